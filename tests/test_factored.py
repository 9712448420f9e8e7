"""The factored state (#26) against a float64 NumPy transcription and optax.adafactor's rule.

The references are independent of the package: tests/reference.py's `factored_step` (the
estimator written from its definition, float64), its `step` (Algorithm 1), and optax's own
adafactor for which axes of a leaf are factored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta
from tests import reference

RHO_EPS = [(0.95, 1e-6), (0.9, 1e-2), (0.99, 1e-8)]


VARIANTS = {  # which averages are factored: (E[g²], E[Δx²])
  "both": (True, True),
  "e_g2_only": (True, False),
  "e_dx2_only": (False, True),
}


def _tx(rho, eps, variant="both", min_dim=128):
  factor_e_g2, factor_e_dx2 = VARIANTS[variant]
  return optax_adadelta.scale_by_adadelta_factored(
    rho,
    eps,
    min_dim_size_to_factor=min_dim,
    factor_e_g2=factor_e_g2,
    factor_e_dx2=factor_e_dx2,
  )


def _spread_gradients(rng, shape, num_steps, decades=4.0):
  """Gradients far from rank-1: row scales, column scales and a per-entry scale, each over
  `decades`, times fresh normal noise every step."""
  n, m = shape
  log_scale = lambda size: rng.uniform(-decades / 2, decades / 2, size)
  scale = 10.0 ** (log_scale((n, 1)) + log_scale((1, m)) + log_scale((n, m)))
  for _ in range(num_steps):
    yield (scale * rng.standard_normal(shape)).astype(np.float32)


def _compare_with_transcription(shape, rho, eps, variant, gradients, rtol):
  n, m = shape
  tx = _tx(rho, eps, variant)
  state = tx.init(jnp.zeros(shape))
  update = jax.jit(tx.update)
  g2, dx2 = reference.factored_zeros(n, m, *VARIANTS[variant])
  worst = 0.0
  for g in gradients:
    step, state = update(jnp.asarray(g), state)
    want, g2, dx2 = reference.factored_step(g.astype(np.float64), g2, dx2, rho, eps)
    error = np.abs(np.asarray(step, np.float64) - want) / (np.abs(want) + 1e-30)
    worst = max(worst, float(np.max(error)))
  assert worst < rtol, f"largest relative error of a step {worst:.3g}"
  for ours, want in ((state.e_g2, g2), (state.e_dx2, dx2)):
    assert isinstance(ours, optax_adadelta.FactoredAverage) == isinstance(want, tuple)
    for a, b in zip(tuple(ours), want, strict=True) if isinstance(want, tuple) else [(ours, want)]:
      np.testing.assert_allclose(a, b, rtol=rtol)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("rho", "eps"), RHO_EPS)
def test_every_step_is_the_float64_transcriptions(rho, eps, variant):
  """200 steps of gradients spread over 3 decades per entry (the factored E[g²]'s steps
  then grow, see the drift test, but not yet beyond float32's range)."""
  rng = np.random.default_rng(0)
  shape = (160, 130)
  gradients = _spread_gradients(rng, shape, 200, decades=1.0)
  _compare_with_transcription(shape, rho, eps, variant, gradients, rtol=2e-4)


def test_a_long_run_with_regime_changes_stays_on_the_transcription():
  """3,000 steps; every 1,000 a quarter of the rows grows 10⁴× and a column band shrinks
  10⁻³×: float32's errors must not build up in the row and column means. (The gradients
  are rank-1 but for the noise: spread per entry would make the steps grow, see below.)"""
  rng = np.random.default_rng(1)
  shape = (128, 144)

  def gradients():
    base = _spread_gradients(rng, shape, 3000, decades=0.0)
    for t, g in enumerate(base):
      phase = t // 1000
      g = g.copy()
      g[phase * 32 : phase * 32 + 32] *= 1e4
      g[:, 10 * phase : 10 * phase + 20] *= 1e-3
      yield g

  _compare_with_transcription(shape, 0.95, 1e-6, "both", gradients(), rtol=5e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("constant_along", ["rows", "columns"])
def test_where_the_averages_are_rank_one_every_step_is_algorithm_1(constant_along, variant):
  """Gradients constant along a row (or a column), with a scale per line over 6 decades and a
  random factor per step: both averages are then rank-1 at every step, the estimate is exact,
  and the factored state takes Algorithm 1's steps."""
  rng = np.random.default_rng(2)
  n, m = 150, 140
  scale = 10.0 ** rng.uniform(-3, 3, (n, 1) if constant_along == "rows" else (1, m))
  tx = _tx(0.95, 1e-6, variant)
  state = tx.init(jnp.zeros((n, m)))
  update = jax.jit(tx.update)
  e_g2 = e_dx2 = np.zeros((n, m))
  for _ in range(300):
    g = (np.broadcast_to(scale, (n, m)) * rng.standard_normal()).astype(np.float32)
    step, state = update(jnp.asarray(g), state)
    want, e_g2, e_dx2 = reference.step(g.astype(np.float64), e_g2, e_dx2, 0.95, 1e-6)
    np.testing.assert_allclose(np.asarray(step), want, rtol=1e-4, atol=0)


def test_the_comparison_sees_a_wrong_estimator():
  """The transcription is not vacuous: Algorithm 1's full averages differ from the factored
  steps by far more than the tolerance on gradients that are not rank-1."""
  rng = np.random.default_rng(0)
  n, m = 160, 130
  g2, dx2 = reference.factored_zeros(n, m)
  e_g2 = e_dx2 = np.zeros((n, m))
  worst = 0.0
  for g in _spread_gradients(rng, (n, m), 50):
    g = g.astype(np.float64)
    factored, g2, dx2 = reference.factored_step(g, g2, dx2, 0.95, 1e-6)
    full, e_g2, e_dx2 = reference.step(g, e_g2, e_dx2, 0.95, 1e-6)
    worst = max(worst, float(np.max(np.abs(factored - full) / np.abs(full))))
  assert worst > 0.1


SHAPES = [
  (130, 140),
  (140, 130),
  (128, 128),
  (127, 300),
  (300, 127),
  (3, 200, 150),
  (200, 3, 150),
  (150, 2, 200, 5),
  (64, 64),
  (5,),
  (),
]


@pytest.mark.parametrize("min_dim", [128, 64, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_which_axes_are_factored_is_optax_adafactors_rule(shape, min_dim):
  """optax.adafactor is the reference: a leaf it factors has row and column means of the
  same shapes here; a leaf it keeps whole is kept whole here."""
  params = {"p": jnp.zeros(shape)}
  theirs = optax.adafactor(1.0, min_dim_size_to_factor=min_dim).init(params)
  factored_state = next(s for s in theirs if hasattr(s, "v_row"))
  v_row, v_col, v = (x["p"] for x in (factored_state.v_row, factored_state.v_col, factored_state.v))
  ours = _tx(0.95, 1e-6, min_dim=min_dim).init(params).e_g2["p"]
  if v.shape == (1,):  # optax keeps v_row and v_col for a factored leaf, v otherwise
    assert isinstance(ours, optax_adadelta.FactoredAverage)
    assert {ours.rows.shape, ours.cols.shape} == {v_row.shape, v_col.shape}
    assert ours.rows.size + ours.cols.size == v_row.size + v_col.size
  else:
    assert not isinstance(ours, optax_adadelta.FactoredAverage)
    assert ours.shape == shape


def test_factored_axes_in_the_middle_of_a_batch_of_matrices():
  """(200, 3, 150) factors axes 0 and 2; each of the 3 middle slices is its own matrix."""
  rng = np.random.default_rng(3)
  shape = (200, 3, 150)
  tx = _tx(0.9, 1e-6)
  state = tx.init(jnp.zeros(shape))
  update = jax.jit(tx.update)
  refs = [reference.factored_zeros(200, 150) for _ in range(3)]
  for _ in range(20):
    g = rng.standard_normal(shape).astype(np.float32) * np.arange(1, 201)[:, None, None]
    step, state = update(jnp.asarray(g), state)
    for k in range(3):
      want, *refs[k] = reference.factored_step(g[:, k].astype(np.float64), *refs[k], 0.9, 1e-6)
      np.testing.assert_allclose(np.asarray(step)[:, k], want, rtol=2e-5)
  assert state.e_g2.rows.shape == (200, 3) and state.e_g2.cols.shape == (3, 150)


def test_unfactored_leaves_take_the_full_states_steps_bit_for_bit():
  params = {
    "bias": jnp.zeros(300),
    "thin": jnp.zeros((4, 300)),
    "complex": jnp.zeros((130, 130), jnp.complex64),
    "scalar": jnp.zeros(()),
  }
  rng = np.random.default_rng(4)
  full = optax_adadelta.scale_by_adadelta(0.9, 1e-6, implementation="jax")
  fact = optax_adadelta.scale_by_adadelta(0.9, 1e-6, factored=True)
  s_full, s_fact = full.init(params), fact.init(params)
  assert not any(isinstance(x, optax_adadelta.FactoredAverage) for x in s_fact.e_g2.values())
  for _ in range(10):
    g = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(p.dtype) * 3, params)
    g["complex"] = g["complex"] * (1 + 2j)
    a, s_full = jax.jit(full.update)(g, s_full)
    b, s_fact = jax.jit(fact.update)(g, s_fact)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_state_bytes_are_eight_per_row_and_column_per_average():
  params = {"w": jnp.zeros((1024, 4096)), "b": jnp.zeros(4096)}
  state = jax.eval_shape(optax_adadelta.scale_by_adadelta(factored=True).init, params)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert nbytes == 2 * 4 * (1024 + 4096) + 2 * 4 * 4096 + 4  # two averages, the counter
  for variant in ("e_g2_only", "e_dx2_only"):
    hybrid = jax.eval_shape(_tx(0.95, 1e-6, variant).init, params)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(hybrid))
    assert nbytes == 4 * (1024 + 4096) + 4 * 1024 * 4096 + 2 * 4 * 4096 + 4


def test_no_step_exceeds_algorithm_1s_bound_however_wrong_the_estimate():
  """One entry 10⁶× its row and column: E[g²]ₜ ≥ (1 − ρ)gₜ² still holds for it, so
  |Δx| ≤ √((Ê[Δx²] + ε)/(1 − ρ)); zero gradients give zero steps, not NaN."""
  rho, eps = 0.9, 1e-6
  tx = _tx(rho, eps)
  state = tx.init(jnp.zeros((200, 200)))
  update = jax.jit(tx.update)
  rng = np.random.default_rng(5)
  for t in range(100):
    g = rng.standard_normal((200, 200)).astype(np.float32) * 1e-3
    g[7, 9] = 1e3 * (1 if t % 2 else -1)
    before = reference.rank_one(
      np.asarray(state.e_dx2.rows, np.float64), np.asarray(state.e_dx2.cols, np.float64)
    )
    step, state = update(jnp.asarray(g), state)
    bound = np.sqrt((before + eps) / (1 - rho))
    assert np.all(np.abs(np.asarray(step)) <= bound * (1 + 1e-5))
  zero_step, state = update(jnp.zeros((200, 200)), tx.init(jnp.zeros((200, 200))))
  assert np.all(np.asarray(zero_step) == 0)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_apply_if_finite_keeps_a_nan_out_of_the_row_and_column_means():
  """A NaN entry would poison a whole row and column (and, through the grand mean, the
  matrix): optax.apply_if_finite skips the batch and keeps the state."""
  tx = optax.apply_if_finite(optax_adadelta.adadelta(factored=True), 3)
  params = jnp.zeros((150, 150))
  state = tx.init(params)
  g = jnp.ones((150, 150))
  _, state = tx.update(g, state, params)
  kept = state.inner_state
  _, state = tx.update(g.at[3, 4].set(jnp.nan), state, params)
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, kept)


@pytest.mark.parametrize(
  ("keywords", "match"),
  [
    ({"packed_state": True}, r"factored=True cannot be combined with packed_state=True"),
    ({"state_bits": 8}, r"factored=True cannot be combined with state_bits=8"),
    (
      {"stochastic_rounding": True, "accumulator_dtype": jnp.bfloat16},
      r"factored=True cannot be combined with stochastic_rounding=True",
    ),
    ({"implementation": "native"}, r"implementation='native' cannot be combined with factored"),
  ],
)
def test_combinations_it_cannot_take_are_refused_by_name(keywords, match):
  with pytest.raises(ValueError, match=match):
    optax_adadelta.adadelta(factored=True, **keywords)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "128", jnp.asarray(128)])
