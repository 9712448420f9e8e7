"""The float32/bfloat16 state's kernel (`kernel.cc`): three operands in, three results out.

Per leaf: (g, E[g²], E[Δx²]) in, (Δx, E[g²], E[Δx²]) out, one loop over memory (XLA's own
lowering makes four), the two averages in place. Each device may update its own shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_adadelta.native import build, primitive

SUPPORTED = {  # (gradient, state) dtypes
  (np.dtype(np.float32), np.dtype(np.float32)),
  (np.dtype(jnp.bfloat16), np.dtype(np.float32)),
  (np.dtype(jnp.bfloat16), np.dtype(jnp.bfloat16)),
}


def takes(leaf: Sequence[Any]) -> bool:
  """Whether the kernel updates this (g, E[g²], E[Δx²]): a float32 or bfloat16 gradient with
  at least one axis, both averages of one dtype at least as wide."""
  g, e_g2, e_dx2 = leaf
  return (
    g is not None
    and g.ndim > 0
    and (g.dtype, e_g2.dtype) in SUPPORTED
    and e_dx2.dtype == e_g2.dtype
  )


def _call(hyper: primitive.Hyper, *flat: jax.Array):
  rho, one_minus_rho, eps = hyper
  aliases = {i: i for i in range(len(flat)) if i % 3 or flat[i].size >= primitive.IN_PLACE_STEP}
  outputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat]
  call = jax.ffi.ffi_call(build.FLOAT_TARGET, outputs, input_output_aliases=aliases)
  # float32 attributes: the pure-JAX rule's constants are float32 too.
  attributes = {"rho": np.float32(rho), "one_minus_rho": np.float32(one_minus_rho)}
  return tuple(call(*flat, **attributes, eps=np.float32(eps)))


KERNEL = primitive.Kernel(build.FLOAT_TARGET, n_in=3, n_out=3, call=_call, partitionable=True)
_bind = primitive.kernel_primitive(KERNEL)


def update_leaves(
  leaves: Sequence[tuple[Any, Any, Any]], hyper: primitive.Hyper, rule: Callable[..., tuple]
) -> list[tuple]:
  """(Δx, E[g²], E[Δx²]) of each (g, E[g²], E[Δx²]): by the kernel, 256 leaves per call, where
  it `takes` the leaf, else by `rule(g, e_g2, e_dx2)`, the pure-JAX update it stands for (also
  that of a None gradient, a frozen parameter)."""
  leaves = [(g if g is None else jnp.asarray(g), a, b) for g, a, b in leaves]
  return primitive.update_in_groups(_bind, KERNEL, leaves, takes, hyper, rule)
