"""The 16-bit state: E[g²] in bfloat16 and E[Δx²] as a 16-bit code of R = (E[Δx²]+ε)/(E[g²]+ε).

Against float64 NumPy: the code's rounding (unbiased, within one level), the steps on random
gradients (unbiased within 1 %), E[Δx²] read back with the ε its ratio was formed with when ε
changes or is traced, the layout (bytes per parameter, blocks, shardings) and the refusal of
a checkpoint of the layout before #22. Long runs: tests/test_long_horizon.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta
from optax_adadelta.formats import ratio_code, rounded16
from optax_adadelta.formats.random_bits import random_bits
from optax_adadelta.formats.rounded16 import Rounded16AdadeltaState
from tests import reference

GAMMA = 40 / 65534  # documented: R(c) = S · 2^(−γ(65535 − c)), R(0) = 0


def _draws(fn, num):
  """fn(count) for counts 0..num−1 in one vmapped call, as float64."""
  return np.asarray(jax.jit(jax.vmap(fn))(jnp.arange(num, dtype=jnp.int32)), np.float64)


def _ratios(rng, shape, octaves=36.0):
  """Positive values over `octaves` below each block's maximum, block scales over 12 decades."""
  scale = 10.0 ** rng.uniform(-6, 6, (*shape[:-1], 1))
  return (2.0 ** rng.uniform(-octaves, 0, shape) * scale).astype(np.float32)


def np_levels(values, blocks):
  """(low, high): the two float64 levels S·2^(−γk) around each value of a block code."""
  grouped = np.asarray(values, np.float64).reshape(*values.shape[:-1], blocks, -1)
  scale = grouped.max(-1, keepdims=True)
  k = np.floor(-np.log2(grouped / scale) / GAMMA)
  high = (scale * 2.0 ** (-GAMMA * k)).reshape(values.shape)
  low = (scale * 2.0 ** (-GAMMA * (k + 1))).reshape(values.shape)
  return low, high


def test_ratio_code_is_unbiased_and_within_one_level_of_the_value():
  """4,000 draws of 2 blocks of 256 values over 36 octaves: each draw is one of the two
  levels around the value (0.042 % apart), their mean the value within 5 standard errors;
  the block maximum is exact."""
  rng = np.random.default_rng(0)
  values = _ratios(rng, (512,))
  encode = lambda c: ratio_code.decode(
    ratio_code.encode(jnp.asarray(values), 2, random_bits(c, 0, (512,)) >> 16)
  )
  draws = _draws(encode, 4000)
  low, high = np_levels(values, 2)
  gap = high - low
  assert np.all(draws >= low - gap * 1e-2) and np.all(draws <= high + gap * 1e-2)
  p = np.clip((values - low) / gap, 0.0, 1.0)
  stderr = gap * np.sqrt(p * (1 - p) / 4000) + gap * 2e-3
  assert np.all(np.abs(draws.mean(0) - values) <= 5 * stderr)
  for block in values.reshape(2, 256):
    assert np.any(draws[:, values == block.max()] == block.max())
  assert np.all(np.abs(gap / values - (2.0**GAMMA - 1)) < 1e-3)  # 0.042 % everywhere


def test_ratio_code_keeps_scalars_nans_and_values_under_the_floor():
  bits = jnp.zeros((), jnp.uint32)
  scalar = ratio_code.encode(jnp.float32(3.5), 1, bits)
  assert scalar.codes.shape == scalar.scale.shape == () and ratio_code.decode(scalar) == 3.5
  values = np.full(256, 1.0, np.float32)
  values[3], values[7] = 2.0**-45, np.nan
  code = ratio_code.encode(jnp.asarray(values), 1, jnp.zeros(256, jnp.uint32))
  assert np.all(np.isnan(np.asarray(ratio_code.decode(code))))  # a NaN spoils its block, loudly
  values[7] = 1.0
  back = np.asarray(ratio_code.decode(ratio_code.encode(jnp.asarray(values), 1, bits + 0)))
  assert (back[3] == 0 or abs(back[3] / 2.0**-40 - 1) < 1e-5) and back[0] == 1.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rho, eps", [(0.95, 1e-4), (0.99, 1e-8)])
