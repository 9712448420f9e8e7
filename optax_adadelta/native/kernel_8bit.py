"""The 8-bit state's kernel (`kernel_8bit.cc`): six operands in, five results out.

Per leaf: (g, codes and scale of E[g²], codes and scale of E[Δx²], key) in, (Δx, codes and
scales) out, one pass over the leaf's memory. It stores the codes that XLA's lowering of the
format's pure-JAX update stores, bit for bit where XLA compiles that update as it is written
(the kernel repeats its operations in their order, multiply-adds contracted as XLA contracts
them; tests/test_native_8bit.py checks it). Blocks and random bits depend on a coordinate's
place in the whole array, so a step sharded over devices runs the pure-JAX update; inside
``shard_map`` the kernel sees the shard's own coordinates, as the pure update does there. Under
``vmap`` the batch axis leads every operand and the key (one key per problem), so the kernel
updates independent problems as separate calls would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_adadelta.native import build, primitive

_IN = 6  # g, codes and scale of E[g²], codes and scale of E[Δx²], key
_OUT = 5  # Δx, codes and scale of E[g²], codes and scale of E[Δx²]
GRADIENT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))  # the state is float32 here


def takes(leaf: Sequence[Any]) -> bool:
  """Whether the kernel updates this leaf: a float32 or bfloat16 gradient with an axis."""
  g = leaf[0]
  return g.dtype in GRADIENT_DTYPES and g.ndim > 0


def _call(config: tuple[primitive.Hyper, bool], *flat: jax.Array):
  (rho, one_minus_rho, eps), stochastic = config
  aliases, outputs = {}, []
  for leaf in range(len(flat) // _IN):
    i, o = _IN * leaf, _OUT * leaf
    if flat[i].size >= primitive.IN_PLACE_STEP:  # Δx over g
      aliases[i] = o
    aliases.update({i + k: o + k for k in range(1, _OUT)})  # codes and scales in place
    outputs += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat[i : i + _OUT]]
  call = jax.ffi.ffi_call(build.TARGET_8BIT, outputs, input_output_aliases=aliases)
  return tuple(
    call(
      *flat,
      rho=np.float32(rho),  # float32, as the pure-JAX update's constants
      one_minus_rho=np.float32(one_minus_rho),
      eps=np.float32(eps),
      stochastic=bool(stochastic),
    )
  )


def _key_axes(leaf: Sequence[jax.Array]) -> int:
  """A leaf's key has one axis per vmap over the kernel: the pure update is vmapped as often."""
  return leaf[_IN - 1].ndim


KERNEL = primitive.Kernel(build.TARGET_8BIT, n_in=_IN, n_out=_OUT, call=_call, batch_rank=_key_axes)
_bind = primitive.kernel_primitive(KERNEL)


def update_leaves_8bit(
  leaves: Sequence[tuple[Any, Any, Any, Any, Any, Any]],
  hyper: primitive.Hyper,
  stochastic: bool,
  pure: Callable[..., Sequence[jax.Array]],
) -> list[tuple]:
  """(Δx, codes_g2, scale_g2, codes_dx2, scale_dx2) of each (g, codes_g2, scale_g2, codes_dx2,
  scale_dx2, key): by the kernel, 256 leaves per call, where it `takes` the leaf, else by
  `pure(g, codes_g2, scale_g2, codes_dx2, scale_dx2, key)`, the pure-JAX update it stands for
  (with stochastic rounding where `stochastic`)."""
  leaves = [(*leaf[:5], jnp.asarray(leaf[5], jnp.uint32)) for leaf in leaves]
  return primitive.update_in_groups(_bind, KERNEL, leaves, takes, (hyper, stochastic), pure)
