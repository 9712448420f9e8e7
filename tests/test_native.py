"""The native CPU kernel (optax_adadelta/native/kernel.cc) against XLA and the float64 reference.

The kernel's results must lie within 1 ulp of the jitted pure-JAX update on any jaxlib. On
the jaxlib versions this project has checked (`BIT_IDENTICAL_ON`), where XLA fuses each average
into one multiply-add as the kernel does, they are bit-identical, and that is tested too; a
later XLA that rounds differently fails only the ulp bound, never a build. These tests skip
on machines without the kernel (no C++ compiler), except in CI (OPTAX_ADADELTA_REQUIRE_NATIVE=1),
and run on the host's CPU device where jax's default backend is a GPU or TPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import pytest

import optax_adadelta
from optax_adadelta import native
from optax_adadelta.native import build, primitive
from tests import reference
from tests.helpers import ulps

if os.environ.get("OPTAX_ADADELTA_REQUIRE_NATIVE") != "1" and native.unavailable_reason():
  pytest.skip(f"native kernel: {native.unavailable_reason()}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _on_the_cpu():
  """The kernel is CPU-only: on a GPU/TPU host these tests run on its CPU device."""
  with jax.default_device(jax.devices("cpu")[0]):
    yield


BIT_IDENTICAL_ON = {"0.10.2", "0.8.2"}  # jaxlib versions checked to give the kernel's bits
DTYPES = {  # parameter dtype, accumulator dtype
  "f32": (jnp.float32, None),
  "bf16_f32": (jnp.bfloat16, jnp.float32),
  "bf16": (jnp.bfloat16, None),
}
SHAPES = [(0,), (7,), (33, 5), (300_007,)]  # the last: several chunks, Δx over g
TARGET = "optax_adadelta_update"


def _random_tree(rng, shape, dtype, spread=True):
  scale = 10.0 ** rng.uniform(-4, 2, size=shape) if spread else 1.0
  return {"w": jnp.asarray(rng.normal(size=shape) * scale, dtype)}


def _mixed_tree(rng, dtype_case):
  """Small leaves of several shapes (one empty), a large one, a scalar and XLA-only leaves."""
  dtype = DTYPES[dtype_case][0]
  shapes = [(7,), (33, 5), (0,), (1,), (4, 3, 2), (40_000,), (300_007,), ()]
  tree = {f"leaf{i}": _random_tree(rng, s, dtype)["w"] for i, s in enumerate(shapes)}
  tree["complex"] = jnp.asarray(rng.normal(size=5) + 1j * rng.normal(size=5), jnp.complex64)
  tree["half"] = jnp.asarray(rng.normal(size=6), jnp.float16)
  return tree


def _trajectory(implementation, params, grads_per_step, dtype_case, **hyper):
  tx = optax_adadelta.adadelta(
    accumulator_dtype=DTYPES[dtype_case][1], implementation=implementation, **hyper
  )
  update, state, results = jax.jit(tx.update), tx.init(params), []
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    results.append((updates, state))
  return results


def _assert_close(got, want, bits: bool):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    if bits:
      as_numpy = np.complex64 if jnp.iscomplexobj(x) else np.float32
      np.testing.assert_array_equal(np.asarray(x, as_numpy), np.asarray(y, as_numpy))
    else:
      worst = ulps(x, y).max(initial=0.0)
      assert worst <= 1, f"{worst} ulp apart"


BOUNDS = ["within_1_ulp", "bit_identical"]


def _check_bits(bound):
  if bound == "bit_identical" and jaxlib.__version__ not in BIT_IDENTICAL_ON:
    pytest.skip(f"bit identity checked on jaxlib {sorted(BIT_IDENTICAL_ON)} only")
  return bound == "bit_identical"


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype_case", sorted(DTYPES))
@pytest.mark.parametrize(
  "hyper",
  [  # the edges and the paper's values by default; another interior point in the slow tier
    pytest.param({}, id="paper"),
    pytest.param({"rho": 0.9, "eps": 1e-8}, id="rho0.9-eps1e-8", marks=pytest.mark.slow),
    pytest.param({"rho": 0.0, "eps": 1e-2}, id="rho0-eps1e-2"),
    pytest.param({"rho": 1.0, "learning_rate": 0.5}, id="rho1-lr0.5"),
  ],
)
def test_jitted_update_matches_xla(bound, shape, dtype_case, hyper):
  bits = _check_bits(bound)
  rng = np.random.default_rng(0)
  dtype = DTYPES[dtype_case][0]
  params = _random_tree(rng, shape, dtype)
  grads = [_random_tree(rng, shape, dtype) for _ in range(4)]
  grads.append(jax.tree.map(jnp.zeros_like, grads[0]))  # a zero gradient after real ones
  native = _trajectory("native", params, grads, dtype_case, **hyper)
  _assert_close(native, _trajectory("jax", params, grads, dtype_case, **hyper), bits)


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("dtype_case", sorted(DTYPES))
def test_tree_of_many_kinds_of_leaves_matches_xla(bound, dtype_case):
  bits = _check_bits(bound)
  rng = np.random.default_rng(4)
  params = _mixed_tree(rng, dtype_case)
  grads = [_mixed_tree(rng, dtype_case) for _ in range(4)]
  native = _trajectory("native", params, grads, dtype_case, rho=0.9)
  _assert_close(native, _trajectory("jax", params, grads, dtype_case, rho=0.9), bits)


def test_non_finite_gradients_propagate_like_xla():
  values = np.array([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e-30, 3.0], np.float32)
  params = {"w": jnp.zeros(7)}
  grads = [{"w": jnp.asarray(values)}, {"w": jnp.ones(7)}]
  native = _trajectory("native", params, grads, "f32")
  _assert_close(native, _trajectory("jax", params, grads, "f32"), bits=False)


def _step(tx):
  def step(x, state, g):
    updates, state = tx.update(g, state, x)
    return optax.apply_updates(x, updates), state

  return jax.jit(step)


@pytest.mark.slow
def test_a_thousand_leaves_follow_the_float64_reference_in_four_calls():
  rng = np.random.default_rng(5)
  sizes = [*rng.integers(1, 300, size=999), 300_007]
  params = [rng.normal(size=n).astype(np.float32) for n in sizes]
  grads = [[rng.normal(size=n).astype(np.float32) for n in sizes] for _ in range(3)]
  want = reference.run(params, grads, rho=0.95, eps=1e-6)
  tx = optax_adadelta.adadelta(implementation="native")
  step, x, state = _step(tx), [jnp.asarray(p) for p in params], tx.init(params)
  calls = step.lower(x, state, x).compile().as_text().count(f'"{TARGET}"')
  assert calls == -(-1000 // primitive.LEAVES_PER_CALL) == 4
  for g in grads:
    x, state = step(x, state, [jnp.asarray(gi) for gi in g])
  for got, expected in zip(x, want.params, strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
  for got, expected in zip(state[1].e_dx2, want.e_dx2, strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-6)


def test_leaves_beyond_one_call_go_in_groups_and_follow_the_float64_reference(monkeypatch):
  """The default tier's check of the grouping that the slow 1,000-leaf test checks at 256."""
  monkeypatch.setattr(primitive, "LEAVES_PER_CALL", 4)
  rng = np.random.default_rng(6)
  sizes = [*rng.integers(1, 50, size=8), 1_001]
  params = [rng.normal(size=n).astype(np.float32) for n in sizes]
  grads = [[rng.normal(size=n).astype(np.float32) for n in sizes] for _ in range(3)]
  want = reference.run(params, grads, rho=0.95, eps=1e-6)
  tx = optax_adadelta.adadelta(implementation="native")
  step, x, state = _step(tx), [jnp.asarray(p) for p in params], tx.init(params)
  assert step.lower(x, state, x).compile().as_text().count(f'"{TARGET}"') == 3
  for g in grads:
    x, state = step(x, state, [jnp.asarray(gi) for gi in g])
  for got, expected in zip(x, want.params, strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
  for got, expected in zip(state[1].e_dx2, want.e_dx2, strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-6)


def _kernel_calls(tx, params) -> int:
  state = tx.init(params)
  return jax.jit(tx.update).lower(params, state, params).compile().as_text().count(f'"{TARGET}"')


def test_auto_uses_one_call_on_cpu_and_jax_or_other_rules_none():
  params = _mixed_tree(np.random.default_rng(3), "f32")
  assert _kernel_calls(optax_adadelta.adadelta(), params) == 1
  assert _kernel_calls(optax_adadelta.adadelta(implementation="jax"), params) == 0
  assert _kernel_calls(optax_adadelta.adadelta(update_rule="pytorch"), params) == 0
  with pytest.raises(ValueError, match=r"update_rule='default' only, got 'keras'"):
    optax_adadelta.adadelta(update_rule="keras", implementation="native")


def test_traced_hyper_parameters_use_xla_and_native_refuses_them():
  params = {"w": jnp.ones(8)}

  def update_with(rho):
    tx = optax_adadelta.adadelta(rho=rho)
    return tx.update(params, tx.init(params))

  assert TARGET not in jax.jit(update_with).lower(0.9).compile().as_text()
  with pytest.raises(ValueError, match=r"implementation='native'.*traced"):
    jax.jit(lambda rho: optax_adadelta.adadelta(rho=rho, implementation="native")).lower(0.9)


def test_decide_gives_the_kernels_constants_or_the_first_reason_against():
  """The one decision: (ρ, 1 − ρ, ε) in double precision; a format's own refusal first, then
  the update rule; "auto" takes XLA quietly where "native" raises, "jax" never asks."""
  assert native.decide(0.9, 1e-6, "default", "auto") == (0.9, 1 - 0.9, 1e-6)
  assert native.decide(np.float32(0.5), 1e-3, "default", "native") == (0.5, 0.5, 1e-3)
  assert native.decide(0.9, 1e-6, "default", "jax") is None
  refusal = "the 16-bit state is updated by XLA"
  assert native.decide(0.9, 1e-6, "pytorch", "auto", refusal) is None
  with pytest.raises(
    ValueError, match=f"^implementation='native' is not possible here: {refusal}$"
  ):
    native.decide(0.9, 1e-6, "pytorch", "native", refusal)
  with pytest.raises(
    ValueError, match=r"not possible here: .*update_rule='default' only, got 'keras'"
  ):
    native.decide(0.9, 1e-6, "keras", "native")
  with pytest.raises(ValueError, match="not traced arrays"):
    native.decide(np.array([0.9]), 1e-6, "default", "native")


def test_without_a_compiler_auto_falls_back_and_says_why(tmp_path):
  """A fresh process with no compiler and an empty cache: pure JAX, and the reason."""
  script = (
    "import jax.numpy as jnp, optax_adadelta as oa\n"
    "from optax_adadelta import native\n"
    "tx = oa.adadelta(); u, _ = tx.update({'w': jnp.ones(3)}, tx.init({'w': jnp.ones(3)}))\n"
    "print(oa.native_available(), float(u['w'][0]), native.unavailable_reason())\n"
    "oa.adadelta(implementation='native')\n"
  )
  env = {**os.environ, "CXX": "no-such-compiler", "OPTAX_ADADELTA_CACHE": str(tmp_path)}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert result.stdout.startswith("False -0.00447"), result.stdout + result.stderr
  assert "no C++ compiler ('no-such-compiler' not found; set CXX)" in result.stdout
  assert "implementation='native' is not possible here: the native kernel" in result.stderr


def test_the_build_is_portable_with_clones_for_wider_vectors():
  """No -march=native; on x86-64 Linux one function per instruction set, chosen at load."""
  assert not any("march" in flag for flag in build.FLAGS)
  if not (sys.platform == "linux" and os.uname().machine == "x86_64"):
    pytest.skip("target_clones are built on x86-64 Linux")
  nm = subprocess.run(["nm", str(build.build_library())], capture_output=True, text=True)
  if nm.returncode != 0:
    pytest.skip("nm (binutils) is not installed")
  for clone in ("arch_x86_64_v3", "arch_x86_64_v4", "default"):
    assert clone in nm.stdout, clone


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
  batched = jax.jit(jax.vmap(tx.update, in_axes=in_axes))
  assert TARGET in batched.lower(grads, state).compile().as_text()
  population = batched(grads, state)
  xla = optax_adadelta.adadelta(rho=0.9, implementation="jax")
  for i in range(5):
    member = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
    member_state = member(state) if in_axes[1] == 0 else one_state
    _assert_close(member(population), jax.jit(xla.update)(member(grads), member_state), False)


def test_gradient_through_the_update_matches_float64_finite_differences():
  """Meta-gradients through the kernel (its derivative rule) against the float64 reference."""
  n, rho, eps = 16, 0.9, 1e-3
  params = np.linspace(-1.0, 1.0, n)
  e_dx2 = np.full(n, 0.1)
  grads = np.cos(np.arange(n, dtype=np.float64))

  def loss64(g):  # one step of Algorithm 1 from a non-zero E[Δx²], then Σ x²
    e_g2 = (1 - rho) * g**2
    step = np.sqrt(e_dx2 + eps) / np.sqrt(e_g2 + eps) * g
    return np.sum((params - step) ** 2)

  h = 1e-6
  want = np.array([(loss64(grads + h * e) - loss64(grads - h * e)) / (2 * h) for e in np.eye(n)])

  def loss(g):
    tx = optax_adadelta.scale_by_adadelta(rho, eps, implementation="native")
    state = optax_adadelta.ScaleByAdadeltaState(
      e_g2={"w": jnp.zeros(n)}, e_dx2={"w": jnp.asarray(e_dx2, jnp.float32)}
    )
    step, _ = tx.update({"w": g}, state)
    return jnp.sum((jnp.asarray(params, jnp.float32) - step["w"]) ** 2)

  g32 = jnp.asarray(grads, jnp.float32)
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  assert TARGET in value_and_grad.lower(g32).compile().as_text()
  value, gradient = value_and_grad(g32)
  np.testing.assert_allclose(value, loss64(grads), rtol=1e-6)
  np.testing.assert_allclose(gradient, want, rtol=2e-4, atol=1e-5)


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
