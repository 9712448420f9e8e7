"""The fused native CPU update (optax_adadelta/_kernel.cc), called through XLA's FFI.

One loop over memory per leaf instead of XLA's several fused loops: it reads g, E[g²] and
E[Δx²] once and writes Δx, E[g²] and E[Δx²] in place (input i aliases output i, so donated
buffers are updated without copies). Leaves below `LARGE_LEAF` elements share one call (the
kernel's grouped handler), so a tree of many small leaves costs one call, not one per leaf.
It computes exactly the operations of the pure-JAX kernel, in the same order, so results are
bit-identical. The wrapper keeps every property of the transform:

* other platforms (GPU, TPU) lower the pure-JAX kernel instead (`lax.platform_dependent`);
* `jax.vmap`: the leaf's batch axis simply becomes part of the array (`custom_vmap`);
* sharding: each device updates its own shard (`custom_partitioning`; no gathers);
* differentiation: derivatives are those of the pure-JAX kernel (`custom_jvp`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

_TARGET = "optax_adadelta_update"
_GROUP_TARGET = "optax_adadelta_update_group"
# (gradient, state) dtypes. float32 gradients with bfloat16 state are left to XLA: there
# XLA's fusion rounds Δx differently (1 ulp) from the one-loop kernel.
_DTYPES = {
  (np.dtype(np.float32), np.dtype(np.float32)),
  (np.dtype(jnp.bfloat16), np.dtype(np.float32)),
  (np.dtype(jnp.bfloat16), np.dtype(jnp.bfloat16)),
}

# Both averages are updated in place. Δx is written over the gradients when a leaf is large:
# then no second gradient-sized buffer is allocated (a fresh large buffer costs more than the
# whole update: its pages are faulted in on every step). Small leaves get a new buffer, which
# is cheap, and saves XLA a copy of gradients that are not donated (benchmarks/explore.py).
_ALIASES_LARGE = {0: 0, 1: 1, 2: 2}
_ALIASES_SMALL = {1: 1, 2: 2}
LARGE_LEAF = 1 << 18  # elements: 1 MiB in float32
Hyper = tuple[float, float, float]  # rho, 1 - rho, eps as Python floats
Leaf = tuple[jax.Array, jax.Array, jax.Array]


@functools.cache
def unavailable_reason() -> str | None:
  """Why the native kernel cannot be used in this process, or None if it can."""
  if os.environ.get("OPTAX_ADADELTA_NATIVE") == "0":
    return "disabled by OPTAX_ADADELTA_NATIVE=0"
  try:
    from optax_adadelta import _kernel  # type: ignore[attr-defined]
  except ImportError as error:
    if os.path.exists(os.path.join(os.path.dirname(__file__), "_kernel.cc")):
      return (
        f"the native kernel is not built in this source tree ({error}); "
        "`pip install -e .` builds it in place"
      )
    return f"the native kernel was not built when the package was installed ({error})"
  jax.ffi.register_ffi_target(_TARGET, _kernel.adadelta_handler(), platform="cpu")
  jax.ffi.register_ffi_target(_GROUP_TARGET, _kernel.adadelta_group_handler(), platform="cpu")
  return None


def is_available() -> bool:
  """Whether `adadelta(implementation="auto")` can use the native CPU kernel here.

  `adadelta(implementation="native")` raises with the reason when it cannot.
  """
  return unavailable_reason() is None


def static_hyper(rho, one_minus_rho, eps) -> Hyper | None:
  """The hyper-parameters as Python floats, or None if any is traced or not a scalar."""
  values = []
  for value in (rho, one_minus_rho, eps):
    if isinstance(value, jax.core.Tracer) or np.ndim(value) != 0:
      return None
    values.append(float(value))
  return values[0], values[1], values[2]


def supports(g: jax.Array, e_g2: jax.Array, e_dx2: jax.Array) -> bool:
  """Whether the kernel handles this leaf: float32 or bfloat16, state at least as wide."""
  return (g.dtype, e_g2.dtype) in _DTYPES and e_dx2.dtype == e_g2.dtype


def update_leaves(leaves: list[Leaf], hyper: Hyper, reference: Callable[..., Leaf]) -> list[Leaf]:
  """`update` for every (g, E[g²], E[Δx²]) in `leaves`; small leaves share one kernel call.

  A kernel call costs XLA about 20 µs however small the leaf (benchmarks/explore.py, E2):
  a model with a thousand biases and norms would spend most of its step calling. Leaves
  below `LARGE_LEAF` elements (and not scalars) go through one call together; large leaves and
  scalars get a call each.
  """
  small = [i for i, (g, _, _) in enumerate(leaves) if g.ndim > 0 and g.size < LARGE_LEAF]
  if len(small) < 2:
    small = []
  results: list[Leaf | None] = [None] * len(leaves)
  if small:
    grouped = _update_group([leaves[i] for i in small], hyper, reference)
    for i, result in zip(small, grouped, strict=True):
      results[i] = result
  for i, leaf in enumerate(leaves):
    if results[i] is None:
      results[i] = update(*leaf, hyper, reference)
  return results  # type: ignore[return-value]


def update(g, e_g2, e_dx2, hyper: Hyper, reference: Callable[..., Leaf]) -> Leaf:
  """(Δx, E[g²], E[Δx²]) for one leaf; `reference` is the pure-JAX kernel on the same dtypes."""

  @jax.custom_jvp
  def fused(g, e_g2, e_dx2):
    return jax.lax.platform_dependent(
      g,
      e_g2,
      e_dx2,
      cpu=functools.partial(_batched, hyper=hyper, reference=reference),
      default=reference,
    )

  @fused.defjvp
  def fused_jvp(primals, tangents):
    return jax.jvp(reference, primals, tangents)

  return fused(g, e_g2, e_dx2)


def _batched(g, e_g2, e_dx2, *, hyper: Hyper, reference: Callable[..., Leaf]) -> Leaf:
  @jax.custom_batching.custom_vmap
  def call(g, e_g2, e_dx2):
    kernel = functools.partial(_ffi, hyper=hyper)
    types = [jax.typeof(x) for x in (g, e_g2, e_dx2)]
    if len({t.manual_axis_type for t in types}) > 1 or len({t.sharding.spec for t in types}) > 1:
      return reference(g, e_g2, e_dx2)  # differently sharded leaves: let XLA reconcile them
    if jax.sharding.get_abstract_mesh().manual_axes:
      # Inside shard_map: these are this device's shards, and so are the results.
      varying = tuple(sorted(types[0].manual_axis_type.varying))
      results = kernel(g, e_g2, e_dx2)
      return tuple(jax.lax.pcast(x, varying, to="varying") for x in results) if varying else results
    sharding = types[0].sharding
    if _explicitly_sharded(sharding):
      # The shardings are part of the types here: run the kernel on each shard.
      specs = (sharding.spec,) * 3
      return jax.shard_map(kernel, mesh=sharding.mesh, in_specs=specs, out_specs=specs)(
        g, e_g2, e_dx2
      )
    return _partitioned(g, e_g2, e_dx2, hyper)

  @call.def_vmap
  def call_vmap(axis_size, in_batched, g, e_g2, e_dx2):
    # Element-wise: the batch axis (moved to the front) is one more array axis.
    args = [
      x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, batched in zip((g, e_g2, e_dx2), in_batched, strict=True)
    ]
    return call(*args), (True, True, True)

  return call(g, e_g2, e_dx2)


def _update_group(leaves: list[Leaf], hyper: Hyper, reference: Callable[..., Leaf]) -> list[Leaf]:
  """`update` on many leaves through one kernel call (same wrapping, flattened arguments)."""

  def reference_all(*flat):
    return tuple(x for i in range(0, len(flat), 3) for x in reference(*flat[i : i + 3]))

  @jax.custom_jvp
  def fused(*flat):
    return jax.lax.platform_dependent(
      *flat,
      cpu=functools.partial(_batched_group, hyper=hyper, reference=reference),
      default=reference_all,
    )

  @fused.defjvp
  def fused_jvp(primals, tangents):
    return jax.jvp(reference_all, primals, tangents)

  flat = fused(*(x for leaf in leaves for x in leaf))
  return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


def _batched_group(*flat, hyper: Hyper, reference: Callable[..., Leaf]) -> tuple[jax.Array, ...]:
  @jax.custom_batching.custom_vmap
  def call(*flat):
    types = [jax.typeof(x) for x in flat]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.manual_axes or any(_explicitly_sharded(t.sharding) for t in types):
      # Inside shard_map, or shardings in the types: each leaf on its own, as `update` does.
      leaves = [flat[i : i + 3] for i in range(0, len(flat), 3)]
      return tuple(x for leaf in leaves for x in _batched(*leaf, hyper=hyper, reference=reference))
    ranks = tuple(x.ndim for x in flat[::3])
    return tuple(_partitioned_group(ranks)(hyper, *flat))

  @call.def_vmap
  def call_vmap(axis_size, in_batched, *flat):
    args = [
      x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
      for x, batched in zip(flat, in_batched, strict=True)
    ]
    return call(*args), (True,) * len(args)

  return call(*flat)


def _explicitly_sharded(sharding) -> bool:
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return False
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _ffi(g, e_g2, e_dx2, hyper: Hyper) -> Leaf:
  rho, one_minus_rho, eps = hyper
  outputs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (g, e_g2, e_dx2))
  aliases = _ALIASES_LARGE if g.size >= LARGE_LEAF else _ALIASES_SMALL
  call = jax.ffi.ffi_call(_TARGET, outputs, input_output_aliases=aliases)
  step, new_e_g2, new_e_dx2 = call(  # float32 attributes, as the pure-JAX kernel's constants
    g,
    e_g2,
    e_dx2,
    rho=np.float32(rho),
    one_minus_rho=np.float32(one_minus_rho),
    eps=np.float32(eps),
  )
  return step, new_e_g2, new_e_dx2


def _ffi_group(*flat, hyper: Hyper) -> tuple[jax.Array, ...]:
  rho, one_minus_rho, eps = hyper
  outputs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat)
  aliases = {i: i for i in range(len(flat)) if i % 3}  # both averages in place, Δx new
  call = jax.ffi.ffi_call(_GROUP_TARGET, outputs, input_output_aliases=aliases)
  return tuple(
    call(*flat, rho=np.float32(rho), one_minus_rho=np.float32(one_minus_rho), eps=np.float32(eps))
  )


@functools.cache
def _partitioned_group(ranks: tuple[int, ...]):
  """The group call for leaves of these ranks: each device updates its own shards.

  Leaf i's three arguments and three results all take the sharding of its gradient.
  """

  @functools.partial(custom_partitioning, static_argnums=(0,))
  def group(hyper: Hyper, *flat):
    return _ffi_group(*flat, hyper=hyper)

  def shardings(arg_shapes):
    return tuple(arg_shapes[i - i % 3].sharding for i in range(len(arg_shapes)))

  def infer(hyper, mesh, arg_shapes, result_shape):
    del hyper, mesh, result_shape
    return shardings(arg_shapes)

  def partition(hyper, mesh, arg_shapes, result_shape):
    del result_shape
    both = shardings(arg_shapes)
    return mesh, functools.partial(_ffi_group, hyper=hyper), both, both

  # Shardy: every dimension its own factor, shared by a leaf's six arrays only.
  operands = [" ".join(f"l{i}d{k}" for k in range(rank)) for i, rank in enumerate(ranks)]
  sides = ", ".join(op for op in operands for _ in range(3))
  group.def_partition(
    partition=partition, infer_sharding_from_operands=infer, sharding_rule=f"{sides} -> {sides}"
  )
  return group


@functools.partial(custom_partitioning, static_argnums=(3,))
def _partitioned(g, e_g2, e_dx2, hyper: Hyper) -> Leaf:
  return _ffi(g, e_g2, e_dx2, hyper)


def _same_sharding(hyper, mesh, arg_shapes, result_shape):
  del hyper, mesh, result_shape
  sharding = arg_shapes[0].sharding
  return (sharding, sharding, sharding)


def _partition(hyper, mesh, arg_shapes, result_shape):
  shardings = _same_sharding(hyper, mesh, arg_shapes, result_shape)
  return mesh, functools.partial(_ffi, hyper=hyper), shardings, shardings


_partitioned.def_partition(
  partition=_partition,
  infer_sharding_from_operands=_same_sharding,
  sharding_rule="..., ..., ... -> ..., ..., ...",
)