def test_a_bad_min_dim_size_to_factor_is_named(bad):
  with pytest.raises(ValueError, match=r"min_dim_size_to_factor must be an int >= 1.*got"):
    optax_adadelta.adadelta(factored=True, min_dim_size_to_factor=bad)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_factored_must_be_a_flag(bad):
  with pytest.raises(TypeError, match=r"factored must be True or False"):
    optax_adadelta.adadelta(factored=bad)
  for name in ("factor_e_g2", "factor_e_dx2"):
    with pytest.raises(TypeError, match=rf"{name} must be True or False"):
      optax_adadelta.scale_by_adadelta_factored(**{name: bad})


def test_factoring_nothing_is_refused():
  with pytest.raises(ValueError, match=r"factor_e_g2 and factor_e_dx2 are both False"):
    optax_adadelta.scale_by_adadelta_factored(factor_e_g2=False, factor_e_dx2=False)


def test_a_gradient_of_another_shape_is_named():
  tx = optax_adadelta.adadelta(factored=True)
  state = tx.init({"w": jnp.zeros((200, 300))})
  with pytest.raises(ValueError, match=r"gradient at \['w'\] has shape \(300, 200\).*row means"):
    tx.update({"w": jnp.zeros((300, 200))}, state)


def test_inject_hyperparams_takes_min_dim_size_to_factor_as_static():
  tx = optax.inject_hyperparams(optax_adadelta.adadelta, static_args=("min_dim_size_to_factor",))(
    learning_rate=1.0, factored=True, min_dim_size_to_factor=64
  )
  state = tx.init(jnp.zeros((64, 100)))
  assert isinstance(optax.tree.get(state, "e_g2"), optax_adadelta.FactoredAverage)


