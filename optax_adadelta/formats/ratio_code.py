"""The 16-bit logarithmic block code of the 16-bit state's ratio R = (E[Δx²] + ε)/(E[g²] + ε).

R is stored as uint16 codes of the parameter's shape and one float32 scale per block of
``B`` contiguous elements of the last axis (``B`` the largest divisor of that axis, per shard,
up to 256; a scalar is one block of one): ``S`` = the block's largest R and

.. math::  R(c) = S \\cdot 2^{-\\gamma (65535 - c)} \\ (c \\ge 1), \\quad R(0) = 0,
           \\quad \\gamma = 40 / 65534,

65,535 levels over 40 octaves below the block's maximum, adjacent ones 2^γ − 1 = 0.042 %
apart (bfloat16's numbers are 0.4–0.8 % apart). A value goes to the upper of its two levels
with probability p = (R − R(c))/(R(c + 1) − R(c)), so the stored R is R on average; the
block's maximum is exact. R > 0 always (ε > 0), so code 0 only stands for values under the
block's floor S·2⁻⁴⁰, which it rounds to 0 or to R(1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_adadelta.formats.random_bits import to_uniform

MAX_BLOCK = 256  # elements per scale: 1/64 byte per element of float32 scale overhead
OCTAVES = 40  # of R below the block's maximum that the 65,535 non-zero codes cover
TOP = 2**16 - 1  # the largest code: the block's maximum itself
_GAMMA = OCTAVES / (TOP - 1)  # log2 of the ratio of adjacent levels


class RatioCode(NamedTuple):
  """E[Δx²] of a 16-bit leaf, stored as its ratio R = (E[Δx²] + ε)/(E[g²] + ε) in 16 bits.

  Attributes:
    codes: uint16, the parameter's shape: R = scale · 2^(−γ(65535 − code)), 0 for code 0,
      γ = 40/65534.
    scale: float32, shape ``param.shape[:-1] + (blocks,)`` (``()`` for a scalar): each
      block's largest R; the block size is ``codes.shape[-1] // scale.shape[-1]``.
  """

  codes: jax.Array
  scale: jax.Array


jax.export.register_namedtuple_serialization(  # for jax.export-ed steps
  RatioCode, serialized_name="optax_adadelta.RatioCode"
)


def is_ratio_code(x: Any) -> bool:
  return isinstance(x, RatioCode)


def block_size(shard_last: int) -> int:
  """The largest divisor of a shard's last axis up to MAX_BLOCK (1 for a prime above it)."""
  return max(d for d in range(1, min(MAX_BLOCK, shard_last) + 1) if shard_last % d == 0)


