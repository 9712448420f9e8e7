"""What the two low-memory formats share: the leaf walk, 16-bit stochastic rounding, a state.

The 16-bit format (:mod:`optax_adadelta.formats.rounded16`) and the 8-bit format
(:mod:`optax_adadelta.formats.eight_bit`) both keep a step counter in the state, which seeds
the random bits of stochastic rounding (:mod:`optax_adadelta.formats.random_bits`), and both
compute every step in float32: read the state, Algorithm 1, store it back. A leaf that a
format stores in a code of its own (a *coded* leaf: 8-bit averages, the 16-bit format's
ratio code) is updated by the format, all of a step's at once; every other leaf is kept as an
array of its state dtype, rounded stochastically when that dtype is narrower than float32 and
rounding is on. `LowMemoryAdadeltaState` is the 8-bit format's state; the 16-bit format
has its own (it also keeps ε)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_adadelta import _checks
from optax_adadelta.formats.random_bits import bits_from_key, shard_position, stream_key, to_uniform


class LowMemoryAdadeltaState(NamedTuple):
  """State of ``scale_by_adadelta(state_bits=8)`` (:func:`scale_by_adadelta_8bit`).

  Attributes:
    count: int32 number of updates so far; seeds the stochastic rounding.
    e_g2: E[g²], a tree shaped like the parameters whose leaves are
      :class:`QuantizedAverage` or, for leaves kept so, arrays (16-bit rounded
      stochastically, or full precision).
    e_dx2: E[Δx²], the same layout.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  e_g2: Any
  e_dx2: Any


jax.export.register_namedtuple_serialization(  # for jax.export-ed steps
  LowMemoryAdadeltaState, serialized_name="optax_adadelta.LowMemoryAdadeltaState"
)

NOT_LOADABLE = (
  "interop.from_torch/from_keras/from_tfjs cannot load into a low-memory state "
  "(stochastic_rounding=True or state_bits=8): load into the optimizer's float32 "
  "state (the same optimizer without those keywords); to_torch/to_keras export a "
  "low-memory state as float32 (dequantized)"
)

# (g, E[g²] node, E[Δx²] node, key) of one coded leaf, as a format's update receives it.
CodedLeaf = tuple[jax.Array, Any, Any, jax.Array]


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


