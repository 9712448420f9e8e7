"""The transform equals the float64 NumPy transcription of Algorithm 1 (tests/reference.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optax_adadelta
from tests import reference

NUM_STEPS = 12

_leaf_specs = st.one_of(
  st.just("python float"),
  hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
tree_specs = st.recursive(
  _leaf_specs,
  lambda children: st.one_of(
    st.lists(children, max_size=3),
    st.lists(children, max_size=3).map(tuple),
    st.dictionaries(st.sampled_from(["w", "b", "scale", "emb"]), children, max_size=3),
  ),
  max_leaves=6,
)
rhos = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 1.0]), st.floats(0.0, 1.0))
epsilons = st.floats(-9.0, -1.0).map(lambda e: 10.0**e)
learning_rates = st.sampled_from([1.0, 0.5, 0.1, 1e-3])
scales = st.sampled_from([1e-3, 1.0, 1e3])


def _is_spec_leaf(x) -> bool:
  return x == "python float" or (isinstance(x, tuple) and all(isinstance(n, int) for n in x))


def build_tree(spec, rng: np.random.Generator, dtype, scale: float = 1.0):
  """A pytree shaped by `spec`, filled with normal draws times `scale`."""

  def leaf(s):
    if s == "python float":
      return float(rng.normal() * scale)
    values = rng.normal(size=s) * scale
    if np.issubdtype(dtype, np.complexfloating):
      values = values + 1j * rng.normal(size=s) * scale
    return jnp.asarray(values, dtype)

  return jax.tree.map(leaf, spec, is_leaf=_is_spec_leaf)


def run_ours(tx, params, grads_per_step):
  state = tx.init(params)
  steps = []
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    steps.append(jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
  return params, state, steps


def assert_matches_reference(ours, ref: reference.ReferenceRun, rtol: float) -> None:
  _, state, steps = ours
  for t, (got_step, want_step) in enumerate(zip(steps, ref.steps, strict=True)):
    for got, want in zip(got_step, want_step, strict=True):
      np.testing.assert_allclose(reference.as_real(got), want, rtol=rtol, err_msg=f"step {t}")
  for name, want in [("e_g2", ref.e_g2), ("e_dx2", ref.e_dx2)]:
    got = jax.tree.leaves(optax.tree.get(state, name))
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(reference.as_real(g), w, rtol=rtol, err_msg=name)


@given(tree_specs, st.integers(0, 2**31), rhos, epsilons, learning_rates, scales)
def test_float32_trees_follow_the_float64_reference(spec, seed, rho, eps, learning_rate, scale):
  rng = np.random.default_rng(seed)
  params = build_tree(spec, rng, np.float32)
  grads = [build_tree(spec, rng, np.float32, scale) for _ in range(NUM_STEPS)]
  tx = optax_adadelta.adadelta(learning_rate, rho, eps)
  ref = reference.run(
    jax.tree.leaves(params),
    [jax.tree.leaves(g) for g in grads],
    learning_rate=learning_rate,
    rho=rho,
    eps=eps,
  )
  assert_matches_reference(run_ours(tx, params, grads), ref, rtol=2e-5)


@given(tree_specs, st.integers(0, 2**31), rhos, epsilons, scales)
def test_float64_trees_match_the_reference_to_1e12(spec, seed, rho, eps, scale):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    params = build_tree(spec, rng, np.float64)
    grads = [build_tree(spec, rng, np.float64, scale) for _ in range(NUM_STEPS)]
    tx = optax_adadelta.adadelta(rho=rho, eps=eps)
    ours = run_ours(tx, params, grads)
    for leaf in jax.tree.leaves(ours[1]):
      assert leaf.dtype == jnp.float64
  ref = reference.run(
    jax.tree.leaves(params), [jax.tree.leaves(g) for g in grads], rho=rho, eps=eps
  )
  assert_matches_reference(ours, ref, rtol=1e-12)


@given(st.integers(0, 2**31), rhos, epsilons, scales)
def test_complex_parts_are_independent_coordinates(seed, rho, eps, scale):
  rng = np.random.default_rng(seed)
  spec = {"w": (3, 2), "b": ()}
  params = build_tree(spec, rng, np.complex64)
  grads = [build_tree(spec, rng, np.complex64, scale) for _ in range(NUM_STEPS)]
  ours = run_ours(optax_adadelta.adadelta(rho=rho, eps=eps), params, grads)
  ref = reference.run(
    jax.tree.leaves(params), [jax.tree.leaves(g) for g in grads], rho=rho, eps=eps
  )
  assert_matches_reference(ours, ref, rtol=2e-5)
  assert jax.tree.leaves(ours[1])[0].dtype == jnp.complex64


def test_complex_gradient_is_not_squared_as_a_complex_number():
  # g = 1 + 1j: as a complex number g² = 2j, whose real part is 0; per coordinate it is (1, 1).
  tx = optax_adadelta.scale_by_adadelta(rho=0.5, eps=1e-6)
  state = tx.init(jnp.zeros(1, jnp.complex64))
  _, state = tx.update(jnp.array([1 + 1j], jnp.complex64), state)
  np.testing.assert_allclose(state.e_g2, [0.5 + 0.5j], rtol=1e-7)


@pytest.fixture
def x64():
  """float64 for tests where the parameters feed back into the step (weight decay).

  g + λx cancels when g ≈ −λx, which turns float32's rounding of x into a large relative
  error in the step; in float64 the comparison stays tight.
  """
  with jax.enable_x64(True):
    yield


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_weight_decay_and_maximize_follow_the_reference(decoupled, maximize):
  rng = np.random.default_rng(7)
  spec = {"w": (4, 3), "b": (3,), "norm": (3,)}
  params = build_tree(spec, rng, np.float64)
  grads = [build_tree(spec, rng, np.float64, 0.1) for _ in range(30)]
  mask = {"w": True, "b": False, "norm": False}
  tx = optax_adadelta.adadelta(
    learning_rate=0.5,
    weight_decay=0.1,
    weight_decay_mask=mask,
    decoupled_weight_decay=decoupled,
    maximize=maximize,
  )
  ref = reference.run(
    jax.tree.leaves(params),
    [jax.tree.leaves(g) for g in grads],
    learning_rate=0.5,
    weight_decay=0.1,
    decay_mask=jax.tree.leaves(mask),
    decoupled=decoupled,
    maximize=maximize,
  )
  assert_matches_reference(run_ours(tx, params, grads), ref, rtol=1e-9)


def test_coupled_and_decoupled_decay_take_different_paths():
  # Guards the test above against a flag that does nothing.
  params = {"w": jnp.ones(3)}
  grads = [{"w": jnp.full(3, 0.01)}] * 5

  def final(decoupled):
    tx = optax_adadelta.adadelta(weight_decay=0.5, decoupled_weight_decay=decoupled)
    return run_ours(tx, params, grads)[0]["w"]

  assert not np.allclose(final(False), final(True), rtol=1e-3)


@pytest.mark.usefixtures("x64")
def test_schedules_for_learning_rate_and_weight_decay_follow_the_reference():
  rng = np.random.default_rng(3)
  spec = {"w": (5,), "b": ()}
  params = build_tree(spec, rng, np.float64)
  grads = [build_tree(spec, rng, np.float64) for _ in range(20)]
  lr = optax.linear_schedule(1.0, 0.1, transition_steps=20)
  wd = optax.exponential_decay(0.1, transition_steps=5, decay_rate=0.5)
  for decoupled in (False, True):
    tx = optax_adadelta.adadelta(lr, weight_decay=wd, decoupled_weight_decay=decoupled)
    ref = reference.run(
      jax.tree.leaves(params),
      [jax.tree.leaves(g) for g in grads],
      # optax evaluates schedules at an int32 count: do the same.
      learning_rate=lambda t: float(lr(jnp.int32(t))),
      weight_decay=lambda t: float(wd(jnp.int32(t))),
      decoupled=decoupled,
    )
    assert_matches_reference(run_ours(tx, params, grads), ref, rtol=1e-9)


# Gradients whose single root √((E[Δx²]+ε)/(E[g²]+ε)) underflowed to 0 in float32 (from about
# 1e17 at ρ = 0.95), and ordinary and tiny ones. Each is one leaf's constant gradient, 4 steps.
LARGE_FINITE = [1e17, -1e18, 1e19, 1.8e19]
ORDINARY = [1e-30, -1e-20, 1e-3, -1.0, 1e3, 1e10]
# g² overflows float32 here: E[g²] is +inf and the step 0 (PyTorch's and Keras's too).
OVERFLOWING = [1.9e19, -3e19, 1e30]
IMPLEMENTATIONS = ["jax", "native"]


def _four_steps(g: float, implementation: str):
  if implementation == "native" and not optax_adadelta.native_available():
    pytest.skip("the native kernel is not available here")
  tx = optax_adadelta.adadelta(rho=0.95, eps=1e-6, implementation=implementation)
  params = jnp.zeros(8, jnp.float32)
  return run_ours(tx, params, [jnp.full(8, g, jnp.float32)] * 4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("g", LARGE_FINITE + ORDINARY)
def test_large_and_small_finite_gradients_take_the_reference_step(g, implementation):
  _, state, steps = _four_steps(g, implementation)
  g32 = float(np.float32(g))
  want = reference.run([np.zeros(8)], [[np.full(8, g32)]] * 4, rho=0.95, eps=1e-6)
  for t in range(4):
    np.testing.assert_allclose(steps[t][0], want.steps[t][0], rtol=1e-5, err_msg=f"step {t}")
  for name, average in [("e_g2", want.e_g2[0]), ("e_dx2", want.e_dx2[0])]:
    got = optax.tree.get(state, name)  # float32 holds g² of g = 1e-30 as 0: hence atol
    np.testing.assert_allclose(got, average, rtol=1e-5, atol=1e-37, err_msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("g", LARGE_FINITE + ORDINARY)
def test_large_and_small_finite_gradients_take_torchs_step(g, implementation):
  torch = pytest.importorskip("torch")
  param = torch.zeros(8, dtype=torch.float32, requires_grad=True)
  optimizer = torch.optim.Adadelta([param], lr=1.0, rho=0.95, eps=1e-6)
  _, _, steps = _four_steps(g, implementation)
  for t in range(4):
    before = param.detach().clone()
    param.grad = torch.full((8,), g, dtype=torch.float32)
    optimizer.step()
    torch_step = (param.detach() - before).numpy()
    np.testing.assert_allclose(np.asarray(steps[t][0]), torch_step, rtol=1e-5, err_msg=f"{t}")


def _squares_must_be_finite() -> optax.GradientTransformation:
  """docs/precision.md's guard: a gradient whose square overflows counts as non-finite."""
  return optax.stateless(
    lambda g, params=None: jax.tree.map(lambda x: jnp.where(jnp.isfinite(x * x), x, jnp.inf), g)
  )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("g", OVERFLOWING)
def test_an_overflowing_square_gives_a_zero_step_that_the_guides_guard_skips(g, implementation):
  """float32 cannot hold E[g²] here: the step is 0 and the coordinate would stay frozen.
  apply_if_finite checks the gradients it is given, which are finite; the guide's guard in
  front of it turns them into inf, so the step is skipped and the state stays finite."""
  _, state, steps = _four_steps(g, implementation)
  np.testing.assert_array_equal(steps[0][0], 0.0)
  assert np.isinf(np.asarray(optax.tree.get(state, "e_g2"))).all()
  inner = optax_adadelta.adadelta(rho=0.95, eps=1e-6, implementation=implementation)
  tx = optax.chain(_squares_must_be_finite(), optax.apply_if_finite(inner, 5))
  params = jnp.zeros(8, jnp.float32)
  state = tx.init(params)
  for grads in [jnp.ones(8), jnp.full(8, g, jnp.float32), jnp.ones(8)]:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  want = reference.run([np.zeros(8)], [[np.ones(8)]] * 2, rho=0.95, eps=1e-6)
  np.testing.assert_allclose(np.asarray(params), want.params[0], rtol=1e-6)
  assert int(state[1].total_notfinite) == 1
