"""Optimizer state split over the data-parallel devices (ZeRO stage 1).

Data-parallel training keeps a copy of the parameters on every device, and by default
their Adadelta state too: E[g²] and E[Δx²] follow the parameters' sharding. Nothing in the
update needs the whole state on one device (each coordinate is updated on its own), so
each device can keep 1/N of it: the device updates its slice of the state with its slice
of the (averaged) gradients, and one all-gather per leaf hands every device the whole
update. The parameters stay replicated::

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  tx = optax_adadelta.adadelta()
  shardings = sharding.state_shardings(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=shardings)(params)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss)(params, x, y)
    grads = sharding.shard_gradients(grads, mesh)      # this device's slice: no copy
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = sharding.replicate_updates(updates, mesh)  # the one all-gather per leaf
    return optax.apply_updates(params, updates), opt_state

Without :func:`replicate_updates` XLA keeps the updates, and then the parameters, split
(FSDP rather than ZeRO-1). Without :func:`shard_gradients` the numbers are the same but
XLA decides where the slicing happens.

A leaf is split along its largest dimension that the axis size divides (the first such
if several are equally large); a leaf with no such dimension (a bias of 10 on 8 devices, a
step count) stays replicated; a factored matrix's row and column means (``factored=True``)
are split as their parameter would be, less the averaged axis. The shardings name only
``axis``: parameters already split over other mesh axes (tensor parallelism) are better
served by the default state, which follows them. The packed state (``packed_state=True``)
is refused: its flat array concatenates the small leaves inside the update, so a split of
it would be undone by gathers every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from optax_adadelta import formats

Axis = str | Sequence[str]


def _axis_names(mesh: Any, axis: Axis) -> tuple[str, ...]:
  """`axis` as a tuple of mesh axis names, checked against `mesh`."""
  if not isinstance(mesh, Mesh):
    raise TypeError(
      f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('data',))), "
      f"got {type(mesh).__name__}: {mesh!r}"
    )
  names = (axis,) if isinstance(axis, str) else tuple(axis) if isinstance(axis, Sequence) else None
  if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
    raise TypeError(f"axis must be a mesh axis name or a tuple of distinct names, got {axis!r}")
  unknown = [n for n in names if n not in mesh.axis_names]
  if unknown:
    raise ValueError(
      f"axis={axis!r} names {unknown}, which the mesh does not have; its axes are {mesh.axis_names}"
    )
  return names


def _split_dimension(shape: tuple[int, ...], size: int) -> int | None:
  """The largest dimension that `size` divides (the first of equals), or None."""
  candidates = [d for d, n in enumerate(shape) if n >= size and n % size == 0]
  return max(candidates, key=lambda d: (shape[d], -d)) if candidates else None


def _leaf_sharding(leaf: Any, mesh: Mesh, names: tuple[str, ...]) -> NamedSharding:
  shape = tuple(getattr(leaf, "shape", ()))
  size = math.prod(mesh.shape[n] for n in names)
  dim = _split_dimension(shape, size)
  if dim is None:
    return NamedSharding(mesh, P())
  spec: list[Any] = [None] * len(shape)
  spec[dim] = names[0] if len(names) == 1 else names
  return NamedSharding(mesh, P(*spec))


def state_shardings(abstract_state: Any, mesh: Mesh, axis: Axis = "data") -> Any:
  """Shardings that split every leaf of an optimizer state over one mesh axis (ZeRO-1).

  Each leaf is split along its largest dimension divisible by the size of ``axis`` (the
  first of equally large ones); a leaf without one (a scalar count, a bias shorter than
  the axis) is replicated. Every array leaf of the state is laid out this way, Adadelta's
  E[g²] and E[Δx²] and any other (a parameter EMA, momentum), whatever its dtype: a
  bfloat16 state (``accumulator_dtype``) splits like a float32 one. An 8-bit average
  (``state_bits=8``) splits its codes and block scales along the same dimension; along
  the last one only if its blocks divide evenly (else a ValueError says what to do).

  Args:
    abstract_state: the state or its shapes, e.g. ``jax.eval_shape(tx.init, params)``.
    mesh: the device mesh of the training step.
    axis: the mesh axis to split over (the data-parallel one), or a tuple of axes to
      split over their product.

  Returns:
    A tree of :class:`jax.sharding.NamedSharding` with the structure of
    ``abstract_state``, for ``jax.jit(tx.init, out_shardings=...)``, the training step's
    ``out_shardings``, ``jax.device_put`` or the templates of
    :func:`optax_adadelta.checkpoint.restore`.

  Raises:
    TypeError: ``mesh`` is not a :class:`jax.sharding.Mesh`, ``axis`` is not a name or
      tuple of names, or the state is a ``PackedAdadeltaState``.
    ValueError: ``axis`` names an axis the mesh does not have.
  """
  names = _axis_names(mesh, axis)
  leaf_sharding = lambda leaf: _leaf_sharding(leaf, mesh, names)

  def one(node: Any) -> Any:  # an Adadelta state's format says how it splits
    fmt = formats.format_of(node)
    return leaf_sharding(node) if fmt is None else fmt.zero_shardings(node, leaf_sharding)

  return jax.tree.map(one, abstract_state, is_leaf=formats.is_state)


def _constrain(tree: Any, shardings: Any) -> Any:
  """`tree` laid out as `shardings`, inside jit or not, on Auto or Explicit axes."""

  def one(x, sharding):
    if any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
      return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)

  return jax.tree.map(one, tree, shardings)


def shard_gradients(grads: Any, mesh: Mesh, axis: Axis = "data") -> Any:
  """The gradients split like the state leaves of their shapes (see :func:`state_shardings`).

  Call it in the training step, on the averaged (replicated) gradients, before
  ``tx.update``: each device then keeps the slice that matches its slice of the state,
  which costs no communication, and the update runs shard by shard.
  """
  names = _axis_names(mesh, axis)
  return _constrain(grads, jax.tree.map(lambda g: _leaf_sharding(g, mesh, names), grads))


def replicate_updates(updates: Any, mesh: Mesh) -> Any:
  """The updates replicated on every device of ``mesh``: one all-gather per split leaf.

  Call it on ``tx.update``'s updates before ``optax.apply_updates``, so that the
  parameters stay replicated.
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}: {mesh!r}")
  return _constrain(updates, jax.tree.map(lambda _: NamedSharding(mesh, P()), updates))


def per_device_bytes(tree: Any) -> dict[int, int]:
  """Bytes of ``tree``'s arrays held by each addressable device, ``{device id: bytes}``.

  Counted from the arrays' shards, so a replicated leaf counts in full on every device and
  a split one by its slice.
  """
  held: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return held