def narrower_than_float32(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def is_variable(x: Any) -> bool:
  """A Flax NNX Variable (nnx.Param, ...): one array in a pytree node with metadata.

  The state keeps each coded average *outside* the Variable, each of its arrays in a
  Variable like the parameter's, so that `nnx.Optimizer` finds one array per Variable.
  """
  return hasattr(x, "get_value") and hasattr(x, "get_metadata")


def unwrap(x: Any, coded: Callable[[Any], bool]) -> Any:
  """An array, or a coded node (a NamedTuple of arrays), out of Flax NNX Variables."""
  if coded(x):
    return type(x)(*(unwrap(part, coded) for part in x))
  return jax.tree.leaves(x)[0] if is_variable(x) else x


def rewrap(new: Any, old: Any) -> Any:
  """`new` (arrays) in the wrapping of `old` (the same nodes, e.g. NNX Variables)."""
  return jax.tree.unflatten(jax.tree.structure(old), jax.tree.leaves(new))


def shard_last(p: Any) -> int:
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


def state_bytes(state: Any) -> int:
  """Bytes of every array in `state` (codes, scales, 16-bit and full averages, counter)."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def transformation(
  update_leaf: Callable[..., tuple],
  accumulator_dtype: Any,
  *,
  stochastic_rounding: bool,
  what: str,
  coded: Callable[[Any], bool] = lambda node: False,
  init_coded: Callable[[Any, Any, str], Any] | None = None,
  update_coded: Callable[[list[CodedLeaf], Any], list] | None = None,
  make_state: Callable[[jax.Array, Any, Any], Any] = LowMemoryAdadeltaState,
  state_type: type = LowMemoryAdadeltaState,
  needs_narrow: bool = False,
  check_coded: Callable[[Any, Any, Any], None] | None = None,
  wrap_coded: bool = True,
) -> optax.GradientTransformation:
  """Adadelta on a low-memory state; `update_leaf(g, e_g2, e_dx2)` updates float32.

  `init_coded(p, dtype, field)` gives the coded node of the parameter `p`'s average `field`
  ("e_g2" or "e_dx2", `dtype` its state dtype), or None to keep an array; a leaf with a
  coded node in either average is updated by `update_coded(leaves, state)`, all of a step's
  together, which returns (Δx, E[g²] node, E[Δx²] node) of each; `coded(node)` says
  whether a state node is coded. `make_state(count, e_g2, e_dx2)` builds the state (an
  instance of `state_type`); `needs_narrow` refuses, at init, a state without a leaf
  narrower than float32. `what` names the transformation in errors. `check_coded(path, g,
  node)` checks a gradient against its coded node (by default, against the node's first
  array, which is then shaped like the parameter); `wrap_coded=False` keeps a coded node's
  arrays out of the parameter's Flax NNX Variable (for arrays not shaped like it).
  """

  def init_fn(params):
    def zeros(field, path, wrapped):
      if wrapped is None:
        return None
      p = jax.tree.leaves(wrapped)[0] if is_variable(wrapped) else wrapped
      dtype = _checks.state_dtype(path, p, accumulator_dtype)
      node = None if init_coded is None else init_coded(p, dtype, field)
      like = lambda make: jax.tree.map(make, wrapped)  # inside a Variable if p is in one
      if node is None:
        return like(lambda p: jnp.zeros_like(p, dtype=dtype))
      if not wrap_coded:
        return node
      return type(node)(*(like(lambda _, part=part: part) for part in node))

    def averages(field):  # called once per field: the two trees share no buffer
      map_with_path = jax.tree_util.tree_map_with_path
      return map_with_path(lambda *x: zeros(field, *x), params, is_leaf=is_variable)

    e_g2, e_dx2 = averages("e_g2"), averages("e_dx2")
    if needs_narrow:
      dtypes = [a.dtype for a in jax.tree.leaves(e_g2)]
      if not any(narrower_than_float32(d) for d in dtypes):
        _checks.check_narrow_state(max(dtypes, key=lambda d: jnp.dtype(d).itemsize))
    return make_state(jnp.zeros([], jnp.int32), e_g2, e_dx2)

  def update_fn(updates, state, params=None):
    del params
    wrapped, treedef = _check(updates, state, coded, what, state_type, check_coded)
    old_g2 = _checks.leaves_like_state(treedef, state.e_g2, "e_g2")
    old_dx2 = _checks.leaves_like_state(treedef, state.e_dx2, "e_dx2")
    steps: list[Any] = []
    new_g2: list[Any] = []
    new_dx2: list[Any] = []
    coded_leaves: dict[int, CodedLeaf] = {}  # position -> the leaf, updated together below
    for number, (g_in, a_in, b_in) in enumerate(zip(wrapped, old_g2, old_dx2, strict=True)):
      steps.append(None)
      new_g2.append(a_in)  # a frozen parameter (None gradient): its state stays
      new_dx2.append(b_in)
      if g_in is None:
        continue
      g = jnp.asarray(unwrap(g_in, coded))  # maybe a float
      a, b = unwrap(a_in, coded), unwrap(b_in, coded)
      key = jnp.uint32(0)
      if stochastic_rounding:
        key = stream_key(state.count, number, shard_position(g, _payload(a, coded)))
      if coded(a) or coded(b):
        coded_leaves[number] = (g, a, b, key)
        continue
      step, a_new, b_new = update_leaf(g, widen(a), widen(b))
      bits = None if not stochastic_rounding else bits_from_key(key, g.shape)
      steps[number] = rewrap(step, g_in)
      new_g2[number] = rewrap(_store(a_new, a, None if bits is None else bits >> 16), a_in)
      new_dx2[number] = rewrap(_store(b_new, b, None if bits is None else bits & 0xFFFF), b_in)
    if coded_leaves:
      assert update_coded is not None  # coded nodes come only from init_coded
      results = update_coded(list(coded_leaves.values()), state)
      for number, (step, a_new, b_new) in zip(coded_leaves, results, strict=True):
        steps[number] = rewrap(step, wrapped[number])
        new_g2[number] = rewrap(a_new, old_g2[number])
        new_dx2[number] = rewrap(b_new, old_dx2[number])
    return treedef.unflatten(steps), make_state(
      state.count + 1, treedef.unflatten(new_g2), treedef.unflatten(new_dx2)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _store(value: jax.Array, old: jax.Array, bits: jax.Array | None) -> jax.Array:
  if bits is not None and narrower_than_float32(old.dtype):
    return round_stochastically(value.astype(jnp.float32), old.dtype, bits)
  return value.astype(old.dtype)


def widen(average: jax.Array) -> jax.Array:
  """A 16-bit average as float32; any other as it is."""
  return average.astype(jnp.float32) if narrower_than_float32(average.dtype) else average


def _payload(node: Any, coded: Callable[[Any], bool]) -> Any:
  """The array of a state node shaped like its parameter (a coded node's first field)."""
  return node[0] if coded(node) else node


def _check(
  updates: Any,
  state: Any,
  coded: Callable[[Any], bool],
  what: str,
  state_type: Any,
  check_coded: Callable[[Any, Any, Any], None] | None,
):
  if not isinstance(state, state_type):
    raise TypeError(
      f"{what} expects a {state_type.__name__}, got {type(state).__name__}; build the "
      "state with the same transform's init"
    )
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(
    updates, is_leaf=lambda x: x is None or is_variable(x)
  )
  leaves = _checks.leaves_like_state(treedef, state.e_g2, "e_g2")
  for (path, g), a in zip(with_paths, leaves, strict=True):
    if g is None:
      continue
    a = unwrap(a, coded)
    if check_coded is not None and coded(a):
      check_coded(path, unwrap(g, coded), a)
    else:
      _checks.check_gradient_leaf(path, unwrap(g, coded), _payload(a, coded))
  return [g for _, g in with_paths], treedef


def whole_blocks(what: str) -> Callable[[Any, Any], None]:
  """A check for :func:`zero_shardings` that refuses a split of a coded node's last axis
  which would cut its blocks (codes and one scale per block of the last axis)."""

  def check(node: Any, sharding: Any) -> None:
    shape, blocks = tuple(node.codes.shape), (node.scale.shape or (1,))[-1]
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    names = spec[-1] if shape else None
    if names is None:
      return
    names = (names,) if isinstance(names, str) else tuple(names)
    size = int(np.prod([sharding.mesh.shape[name] for name in names]))
    if blocks % size:
      raise ValueError(
        f"state_shardings would split {what} of shape {shape} along its last axis into "
        f"{size} pieces, but its {blocks} blocks of {shape[-1] // blocks} do not divide "
        "evenly among them. Call tx.init on parameters laid out as the split (jax.device_put("
        "params, state_shardings(params, mesh))): the blocks then fit in each piece."
      )

  return check


def zero_shardings(
  state: Any,
  leaf_sharding: Callable[[Any], Any],
  coded: Callable[[Any], bool],
  check: Callable[[Any, Any], None] | None = None,
) -> Any:
  """ZeRO-1 shardings of a low-memory state: every array as `leaf_sharding` lays it out, the
  arrays of a coded node (codes, block scales) all split along its codes' dimension, after
  `check(node, sharding)` (which may refuse a split that cuts its blocks)."""

  def one(node: Any) -> Any:
    if not coded(node):
      return leaf_sharding(node)
    sharding = leaf_sharding(node[0])
    if check is not None:
      check(node, sharding)
    return type(node)(*(sharding for _ in node))

  return jax.tree.map(one, state, is_leaf=coded)