def test_16bit_steps_are_not_biased_against_float64_adadelta(rho, eps, dtype):
  """Random gradients (scales log-normal) on a (8, 512) leaf for 300 steps: mean |Δx| over
  the last 100 steps within 1 % of a float64 NumPy Adadelta's, the mean E[Δx²] within 1 %
  (bfloat16; measured 0.01 % and 0.02 %) or 2 % (float16, whose smallest E[g²] are
  subnormal: measured 0.9 % at ρ = 0.99, ε = 1e-8)."""
  rng = np.random.default_rng(7)
  scale = np.exp(rng.standard_normal((8, 512))) * 0.05
  grads = (rng.standard_normal((300, 8, 512)) * scale).astype(np.float32)
  e_g2, e_dx2, steps = np.zeros((8, 512)), np.zeros((8, 512)), []
  for g in grads.astype(np.float64):
    dx, e_g2, e_dx2 = reference.step(g, e_g2, e_dx2, rho, eps)
    steps.append(dx)
  tx = rounded16.scale_by_adadelta_16bit(rho, eps, accumulator_dtype=dtype)
  run = lambda state, gs: jax.lax.scan(lambda s, g: tx.update(g, s)[::-1], state, gs)
  state, got = jax.jit(run)(tx.init(jnp.zeros((8, 512))), jnp.asarray(grads))
  step_ratio = np.abs(np.asarray(got[-100:], np.float64)).mean() / np.abs(steps[-100:]).mean()
  dx2_ratio = np.asarray(rounded16.average_values(state)[1], np.float64).mean() / e_dx2.mean()
  print(f"{dtype}, rho={rho}, eps={eps}: mean |Δx| × {step_ratio:.5f}, E[Δx²] × {dx2_ratio:.5f}")
  assert abs(step_ratio - 1) < 0.01
  assert abs(dx2_ratio - 1) < (0.01 if dtype == "bfloat16" else 0.02)


def _np_run(grads, rho, epss):
  e_g2 = e_dx2 = np.zeros(grads.shape[1:])
  for g, eps in zip(grads.astype(np.float64), epss, strict=True):
    dx, e_g2, e_dx2 = reference.step(g, e_g2, e_dx2, rho, eps)
  return dx, e_dx2


def test_a_changed_eps_reads_e_dx2_with_the_eps_its_ratio_was_formed_with():
  """inject_hyperparams moves ε from 1e-2 to 1e-6 after 50 steps: E[Δx²] and the steps
  follow float64 Adadelta with the same ε schedule (within 1 %). Read with the new ε, the
  stored R = (E[Δx²] + 1e-2)/(E[g²] + 1e-2) would imply an E[Δx²] about 1e-2 too large."""
  rng = np.random.default_rng(3)
  grads = rng.standard_normal((80, 4, 512)).astype(np.float32)
  epss = [1e-2] * 50 + [1e-6] * 30
  tx = optax.inject_hyperparams(optax_adadelta.scale_by_adadelta_16bit)(rho=0.9, eps=1e-6)
  state = tx.init(jnp.zeros((4, 512)))
  update = jax.jit(tx.update)
  for t, g in enumerate(grads):
    state.hyperparams["eps"] = jnp.asarray(epss[t], jnp.float32)  # a schedule would do this
    dx, state = update(jnp.asarray(g), state)
    if t == 49:
      assert float(state.inner_state.eps) == np.float32(1e-2)
  assert float(state.inner_state.eps) == np.float32(1e-6)
  want_dx, want_dx2 = _np_run(grads, 0.9, epss)
  got_dx2 = np.asarray(rounded16.average_values(state.inner_state)[1], np.float64)
  np.testing.assert_allclose(got_dx2.mean(), want_dx2.mean(), rtol=0.01)
  np.testing.assert_allclose(np.abs(dx).mean(), np.abs(want_dx).mean(), rtol=0.01)


def test_vmap_over_eps_equals_each_eps_alone():
  """ε traced and batched: the state keeps one ε per problem, and each problem's numbers
  are those of its own run (XLA fuses the batched float32 arithmetic a little differently,
  which may move a stored value to its other neighbour: within one level, 0.042 %)."""
  epss = jnp.array([1e-6, 1e-4, 1e-2])
  grads = jnp.asarray(np.random.default_rng(4).standard_normal((5, 4, 256)), jnp.float32)

  def run(eps):
    tx = rounded16.scale_by_adadelta_16bit(0.95, eps)
    state = tx.init(jnp.zeros((4, 256)))
    return jax.lax.scan(lambda s, g: tx.update(g, s)[::-1], state, grads)

  batched = jax.jit(jax.vmap(run))(epss)
  assert batched[0].eps.shape == (3,)
  for i in range(3):
    alone = jax.jit(run)(epss[i])
    state = jax.tree.map(lambda x, i=i: x[i], batched[0])
    assert state.eps == alone[0].eps == np.float32(epss[i])
    averages = rounded16.average_values(state), rounded16.average_values(alone[0])
    for x, y in zip(*averages, strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=0)
    np.testing.assert_allclose(np.asarray(batched[1][i]), np.asarray(alone[1]), rtol=1e-3)


