"""Adadelta with the small leaves' state packed into flat arrays (``packed_state=True``).

The default state mirrors the parameters: one E[g²] and one E[Δx²] array per leaf. Passing a
few thousand arrays into and out of a jitted step costs JAX more than updating them
(README, Performance: E2 and E4), so a model of many small leaves can keep each average of its
small leaves as one flat array instead, laid out leaf after leaf in the order of the flattened
parameter tree. Large leaves (`_native.LARGE_LEAF` elements or more) keep an array of their own,
shaped and sharded like the parameter: packing them would only copy megabytes each step. Each
step concatenates the small gradients, updates every coordinate with the same operations as
the per-leaf path, and cuts Δx back into the gradients' shapes.

What it gives up: the packed array does not take the small parameters' shardings (with
sharded small parameters XLA moves their gradients to concatenate them), and `interop` does
not convert the state. All gradient leaves must be real and of one floating dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_adadelta import _checks, _native

Leaf = tuple[jax.Array, jax.Array, jax.Array]


class PackedAdadeltaState(NamedTuple):
  """State of ``scale_by_adadelta(packed_state=True)``.

  Attributes:
    e_g2: E[g²] as a tuple: first one flat array holding every leaf below 2¹⁸ elements (in
      ``jax.tree.leaves`` order, each raveled, laid end to end), then, in the same order,
      one array per larger leaf, shaped and sharded like that parameter.
    e_dx2: E[Δx²], in the same layout.
  """

  e_g2: tuple[jax.Array, ...]
  e_dx2: tuple[jax.Array, ...]


def _real_leaves(what: str, tree: Any) -> tuple[list, list[jax.Array]]:
  """Paths and leaves of `tree`, checked: no None, real floating, one dtype."""
  paths, leaves, _ = _checks.flatten_gradients(tree)
  dtypes = set()
  for path, leaf in zip(paths, leaves, strict=True):
    where = jax.tree_util.keystr(path) or "the root"
    if leaf is None:
      raise ValueError(
        f"packed_state=True needs every leaf of the {what}, but the one at {where} is None; "
        "use packed_state=False, whose state keeps a place for missing leaves"
      )
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"packed_state=True needs real floating {what}; the leaf at {where} has dtype "
        f"{dtype}. Use packed_state=False for complex or integer leaves"
      )
    dtypes.add(str(dtype))
  if len(dtypes) > 1:
    raise TypeError(
      f"packed_state=True needs {what} of one dtype, got {', '.join(sorted(dtypes))}; cast "
      "them to one dtype or use packed_state=False"
    )
  return paths, [jnp.asarray(leaf) for leaf in leaves]


def _is_packed(leaf: jax.Array) -> bool:
  return leaf.size < _native.LARGE_LEAF


def scale_by_packed_kernel(
  by_xla: Callable[..., Leaf],
  accumulator_dtype: np.dtype | None,
  native: _native.Hyper | None,
) -> optax.GradientTransformation:
  """The packed-state Adadelta around the per-leaf update `by_xla` (and the native kernel).

  `by_xla(g, e_g2, e_dx2)` returns `(step, e_g2, e_dx2)` for one array; with `native` (the
  hyper-parameters as floats) the arrays go through the native kernel where it applies.
  """

  def init_fn(params):
    paths, leaves = _real_leaves("parameters", params)
    dtype = _checks.state_dtype(paths[0], leaves[0], accumulator_dtype) if leaves else jnp.float32
    packed = jax.ShapeDtypeStruct((sum(leaf.size for leaf in leaves if _is_packed(leaf)),), dtype)
    large = [leaf for leaf in leaves if not _is_packed(leaf)]

    def zeros():  # a fresh array each: aliased buffers could not both be donated
      own = (jnp.zeros_like(leaf, dtype) for leaf in large)  # keeps each leaf's sharding
      return (jnp.zeros_like(packed), *own)

    return PackedAdadeltaState(e_g2=zeros(), e_dx2=zeros())

  def update_leaf(g, e_g2, e_dx2):
    if native is not None and _native.supports(g, e_g2, e_dx2):
      return _native.update(g, e_g2, e_dx2, native, by_xla)
    return by_xla(g, e_g2, e_dx2)

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, PackedAdadeltaState):
      raise TypeError(
        f"packed_state=True expects a PackedAdadeltaState, got {type(state).__name__}; "
        "build the state with the same transform's init"
      )
    _, grads = _real_leaves("gradients", updates)
    small = [g for g in grads if _is_packed(g)]
    large = [g for g in grads if not _is_packed(g)]
    _check_layout(small, large, state)
    e_g2, e_dx2 = state.e_g2[0], state.e_dx2[0]
    pieces: Iterator[jax.Array] = iter([])
    if small:
      flat = jnp.concatenate([g.ravel() for g in small]) if len(small) > 1 else small[0].ravel()
      step, e_g2, e_dx2 = update_leaf(flat, e_g2, e_dx2)
      pieces = iter(jnp.split(step, np.cumsum([g.size for g in small])[:-1]))
    own = zip(large, state.e_g2[1:], state.e_dx2[1:], strict=True)
    results = iter([update_leaf(*leaf) for leaf in own])  # one kernel call per large leaf
    steps, own_e_g2, own_e_dx2 = [], [], []
    for g in grads:
      if _is_packed(g):
        steps.append(next(pieces).reshape(g.shape))
      else:
        leaf_step, leaf_e_g2, leaf_e_dx2 = next(results)
        steps.append(leaf_step)
        own_e_g2.append(leaf_e_g2)
        own_e_dx2.append(leaf_e_dx2)
    new_state = PackedAdadeltaState(e_g2=(e_g2, *own_e_g2), e_dx2=(e_dx2, *own_e_dx2))
    return jax.tree.unflatten(jax.tree.structure(updates), steps), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _check_layout(
  small: list[jax.Array], large: list[jax.Array], state: PackedAdadeltaState
) -> None:
  """Whether `state` was built by `init` for gradients of these shapes."""
  size = sum(g.size for g in small)
  shapes = [tuple(g.shape) for g in large]
  held = [tuple(x.shape) for x in state.e_g2[1:]]
  if size != state.e_g2[0].size or shapes != held:
    raise ValueError(
      f"The gradients do not fit the packed state: their leaves below {_native.LARGE_LEAF:,} "
      f"elements hold "
      f"{size:,} coordinates and the larger ones have shapes {shapes}, but the state holds "
      f"{state.e_g2[0].size:,} packed coordinates and arrays of shapes {held}: pass "
      "gradients shaped like the parameters given to init"
    )
