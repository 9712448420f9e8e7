"""The native 8-bit kernel (optax_adadelta/native/kernel_8bit.cc) against XLA's lowering.

XLA's lowering of the same update (`implementation="jax"`) is itself checked against a
float64 NumPy reference in tests/test_low_memory.py. The kernel repeats its operations in
their order, so on the jaxlib versions checked (`BIT_IDENTICAL_ON`) it stores the same
codes, scales and steps, bit for bit; on any jaxlib its codes are at most one apart and its
floats within 1 ulp of one step of XLA's from the same state. Tests skip without the
kernel (no C++ compiler) except in CI, and run on the host's CPU device.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_adadelta
from optax_adadelta import native
from optax_adadelta.native import build
from tests.helpers import ulps
from tests.sharding_checks import needs_eight_devices

if os.environ.get("OPTAX_ADADELTA_REQUIRE_NATIVE") != "1" and native.unavailable_reason():
  pytest.skip(f"native kernel: {native.unavailable_reason()}", allow_module_level=True)

BIT_IDENTICAL_ON = {"0.10.2", "0.8.2"}  # jaxlib versions checked to give the kernel's bits
TARGET = build.TARGET_8BIT
SHAPES = {  # blocks of 256, of 96 (a last axis of 96), of 250, several chunks, a full leaf
  "w256": (64, 768),
  "w96": (100, 96),
  "w250": (2, 3000),
  "big": (300_032,),
  "deep": (3, 5, 512),
  "small": (10,),
}


@pytest.fixture(autouse=True)
def _on_the_cpu():
  with jax.default_device(jax.devices("cpu")[0]):
    yield


def _grads(rng, dtype, zero_rows=True):
  """Magnitudes over ten decades, some exact zeros, a whole zero block in each leaf."""
  tree = {}
  for name, shape in SHAPES.items():
    scale = 10.0 ** rng.uniform(-7, 3, size=shape)
    g = rng.standard_normal(shape) * scale * (rng.random(shape) < 0.9)
    if zero_rows and len(shape) > 1:
      g[(0,) * (len(shape) - 1)] = 0.0  # the first row: zero blocks
    tree[name] = jnp.asarray(g, dtype)
  return tree


def _f32_ulps(x, y) -> float:
  """The worst distance in float32 ulps (bfloat16 values too: a bfloat16 step that differs
  at all is far more than 1 float32 ulp off)."""
  return float(ulps(np.asarray(x, np.float32), np.asarray(y, np.float32)).max(initial=0.0))


def _assert_close(got, want, bits: bool):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    x, y = np.asarray(x), np.asarray(y)
    if bits:
      np.testing.assert_array_equal(x, y)
    elif x.dtype == np.uint8:
      assert np.abs(x.astype(int) - y.astype(int)).max(initial=0) <= 1
    elif np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16:
      assert _f32_ulps(x, y) <= 1, f"{_f32_ulps(x, y)} ulp apart"
    else:
      np.testing.assert_array_equal(x, y)


def _txs(**keywords):
  return {
    i: optax_adadelta.scale_by_adadelta(state_bits=8, implementation=i, **keywords)
    for i in ("native", "jax")
  }


def _kernel_calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().as_text().count(f'"{TARGET}"')


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
@pytest.mark.parametrize(
  "hyper",
  [  # the paper's values in the default run, the other three in the slow tier
    pytest.param({}, id="paper"),
    pytest.param({"rho": 0.9, "eps": 1e-8}, id="rho0.9-eps1e-8", marks=pytest.mark.slow),
    pytest.param({"rho": 0.0, "eps": 1e-2}, id="rho0-eps1e-2", marks=pytest.mark.slow),
    pytest.param({"rho": 1.0}, id="rho1", marks=pytest.mark.slow),
  ],
)
def test_each_step_stores_the_codes_xla_stores(dtype, stochastic, hyper):
  """Six steps; each from the kernel's own state, by the kernel and by XLA."""
  bits = jaxlib.__version__ in BIT_IDENTICAL_ON
  rng = np.random.default_rng(0)
  txs = _txs(stochastic_rounding=stochastic, **hyper)
  native, xla = (jax.jit(txs[i].update) for i in ("native", "jax"))
  params = jax.tree.map(jnp.zeros_like, _grads(rng, dtype))
  state = txs["native"].init(params)
  assert _kernel_calls(txs["native"].update, params, state) == 1
  assert _kernel_calls(txs["jax"].update, params, state) == 0
  grads = [_grads(rng, dtype) for _ in range(5)] + [jax.tree.map(jnp.zeros_like, params)]
  for t, g in enumerate(grads):
    got = native(g, state)
    _assert_close(got, xla(g, state), bits)
    state = got[1]
    average = state.e_g2["w256"]
    if t == 4 and hyper.get("rho") != 1.0:  # ρ = 1 keeps the zero state
      assert len(np.unique(average.codes)) > 100  # the codes are used
    assert not np.asarray(average.scale[0]).any()  # zero blocks stay exactly zero


