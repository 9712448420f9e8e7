"""Adadelta with a low-memory state: 16-bit averages rounded stochastically, or 8-bit codes.

Two formats, chosen by :func:`optax_adadelta.scale_by_adadelta`'s keywords; both keep the
arithmetic of every step in float32 (dequantize, Algorithm 1, quantize) and a step counter
in the state, which seeds the random bits of stochastic rounding (`_random_bits`):

``stochastic_rounding=True`` with a bfloat16 or float16 state
  Each new average is rounded to one of the two neighbouring 16-bit numbers, the upper
  with probability (v − lo)/(hi − lo), so it is v in expectation. Rounded to nearest,
  (1 − ρ)(g² − E[g²]) falls under half an ulp once E[g²] is within 2⁻⁹/(1 − ρ) of its
  target (bfloat16, 1/0.05 · 2⁻⁹ ≈ 4 %), and the average stalls there.

``state_bits=8``
  Each average of a leaf of at least ``min_8bit_size`` elements is stored as a
  :class:`QuantizedAverage`: uint8 codes and a float32 scale per block of up to 256 elements
  (`_codes_8bit`), rounded stochastically when ``stochastic_rounding`` is True (the default
  for 8-bit), else to the nearer code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_adadelta import _checks
from optax_adadelta.formats.codes_8bit import (
  QuantizedAverage,
  block_size,
  blocks_of,
  dequantize,
  is_quantized,
  lift_weight,
  quantize,
)
from optax_adadelta.formats.random_bits import bits_from_key, shard_position, stream_key, to_uniform


class LowMemoryAdadeltaState(NamedTuple):
  """State of ``scale_by_adadelta(stochastic_rounding=True)`` or ``(state_bits=8)``.

  Attributes:
    count: int32 number of updates so far; seeds the stochastic rounding.
    e_g2: E[g²], a tree shaped like the parameters whose leaves are arrays (16-bit, or
      full precision for leaves kept so) or :class:`QuantizedAverage`.
    e_dx2: E[Δx²], the same layout.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  e_g2: Any
  e_dx2: Any


jax.export.register_namedtuple_serialization(  # for jax.export-ed steps
  LowMemoryAdadeltaState, serialized_name="optax_adadelta.LowMemoryAdadeltaState"
)


# Stochastic rounding to 16 bits ------------------------------------------------------


def round_stochastically(values: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
  """`values` (float32, ≥ 0) in `dtype`, the upper neighbour with probability (v−lo)/(hi−lo).

  `bits`: 16 random bits per value (uint32 below 2¹⁶). For bfloat16 they are added to the
  16 bits that bfloat16 drops, which carries into the kept bits with exactly that
  probability; float16 compares a uniform number with the position between neighbours.
  """
  if jnp.dtype(dtype) == jnp.bfloat16:
    raised = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32) + bits
    kept = jax.lax.bitcast_convert_type(raised & jnp.uint32(0xFFFF0000), jnp.float32)
    return kept.astype(dtype)  # exact: the dropped bits are zero
  nearest = values.astype(dtype)
  below = nearest.astype(jnp.float32) > values
  toward = jnp.where(below, jnp.asarray(-jnp.inf, dtype), jnp.asarray(jnp.inf, dtype))
  other = jnp.nextafter(nearest, toward)
  low = jnp.where(below, other, nearest)
  high = jnp.where(below, nearest, other)
  low32, high32 = low.astype(jnp.float32), high.astype(jnp.float32)
  gap = high32 - low32
  p = jnp.where(jnp.isfinite(gap) & (gap > 0), (values - low32) / gap, 0.0)
  return jnp.where(to_uniform(bits) < p, high, low)


# The transform -----------------------------------------------------------------------


def _shard_last(p: Any) -> int:
  """Length of the last axis in one shard of `p` (the whole axis when not known)."""
  sharding = getattr(p, "sharding", None) if isinstance(p, jax.Array) else None
  if sharding is None or isinstance(p, jax.core.Tracer):
    try:
      sharding = jax.typeof(p).sharding
    except Exception:  # not an array, or no sharding in its type
      sharding = None
  try:
    return int(sharding.shard_shape(tuple(p.shape))[-1])  # type: ignore[union-attr]
  except Exception:  # no sharding, or one without a concrete mesh
    return int(p.shape[-1])


