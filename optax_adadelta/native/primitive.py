"""One builder of a kernel primitive, used by both kernels (`float_kernel`, `kernel_8bit`).

A kernel primitive updates up to `LEAVES_PER_CALL` leaves of a step in one FFI call, each leaf
`Kernel.n_in` operands in and `Kernel.n_out` results out. It stands for `pure`, the pure-JAX
update of one leaf, bound as a parameter with `config`, the kernel's constants. Its rules:

* lowering: the kernel on one CPU device, a ``pmap`` replica or a ``shard_map`` shard (it then
  sees the shard as its array, as `pure` does there); for a step sharded over several devices,
  each device on its own shards (``custom_partitioning``) where the kernel is `partitionable`,
  else `pure`; `pure` too under ``jax.export`` (which serializes only custom calls with
  compatibility guarantees) and on every other platform;
* batching (``vmap``): the batch axis leads every operand; `Kernel.batch_rank` says how many
  leading axes of a leaf `pure` must be vmapped over (the elementwise update: none);
* differentiation: the derivatives of `pure`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from optax_adadelta.native import jax_private

Hyper = tuple[float, float, float]  # rho, 1 - rho, eps
# XLA's compile time grows faster than linearly in one call's operands: 1,000 leaves of a step
# compiled in 48 s as one call, 5 s as calls of 200 (the XLA path: 13 s). A call costs ~20 µs.
LEAVES_PER_CALL = 256
# Δx is written over the gradient of a leaf this large: a fresh buffer of that size costs
# more than the update (its pages are faulted in on every step). Smaller leaves get a new one.
IN_PLACE_STEP = 1 << 18


@dataclasses.dataclass(frozen=True)
class Kernel:
  """What a kernel primitive needs to know of its kernel."""

  target: str  # the FFI target (build.TARGETS)
  n_in: int  # operands per leaf, the gradient first
  n_out: int  # results per leaf, shaped like the leaf's first n_out operands
  call: Callable[..., Sequence[jax.Array]]  # (config, *operands) -> results, by the FFI call
  # A leaf's leading vmap axes that `pure` must be vmapped over (an elementwise update: none).
  batch_rank: Callable[[Sequence[jax.Array]], int] = lambda leaf: 0
  # Whether each device may update its own shards of a leaf: every operand and result is
  # shaped like the gradient and follows its sharding (so n_in == n_out).
  partitionable: bool = False

  def __post_init__(self):
    if self.partitionable and self.n_in != self.n_out:
      raise ValueError(f"a partitionable kernel maps each operand to one result: {self}")


def kernel_primitive(kernel: Kernel) -> Callable[..., list]:
  """`bind(*operands, config, pure)`: the kernel's primitive with all its rules.

  `config` (hashable: the kernel's constants) and `pure` (the pure-JAX update of one leaf's
  operands) are static: an eager call compiles once per `pure` object, so make it once per
  transformation, not once per step.
  """
  primitive = Primitive(kernel.target)
  primitive.multiple_results = True
  api = jax_private.private_api()

  def by_pure(*flat, pure, config=None):
    del config
    results: list = []
    for i in range(0, len(flat), kernel.n_in):
      leaf, fn = flat[i : i + kernel.n_in], pure
      for _ in range(kernel.batch_rank(leaf)):
        fn = jax.vmap(fn)
      results += fn(*leaf)
    return results

  def abstract_eval(*avals, config, pure):
    del config, pure
    return [a for i in range(0, len(avals), kernel.n_in) for a in avals[i : i + kernel.n_out]]

  def cpu_lowering(ctx, *flat, config, pure):
    site = api.site(ctx)
    fn: Callable
    if site.for_export or (site.sharded and not (kernel.partitionable and site.devices_known)):
      fn = functools.partial(by_pure, pure=pure)
    elif site.sharded:
      ranks = tuple(aval.ndim for aval in ctx.avals_in[:: kernel.n_in])
      fn = functools.partial(_partitioned(kernel, ranks), config)
    else:  # one device, a pmap replica, or this device's shards inside shard_map
      fn = functools.partial(kernel.call, config)
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *flat)

  def batch(args, dims, **params):
    out = primitive.bind(*_batch_axes_first(args, dims), **params)
    return out, [0] * len(out)

  def jvp(primals, tangents, *, config, pure):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, tangents_out = jax.jvp(functools.partial(by_pure, pure=pure), list(primals), tangents)
    return primitive.bind(*primals, config=config, pure=pure), tangents_out

  primitive.def_impl(jax.jit(primitive.bind, static_argnames=("config", "pure")))
  primitive.def_abstract_eval(abstract_eval)
  mlir.register_lowering(primitive, mlir.lower_fun(by_pure, multiple_results=True))
  mlir.register_lowering(primitive, cpu_lowering, platform="cpu")
  batching.primitive_batchers[primitive] = batch
  ad.primitive_jvps[primitive] = jvp
  if kernel.partitionable:  # jit then lowers with the device assignment partitioning needs
    api.lower_with_devices(primitive)
  return primitive.bind


def update_in_groups(
  bind: Callable[..., list],
  kernel: Kernel,
  leaves: Sequence[Sequence[Any]],
  takes: Callable[[Sequence[Any]], bool],
  config: Any,
  pure: Callable[..., Sequence[Any]],
) -> list[tuple]:
  """Each leaf's results: those the kernel `takes` by it, `LEAVES_PER_CALL` per call, in
  order; the others by `pure`."""
  native = [i for i, leaf in enumerate(leaves) if takes(leaf)]
  by_kernel = set(native)
  results: list = [None if i in by_kernel else tuple(pure(*x)) for i, x in enumerate(leaves)]
  for start in range(0, len(native), LEAVES_PER_CALL):
    group = native[start : start + LEAVES_PER_CALL]
    flat = bind(*(x for i in group for x in leaves[i]), config=config, pure=pure)
    for k, i in enumerate(group):
      results[i] = tuple(flat[kernel.n_out * k : kernel.n_out * (k + 1)])
  return results


@functools.cache
def _partitioned(kernel: Kernel, ranks: tuple[int, ...]):
  """The kernel call for leaves of these ranks, each device on its own shards.

  The one rule: a leaf's operands and results share its gradient's sharding.
  """

  @functools.partial(custom_partitioning, static_argnums=(0,))
  def call(config, *flat):
    return kernel.call(config, *flat)

  def follow_gradients(arg_shapes):
    return tuple(arg_shapes[i - i % kernel.n_in].sharding for i in range(len(arg_shapes)))

  def partition(config, mesh, arg_shapes, result_shape):
    shardings = follow_gradients(arg_shapes)
    return mesh, functools.partial(kernel.call, config), shardings, shardings

  dims = [" ".join(f"l{leaf}d{k}" for k in range(rank)) for leaf, rank in enumerate(ranks)]
  sides = ", ".join(d for d in dims for _ in range(kernel.n_in))
  call.def_partition(
    partition=partition,
    infer_sharding_from_operands=lambda config, mesh, shapes, result: follow_gradients(shapes),
    sharding_rule=f"{sides} -> {sides}",
  )
  return call


def _batch_axes_first(args, dims) -> list:
  """The operands of a batched primitive with the vmap axis leading each (broadcast if none)."""
  size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
  return [
    jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
    for x, d in zip(args, dims, strict=True)
  ]
