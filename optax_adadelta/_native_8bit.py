"""The 8-bit state's native CPU update: `_kernel_8bit.cc` behind one JAX primitive.

`updater` makes the function that updates up to 256 8-bit leaves of a step in one kernel
call, one pass over each leaf's memory. The kernel stores the codes that XLA's lowering of
:func:`optax_adadelta._low_memory.update_quantized` stores, bit for bit where XLA compiles
the update as it is written (the kernel repeats its operations in their order, multiply-adds
contracted as XLA contracts them; `tests/test_native_8bit.py` checks it). The primitive's rules:

* lowering: the kernel on one CPU device, a ``pmap`` replica or a ``shard_map`` shard (it
  sees the shard's own coordinates, as the pure-JAX update does there); XLA's lowering of the
  pure-JAX update for a step sharded over several devices, under ``jax.export`` and on other
  platforms;
* batching (``vmap``): the batch axis leads every operand and the key (one key per
  problem), so the kernel updates independent problems as separate calls would;
* differentiation: that of the pure-JAX update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from optax_adadelta import _low_memory, _native

_IN = 6  # g, codes and scale of E[g²], codes and scale of E[Δx²], key
_OUT = 5  # Δx, codes and scale of E[g²], codes and scale of E[Δx²]


def supports(g: jax.Array) -> bool:
  """Float32 and bfloat16 gradients, as `_native.supports` (the state is float32 here)."""
  return (g.dtype, np.dtype(np.float32)) in _native._SUPPORTED and g.ndim > 0


def updater(
  hyper: _native.Hyper, update_leaf: Callable[..., tuple], stochastic: bool
) -> Callable[[list[_low_memory.QuantizedLeaf]], list]:
  """A function from 8-bit leaves to :func:`_low_memory.update_quantized` of each: the
  float32 and bfloat16 ones by the kernel, up to 256 leaves per call, the rest by XLA."""
  rho, _, eps = hyper
  pure = functools.partial(
    update_leaf_flat, update_leaf=update_leaf, stochastic=stochastic, rho=rho, eps=eps
  )

  def update_leaves(leaves: list[_low_memory.QuantizedLeaf]) -> list:
    results: list = [None] * len(leaves)
    native = [i for i, leaf in enumerate(leaves) if supports(leaf[0])]
    for i in set(range(len(leaves))) - set(native):
      results[i] = _unflatten(pure(*_flatten(leaves[i])))
    for start in range(0, len(native), _native._LEAVES_PER_CALL):
      group = native[start : start + _native._LEAVES_PER_CALL]
      flat = [x for i in group for x in _flatten(leaves[i])]
      out = _update_p.bind(*flat, hyper=hyper, stochastic=stochastic, pure=pure)
      for k, i in enumerate(group):
        results[i] = _unflatten(out[_OUT * k : _OUT * (k + 1)])
    return results

  return update_leaves


def update_leaf_flat(
  g, codes_g2, scale_g2, codes_dx2, scale_dx2, key, *, update_leaf, stochastic, rho, eps
):
  """The pure-JAX update of one leaf, on flat arrays (the kernel's operands and results)."""
  a = _low_memory.QuantizedAverage(codes_g2, scale_g2)
  b = _low_memory.QuantizedAverage(codes_dx2, scale_dx2)
  leaf = (g, a, b, key)
  return _flatten_result(_low_memory.update_quantized(leaf, update_leaf, stochastic, rho, eps))


def _flatten(leaf) -> list:
  g, a, b, key = leaf
  return [g, a.codes, a.scale, b.codes, b.scale, jax.numpy.asarray(key, jax.numpy.uint32)]


def _flatten_result(result) -> list:
  step, a, b = result
  return [step, a.codes, a.scale, b.codes, b.scale]


def _unflatten(flat):
  step, codes_g2, scale_g2, codes_dx2, scale_dx2 = flat
  return (
    step,
    _low_memory.QuantizedAverage(codes_g2, scale_g2),
    _low_memory.QuantizedAverage(codes_dx2, scale_dx2),
  )


def _by_pure(*flat, pure, **unused: Any):
  """The pure-JAX update of each leaf; a key with k axes means k leading vmap axes."""
  del unused
  results = []
  for i in range(0, len(flat), _IN):
    fn = pure
    for _ in range(flat[i + _IN - 1].ndim):
      fn = jax.vmap(fn)
    results += fn(*flat[i : i + _IN])
  return results


def _kernel_call(*flat, hyper: _native.Hyper, stochastic: bool):
  rho, one_minus_rho, eps = hyper
  aliases, outputs = {}, []
  for leaf in range(len(flat) // _IN):
    i, o = _IN * leaf, _OUT * leaf
    if flat[i].size >= _native._IN_PLACE_STEP:  # Δx over g
      aliases[i] = o
    aliases.update({i + k: o + k for k in range(1, _OUT)})  # codes and scales in place
    outputs += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat[i : i + _OUT]]
  call = jax.ffi.ffi_call(_native.TARGET_8BIT, outputs, input_output_aliases=aliases)
  return tuple(
    call(
      *flat,
      rho=np.float32(rho),  # float32, as the pure-JAX update's constants
      one_minus_rho=np.float32(one_minus_rho),
      eps=np.float32(eps),
      stochastic=bool(stochastic),
    )
  )


def _cpu_lowering(ctx, *flat, hyper, stochastic, pure):
  if ctx.module_context.lowering_parameters.for_export or _native.sharded_over_devices(ctx):
    fn: Callable = functools.partial(_by_pure, pure=pure)
  else:
    fn = functools.partial(_kernel_call, hyper=hyper, stochastic=stochastic)
  return mlir.lower_fun(fn, multiple_results=True)(ctx, *flat)


def _batch(args, dims, **params):
  """A vmap axis becomes the leading axis of every operand, the key's included: the kernel
  then updates one problem per key, as separate calls would."""
  out = _update_p.bind(*_native.batch_axes_first(args, dims), **params)
  return out, [0] * len(out)


def _jvp(primals, tangents, *, hyper, stochastic, pure):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  _, tangents_out = jax.jvp(functools.partial(_by_pure, pure=pure), list(primals), tangents)
  return _update_p.bind(*primals, hyper=hyper, stochastic=stochastic, pure=pure), tangents_out


def _abstract_eval(*avals, **unused):
  del unused
  return [a for i in range(0, len(avals), _IN) for a in avals[i : i + _OUT]]


_update_p = Primitive(_native.TARGET_8BIT)
_update_p.multiple_results = True
_update_p.def_impl(jax.jit(_update_p.bind, static_argnames=("hyper", "stochastic", "pure")))
_update_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_update_p, mlir.lower_fun(_by_pure, multiple_results=True))
mlir.register_lowering(_update_p, _cpu_lowering, platform="cpu")
batching.primitive_batchers[_update_p] = _batch
ad.primitive_jvps[_update_p] = _jvp