def _leaf_blocks(p: Any, min_8bit_size: int) -> int | None:
  """Number of blocks of the last axis for an 8-bit leaf, or None to keep it full."""
  dtype = jnp.result_type(p)
  if not jnp.issubdtype(dtype, jnp.floating) or p.ndim == 0 or p.size < min_8bit_size:
    return None
  if p.size == 0:  # nothing to scale: an empty full-precision state costs no bytes
    return None
  size = block_size(_shard_last(p))
  return None if size is None else p.shape[-1] // size


QuantizedLeaf = tuple[jax.Array, QuantizedAverage, QuantizedAverage, jax.Array]


def update_quantized(
  leaf: QuantizedLeaf, update_leaf: Callable[..., tuple], stochastic: bool, rho: Any, eps: Any
) -> tuple[jax.Array, QuantizedAverage, QuantizedAverage]:
  """(Δx, E[g²], E[Δx²]) of one 8-bit leaf (g, E[g²], E[Δx²], key): dequantize, update,
  quantize (rounded stochastically with the key's bits, E[g²]'s lifted, or to nearest)."""
  g, a, b, key = leaf
  step, a_new, b_new = update_leaf(g, dequantize(a), dequantize(b))
  if not stochastic:
    return (
      step,
      quantize(a_new, a.scale.shape[-1], None, floor_up=True),
      quantize(b_new, b.scale.shape[-1], None),
    )
  # One uniform number rounds both averages of a coordinate: each stays unbiased, and their
  # ratio, all that the step uses, carries the least rounding noise the codes allow (the
  # guide's "Long runs": independent draws let it drift until a coordinate oscillates).
  shared = bits_from_key(key, g.shape) >> 16
  lift = (lift_weight(rho), jnp.asarray(eps, jnp.float32))
  return (
    step,
    quantize(a_new, a.scale.shape[-1], shared, lift, floor_up=True),
    quantize(b_new, b.scale.shape[-1], shared),
  )


def scale_by_adadelta_low_memory(
  update_leaf: Callable[..., tuple],
  accumulator_dtype: Any,
  rho: Any,
  eps: Any,
  *,
  state_bits: int | None,
  stochastic_rounding: bool,
  min_8bit_size: int,
  update_quantized_leaves: Callable[[list[QuantizedLeaf]], list] | None = None,
) -> optax.GradientTransformation:
  """Adadelta on a LowMemoryAdadeltaState; `update_leaf(g, e_g2, e_dx2)` updates float32.

  `update_quantized_leaves`, given the 8-bit leaves of a step, returns what
  :func:`update_quantized` returns for each (the native kernel does all in one call).
  """
  if update_quantized_leaves is None:
    update_quantized_leaves = lambda leaves: [
      update_quantized(leaf, update_leaf, stochastic_rounding, rho, eps) for leaf in leaves
    ]

  def init_fn(params):
    def zeros(path, wrapped):
      if wrapped is None:
        return None
      p = jax.tree.leaves(wrapped)[0] if _is_variable(wrapped) else wrapped
      dtype = _checks.state_dtype(path, p, accumulator_dtype)
      blocks = _leaf_blocks(p, min_8bit_size) if state_bits == 8 else None
      like = lambda make: jax.tree.map(make, wrapped)  # inside a Variable if p is in one
      if blocks is None:
        return like(lambda p: jnp.zeros_like(p, dtype=dtype))
      codes = like(lambda p: jnp.zeros_like(p, dtype=jnp.uint8))  # the parameter's sharding
      scale = like(lambda p: jnp.max(blocks_of(jnp.zeros_like(p, jnp.float32), blocks), axis=-1))
      return QuantizedAverage(codes, scale)

    e_g2 = jax.tree_util.tree_map_with_path(zeros, params, is_leaf=_is_variable)
    if stochastic_rounding and state_bits is None:
      dtypes = [a.dtype for a in jax.tree.leaves(e_g2)]
      if not any(_narrower_than_float32(d) for d in dtypes):
        _checks.check_narrow_state(max(dtypes, key=lambda d: jnp.dtype(d).itemsize))
    e_dx2 = jax.tree_util.tree_map_with_path(zeros, params, is_leaf=_is_variable)  # not aliased
    return LowMemoryAdadeltaState(jnp.zeros([], jnp.int32), e_g2, e_dx2)

  def update_fn(updates, state, params=None):
    del params
    wrapped, treedef = _check(updates, state)
    old_g2 = _checks.leaves_like_state(treedef, state.e_g2, "e_g2")
    old_dx2 = _checks.leaves_like_state(treedef, state.e_dx2, "e_dx2")
    steps: list[Any] = []
    new_g2: list[Any] = []
    new_dx2: list[Any] = []
    quantized: dict[int, QuantizedLeaf] = {}  # position -> the leaf, updated together below
    for number, (g_in, a_in, b_in) in enumerate(zip(wrapped, old_g2, old_dx2, strict=True)):
      steps.append(None)
      new_g2.append(a_in)  # a frozen parameter (None gradient): its state stays
      new_dx2.append(b_in)
      if g_in is None:
        continue
      g, a, b = jnp.asarray(_unwrap(g_in)), _unwrap(a_in), _unwrap(b_in)  # g: maybe a float
      key = jnp.uint32(0)
      if stochastic_rounding:
        key = stream_key(state.count, number, shard_position(g, a.codes if is_quantized(a) else a))
      if is_quantized(a):
        quantized[number] = (g, a, b, key)
        continue
      step, a_new, b_new = update_leaf(g, _widen(a), _widen(b))
      bits = None if not stochastic_rounding else bits_from_key(key, g.shape)
      steps[number] = _like(step, g_in)
      new_g2[number] = _like(_store(a_new, a, None if bits is None else bits >> 16), a_in)
      new_dx2[number] = _like(_store(b_new, b, None if bits is None else bits & 0xFFFF), b_in)
    results = update_quantized_leaves(list(quantized.values())) if quantized else []
    for number, (step, a_new, b_new) in zip(quantized, results, strict=True):
      steps[number] = _like(step, wrapped[number])
      new_g2[number] = _like(a_new, old_g2[number])
      new_dx2[number] = _like(b_new, old_dx2[number])
    return treedef.unflatten(steps), LowMemoryAdadeltaState(
      state.count + 1, treedef.unflatten(new_g2), treedef.unflatten(new_dx2)
    )

  def _store(value, old, bits):
    if bits is not None and _narrower_than_float32(old.dtype):
      return round_stochastically(value.astype(jnp.float32), old.dtype, bits)
    return value.astype(old.dtype)

  return optax.GradientTransformation(init_fn, update_fn)


