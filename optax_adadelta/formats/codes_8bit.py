"""The 8-bit code of the low-memory state: a logarithmic code per block, rounded up or down.

Each average of an 8-bit leaf is stored as uint8 codes of the parameter's shape and one
float32 scale per block of ``B`` contiguous elements of the last axis (``B`` the largest
divisor of that axis, per shard, up to 256; at least 32, or the leaf keeps a full-precision
state): ``S`` = the block's largest value and

.. math::  E(c) = S \\cdot 2^{-\\gamma (255 - c)} \\ (c \\ge 1), \\quad E(0) = 0,
           \\quad \\gamma = 24 / 254,

a logarithmic code over 24 octaves of E below the block's maximum (12 of the root mean
square √E, which is what Adadelta uses: √(E[Δx²]+ε)/√(E[g²]+ε)). Adjacent codes differ by
the factor 2^γ = 1.068, so rounding to the nearer code changes E by at most 3.3 % and
√(E+ε) by at most 1.65 %, whatever the block's range; the block's maximum is exact, a zero
block is exact. Values under S·2⁻²⁴ round to 0 or to E(1); E[g²]'s to E(1) only.

Rounded stochastically, E goes to the upper code with probability
p = (E − E(c))/(E(c+1) − E(c)), so the stored E is E on average. E[Δx²] is stored so. E[g²]'s
p is lifted by ½·ρ/(1+ρ)·p(1 − p)·(E(c+1) − E(c))/(E + ε) (:func:`lift_weight`): the rounding
noise that the running average keeps would otherwise make 1/(E[g²] + ε), and with it every
step, a few percent too large on average. Both averages of a coordinate are rounded with
one uniform number (`eight_bit.update_quantized`). A positive E[g²] under the floor
S·2⁻²⁴ is coded 1, never 0 (`floor_up`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_adadelta.formats.random_bits import to_uniform

MAX_BLOCK = 256  # elements per scale: 1/64 byte per element of float32 scale overhead
MIN_BLOCK = 32  # below this (a prime last axis, say) the scales would cost too much
OCTAVES = 24  # of E below the block's maximum that the 255 non-zero codes cover
_GAMMA = OCTAVES / 254  # log2 of the ratio of adjacent codes


class QuantizedAverage(NamedTuple):
  """One running average stored in 8 bits.

  Attributes:
    codes: uint8, the parameter's shape: E = scale · 2^(−γ(255 − code)), 0 for code 0.
    scale: float32, shape ``param.shape[:-1] + (blocks,)``: each block's largest E; the
      block size is ``codes.shape[-1] // scale.shape[-1]``.
  """

  codes: jax.Array
  scale: jax.Array


jax.export.register_namedtuple_serialization(  # for jax.export-ed steps
  QuantizedAverage, serialized_name="optax_adadelta.QuantizedAverage"
)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedAverage)


def block_size(shard_last: int) -> int | None:
  """The largest divisor of a shard's last axis up to MAX_BLOCK, or None below MIN_BLOCK
  (an empty axis included: a zero-size leaf has no block to scale)."""
  divisors = [d for d in range(MIN_BLOCK, min(MAX_BLOCK, shard_last) + 1) if shard_last % d == 0]
  return max(divisors, default=None)


def blocks_of(x: jax.Array, blocks: int) -> jax.Array:
  """`x` with its last axis split into `blocks` blocks: shape (..., blocks, block)."""
  return x.reshape(*x.shape[:-1], blocks, x.shape[-1] // blocks)


# E(c)/S = 2^(−γk) for k = 255 − c: with 12k = 127q + r, 2^(−q) · 2^(−r/127), the second
# factor a polynomial in r (a least-squares fit, within 1.3e-7 of 2^(−r/127) in float32).
# Integer steps, one Horner chain (each step one multiply-add, which XLA contracts exactly
# where the native kernel does) and an exact power of two: the same float32 bits in XLA and
# in the kernel, with no table to look up.
_POLYNOMIAL = (  # coefficients of r¹ … r⁶; r⁰'s is 1
  -0.005457850638777018,
  1.489393980591558e-05,
  -2.7090141685448543e-08,
  3.682612895183901e-11,
  -3.862069762302148e-14,
  2.6107046013841357e-17,
)


def level(codes: jax.Array) -> jax.Array:
  """E(c)/S as float32 for int32 codes c in [0, 255]: 0 for c = 0, exactly 1 for c = 255."""
  k12 = (255 - codes) * 12
  q = jnp.right_shift(k12 * 8257, 20)  # ⌊12k / 127⌋, exact for 12k < 3100
  r = (k12 - q * 127).astype(jnp.float32)
  acc = jnp.full_like(r, _POLYNOMIAL[-1])
  for coefficient in reversed(_POLYNOMIAL[:-1]):
    acc = coefficient + r * acc
  mantissa = 1.0 + r * acc
  power = jax.lax.bitcast_convert_type(jnp.left_shift(127 - q, 23), jnp.float32)  # 2^(−q)
  return jnp.where(codes == 0, 0.0, mantissa * power)


# The estimate of a code from a float's bits (see `_code_below`): c ≈ 255 + (bits − 127·2²³)
# / 2¹⁵ · 254 / 6144, computed on non-negative integers; _BIAS·6144 keeps them so.
_BIAS = 1400


def _code_below(x: jax.Array) -> jax.Array:
  """The largest c ≤ 254 with level(c) ≤ x (254 for NaN), as int32.

  A float's bits, read as an integer, are 2²³·(e + 127 + f) for x = 2^e·(1 + f), and
  e + f ≤ log2 x < e + f + 0.0861: so ⌊255 + (e + f)/γ⌋ is the code below x or the one
  before it (0.0861/γ < 1 code), and one comparison settles which. In integers only, so
  that the native kernel finds the same code.
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF)
  octaves = jnp.right_shift(bits - jnp.int32(127 << 23), 15)  # (e + f)·2⁸, rounded down
  estimate = (octaves * 254 + 6144 * (255 + _BIAS)) // 6144 - _BIAS
  estimate = jnp.clip(estimate, 0, 254)
  above = x >= level(estimate + 1)
  return jnp.minimum(estimate + above.astype(jnp.int32), 254)