def _blocks_of(x: jax.Array, blocks: int) -> jax.Array:
  """`x` as (..., blocks, block); a scalar as one block of one."""
  if x.ndim == 0:
    return x.reshape(1, 1)
  return x.reshape(*x.shape[:-1], blocks, x.shape[-1] // blocks)


def _scale_shape(grouped: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return grouped.reshape(()) if not shape else grouped[..., 0]


# 2^(−γk) with 40k = 65534q + r: 2^(−q) · 2^(−r/65534), the second factor 1 + t·P(t) for
# t = r/65534 (a least-squares fit, within 2.4e-7 of 2^(−t) in float32, decreasing). No exp2:
# XLA's CPU exp2 differs by an ulp between compilations (sharded or not, vmapped or not),
# and then a value would decode differently from how it was encoded.
_POLYNOMIAL = (  # coefficients of t¹ … t⁶; t⁰'s is 1
  -0.6931470851170021,
  0.24022465801996107,
  -0.05549207261398977,
  0.009581787336914985,
  -0.0012770993236537204,
  0.00010981309511274209,
)


def level(k: jax.Array) -> jax.Array:
  """R(c)/S = 2^(−γk) as float32 for int32 k = 65535 − c in [0, 65535]; exactly 1 for k = 0."""
  octaves = k * OCTAVES
  q = jax.lax.div(octaves, jnp.int32(TOP - 1))
  t = (octaves - q * (TOP - 1)).astype(jnp.float32) * jnp.float32(1 / (TOP - 1))
  acc = jnp.full_like(t, _POLYNOMIAL[-1])
  for coefficient in reversed(_POLYNOMIAL[:-1]):
    acc = coefficient + t * acc
  power = jax.lax.bitcast_convert_type(jnp.left_shift(127 - q, 23), jnp.float32)  # 2^(−q)
  return (1.0 + t * acc) * power


def ones(p: Any, blocks: int) -> RatioCode:
  """R = 1 everywhere (E[g²] = E[Δx²] = 0), with the sharding of the parameter `p`."""
  codes = jnp.full_like(p, TOP, dtype=jnp.uint16)
  scale = jnp.max(_blocks_of(jnp.ones_like(p, jnp.float32), blocks), axis=-1)
  return RatioCode(codes, scale if p.ndim else scale.reshape(()))


def decode(code: RatioCode) -> jax.Array:
  """The float32 R that a RatioCode stands for: level(code) · scale."""
  codes = code.codes.astype(jnp.int32)
  blocks = 1 if codes.ndim == 0 else code.scale.shape[-1]
  values = jnp.where(codes == 0, 0.0, level(TOP - codes))
  grouped = _blocks_of(values, blocks) * jnp.reshape(code.scale, (*code.scale.shape, 1))
  return grouped.reshape(codes.shape)


def _block_max(grouped: jax.Array) -> jax.Array:
  """Each block's largest value, NaN if it holds one (XLA's CPU max may skip a NaN): the
  values are positive or NaN, whose bits (sign cleared) order as integers, NaN above +inf."""
  bits = jax.lax.bitcast_convert_type(grouped, jnp.int32) & jnp.int32(0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(jnp.max(bits, axis=-1, keepdims=True), jnp.float32)


def encode(values: jax.Array, blocks: int, bits: jax.Array) -> RatioCode:
  """Codes for positive float32 `values`, each rounded up with probability p.

  `bits`: 16 random bits per value (uint32 below 2¹⁶); the value goes up when the uniform
  number they make is below p. A NaN makes its block's scale NaN (the block reads NaN).
  """
  grouped = _blocks_of(values.astype(jnp.float32), blocks)
  scale = _block_max(grouped)
  x = grouped * (1.0 / jnp.where(scale > 0, scale, 1.0))  # in [0, 1]
  guess = jnp.floor(jnp.log2(jnp.maximum(x, 2.0**-126)) * jnp.float32(-1 / _GAMMA))
  k = jnp.clip(guess, 0, TOP - 1).astype(jnp.int32)
  high, low = level(k), jnp.where(k == TOP - 1, 0.0, level(k + 1))
  # log2's last ulps may put x just outside [low, high]: one level either way, its neighbour
  # by a factor 2^±γ (within 3e-7 of level(): a bias that small, where it happens at all).
  above = (x > high) & (k > 0)
  below = (x < low) & (k < TOP - 1)
  k = k - above.astype(jnp.int32) + below.astype(jnp.int32)
  high, low = (
    jnp.where(above, high * jnp.float32(2.0**_GAMMA), jnp.where(below, low, high)),
    jnp.where(above, high, jnp.where(below, low * jnp.float32(2.0**-_GAMMA), low)),
  )
  low = jnp.where(k == TOP - 1, 0.0, low)  # under the floor: between 0 and it
  # Up with probability p = (x − low)/(high − low), without the division.
  up = _blocks_of(to_uniform(bits), blocks) * (high - low) < x - low
  codes = jnp.where(up | (grouped >= scale), TOP - k, TOP - k - 1)
  shape = values.shape
  return RatioCode(codes.astype(jnp.uint16).reshape(shape), _scale_shape(scale, shape))