def _is_variable(x: Any) -> bool:
  """A Flax NNX Variable (nnx.Param, ...): one array in a pytree node with metadata.

  The state keeps each QuantizedAverage *outside* the Variable, codes and scale each in a
  Variable like the parameter's, so that `nnx.Optimizer` finds one array per Variable.
  """
  return hasattr(x, "get_value") and hasattr(x, "get_metadata")


def _narrower_than_float32(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _widen(average: Any) -> jax.Array:
  """The average as float32 (8-bit codes dequantized, 16 bits widened) or its own dtype."""
  if is_quantized(average):
    return dequantize(average)
  if _narrower_than_float32(average.dtype):
    return average.astype(jnp.float32)
  return average


def _check(updates: Any, state: Any):
  if not isinstance(state, LowMemoryAdadeltaState):
    raise TypeError(
      f"scale_by_adadelta(stochastic_rounding=..., state_bits=...) expects a "
      f"LowMemoryAdadeltaState, got {type(state).__name__}; build the state with the same "
      "transform's init"
    )
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(
    updates, is_leaf=lambda x: x is None or _is_variable(x)
  )
  leaves = _checks.leaves_like_state(treedef, state.e_g2, "e_g2")
  for (path, g), a in zip(with_paths, leaves, strict=True):
    if g is not None:
      a = _unwrap(a)
      _checks.check_gradient_leaf(path, _unwrap(g), a.codes if is_quantized(a) else a)
  return [g for _, g in with_paths], treedef


def _unwrap(x: Any) -> Any:
  """An array, or a QuantizedAverage of arrays, out of Flax NNX Variables."""
  if is_quantized(x):
    return QuantizedAverage(_unwrap(x.codes), _unwrap(x.scale))
  return jax.tree.leaves(x)[0] if _is_variable(x) else x


def _like(new: Any, old: Any) -> Any:
  """`new` (arrays) in the wrapping of `old` (the same nodes, e.g. NNX Variables)."""
  return jax.tree.unflatten(jax.tree.structure(old), jax.tree.leaves(new))


def state_bytes(state: Any) -> int:
  """Bytes of every array in `state` (codes, scales, 16-bit and full averages, counter)."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def average_values(average: Any) -> Any:
  """A tree of averages (arrays or QuantizedAverage) as float32/own-dtype arrays."""
  return jax.tree.map(lambda a: None if a is None else _widen(a), average, is_leaf=is_quantized)
