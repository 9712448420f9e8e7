"""Adadelta with a low-memory state: 16-bit averages rounded stochastically, or 8-bit codes.

Two formats, chosen by :func:`optax_adadelta.scale_by_adadelta`'s keywords; both keep the
arithmetic of every step in float32 (dequantize, Algorithm 1, quantize) and a step counter
in the state:

``stochastic_rounding=True`` with a bfloat16 or float16 state
  Each new average is rounded to one of the two neighbouring 16-bit numbers, the upper
  with probability (v − lo)/(hi − lo), so it is v in expectation. Rounded to nearest,
  (1 − ρ)(g² − E[g²]) falls under half an ulp once E[g²] is within 2⁻⁹/(1 − ρ) of its
  target (bfloat16, 1/0.05 · 2⁻⁹ ≈ 4 %), and the average stalls there.

``state_bits=8``
  Each average of a leaf of at least ``min_8bit_size`` elements is stored as uint8 codes of
  the parameter's shape and one float32 scale per block of ``B`` contiguous elements of the
  last axis (``B`` the largest divisor of that axis, per shard, up to 256; at least 32, or
  the leaf keeps a full-precision state): ``S`` = the block's largest value and

  .. math::  E(c) = S \\cdot 2^{-\\gamma (255 - c)} \\ (c \\ge 1), \\quad E(0) = 0,
             \\quad \\gamma = 24 / 254,

  a logarithmic code over 24 octaves of E below the block's maximum (12 of the root mean
  square √E, which is what Adadelta uses: √(E[Δx²]+ε)/√(E[g²]+ε)). Adjacent codes differ by
  the factor 2^γ = 1.068, so rounding to the nearer code changes E by at most 3.3 % and
  √(E+ε) by at most 1.65 %, whatever the block's range; the block's maximum is exact, a
  zero block is exact. Values under S·2⁻²⁴ round to 0 or to E(1). The codes are rounded
  stochastically (unbiased in E) when ``stochastic_rounding`` is True, the default for
  8-bit, else to the nearer code in E.

The random bits are a counter-based hash of (step counter, leaf number, coordinate's index
in the whole leaf), 16 bits for each average: reproducible, restored with the state, the same for
a replicated leaf on every device, different on every shard of a sharded one, and under
``vmap`` the same as separate runs. Inside ``shard_map`` the index is the shard's own, and
the shard's position along the mesh axes over which its leaf varies (read from
``shard_map``'s types) selects the stream: shards draw independent streams, a replicated
leaf the same one everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_adadelta import _checks

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


for _cls in (QuantizedAverage, LowMemoryAdadeltaState):  # for jax.export-ed steps
  jax.export.register_namedtuple_serialization(
    _cls, serialized_name=f"optax_adadelta.{_cls.__name__}"
  )


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedAverage)


# The 8-bit code ----------------------------------------------------------------------


def block_size(shard_last: int) -> int | None:
  """The largest divisor of a shard's last axis up to MAX_BLOCK, or None below MIN_BLOCK."""
  size = max(d for d in range(1, min(MAX_BLOCK, shard_last) + 1) if shard_last % d == 0)
  return size if size >= MIN_BLOCK else None


def _blocks(x: jax.Array, blocks: int) -> jax.Array:
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
  values = _blocks(level(q.codes.astype(jnp.int32)), blocks) * q.scale[..., None]
  return values.reshape(q.codes.shape)


def _block_max(grouped: jax.Array) -> jax.Array:
  """Each block's largest value, NaN if it holds one (XLA's CPU max may skip a NaN).

  The values are non-negative or NaN: their bits, sign cleared, order as integers with NaN
  above +inf, so one integer maximum does it (the native kernel takes the same one).
  """
  bits = jax.lax.bitcast_convert_type(grouped, jnp.int32) & jnp.int32(0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(jnp.max(bits, axis=-1, keepdims=True), jnp.float32)


def quantize(values: jax.Array, blocks: int, bits: jax.Array | None) -> QuantizedAverage:
  """Codes for non-negative float32 `values`, rounded up with probability p.

  With x = E/S between level(c) and level(c + 1), p = (x − level(c))/(level(c + 1) −
  level(c)): linear in E, so the mean of the stored E over 16 random `bits` per value is
  the value; `bits=None` rounds to the nearer code in E (p > 1/2). Three polynomials and
  no logarithm per value; the native kernel computes the same numbers in the same order.
  A NaN makes its block's scale NaN, so the whole block reads NaN: loud, and bounded.
  """
  grouped = _blocks(values.astype(jnp.float32), blocks)
  scale = _block_max(grouped)
  x = grouped * (1.0 / jnp.where(scale > 0, scale, 1.0))  # in [0, 1]
  low = _code_below(x)
  below = level(low)
  p = (x - below) / (level(low + 1) - below)
  threshold = 0.5 if bits is None else _blocks(to_uniform(bits), blocks)
  codes = jnp.where(grouped >= scale, 255, low + (p > threshold).astype(jnp.int32))
  return QuantizedAverage(codes.astype(jnp.uint8).reshape(values.shape), scale[..., 0])


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


# Counter-based random numbers --------------------------------------------------------


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
  size = block_size(_shard_last(p))
  return None if size is None else p.shape[-1] // size


QuantizedLeaf = tuple[jax.Array, QuantizedAverage, QuantizedAverage, jax.Array]


def update_quantized(
  leaf: QuantizedLeaf, update_leaf: Callable[..., tuple], stochastic: bool
) -> tuple[jax.Array, QuantizedAverage, QuantizedAverage]:
  """(Δx, E[g²], E[Δx²]) of one 8-bit leaf (g, E[g²], E[Δx²], key): dequantize, update,
  quantize (rounded stochastically with the key's bits, or to nearest)."""
  g, a, b, key = leaf
  step, a_new, b_new = update_leaf(g, dequantize(a), dequantize(b))
  bits = bits_from_key(key, g.shape) if stochastic else None
  high, low = (None, None) if bits is None else (bits >> 16, bits & jnp.uint32(0xFFFF))
  return (
    step,
    quantize(a_new, a.scale.shape[-1], high),
    quantize(b_new, b.scale.shape[-1], low),
  )


def scale_by_adadelta_low_memory(
  update_leaf: Callable[..., tuple],
  accumulator_dtype: Any,
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
      update_quantized(leaf, update_leaf, stochastic_rounding) for leaf in leaves
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
      scale = like(lambda p: jnp.max(_blocks(jnp.zeros_like(p, jnp.float32), blocks), axis=-1))
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
    old_g2 = _checks._leaves_like_state(treedef, state.e_g2, "e_g2")
    old_dx2 = _checks._leaves_like_state(treedef, state.e_dx2, "e_dx2")
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
  leaves = _checks._leaves_like_state(treedef, state.e_g2, "e_g2")
  for (path, g), a in zip(with_paths, leaves, strict=True):
    if g is not None:
      a = _unwrap(a)
      _checks._check_gradient_leaf(path, _unwrap(g), a.codes if is_quantized(a) else a)
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