def test_non_finite_gradients_give_xlas_state():
  """NaN and ±inf in a block: the same steps and codes, the block's scale NaN or inf."""
  g = np.random.default_rng(1).standard_normal((4, 1024)).astype(np.float32)
  g[0, 3], g[1, 300], g[2, 600] = np.nan, np.inf, -np.inf
  txs = _txs()
  params = {"w": jnp.zeros((4, 1024))}
  state = txs["native"].init(params)
  for step in range(2):
    got = jax.jit(txs["native"].update)({"w": jnp.asarray(g)}, state)
    _assert_close(got, jax.jit(txs["jax"].update)({"w": jnp.asarray(g)}, state), bits=False)
    state = got[1]
    if step == 0:
      scale = np.asarray(state.e_g2["w"].scale)
      assert np.isnan(scale[0, 0]) and np.isposinf(scale[1, 1]) and np.isposinf(scale[2, 2])
      assert np.isfinite(np.delete(scale.ravel(), [0, 5, 10])).all()  # the other blocks


@pytest.mark.slow
def test_leaves_are_updated_256_per_call_and_other_rules_use_xla():
  params = {f"w{i:03}": jnp.zeros((8, 512)) for i in range(257)}
  tx = optax_adadelta.scale_by_adadelta(state_bits=8)
  assert _kernel_calls(tx.update, params, tx.init(params)) == 2
  params = {f"w{i}": jnp.zeros((8, 512)) for i in range(3)}
  for keywords in ({"update_rule": "pytorch"}, {"implementation": "jax"}):
    tx = optax_adadelta.scale_by_adadelta(state_bits=8, **keywords)
    assert _kernel_calls(tx.update, params, tx.init(params)) == 0

  def traced(rho):
    tx = optax_adadelta.scale_by_adadelta(rho=rho, state_bits=8)
    return tx.update(params, tx.init(params))

  assert _kernel_calls(traced, 0.9) == 0


@pytest.mark.parametrize("shared_state", [False, True], ids=["vmapped_state", "shared_state"])
def test_under_vmap_the_kernel_gives_xlas_vmapped_update(shared_state):
  """Batched: one key per problem (a vmapped counter), or one key for all (shared state)."""
  rng = np.random.default_rng(2)
  grads = jnp.asarray(rng.standard_normal((3, 8, 512)), jnp.float32)
  txs = _txs()
  state = txs["native"].init({"w": jnp.zeros((8, 512))})
  if not shared_state:
    state = jax.tree.map(lambda x: jnp.stack([x] * 3), state)
    state = state._replace(count=jnp.array([0, 5, 9], jnp.int32))
  axes = (0, None if shared_state else 0)
  runs = {
    i: jax.jit(jax.vmap(lambda g, s, i=i: txs[i].update({"w": g}, s), in_axes=axes)) for i in txs
  }
  assert _kernel_calls(runs["native"], grads, state) == 1
  got = runs["native"](grads, state)
  _assert_close(got, runs["jax"](grads, state), bits=jaxlib.__version__ in BIT_IDENTICAL_ON)
  codes = np.asarray(got[1].e_g2["w"].codes)
  assert not (codes[0] == codes[1]).all()  # different gradients, different problems