def test_layout_is_4_bytes_per_parameter_blocks_follow_the_last_axis_and_float32_stays():
  """(512, 768): E[g²] bfloat16, R's codes uint16 and a float32 scale per 256 (4.016 bytes per
  parameter); a prime last axis (997) gets blocks of one; a scalar one block; a float32 leaf
  (accumulator_dtype=None) keeps float32 arrays; zero-size leaves cost nothing."""
  params = {
    "w": jnp.zeros((512, 768), jnp.bfloat16),
    "odd": jnp.zeros((8, 997), jnp.bfloat16),
    "s": jnp.zeros((), jnp.bfloat16),
    "f": jnp.zeros(10, jnp.float32),
    "empty": jnp.zeros((3, 0), jnp.bfloat16),
  }
  state = rounded16.scale_by_adadelta_16bit(accumulator_dtype=None).init(params)
  assert isinstance(state, Rounded16AdadeltaState) and state.eps.dtype == jnp.float32
  w = state.e_dx2["w"]
  assert state.e_g2["w"].dtype == jnp.bfloat16 and w.codes.dtype == jnp.uint16
  assert w.codes.shape == (512, 768) and w.scale.shape == (512, 3)
  assert state.e_dx2["odd"].scale.shape == (8, 997) and state.e_dx2["s"].scale.shape == ()
  assert state.e_g2["f"].dtype == state.e_dx2["f"].dtype == jnp.float32
  assert state.e_dx2["empty"].shape == (3, 0)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  per_parameter = (nbytes(state.e_g2["w"]) + nbytes(w)) / params["w"].size
  print(f"16-bit state: {per_parameter:.4f} bytes per parameter for a 512 x 768 leaf")
  assert per_parameter == 4 + 4 / 256
  e_g2, e_dx2 = rounded16.average_values(state)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves((e_g2, e_dx2)))


def test_the_first_step_is_float64_adadeltas_first_step():
  """R = 1 at init reads E[Δx²] = 0 exactly: the first step is √(ε/((1 − ρ)g² + ε))·g."""
  g = jnp.asarray(np.random.default_rng(5).standard_normal((4, 256)), jnp.float32)
  tx = rounded16.scale_by_adadelta_16bit(0.9, 1e-6)
  dx, _ = tx.update(g, tx.init(jnp.zeros((4, 256))))
  want, *_ = reference.step(np.asarray(g, np.float64), 0.0, 0.0, 0.9, 1e-6)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want, rtol=2e-6)


def test_the_front_builds_this_format_for_stochastic_rounding_of_a_16_bit_state():
  tx = optax_adadelta.scale_by_adadelta(accumulator_dtype=jnp.bfloat16, stochastic_rounding=True)
  assert isinstance(tx.init({"w": jnp.zeros((2, 256))}), Rounded16AdadeltaState)


def test_a_checkpoint_of_the_layout_before_22_is_refused_and_migrates(tmp_path):
  """The 16-bit state saved before #22 (E[Δx²] as bfloat16 arrays, no ε) does not fit the new
  state: restore raises, listing the missing ε and the ratio code's leaves. Restored into
  `layout_before_22`'s template and converted by `from_layout_before_22`, it keeps E[g²] and
  the counter exactly and E[Δx²] + ε within half a level of R (0.021 %), and trains on."""
  pytest.importorskip("orbax.checkpoint")
  from optax_adadelta import checkpoint, formats

  rng = np.random.default_rng(6)
  params = {"w": jnp.zeros((4, 256)), "b": jnp.zeros(3)}
  tx = optax_adadelta.adadelta(
    1.0, 0.95, 1e-6, accumulator_dtype="bfloat16", stochastic_rounding=True
  )
  new = tx.init(params)

  def fill(x):  # an old state with values: averages over 8 decades, a counter at 7
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(10.0 ** rng.uniform(-9, -1, x.shape), x.dtype)
    return jnp.full(x.shape, 7, x.dtype)

  old = jax.tree.map(fill, rounded16.layout_before_22(new))
  checkpoint.save(tmp_path / "old", params, old, step=7)
  with pytest.raises(ValueError, match=r"(?s)(eps.*e_dx2.*codes|e_dx2.*codes.*eps)"):
    checkpoint.restore(tmp_path / "old", params, new)
  restored = checkpoint.restore(tmp_path / "old", params, rounded16.layout_before_22(new))
  migrated = rounded16.from_layout_before_22(restored.opt_state, new)
  assert jax.tree.structure(migrated) == jax.tree.structure(new)

  def core(tree):  # the Adadelta state inside the chain's
    return next(n for n in jax.tree.leaves(tree, is_leaf=formats.is_state) if formats.is_state(n))

  got, was = core(migrated), core(old)
  assert int(got.count) == 7 and float(got.eps) == np.float32(1e-6)
  e_g2, e_dx2 = rounded16.average_values(got)
  for name in params:
    np.testing.assert_array_equal(np.asarray(e_g2[name]), np.asarray(was.e_g2[name], np.float32))
    want = np.asarray(was.e_dx2[name], np.float64) + 1e-6
    np.testing.assert_allclose(np.asarray(e_dx2[name], np.float64) + 1e-6, want, rtol=2.2e-4)
  grads = {"w": jnp.ones((4, 256)), "b": jnp.ones(3)}
  updates, _ = jax.jit(tx.update)(grads, migrated, params)
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))