def dequantize(q: QuantizedAverage) -> jax.Array:
  """The float32 average a QuantizedAverage stands for: level(code) · scale."""
  blocks = q.scale.shape[-1]
  values = blocks_of(level(q.codes.astype(jnp.int32)), blocks) * q.scale[..., None]
  return values.reshape(q.codes.shape)


def _block_max(grouped: jax.Array) -> jax.Array:
  """Each block's largest value, NaN if it holds one (XLA's CPU max may skip a NaN).

  The values are non-negative or NaN: their bits, sign cleared, order as integers with NaN
  above +inf, so one integer maximum does it (the native kernel takes the same one).
  """
  bits = jax.lax.bitcast_convert_type(grouped, jnp.int32) & jnp.int32(0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(jnp.max(bits, axis=-1, keepdims=True), jnp.float32)


def quantize(
  values: jax.Array,
  blocks: int,
  bits: jax.Array | None,
  lift: tuple[jax.Array, jax.Array] | None = None,
  *,
  floor_up: bool = False,
) -> QuantizedAverage:
  """Codes for non-negative float32 `values`, rounded up with probability p.

  With x = E/S between level(c) and level(c + 1), p = (x − level(c))/(level(c + 1) −
  level(c)): linear in E, so the mean of the stored E over 16 random `bits` per value is
  the value; `bits=None` rounds to the nearer code in E (p > 1/2). Three polynomials and
  no logarithm per value; the native kernel computes the same numbers in the same order.
  A NaN makes its block's scale NaN, so the whole block reads NaN: loud, and bounded.

  `lift=(w, ε)` (for E[g²], with `bits`): p + w·p(1 − p)·(level(c + 1) − level(c))/(x + ε/S)
  instead, above code 0, so the stored E is on average higher than E by w·Var/(E + ε),
  Var = (E − E(c))(E(c + 1) − E) the rounding's variance (see `lift_weight`); computed with
  one division, as p is.

  `floor_up` (for E[g²]): a positive value under the block's floor level(1)·S gets code 1,
  never 0. Adadelta's step divides by √(E[g²] + ε): an E[g²] read as 0 while g² is not
  lets Δx² reach g²·(E[Δx²] + ε)/ε and E[Δx²] grow geometrically (docs/guides/low_memory.md,
  "Small values in a large block"); read as the floor, the step can only be shorter.
  """
  grouped = blocks_of(values.astype(jnp.float32), blocks)
  scale = _block_max(grouped)
  inverse = 1.0 / jnp.where(scale > 0, scale, 1.0)
  x = grouped * inverse  # in [0, 1]
  low = _code_below(x)
  below, above = level(low), level(low + 1)
  spread = above - below
  if lift is None:
    p = (x - below) / spread
  else:  # p + w·p(1 − p)·spread/floor = (x − below)·(floor + w·(above − x))/(spread·floor)
    weight, eps = lift
    floor = x + eps * inverse
    weight = jnp.where(low > 0, weight, 0.0)
    p = (x - below) * (floor + weight * (above - x)) / (spread * floor)
  threshold = 0.5 if bits is None else blocks_of(to_uniform(bits), blocks)
  rounded = low + (p > threshold).astype(jnp.int32)
  if floor_up:
    rounded = jnp.maximum(rounded, (x > 0).astype(jnp.int32))
  codes = jnp.where(grouped >= scale, 255, rounded)
  return QuantizedAverage(codes.astype(jnp.uint8).reshape(values.shape), scale[..., 0])


def lift_weight(rho: Any) -> jax.Array:
  """w = ½·ρ/(1 + ρ) in float32: the lift of E[g²]'s stochastic rounding (`quantize`).

  Each rounding adds noise of variance Var to the stored E[g²]; the running average keeps
  it, ρᵏ-weighted, so the E[g²] a step uses carries Σₖ ρ²ᵏ·Var = ρ²/(1 − ρ²)·Var of it,
  and 1/(E[g²] + ε), convex, is on average higher by that over (E + ε)³ (to second order).
  A mean higher by δ lowers 1/(E[g²] + ε) by δ/(E + ε)²; each rounding's mean raised by
  w·Var/(E + ε) accumulates to δ = ρ/(1 − ρ)·w·Var/(E + ε), which cancels that term when
  w = ρ/(1 + ρ). But E[Δx²] is rounded with the same uniform number (`update_quantized`):
  its error covaries with E[g²]'s, which lowers (E[Δx²] + ε)/(E[g²] + ε) by the
  covariance, on average half the variance (E[min(p, p′) − p·p′] = 1/12 against
  E[p(1 − p)] = 1/6 for independent positions p, p′ between codes): half the lift is left.
  """
  rho = jnp.asarray(rho, jnp.float32)
  return 0.5 * (rho / (1.0 + rho))
