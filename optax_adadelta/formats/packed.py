"""The packed state format: the small leaves' averages in flat arrays (``packed_state=True``).

The default state mirrors the parameters: one E[g²] and one E[Δx²] array per leaf. Passing a
few thousand arrays into and out of a jitted step costs JAX more than updating them
(benchmarks/README.md), so a model of many small leaves can keep each average of its small
leaves (below `PACKED_BELOW` elements) as one flat array, laid out leaf after leaf in the order
of the flattened parameter tree. Larger leaves keep an array of their own, shaped and sharded
like the parameter: packing them would only copy megabytes each step. Each step concatenates
the small gradients, updates every coordinate as the per-leaf state does, and cuts Δx back
into the gradients' shapes.

The layout (the leaves' key paths, shapes, dtype, threshold) is stored in the state, so
gradients of any other structure, shape or dtype are refused, naming the first difference.
The paths leave out the boxes frameworks put around one array and take off again between
init and update (nnx.Optimizer inits on nnx.Param Variables, then updates with plain arrays),
as the per-leaf state, which is shaped like the gradients, does.

What the packed state gives up: it does not take the small parameters' shardings (the flat
arrays are replicated; under Explicit mesh axes each small gradient is gathered into them and
its step sliced back to the gradient's sharding), and `interop` does not convert it. All
leaves must be real and of one floating dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_adadelta import _checks, native
from optax_adadelta.formats import base

PACKED_BELOW = 1 << 18  # elements: leaves below this are packed (1 MiB in float32)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
  """What a :class:`PackedAdadeltaState` was built for (static: not an array, not saved).

  Attributes:
    leaf_names: each leaf's key path, in ``jax.tree.leaves`` order, without the keys of
      boxes around one array (``['bias']`` for nnx's ``['bias'].value``).
    shapes: shape of each leaf, in ``jax.tree.leaves`` order.
    dtype: the leaves' dtype.
    packed_below: leaves with fewer elements than this are packed.
  """

  leaf_names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtype: str
  packed_below: int

  @property
  def packed(self) -> tuple[bool, ...]:
    return tuple(int(np.prod(s)) < self.packed_below for s in self.shapes)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["e_g2_packed", "e_dx2_packed", "e_g2_large", "e_dx2_large"],
  meta_fields=["layout"],
)
@dataclasses.dataclass(frozen=True)
class PackedAdadeltaState:
  """State of ``scale_by_adadelta(packed_state=True)``.

  Attributes:
    e_g2_packed: E[g²] of every leaf below ``layout.packed_below`` elements, each raveled,
      laid end to end in ``jax.tree.leaves`` order.
    e_dx2_packed: E[Δx²] of the same leaves, in the same layout.
    e_g2_large: E[g²] of each larger leaf, in the same order, shaped (and sharded) like it.
    e_dx2_large: E[Δx²] of each larger leaf.
    layout: the parameter tree the state was built for (a :class:`PackedLayout`).
  """

  e_g2_packed: jax.Array
  e_dx2_packed: jax.Array
  e_g2_large: tuple[jax.Array, ...]
  e_dx2_large: tuple[jax.Array, ...]
  layout: PackedLayout


def _layout_to_bytes(aux: tuple[PackedLayout]) -> bytes:
  (layout,) = aux
  return json.dumps(dataclasses.asdict(layout)).encode()


def _layout_from_bytes(data: bytes) -> tuple[PackedLayout]:
  fields = json.loads(data)
  return (
    PackedLayout(
      leaf_names=tuple(fields["leaf_names"]),
      shapes=tuple(tuple(shape) for shape in fields["shapes"]),
      dtype=fields["dtype"],
      packed_below=fields["packed_below"],
    ),
  )


# So that a `jax.export`-ed step taking this state can be serialized; the layout is its
# static part, written as JSON.
jax.export.register_pytree_node_serialization(
  PackedAdadeltaState,
  serialized_name="optax_adadelta.PackedAdadeltaState",
  serialize_auxdata=_layout_to_bytes,
  deserialize_auxdata=_layout_from_bytes,
)


def _real_leaves(what: str, tree: Any) -> tuple[list, list[jax.Array], Any]:
  """Paths, leaves and structure of `tree`, checked: no None, real floating, one dtype."""
  paths, leaves, treedef = _checks.flatten_gradients(tree)
  dtypes: dict[str, str] = {}  # dtype: where it first occurs
  for path, leaf in zip(paths, leaves, strict=True):
    where = jax.tree_util.keystr(path) or "the root"
    if leaf is None:
      raise ValueError(
        f"packed_state=True needs every leaf of the {what}, but the one at {where} is None; "
        "use packed_state=False, whose state keeps a place for missing leaves"
      )
    _checks.check_array_like("leaf of the " + what, where, leaf)
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"packed_state=True needs real floating {what}; the leaf at {where} has dtype "
        f"{dtype}. Use packed_state=False for complex or integer leaves"
      )
    dtypes.setdefault(str(dtype), where)
  if len(dtypes) > 1:
    places = ", ".join(f"{d} at {w}" for d, w in dtypes.items())
    raise TypeError(
      f"packed_state=True needs {what} of one dtype, got {', '.join(sorted(dtypes))} "
      f"({places}); cast them to one dtype or use packed_state=False"
    )
  return paths, [jnp.asarray(leaf) for leaf in leaves], treedef


def scale_by_adadelta_packed(
  rho: Any = 0.95,
  eps: Any = 1e-6,
  *,
  accumulator_dtype: Any = None,
  update_rule: str = "default",
  implementation: str = "auto",
) -> optax.GradientTransformation:
  r"""Adadelta's rescaling with the averages of the small leaves packed into flat arrays.

  The same update as :func:`scale_by_adadelta`, coordinate by coordinate and bit for bit:

  .. math::
    E[g^2]_t &= \rho\, E[g^2]_{t-1} + (1 - \rho)\, g_t^2 \\
    \Delta x_t &= g_t \sqrt{\frac{E[\Delta x^2]_{t-1} + \epsilon}{E[g^2]_t + \epsilon}} \\
    E[\Delta x^2]_t &= \rho\, E[\Delta x^2]_{t-1} + (1 - \rho)\, \Delta x_t^2

  (or the chosen ``update_rule``'s order of operations), returning :math:`\Delta x_t`. Only
  the state differs: each average of every leaf below ``2**18`` elements is one flat array
  (a :class:`PackedAdadeltaState`), laid out leaf after leaf, so that a step of a model of
  many small leaves passes two state arrays instead of two per leaf (1,000 leaves: 1.8–2.5×
  faster). Larger leaves keep arrays of their own, shaped and sharded like the parameters.
  The packed part does not mirror the parameters: it takes no per-leaf sharding, ZeRO split
  or ``interop``. Real leaves of one floating dtype only. ``adadelta(packed_state=True)``
  and ``scale_by_adadelta(packed_state=True)`` build the same.

  Args:
    rho: decay rate of both running averages, in [0, 1].
    eps: added inside both square roots, > 0.
    accumulator_dtype: real floating dtype of the state, or ``None`` for the leaves' dtype.
    update_rule: whose order of floating-point operations to follow; see
      :func:`scale_by_adadelta`.
    implementation: ``"auto"``, ``"native"`` or ``"jax"``; see :func:`scale_by_adadelta`.

  Returns:
    An :class:`optax.GradientTransformation` whose state is a :class:`PackedAdadeltaState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_adadelta
    >>> tx = optax_adadelta.scale_by_adadelta_packed(rho=0.9, eps=1e-6)
    >>> state = tx.init({"b": jnp.zeros(2), "w": jnp.zeros((2, 2))})
    >>> state.e_g2_packed.shape  # both leaves, end to end
    (6,)
  """
  return FORMAT.transformation(
    base.options(
      rho,
      eps,
      accumulator_dtype=accumulator_dtype,
      update_rule=update_rule,
      implementation=implementation,
      packed_state=True,
    )
  )


class PackedFormat:
  """Flat arrays for the small leaves' averages, arrays of their own for the large ones."""

  name = "packed"
  state_types = (PackedAdadeltaState,)

  def selected_by(self, options: base.Options) -> bool:
    return options.packed_state

  def refuse(self, options: base.Options) -> None:
    if options.low_memory:
      raise ValueError(
        "packed_state=True cannot be combined with stochastic_rounding=True or state_bits=8: "
        "the low-memory state mirrors the parameters leaf by leaf; drop one of the two"
      )

  def transformation(self, options: base.Options) -> optax.GradientTransformation:
    return _transformation(
      base.leaf_update(options), options.accumulator_dtype, base.decide_native(options)
    )

  def averages(self, state: Any) -> tuple[Any, Any]:
    raise ValueError(
      "interop does not convert the packed state (packed_state=True): convert the state of "
      "the same optimizer built with packed_state=False"
    )

  def with_averages(self, state: Any, e_g2: Any, e_dx2: Any) -> Any:
    return self.averages(state)

  def zero_shardings(self, state: Any, leaf_sharding: Callable) -> Any:
    raise TypeError(
      "state_shardings cannot split a PackedAdadeltaState (adadelta(packed_state=True)): "
      "its flat array concatenates the small leaves inside the update, so every step "
      "would gather the gradients to re-split them. Build the optimizer with "
      "packed_state=False (the default) for a ZeRO-sharded state."
    )


FORMAT = PackedFormat()


def _transformation(
  update_leaf: Callable[..., tuple], accumulator_dtype: Any, hyper: native.Hyper | None
) -> optax.GradientTransformation:
  """Adadelta on a packed state; `update_leaf(g, e_g2, e_dx2)` updates one array.

  With `hyper` (ρ, 1−ρ, ε as floats) the arrays go through the native kernel, in one call.
  """

  def init_fn(params):
    paths, leaves, _ = _real_leaves("parameters", params)
    dtype = _checks.state_dtype(paths[0], leaves[0], accumulator_dtype) if leaves else jnp.float32
    layout = PackedLayout(
      leaf_names=_checks.leaf_names(paths),
      shapes=tuple(tuple(leaf.shape) for leaf in leaves),
      dtype=str(leaves[0].dtype) if leaves else "float32",
      packed_below=PACKED_BELOW,
    )
    size = sum(leaf.size for leaf, packed in zip(leaves, layout.packed, strict=True) if packed)
    large = [leaf for leaf, packed in zip(leaves, layout.packed, strict=True) if not packed]
    # Fresh arrays for each average: aliased buffers could not both be donated.
    return PackedAdadeltaState(
      e_g2_packed=jnp.zeros((size,), dtype),
      e_dx2_packed=jnp.zeros((size,), dtype),
      e_g2_large=tuple(jnp.zeros_like(leaf, dtype) for leaf in large),  # keeps its sharding
      e_dx2_large=tuple(jnp.zeros_like(leaf, dtype) for leaf in large),
      layout=layout,
    )

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, PackedAdadeltaState):
      raise TypeError(
        f"packed_state=True expects a PackedAdadeltaState, got {type(state).__name__}; "
        "build the state with the same transform's init"
      )
    paths, grads, treedef = _real_leaves("gradients", updates)
    check_layout(state.layout, paths, grads, treedef)
    small = [
      _replicated(g).ravel() for g, packed in zip(grads, state.layout.packed, strict=True) if packed
    ]
    large = [g for g, packed in zip(grads, state.layout.packed, strict=True) if not packed]
    flat = jnp.concatenate(small) if small else jnp.zeros((0,), state.layout.dtype)
    arrays = (
      [flat, *large],
      [state.e_g2_packed, *state.e_g2_large],
      [state.e_dx2_packed, *state.e_dx2_large],
    )
    leaves = list(zip(*arrays, strict=True))
    if hyper is None:
      results = [update_leaf(*leaf) for leaf in leaves]
    else:
      results = native.update_leaves(leaves, hyper, update_leaf)
    (flat_step, e_g2, e_dx2), *large_results = results
    pieces = iter(jnp.split(flat_step, np.cumsum([s.size for s in small])[:-1]) if small else [])
    large_iter = iter(large_results)
    steps = [
      _sharded_like(g, next(pieces).reshape(g.shape)) if packed else next(large_iter)[0]
      for g, packed in zip(grads, state.layout.packed, strict=True)
    ]
    new_state = PackedAdadeltaState(
      e_g2_packed=e_g2,
      e_dx2_packed=e_dx2,
      e_g2_large=tuple(r[1] for r in large_results),
      e_dx2_large=tuple(r[2] for r in large_results),
      layout=state.layout,
    )
    return treedef.unflatten(steps), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def check_layout(layout: PackedLayout, paths, grads, treedef) -> None:
  """Raises unless the gradients have the leaves, shapes and dtype the state was built for."""
  _checks.check_leaf_names(layout.leaf_names, paths, treedef, "packed state")
  for path, g, shape in zip(paths, grads, layout.shapes, strict=True):
    if tuple(g.shape) != shape or str(g.dtype) != layout.dtype:
      raise ValueError(
        f"The gradient at {jax.tree_util.keystr(path) or 'the root'} has shape {tuple(g.shape)} "
        f"and dtype {g.dtype}, but the packed state was built for shape {shape} and dtype "
        f"{layout.dtype}: pass gradients shaped like the parameters given to init."
      )


def _explicit_sharding(x: jax.Array) -> NamedSharding | None:
  """The sharding in `x`'s type when it names mesh axes (Explicit axes), else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  if isinstance(sharding, NamedSharding) and any(entry is not None for entry in sharding.spec):
    return sharding
  return None


def _replicated(g: jax.Array) -> jax.Array:
  """`g` replicated, so that it can join the flat array: under Explicit axes the operands
  of a concatenation must share one sharding, and a split leaf's ravel may have none."""
  sharding = _explicit_sharding(g)
  return g if sharding is None else jax.sharding.reshard(g, NamedSharding(sharding.mesh, P()))


def _sharded_like(g: jax.Array, step: jax.Array) -> jax.Array:
  """A (replicated) step laid out as its gradient: each device keeps its slice, no gather."""
  sharding = _explicit_sharding(g)
  return step if sharding is None else jax.sharding.reshard(step, sharding)
