"""dtypes: the state keeps its dtype, updates keep the gradients', and low precision's pitfalls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta
from tests import reference

LOW = [jnp.bfloat16, jnp.float16]


def _scan_updates(tx, params, grads):
  """Runs updates in lax.scan, which fails if any state dtype changes between steps."""

  def step(state, g):
    updates, state = tx.update(g, state, params)
    return state, updates

  return jax.lax.scan(step, tx.init(params), grads)


@pytest.mark.parametrize("param_dtype", [jnp.float32, *LOW])
@pytest.mark.parametrize("accumulator_dtype", [None, jnp.float32, "float32", jnp.bfloat16])
@pytest.mark.parametrize("grad_dtype", [jnp.float32, jnp.bfloat16])
def test_state_dtype_is_fixed_and_updates_keep_the_gradient_dtype(
  param_dtype, accumulator_dtype, grad_dtype
):
  params = {"w": jnp.ones((4, 3), param_dtype), "b": jnp.zeros(3, param_dtype)}
  grads = jax.tree.map(lambda p: jnp.linspace(-1, 1, 5 * p.size).reshape(5, *p.shape), params)
  grads = jax.tree.map(lambda g: g.astype(grad_dtype), grads)
  # A learning-rate schedule makes the learning rate a float32 array.
  tx = optax_adadelta.adadelta(
    optax.constant_schedule(0.5), weight_decay=0.01, accumulator_dtype=accumulator_dtype
  )
  state, updates = _scan_updates(tx, params, grads)
  want = jnp.dtype(param_dtype if accumulator_dtype is None else accumulator_dtype)
  for leaf in jax.tree.leaves(optax.tree.get(state, "e_g2")):
    assert leaf.dtype == want
  for leaf in jax.tree.leaves(optax.tree.get(state, "e_dx2")):
    assert leaf.dtype == want
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == grad_dtype


def test_float64_in_x64_mode_keeps_float64_state_and_updates():
  with jax.enable_x64(True):
    params = jnp.ones(3, jnp.float64)
    state, updates = _scan_updates(optax_adadelta.adadelta(), params, jnp.ones((4, 3)) * 0.1)
    assert updates.dtype == jnp.float64
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(state))
    with_f32_state, _ = _scan_updates(
      optax_adadelta.adadelta(accumulator_dtype=jnp.float32), params, jnp.ones((4, 3)) * 0.1
    )
    assert optax.tree.get(with_f32_state, "e_g2").dtype == jnp.float32


@pytest.mark.parametrize("param_dtype", LOW)
def test_low_precision_parameters_with_float32_accumulators_follow_the_reference(param_dtype):
  rng = np.random.default_rng(0)
  grads = jnp.asarray(rng.normal(size=(20, 64)), param_dtype)
  tx = optax_adadelta.scale_by_adadelta(accumulator_dtype=jnp.float32)
  state, steps = _scan_updates(tx, jnp.zeros(64, param_dtype), grads)
  ref = reference.run([np.zeros(64)], [[np.asarray(g, np.float64)] for g in grads])
  # Arithmetic and state are float32; only each returned step is rounded to param_dtype
  # (half an ulp, or half the subnormal spacing for tiny float16 steps).
  info = jnp.finfo(param_dtype)
  for t in range(20):
    np.testing.assert_allclose(
      np.asarray(-steps[t], np.float64),
      ref.steps[t][0],
      rtol=float(info.eps) / 2 + 1e-6,
      atol=float(info.smallest_subnormal) / 2,
    )
  np.testing.assert_allclose(state.e_g2, ref.e_g2[0], rtol=1e-5)


def test_bfloat16_accumulators_stall_short_of_the_true_average():
  """Documented pitfall: an EMA stored in bfloat16 cannot move by less than half an ulp
  (2⁻⁹ relative), so with ρ=0.95 and a constant g=1, E[g²] sticks near 0.96 instead of 1."""
  grads = jnp.ones((400, 1))
  stalled, _ = _scan_updates(
    optax_adadelta.scale_by_adadelta(accumulator_dtype=jnp.bfloat16), jnp.zeros(1), grads
  )
  exact, _ = _scan_updates(optax_adadelta.scale_by_adadelta(), jnp.zeros(1), grads)
  assert float(stalled.e_g2[0]) < 0.98
  assert float(exact.e_g2[0]) > 0.9999


def test_float16_accumulators_lose_small_averages_to_underflow():
  """Documented pitfall: with g = 1e-3, (1−ρ)g² = 5e-8 is below float16's smallest normal
  (6.1e-5) and near its smallest subnormal (6e-8); E[g²] and E[Δx²] are badly rounded."""
  grads = jnp.full((10, 1), 1e-3, jnp.float16)
  in_f16, _ = _scan_updates(optax_adadelta.scale_by_adadelta(), jnp.zeros(1, jnp.float16), grads)
  in_f32, _ = _scan_updates(
    optax_adadelta.scale_by_adadelta(accumulator_dtype=jnp.float32),
    jnp.zeros(1, jnp.float16),
    grads,
  )
  ref = reference.run([np.zeros(1)], [[np.asarray(g, np.float64)] for g in grads])
  f16_error = abs(float(in_f16.e_g2[0]) / ref.e_g2[0][0] - 1)
  f32_error = abs(float(in_f32.e_g2[0]) / ref.e_g2[0][0] - 1)
  assert f16_error > 0.01
  assert f32_error < 1e-5


def test_complex_parameters_get_complex_accumulators_of_the_requested_precision():
  with jax.enable_x64(True):
    params = jnp.ones(2, jnp.complex128)
    tx = optax_adadelta.scale_by_adadelta(accumulator_dtype=jnp.float32)
    assert tx.init(params).e_g2.dtype == jnp.complex64
  assert optax_adadelta.scale_by_adadelta().init(jnp.ones(2, jnp.complex64)).e_g2.dtype == (
    jnp.complex64
  )
