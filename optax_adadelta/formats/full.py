"""The default state format: E[g²] and E[Δx²] as two trees shaped like the parameters.

Each leaf's averages keep its shape, sharding and (or ``accumulator_dtype``'s) dtype, so the
state follows the parameters wherever they go: a mesh, a ZeRO split, a checkpoint, a peer
library's optimizer (`interop`). The update is one map over the leaves; with the native kernel,
one kernel call per 256 leaves it can take (float32, bfloat16), XLA for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_adadelta import _checks, native
from optax_adadelta.formats import base


class ScaleByAdadeltaState(NamedTuple):
  """State of :func:`scale_by_adadelta`: two trees shaped like the parameters.

  Attributes:
    e_g2: E[g²], the running average of squared gradients.
    e_dx2: E[Δx²], the running average of squared (unscaled) steps.

  Both start at zero. For a complex parameter the leaf is complex: its real part holds the
  average for the real coordinate and its imaginary part the average for the imaginary
  coordinate (PyTorch's ``view_as_real`` layout).
  """

  e_g2: optax.Params
  e_dx2: optax.Params


# So that a `jax.export`-ed step taking this state can be serialized.
jax.export.register_namedtuple_serialization(
  ScaleByAdadeltaState, serialized_name="optax_adadelta.ScaleByAdadeltaState"
)


class FullFormat:
  """Per-leaf arrays: the format chosen when no option asks for another."""

  name = "full"
  state_types = (ScaleByAdadeltaState,)

  def selected_by(self, options: base.Options) -> bool:
    del options  # the registry's fallback: chosen when no other format is selected
    return False

  def refuse(self, options: base.Options) -> None:
    del options  # takes every option that selects it

  def transformation(self, options: base.Options) -> optax.GradientTransformation:
    update_leaf = base.leaf_update(options)
    hyper = base.decide_native(options)
    accumulator_dtype = options.accumulator_dtype

    def init_fn(params):
      def zeros(path, p):  # zeros_like keeps the parameter's sharding
        return jnp.zeros_like(p, dtype=_checks.state_dtype(path, p, accumulator_dtype))

      return ScaleByAdadeltaState(  # two trees: aliased buffers could not both be donated
        e_g2=jax.tree_util.tree_map_with_path(zeros, params),
        e_dx2=jax.tree_util.tree_map_with_path(zeros, params),
      )

    def update_fn(updates, state, params=None):
      del params
      if not isinstance(state, ScaleByAdadeltaState):
        raise TypeError(
          f"scale_by_adadelta expects a ScaleByAdadeltaState, got {type(state).__name__}; "
          "build the state with the same transform's init"
        )
      _checks.check_gradients(updates, state.e_g2)
      treedef: Any = jax.tree.structure(updates, is_leaf=base.is_none)
      trees = (updates, state.e_g2, state.e_dx2)
      leaves = list(zip(*(treedef.flatten_up_to(t) for t in trees), strict=True))
      if hyper is None:
        results = [update_leaf(*leaf) for leaf in leaves]
      else:
        results = native.update_leaves(leaves, hyper, update_leaf)
      steps, e_g2, e_dx2 = base.unzip3(treedef, results)
      return steps, ScaleByAdadeltaState(e_g2=e_g2, e_dx2=e_dx2)

    return optax.GradientTransformation(init_fn, update_fn)

  def averages(self, state: Any) -> tuple[Any, Any]:
    return state.e_g2, state.e_dx2

  def with_averages(self, state: Any, e_g2: Any, e_dx2: Any) -> Any:
    del state
    return ScaleByAdadeltaState(e_g2, e_dx2)

  def zero_shardings(self, state: Any, leaf_sharding: Callable) -> Any:
    return jax.tree.map(leaf_sharding, state)


FORMAT = FullFormat()
