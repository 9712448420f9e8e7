"""A stub state format (scratch commit: counts what adding a format takes; reverted)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_adadelta.formats import base


class StubAdadeltaState(NamedTuple):
  e_g2: Any
  e_dx2: Any


def scale_by_adadelta_stub(rho: Any = 0.95, eps: Any = 1e-6) -> optax.GradientTransformation:
  """Adadelta on the stub state (the full format's arithmetic, a state class of its own)."""
  return FORMAT.transformation(base.options(rho, eps))


class StubFormat:
  name = "stub"
  state_types = (StubAdadeltaState,)

  def selected_by(self, options: base.Options) -> bool:
    return False  # chosen by its own transformation only

  def refuse(self, options: base.Options) -> None:
    pass

  def transformation(self, options: base.Options) -> optax.GradientTransformation:
    update_leaf = base.leaf_update(options)

    def init_fn(params):
      zeros = lambda: jax.tree.map(jnp.zeros_like, params)
      return StubAdadeltaState(zeros(), zeros())

    def update_fn(updates, state, params=None):
      treedef: Any = jax.tree.structure(updates, is_leaf=base.is_none)
      trees = (updates, state.e_g2, state.e_dx2)
      leaves = zip(*(treedef.flatten_up_to(t) for t in trees), strict=True)
      steps, e_g2, e_dx2 = base.unzip3(treedef, [update_leaf(*leaf) for leaf in leaves])
      return steps, StubAdadeltaState(e_g2, e_dx2)

    return optax.GradientTransformation(init_fn, update_fn)

  def averages(self, state: Any) -> tuple[Any, Any]:
    return state.e_g2, state.e_dx2

  def with_averages(self, state: Any, e_g2: Any, e_dx2: Any) -> Any:
    return StubAdadeltaState(e_g2, e_dx2)

  def zero_shardings(self, state: Any, leaf_sharding: Callable) -> Any:
    return jax.tree.map(leaf_sharding, state)


FORMAT = StubFormat()
