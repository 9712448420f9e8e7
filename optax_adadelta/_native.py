"""Transitional shim (issue #24): the native layer lives in `optax_adadelta.native` now.

Deleted once the formats no longer import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from optax_adadelta.native import Hyper, is_available, unavailable_reason, update_leaves

__all__ = ["Hyper", "is_available", "static_hyper", "unavailable_reason", "update_tree"]


def static_hyper(rho, eps) -> Hyper | None:
  """(ρ, 1 − ρ, ε) as Python floats, or None if either is traced or not a scalar."""
  if any(isinstance(v, jax.core.Tracer) or np.ndim(v) != 0 for v in (rho, eps)):
    return None
  return float(rho), 1 - float(rho), float(eps)


def update_tree(updates, e_g2, e_dx2, hyper: Hyper, rule: Callable[..., tuple]):
  """A tree of (Δx, E[g²], E[Δx²]) per leaf, by `native.update_leaves`."""
  treedef: Any = jax.tree.structure(updates, is_leaf=lambda x: x is None)
  columns = zip(*(treedef.flatten_up_to(t) for t in (updates, e_g2, e_dx2)), strict=True)
  return treedef.unflatten(update_leaves(list(columns), hyper, rule))
