"""Transitional shim (issue #24): the 8-bit kernel lives in `optax_adadelta.native` now.

Deleted once the 8-bit format calls `native.update_leaves_8bit` itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from optax_adadelta import _low_memory
from optax_adadelta.native import Hyper, update_leaves_8bit


def updater(
  hyper: Hyper, update_leaf: Callable[..., tuple], stochastic: bool
) -> Callable[[list[_low_memory.QuantizedLeaf]], list]:
  """A function from 8-bit leaves to :func:`_low_memory.update_quantized` of each."""
  rho, _, eps = hyper
  pure = functools.partial(
    update_leaf_flat, update_leaf=update_leaf, stochastic=stochastic, rho=rho, eps=eps
  )

  def update_leaves(leaves: list[_low_memory.QuantizedLeaf]) -> list:
    flat = [(g, a.codes, a.scale, b.codes, b.scale, key) for g, a, b, key in leaves]
    return [
      (step, _low_memory.QuantizedAverage(c1, s1), _low_memory.QuantizedAverage(c2, s2))
      for step, c1, s1, c2, s2 in update_leaves_8bit(flat, hyper, stochastic, pure)
    ]

  return update_leaves


def update_leaf_flat(
  g, codes_g2, scale_g2, codes_dx2, scale_dx2, key, *, update_leaf, stochastic, rho, eps
):
  """The pure-JAX update of one leaf, on flat arrays (the kernel's operands and results)."""
  a = _low_memory.QuantizedAverage(codes_g2, scale_g2)
  b = _low_memory.QuantizedAverage(codes_dx2, scale_dx2)
  step, a, b = _low_memory.update_quantized((g, a, b, key), update_leaf, stochastic, rho, eps)
  return step, a.codes, a.scale, b.codes, b.scale