def _step_scale_after(variant, num_steps, decades):
  """RMS of the last step on gradients whose per-entry spread is not rank-1 and which do not
  respond to the steps; variant None is the full state (Algorithm 1)."""
  rng = np.random.default_rng(6)
  shape = (144, 128)
  tx = optax_adadelta.scale_by_adadelta(0.95, 1e-6) if variant is None else _tx(0.95, 1e-6, variant)
  state = tx.init(jnp.zeros(shape))

  @jax.jit
  def run(state, gradients):
    def one(state, g):
      step, state = tx.update(g, state)
      return state, jnp.sqrt(jnp.mean(step * step))

    return jax.lax.scan(one, state, gradients)[1]

  gradients = jnp.asarray(np.stack(list(_spread_gradients(rng, shape, num_steps, decades))))
  return float(run(state, gradients)[-1])


def test_a_factored_e_g2_makes_the_steps_drift_and_a_factored_e_dx2_alone_does_not():
  """The docstring's 'what it gives up', measured: under 400 steps of gradients spread over
  a decade per entry, Algorithm 1's steps keep their scale; factoring E[Δx²] alone keeps it
  within 1.5×; factoring E[g²] (alone or with E[Δx²]) grows it over 10⁶× (measured 6·10⁶
  and 3·10¹²; at 1.5 decades both overflow float32 by step 400)."""
  full = _step_scale_after(None, 400, 1.0)
  assert 0.5 < _step_scale_after("e_dx2_only", 400, 1.0) / full < 1.5
  for variant in ("both", "e_g2_only"):
    assert _step_scale_after(variant, 400, 1.0) / full > 1e6