@needs_eight_devices
def test_sharded_steps_use_xla_and_shard_map_shards_the_kernel():
  """A step jitted over a NamedSharding lowers XLA's update (no kernel: it would see only its
  shard's coordinates); inside shard_map every device runs the kernel on its shard. Both
  equal the kernel's one-device step, bit for bit where checked."""
  bits = jaxlib.__version__ in BIT_IDENTICAL_ON
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  sharding = NamedSharding(mesh, P("data", "model"))
  rng = np.random.default_rng(3)
  g = {"w": jnp.asarray(rng.standard_normal((8, 1024)), jnp.float32)}
  txs = _txs()
  state = txs["native"].init({"w": jnp.zeros((8, 1024))})
  want = jax.jit(txs["native"].update)(g, state)
  placed = jax.tree.map(
    lambda x: jax.device_put(x, sharding if x.ndim == 2 else NamedSharding(mesh, P())),
    (g, state),
  )
  assert _kernel_calls(txs["native"].update, *placed) == 0
  _assert_close(jax.jit(txs["native"].update)(*placed), want, bits)

  tx = optax_adadelta.scale_by_adadelta(state_bits=8, stochastic_rounding=False)
  state = jax.device_put(tx.init(placed[0]), jax.tree.map(lambda x: x.sharding, placed[1]))
  specs = jax.tree.map(lambda x: x.sharding.spec, (placed[0], state))
  per_shard = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=specs, out_specs=specs))
  assert _kernel_calls(per_shard, placed[0], state) == 1
  got = per_shard(placed[0], state)  # blocks of 256 lie inside the shards of 512
  _assert_close(got, jax.jit(tx.update)(g, tx.init(g)), bits)


def test_gradients_through_the_update_are_xlas():
  """Differentiating through the step (meta-gradients) takes the pure-JAX derivative."""
  txs = _txs(stochastic_rounding=False)
  state = txs["native"].init({"w": jnp.zeros((4, 1024))})
  g = jnp.asarray(np.random.default_rng(4).standard_normal((4, 1024)), jnp.float32)

  def loss(g, implementation):
    step, _ = txs[implementation].update({"w": g}, state)
    return jnp.sum(step["w"] ** 2)

  got = jax.jit(jax.grad(functools.partial(loss, implementation="native")))(g)
  want = jax.jit(jax.grad(functools.partial(loss, implementation="jax")))(g)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
def test_a_small_gradient_under_the_block_floor_keeps_xlas_codes_and_a_bounded_step(stochastic):
  """#22 item 2 through the kernel: |g| = 10 in a block but 2e-3 and 1e-4, whose E[g²] lie
  under the block's floor S·2⁻²⁴ and are coded 1, never 0. 1,000 steps in one scan, by the
  kernel and by XLA: the same state; the small coordinates' |Δx| stays within 1.5× of
  float64's (0.002 and 1e-4; rounded to nearest, E[Δx²] runs 1.3× long), where it reached
  4.7e6 by step 2,000 when E[g²] could read 0."""
  magnitudes = np.full((2, 256), 10.0, np.float32)
  magnitudes[:, 7], magnitudes[:, 100] = 2e-3, 1e-4
  signs = np.where(np.random.default_rng(0).random((1000, 2, 256)) < 0.5, -1.0, 1.0)
  grads = jnp.asarray(signs * magnitudes, jnp.float32)
  txs = _txs(stochastic_rounding=stochastic, min_8bit_size=0)
  out = {}
  for name, tx in txs.items():
    run = lambda state, gs, tx=tx: jax.lax.scan(lambda s, g: tx.update(g, s)[::-1], state, gs)
    out[name] = jax.jit(run)(tx.init(jnp.zeros((2, 256))), grads)
  _assert_close(out["native"], out["jax"], jaxlib.__version__ in BIT_IDENTICAL_ON)
  steps = np.abs(np.asarray(out["native"][1]))
  assert steps[:, :, 7].max() <= 1.5 * 0.002 and steps[:, :, 100].max() <= 1.5 * 1e-4
  assert np.asarray(out["native"][0].e_g2.codes)[:, [7, 100]].min() == 1


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 256)])
def test_zero_size_leaves_beside_8_bit_leaves_in_one_kernel_call(shape):
  """#22 item 8: an empty leaf keeps an empty full-precision state; the others use the kernel."""
  tx = optax_adadelta.scale_by_adadelta(state_bits=8, min_8bit_size=0, implementation="native")
  params = {"empty": jnp.zeros(shape), "w": jnp.zeros((2, 256))}
  state = tx.init(params)
  grads = {"empty": jnp.zeros(shape), "w": jnp.ones((2, 256))}
  assert _kernel_calls(tx.update, grads, state) == 1
  updates, _ = jax.jit(tx.update)(grads, state)
  assert updates["empty"].shape == shape
  np.testing.assert_allclose(updates["w"], np.sqrt(1e-6 / (0.05 + 1e-6)), rtol=1e-6)
