"""The optional native CPU update: `_kernel.cc` through XLA's FFI, built at first use.

(`_kernel_8bit.cc`, the 8-bit state's update, is built into the same library and called by
`_native_8bit`.)

One primitive, `optax_adadelta_update`, updates up to 256 leaves of a step in one call: one loop
over memory per leaf (XLA's own lowering makes four), the two averages in place. Its rules:

* lowering: the kernel on CPU; everywhere else, and under `jax.export` (which only serializes
  custom calls with compatibility guarantees), the pure-JAX rule it replaces;
* batching: the update is elementwise, so a `vmap` axis is one more array axis;
* differentiation: the derivatives of the pure-JAX rule;
* sharding: each device updates its own shards (`custom_partitioning`, no collectives).

The kernel is compiled once per machine, jaxlib and source with the system C++ compiler
(``$CXX``, else ``c++``) against the FFI headers of the installed jaxlib, for the baseline
instruction set with clones for wider vectors (see `_kernel.cc`), and cached in
``$OPTAX_ADADELTA_CACHE`` (else ``~/.cache/optax_adadelta``) beside a record of its size and
SHA-256, checked before every load (dlopen of a truncated file kills the process with SIGBUS):
a damaged build is compiled again. Compiling and falling back are logged (WARNING, the
``optax_adadelta`` logger); ``python -m optax_adadelta.build_native`` compiles ahead of time.
Where that fails the package runs on pure JAX, and `native_available()` is False;
`unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_TARGET = "optax_adadelta_update"
TARGET_8BIT = "optax_adadelta_update_8bit"  # _kernel_8bit.cc, used by _native_8bit.py
_NATIVE_DIR = Path(__file__).with_name("native")
_SOURCES = [_NATIVE_DIR / n for n in ("kernel.cc", "kernel_8bit.cc")]
_HEADER = _NATIVE_DIR / "adadelta.h"
_FLAGS = (
  "-std=c++17",
  "-O3",
  "-fno-math-errno",
  "-fno-trapping-math",  # FP exception flags only: comparisons then vectorise
  "-ffp-contract=off",
  "-fPIC",
  "-shared",
)
# Δx is written over the gradient of a leaf this large: a fresh buffer of that size costs
# more than the update (its pages are faulted in on every step). Smaller leaves get a new one.
_IN_PLACE_STEP = 1 << 18
# XLA's compile time grows faster than linearly in one call's operands: 1,000 leaves of a step
# compiled in 48 s as one call, 5 s as calls of 200 (the XLA path: 13 s). A call costs ~20 µs.
_LEAVES_PER_CALL = 256
_SUPPORTED = {  # (gradient, state) dtypes
  (np.dtype(np.float32), np.dtype(np.float32)),
  (np.dtype(jnp.bfloat16), np.dtype(np.float32)),
  (np.dtype(jnp.bfloat16), np.dtype(jnp.bfloat16)),
}
# What compiling both kernels took, measured (see docs/performance.md); said when it starts.
COMPILE_TIME = "15-17 s of one core, a minute or more on a busy machine"
# The package's logger. Compiling and falling back are said at WARNING, the level Python shows
# with no logging configured (in a terminal and in a notebook's cell output): a first step that
# stalls silently for many seconds, or a kernel that cannot be used, should be seen.
_log = logging.getLogger("optax_adadelta")
Hyper = tuple[float, float, float]  # rho, 1 - rho, eps
Leaf = tuple[jax.Array, jax.Array, jax.Array]


def _cache_dir() -> Path:
  default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optax_adadelta"
  return Path(os.environ.get("OPTAX_ADADELTA_CACHE") or default)


def _digest(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(record: Path) -> tuple[Path | None, str | None]:
  """The library a build record names, if its size and SHA-256 are the recorded ones.

  Else (None, what is wrong), or (None, None) where nothing was built yet. dlopen of a
  truncated library kills the process with SIGBUS, so nothing unverified is loaded.
  """
  if not record.exists():
    orphans = sorted(p.name for p in record.parent.glob(f"{record.stem}*.so"))
    return None, f"{orphans[0]} has no build record {record.name}" if orphans else None
  try:
    meta = json.loads(record.read_text())
    library = record.with_name(meta["library"])
    if library.name != meta["library"]:  # a bare file name in the cache, nothing else
      raise ValueError(f"library {meta['library']!r} is not a file name")
    size, digest = meta["size"], meta["sha256"]
  except (OSError, ValueError, KeyError, TypeError) as error:
    return None, f"build record {record.name} is unreadable ({error})"
  if not library.exists():
    return None, f"{library.name}, named by {record.name}, is missing"
  if library.stat().st_size != size:
    return None, f"{library.name} has {library.stat().st_size} bytes, {size} when built"
  if _digest(library) != digest:
    return None, f"{library.name} is not the file that was built (SHA-256 differs)"
  return library, None


def _build() -> Path:
  """The kernels' shared library: a verified cached build, or compiled into the cache now.

  Race-safe: each process compiles into its own temporary file, renames it to a name made of
  its hash (so a rename never replaces a file with different bytes), then publishes the
  build record (size, SHA-256) by another atomic rename.
  """
  compiler = shutil.which(os.environ.get("CXX", "c++"))
  if compiler is None:
    raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not found; set CXX)")
  include = jax.ffi.include_dir()
  key = hashlib.sha256(
    b"\0".join(
      [
        *(path.read_bytes() for path in (*_SOURCES, _HEADER)),
        jaxlib.__version__.encode(),
        compiler.encode(),
        *map(str.encode, _FLAGS),
      ]
    )
  ).hexdigest()[:16]
  record = _cache_dir() / f"kernel-{key}.json"
  library, problem = _verified(record)
  if library is not None:
    return library
  if problem:
    _log.warning("optax_adadelta: the cached native kernel is unusable, rebuilding: %s", problem)
  record.parent.mkdir(parents=True, exist_ok=True)
  _log.warning(
    "optax_adadelta: compiling the native CPU kernels (%s, once per machine, jaxlib and "
    "release) into %s; to do it ahead of time: python -m optax_adadelta.build_native",
    COMPILE_TIME,
    record.parent,
  )
  with tempfile.TemporaryDirectory(dir=record.parent) as scratch:
    built = Path(scratch) / "kernel.so"
    command = [compiler, *_FLAGS, "-isystem", include, *map(str, _SOURCES), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not built.exists():
      failure = f"compiling {_SOURCES[0].name} failed: {result.stderr.strip()[-2000:]}"
      raise RuntimeError(f"{problem}; {failure}" if problem else failure)
    digest, size = _digest(built), built.stat().st_size
    name = f"{record.stem}-{digest[:16]}.so"
    os.replace(built, record.with_name(name))
    written = Path(scratch) / "record.json"
    written.write_text(json.dumps({"library": name, "size": size, "sha256": digest}))
    os.replace(written, record)
  library, problem = _verified(record)
  if library is None:  # another process published a different build since: not ours to judge
    raise RuntimeError(f"the kernel just built failed its check: {problem}")
  return library


@functools.cache
def unavailable_reason() -> str | None:
  """Why the native kernel cannot be used in this process, or None if it can (logged once)."""
  if os.environ.get("OPTAX_ADADELTA_NATIVE") == "0":
    reason, level = "disabled by OPTAX_ADADELTA_NATIVE=0", logging.INFO
  elif os.name == "nt":
    reason, level = "the native kernel is built on Linux and macOS only", logging.INFO
  else:
    try:
      library = ctypes.cdll.LoadLibrary(str(_build()))
      capsules = (library.optax_adadelta_update, library.optax_adadelta_update_8bit)
      jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(capsules[0]))
      jax.ffi.register_ffi_target(TARGET_8BIT, jax.ffi.pycapsule(capsules[1]))
      return None
    except (OSError, RuntimeError, AttributeError) as error:
      reason = f"the native kernel could not be built or loaded: {error}"
      level = logging.WARNING  # something to fix: say it where it is seen
  _log.log(level, "optax_adadelta: using XLA's update (same results, slower): %s", reason)
  return reason


def is_available() -> bool:
  """Whether ``adadelta()`` can use the native CPU kernel in this process.

  The kernels are compiled on first use and cached: 15-17 s of one core's time, measured on a
  2-core AMD EPYC (32-62 s wall there while other jobs kept it busy; see docs/performance.md),
  announced by a log warning. ``python -m optax_adadelta.build_native`` does it ahead of time.
  Where they cannot be built, everything runs on pure JAX with the same results, and
  ``adadelta(implementation="native")`` raises with the reason.
  """
  return unavailable_reason() is None


def static_hyper(rho, eps) -> Hyper | None:
  """(ρ, 1 − ρ, ε) as Python floats, or None if either is traced or not a scalar."""
  if any(isinstance(v, jax.core.Tracer) or np.ndim(v) != 0 for v in (rho, eps)):
    return None
  return float(rho), 1 - float(rho), float(eps)


def supports(g: jax.Array, e_g2: jax.Array, e_dx2: jax.Array) -> bool:
  """Whether the kernel handles this leaf: float32 or bfloat16, the state at least as wide."""
  return (g.dtype, e_g2.dtype) in _SUPPORTED and e_dx2.dtype == e_g2.dtype


def update_tree(updates, e_g2, e_dx2, hyper: Hyper, rule: Callable[..., Leaf]):
  """A tree of (Δx, E[g²], E[Δx²]) per leaf: one kernel call for every leaf it supports.

  `rule(g, e_g2, e_dx2)` is the pure-JAX update of one leaf that the kernel stands for; it
  updates the other leaves (other dtypes, scalars, None gradients).
  """
  treedef: Any = jax.tree.structure(updates, is_leaf=lambda x: x is None)
  columns = zip(*(treedef.flatten_up_to(t) for t in (updates, e_g2, e_dx2)), strict=True)
  leaves = [(g if g is None else jnp.asarray(g), a, b) for g, a, b in columns]
  native = [
    i for i, (g, a, b) in enumerate(leaves) if g is not None and g.ndim and supports(g, a, b)
  ]
  by_rule = set(range(len(leaves))) - set(native)
  results: list = [rule(*leaf) if i in by_rule else None for i, leaf in enumerate(leaves)]
  for start in range(0, len(native), _LEAVES_PER_CALL):
    group = native[start : start + _LEAVES_PER_CALL]
    flat = _update_p.bind(*(x for i in group for x in leaves[i]), hyper=hyper, rule=rule)
    for k, i in enumerate(group):
      results[i] = tuple(flat[3 * k : 3 * k + 3])
  return treedef.unflatten(results)


def _by_rule(*flat, rule, hyper=None):
  del hyper
  return [x for i in range(0, len(flat), 3) for x in rule(*flat[i : i + 3])]


def _kernel_call(*flat, hyper: Hyper):
  rho, one_minus_rho, eps = hyper
  aliases = {i: i for i in range(len(flat)) if i % 3 or flat[i].size >= _IN_PLACE_STEP}
  outputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat]
  call = jax.ffi.ffi_call(_TARGET, outputs, input_output_aliases=aliases)
  # float32 attributes: the pure-JAX rule's constants are float32 too.
  attributes = {"rho": np.float32(rho), "one_minus_rho": np.float32(one_minus_rho)}
  return tuple(call(*flat, **attributes, eps=np.float32(eps)))


@functools.cache
def _partitioned(ranks: tuple[int, ...]):
  """The kernel call for leaves of these ranks, each device on its own shards.

  The one rule: a leaf's three arguments and three results share its gradient's sharding.
  """

  @functools.partial(custom_partitioning, static_argnums=(0,))
  def call(hyper, *flat):
    return _kernel_call(*flat, hyper=hyper)

  def follow_gradients(arg_shapes):
    return tuple(arg_shapes[i - i % 3].sharding for i in range(len(arg_shapes)))

  def partition(hyper, mesh, arg_shapes, result_shape):
    shardings = follow_gradients(arg_shapes)
    return mesh, functools.partial(_kernel_call, hyper=hyper), shardings, shardings

  dims = [" ".join(f"l{leaf}d{k}" for k in range(rank)) for leaf, rank in enumerate(ranks)]
  sides = ", ".join(d for d in dims for _ in range(3))
  call.def_partition(
    partition=partition,
    infer_sharding_from_operands=lambda hyper, mesh, shapes, result: follow_gradients(shapes),
    sharding_rule=f"{sides} -> {sides}",
  )
  return call


def sharded_over_devices(ctx) -> bool:
  """Whether a lowering is of a step sharded over several devices (jit with shardings)."""
  axes = ctx.module_context.axis_context
  return type(axes).__name__ == "ShardingContext" and axes.num_devices > 1


def batch_axes_first(args, dims) -> list:
  """The operands of a batched primitive with the vmap axis leading each (broadcast if none)."""
  size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
  return [
    jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
    for x, d in zip(args, dims, strict=True)
  ]


def _cpu_lowering(ctx, *flat, hyper, rule):
  context, axes = ctx.module_context, ctx.module_context.axis_context
  sharded = sharded_over_devices(ctx)
  fn: Callable
  if context.lowering_parameters.for_export or (sharded and axes.device_assignment is None):
    fn = functools.partial(_by_rule, rule=rule)
  elif sharded:
    ranks = tuple(aval.ndim for aval in ctx.avals_in[::3])
    fn = lambda *flat: _partitioned(ranks)(hyper, *flat)
  else:  # one device, a pmap replica, or this device's shards inside shard_map
    fn = functools.partial(_kernel_call, hyper=hyper)
  return mlir.lower_fun(fn, multiple_results=True)(ctx, *flat)


def _batch(args, dims, *, hyper, rule):
  return _update_p.bind(*batch_axes_first(args, dims), hyper=hyper, rule=rule), [0] * len(args)


def _jvp(primals, tangents, *, hyper, rule):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  _, tangents_out = jax.jvp(functools.partial(_by_rule, rule=rule), list(primals), tangents)
  return _update_p.bind(*primals, hyper=hyper, rule=rule), tangents_out


_update_p = Primitive(_TARGET)
_update_p.multiple_results = True
_update_p.def_impl(jax.jit(_update_p.bind, static_argnames=("hyper", "rule")))
_update_p.def_abstract_eval(lambda *avals, hyper, rule: list(avals))
mlir.register_lowering(_update_p, mlir.lower_fun(_by_rule, multiple_results=True))
mlir.register_lowering(_update_p, _cpu_lowering, platform="cpu")
try:  # private: jit then lowers with the device assignment that custom_partitioning needs
  from jax._src import dispatch as _dispatch

  _dispatch.prim_requires_devices_during_lowering.add(_update_p)
except (ImportError, AttributeError):  # then sharded steps lower the pure-JAX rule
  pass
batching.primitive_batchers[_update_p] = _batch
ad.primitive_jvps[_update_p] = _jvp
