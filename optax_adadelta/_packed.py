"""Adadelta with its state packed into two flat arrays (``packed_state=True``).

The default state mirrors the parameters: one E[g²] and one E[Δx²] array per leaf. Passing a
few thousand arrays into and out of a jitted step costs JAX more than updating them
(README, Performance: E2 and E4), so a model of many small leaves can keep each average as
one flat array instead, laid out leaf after leaf in the order of the flattened parameter
tree. Each step concatenates the gradients, updates every coordinate with the same
operations as the per-leaf path, and cuts Δx back into the gradients' shapes.

What it gives up: the state no longer has the parameters' structure, so it does not take
their shardings (with sharded parameters XLA moves the gradients to concatenate them), and
`interop` does not convert it. All gradient leaves must be real and of one floating dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_adadelta import _checks, _native

Leaf = tuple[jax.Array, jax.Array, jax.Array]


class PackedAdadeltaState(NamedTuple):
  """State of ``scale_by_adadelta(packed_state=True)``: two flat arrays.

  Attributes:
    e_g2: E[g²] of every coordinate, the leaves of the parameter tree (flattened in
      ``jax.tree.leaves`` order, each raveled) laid end to end.
    e_dx2: E[Δx²], in the same layout.
  """

  e_g2: jax.Array
  e_dx2: jax.Array


def _real_leaves(what: str, tree: Any) -> tuple[list, list[jax.Array]]:
  """Paths and leaves of `tree`, checked: no None, real floating, one dtype."""
  paths, leaves, _ = _checks.flatten_gradients(tree)
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
  dtypes = sorted({str(jnp.result_type(leaf)) for leaf in leaves})
  if len(dtypes) > 1:
    raise TypeError(
      f"packed_state=True needs {what} of one dtype, got {', '.join(dtypes)}; cast them to one "
      "dtype or use packed_state=False"
    )
  return paths, [jnp.asarray(leaf) for leaf in leaves]


def scale_by_packed_kernel(
  by_xla: Callable[..., Leaf],
  accumulator_dtype: np.dtype | None,
  native: _native.Hyper | None,
) -> optax.GradientTransformation:
  """The packed-state Adadelta around the per-leaf update `by_xla` (and the native kernel).

  `by_xla(g, e_g2, e_dx2)` returns `(step, e_g2, e_dx2)` for one array; with `native` (the
  hyper-parameters as floats) the flat arrays go through the native kernel where it applies.
  """

  def init_fn(params):
    _, leaves = _real_leaves("parameters", params)
    dtype = accumulator_dtype or (leaves[0].dtype if leaves else jnp.float32)
    size = sum(leaf.size for leaf in leaves)
    zeros = jnp.zeros((size,), dtype)
    return PackedAdadeltaState(e_g2=zeros, e_dx2=jnp.zeros_like(zeros))

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(state, PackedAdadeltaState):
      raise TypeError(
        f"packed_state=True expects a PackedAdadeltaState, got {type(state).__name__}; "
        "build the state with the same transform's init"
      )
    _, grads = _real_leaves("gradients", updates)
    size = sum(g.size for g in grads)
    if size != state.e_g2.shape[-1]:
      raise ValueError(
        f"The gradients have {size:,} coordinates but the packed state holds "
        f"{state.e_g2.shape[-1]:,}: pass gradients shaped like the parameters given to init"
      )
    if not grads:
      return updates, state
    flat = jnp.concatenate([g.ravel() for g in grads]) if len(grads) > 1 else grads[0].ravel()
    if native is not None and _native.supports(flat, state.e_g2, state.e_dx2):
      step, e_g2, e_dx2 = _native.update(flat, state.e_g2, state.e_dx2, native, by_xla)
    else:
      step, e_g2, e_dx2 = by_xla(flat, state.e_g2, state.e_dx2)
    offsets = np.cumsum([g.size for g in grads])[:-1]
    pieces = jnp.split(step, offsets) if len(grads) > 1 else [step]
    steps = [piece.reshape(g.shape) for piece, g in zip(pieces, grads, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(updates), steps), PackedAdadeltaState(e_g2, e_dx2)

  return optax.GradientTransformation(init_fn, update_fn)
