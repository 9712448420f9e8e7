"""The native CPU kernel (optax_adadelta/_kernel.cc) against XLA and the float64 reference.

Bit-identical means: the jitted `tx.update` gives the same bits with implementation="native"
and implementation="jax". (XLA's CPU backend fuses each average into one multiply-add; the
kernel does the same. Eagerly, op by op, XLA rounds without fused multiply-adds, so eager
pure-JAX results may differ from jitted ones by an ulp: that is XLA, not the kernel.)
These tests skip when the kernel was not built, except in CI (OPTAX_ADADELTA_REQUIRE_NATIVE=1).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta
from optax_adadelta import _native
from tests import reference

if _native.unavailable_reason() and os.environ.get("OPTAX_ADADELTA_REQUIRE_NATIVE") != "1":
  pytest.skip(f"native kernel: {_native.unavailable_reason()}", allow_module_level=True)

DTYPES = {  # parameter dtype, accumulator dtype
  "f32": (jnp.float32, None),
  "bf16_f32": (jnp.bfloat16, jnp.float32),
  "bf16": (jnp.bfloat16, None),
}
SHAPES = [(), (0,), (7,), (33, 5), (300_007,)]  # the last: several chunks, Δx over g
TARGET = "optax_adadelta_update"
GROUP_TARGET = "optax_adadelta_update_group"  # many small leaves in one call


def _random_tree(rng, shape, dtype, spread=True):
  scale = 10.0 ** rng.uniform(-4, 2, size=shape) if spread else 1.0
  return {"w": jnp.asarray(rng.normal(size=shape) * scale, dtype)}


def _updates(implementation, params, grads_per_step, dtype_case, **hyper):
  _, accumulator = DTYPES[dtype_case]
  tx = optax_adadelta.adadelta(
    accumulator_dtype=accumulator, implementation=implementation, **hyper
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  results = []
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    results.append((updates, state))
  return results


def _assert_same_bits(got, want):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    as_numpy = np.complex64 if jnp.iscomplexobj(x) else np.float32
    np.testing.assert_array_equal(np.asarray(x, as_numpy), np.asarray(y, as_numpy))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype_case", sorted(DTYPES))
@pytest.mark.parametrize(
  "hyper",
  [{}, {"rho": 0.9, "eps": 1e-8}, {"rho": 0.0, "eps": 1e-2}, {"rho": 1.0, "learning_rate": 0.5}],
  ids=["paper", "rho0.9-eps1e-8", "rho0-eps1e-2", "rho1-lr0.5"],
)
def test_jitted_update_is_bit_identical_to_xla(shape, dtype_case, hyper):
  rng = np.random.default_rng(0)
  dtype = DTYPES[dtype_case][0]
  params = _random_tree(rng, shape, dtype)
  grads = [_random_tree(rng, shape, dtype) for _ in range(4)]
  grads.append(jax.tree.map(jnp.zeros_like, grads[0]))  # a zero gradient after real ones
  native = _updates("native", params, grads, dtype_case, **hyper)
  xla = _updates("jax", params, grads, dtype_case, **hyper)
  _assert_same_bits(native, xla)


def test_non_finite_gradients_propagate_like_xla():
  values = np.array([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e-30, 3.0], np.float32)
  params = {"w": jnp.zeros(7)}
  grads = [{"w": jnp.asarray(values)}, {"w": jnp.ones(7)}]
  native = _updates("native", params, grads, "f32")
  xla = _updates("jax", params, grads, "f32")
  for got, want in zip(jax.tree.leaves(native), jax.tree.leaves(xla), strict=True):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got)[finite], np.asarray(want)[finite])


def test_trajectory_follows_the_float64_reference():
  rng = np.random.default_rng(1)
  params = [rng.normal(size=(50, 40)).astype(np.float32)]
  grads = [[rng.normal(size=(50, 40)).astype(np.float32)] for _ in range(30)]
  want = reference.run(params, grads, rho=0.9, eps=1e-6)
  tx = optax_adadelta.adadelta(rho=0.9, eps=1e-6, implementation="native")
  state = tx.init([jnp.asarray(params[0])])
  x = [jnp.asarray(params[0])]

  @jax.jit
  def step(x, state, g):
    updates, state = tx.update(g, state)
    return optax.apply_updates(x, updates), state

  for g in grads:
    x, state = step(x, state, [jnp.asarray(g[0])])
  np.testing.assert_allclose(x[0], want.params[0], rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(state[0].e_g2[0], want.e_g2[0], rtol=2e-6)
  np.testing.assert_allclose(state[0].e_dx2[0], want.e_dx2[0], rtol=2e-6)


def _compiled_text(tx, params):
  state = tx.init(params)
  return jax.jit(tx.update).lower(params, state, params).compile().as_text()


def _kernel_calls(text):
  return text.count(f'"{TARGET}"'), text.count(f'"{GROUP_TARGET}"')


def test_auto_uses_the_kernel_on_cpu_and_jax_does_not():
  params = {"w": jnp.ones((8, 8)), "b": jnp.ones(8, jnp.bfloat16)}
  assert _kernel_calls(_compiled_text(optax_adadelta.adadelta(), params)) == (0, 1)
  assert _kernel_calls(_compiled_text(optax_adadelta.adadelta(implementation="jax"), params)) == (
    0,
    0,
  )


def _mixed_tree(rng, dtype_case):
  """Small leaves of several shapes (one empty), a large one, a scalar and XLA-only leaves."""
  dtype = DTYPES[dtype_case][0]
  tree = {
    f"small{i}": _random_tree(rng, shape, dtype)["w"]
    for i, shape in enumerate([(7,), (33, 5), (0,), (1,), (4, 3, 2), (40_000,), (70_001,)])
  }
  tree["large"] = _random_tree(rng, (300_007,), dtype)["w"]
  tree["scalar"] = _random_tree(rng, (), dtype)["w"]
  tree["complex"] = jnp.asarray(rng.normal(size=5) + 1j * rng.normal(size=5), jnp.complex64)
  tree["half"] = jnp.asarray(rng.normal(size=6), jnp.float16)
  return tree


def test_small_leaves_share_one_kernel_call_and_large_ones_get_their_own():
  params = _mixed_tree(np.random.default_rng(3), "f32")
  # One call for the seven small leaves; one each for the large leaf and the scalar.
  assert _kernel_calls(_compiled_text(optax_adadelta.adadelta(), params)) == (2, 1)
  one_small = {"w": params["small0"], "large": params["large"]}
  assert _kernel_calls(_compiled_text(optax_adadelta.adadelta(), one_small)) == (2, 0)


@pytest.mark.parametrize("dtype_case", sorted(DTYPES))
def test_tree_of_many_leaves_is_bit_identical_to_xla(dtype_case):
  rng = np.random.default_rng(4)
  params = _mixed_tree(rng, dtype_case)
  grads = [_mixed_tree(rng, dtype_case) for _ in range(4)]
  native = _updates("native", params, grads, dtype_case, rho=0.9, eps=1e-6)
  xla = _updates("jax", params, grads, dtype_case, rho=0.9, eps=1e-6)
  _assert_same_bits(native, xla)


@pytest.mark.parametrize("dtype_case", sorted(DTYPES))
def test_whole_training_step_with_weight_decay_is_bit_identical_without_excess_precision(
  dtype_case,
):
  """In a whole step XLA may fuse optax's g + λ·x into the update and, by default
  (`xla_allow_excess_precision`), skip its bfloat16 rounding; the kernel gets the rounded g.
  With that option off both paths round every bfloat16 array, and the bits agree."""
  rng = np.random.default_rng(5)
  params = _mixed_tree(rng, dtype_case)
  grads = [_mixed_tree(rng, dtype_case) for _ in range(4)]

  def trajectory(implementation):
    tx = optax_adadelta.adadelta(
      0.5,
      weight_decay=1e-3,
      accumulator_dtype=DTYPES[dtype_case][1],
      implementation=implementation,
    )

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    p, state = params, tx.init(params)
    compiled = jax.jit(step).lower(p, state, grads[0])
    compiled = compiled.compile({"xla_allow_excess_precision": False})
    out = []
    for g in grads:
      p, state = compiled(p, state, g)
      out.append((p, state))
    return out

  _assert_same_bits(trajectory("native"), trajectory("jax"))


def test_a_thousand_leaves_in_one_call_follow_the_float64_reference():
  rng = np.random.default_rng(5)
  sizes = rng.integers(1, 300, size=1000)
  params = [rng.normal(size=n).astype(np.float32) for n in sizes]
  grads = [[rng.normal(size=n).astype(np.float32) for n in sizes] for _ in range(3)]
  want = reference.run(params, grads, rho=0.95, eps=1e-6)
  tx = optax_adadelta.adadelta(implementation="native")
  step_fn = jax.jit(lambda x, s, g: (lambda u, s: (optax.apply_updates(x, u), s))(*tx.update(g, s)))
  assert _kernel_calls(step_fn.lower(params, tx.init(params), params).compile().as_text()) == (0, 1)
  x, state = [jnp.asarray(p) for p in params], tx.init(params)
  for g in grads:
    x, state = step_fn(x, state, [jnp.asarray(gi) for gi in g])
  for got, expected in zip(x, want.params, strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
  for got, expected in zip(state[0].e_dx2, want.e_dx2, strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-6)


def test_leaves_the_kernel_does_not_handle_go_through_xla():
  params = {"c": jnp.ones(4, jnp.complex64), "h": jnp.ones(4, jnp.float16), "w": jnp.ones(4)}
  text = _compiled_text(optax_adadelta.adadelta(), params)
  assert text.count(f'"{TARGET}"') == 1  # only the float32 leaf


def test_traced_hyper_parameters_use_xla_and_native_refuses_them():
  params = {"w": jnp.ones(8)}

  def update_with(rho):
    tx = optax_adadelta.adadelta(rho=rho)
    return tx.update(params, tx.init(params))

  text = jax.jit(update_with).lower(0.9).compile().as_text()
  assert TARGET not in text
  with pytest.raises(ValueError, match=r"implementation='native'.*traced"):
    jax.jit(lambda rho: optax_adadelta.adadelta(rho=rho, implementation="native")).lower(0.9)


def test_without_the_kernel_auto_falls_back_and_native_says_why(monkeypatch):
  monkeypatch.setattr(_native, "unavailable_reason", lambda: "not built (test)")
  params = {"w": jnp.ones(8)}
  assert TARGET not in _compiled_text(optax_adadelta.adadelta(), params)
  with pytest.raises(ValueError, match=r"implementation='native' is not possible here: not built"):
    optax_adadelta.adadelta(implementation="native")


def test_unknown_implementation_is_refused_with_the_choices():
  with pytest.raises(
    ValueError, match=r"implementation must be one of 'auto', 'native', 'jax', got 'fast'"
  ):
    optax_adadelta.adadelta(implementation="fast")


@pytest.mark.parametrize("in_axes", [(0, 0), (0, None)], ids=["batched_state", "shared_state"])
def test_vmap_over_a_population_equals_each_member(in_axes):
  rng = np.random.default_rng(2)
  tx = optax_adadelta.adadelta(rho=0.9)
  grads = {
    "w": jnp.asarray(rng.normal(size=(5, 300)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(5, 3, 7)), jnp.float32),
  }
  one_state = tx.init({"w": jnp.zeros(300), "b": jnp.zeros((3, 7))})
  state = one_state
  if in_axes[1] == 0:
    state = jax.tree.map(lambda x: jnp.stack([x + i for i in range(5)]), one_state)
  population = jax.jit(jax.vmap(tx.update, in_axes=in_axes))(grads, state)
  assert GROUP_TARGET in jax.jit(jax.vmap(tx.update, in_axes=in_axes)).lower(grads, state).as_text()
  xla = optax_adadelta.adadelta(rho=0.9, implementation="jax")
  for i in range(5):
    member = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
    member_state = member(state) if in_axes[1] == 0 else one_state
    want = jax.jit(xla.update)(member(grads), member_state)
    _assert_same_bits(member(population), want)


def test_nested_vmap_over_hyper_parameter_grid_and_seeds():
  """vmap over traced ρ uses XLA; vmap over seeds inside stays on the kernel."""
  grads = jnp.linspace(-1, 1, 2 * 3 * 16).reshape(2, 3, 16)

  def run(rho, g):
    tx = optax_adadelta.adadelta(rho=rho)
    return tx.update({"w": g}, tx.init({"w": g}))[0]["w"]

  rhos = [0.9, 0.95]
  got = jax.vmap(lambda rho, g: jax.vmap(lambda gi: run(rho, gi))(g))(jnp.array(rhos), grads)
  want = jnp.stack([jax.vmap(lambda gi, r=r: run(r, gi))(grads[i]) for i, r in enumerate(rhos)])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gradient_through_the_update_equals_xla():
  """Meta-gradients (differentiating the update) use the pure-JAX derivative rules."""
  params = {"w": jnp.linspace(-1.0, 1.0, 64)}

  def loss_after_update(grads, implementation):
    tx = optax_adadelta.adadelta(implementation=implementation)
    state = tx.init(params)
    state = jax.tree.map(lambda x: x + 0.1, state)  # a non-zero E[Δx²]
    updates, _ = tx.update(grads, state)
    return jnp.sum(optax.apply_updates(params, updates)["w"] ** 2)

  grads = {"w": jnp.cos(jnp.arange(64.0))}
  got = jax.jit(jax.grad(loss_after_update), static_argnums=1)(grads, "native")
  want = jax.jit(jax.grad(loss_after_update), static_argnums=1)(grads, "jax")
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)


@pytest.mark.parametrize("gradients", ["computed_in_step", "step_argument"])
def test_donated_step_needs_at_most_one_gradient_sized_temporary(gradients):
  """Δx is written over the gradient buffer, and the averages are updated in place.

  Gradients computed inside the step: their buffer is the only temporary. Gradients passed
  in (not an output, so JAX cannot donate them): XLA copies them once into a temporary.
  optax.adadelta needs two temporaries of that size in both cases.
  """
  n = 1 << 20
  params = {"w": jnp.ones(n)}
  tx = optax_adadelta.adadelta()

  def step(params, state, batch):
    grads = jax.tree.map(jnp.sin, batch) if gradients == "computed_in_step" else batch
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  memory = compiled.memory_analysis()
  assert TARGET in compiled.as_text()
  assert memory.temp_size_in_bytes < 1.01 * 4 * n, memory.temp_size_in_bytes
  assert memory.alias_size_in_bytes == 3 * 4 * n, memory.alias_size_in_bytes
