"""Counter-based random bits for stochastic rounding: reproducible, and restored with the state.

The bits of a leaf at step ``count`` are a 32-bit hash of (step counter, leaf number,
coordinate's index in the whole leaf), 16 bits for each average: the same for a replicated
leaf on every device, different on every shard of a sharded one, and under ``vmap`` the same
as separate runs. Inside ``shard_map`` the index is the shard's own, and the shard's
position along the mesh axes over which its leaf varies (read from ``shard_map``'s types)
selects the stream: shards draw independent streams, a replicated leaf the same one
everywhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _mix(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (Wellons' lowbias32): every input bit changes every output bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def stream_key(count: jax.Array, leaf: int, shard: jax.Array | None = None) -> jax.Array:
  """The uint32 key of one leaf's random bits at step `count` (and shard, in shard_map)."""
  key = _mix(jnp.uint32(leaf) * jnp.uint32(0x9E3779B9) + jnp.uint32(0x632BE5AB))
  if shard is not None:
    key = _mix(key ^ _mix(jnp.asarray(shard).astype(jnp.uint32) + jnp.uint32(0x68E31DA4)))
  return _mix(key ^ jnp.asarray(count).astype(jnp.uint32))


def bits_from_key(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """32 random bits (uint32) per coordinate: the hash of the key and the row-major index."""
  index = jnp.zeros(shape, jnp.uint32)
  for axis, length in enumerate(shape):
    index = index * jnp.uint32(length) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
  return _mix(index ^ key)


def random_bits(
  count: jax.Array, leaf: int, shape: tuple[int, ...], shard: jax.Array | None = None
) -> jax.Array:
  """32 random bits (uint32) per coordinate of a leaf, a hash of (count, leaf, index).

  One hash per coordinate per step: its high 16 bits round E[g²], its low 16 bits E[Δx²].
  `shard`, inside ``shard_map``, is the shard's position among those of its leaf (see
  :func:`shard_position`); it selects another stream for each shard.
  """
  return bits_from_key(stream_key(count, leaf, shard), shape)


def _varying_axes(x: Any) -> frozenset:
  """The manual mesh axes over which `x` may differ (shard_map's type system), or none."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def shard_position(*arrays: Any) -> jax.Array | None:
  """Inside ``shard_map``: this shard's index over the mesh axes along which `arrays` vary.

  None outside ``shard_map``, and for values the same on every device (a replicated leaf),
  which then draw the same stream everywhere. Read from the types ``shard_map`` tracks
  (``check_vma=True``, its default); with ``check_vma=False`` and under ``pmap`` nothing
  is known to vary, and every device draws the same stream.
  """
  varying = frozenset().union(*(_varying_axes(a) for a in arrays))
  if not varying:
    return None
  names = jax.sharding.get_abstract_mesh().axis_names
  return jax.lax.axis_index(tuple(n for n in names if n in varying))


def to_uniform(bits16: jax.Array) -> jax.Array:
  """16 random bits as float32 (k + ½)/2¹⁶: P(u < p) is p to within 2⁻¹⁷."""
  return (bits16.astype(jnp.float32) + 0.5) * jnp.float32(2.0**-16)
