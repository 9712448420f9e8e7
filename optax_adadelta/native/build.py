"""Compiles, caches, verifies and loads the native kernels, and registers them with XLA's FFI.

Both kernels (`kernel.cc`, `kernel_8bit.cc`, sharing `adadelta.h`) go into one shared library,
compiled once per machine, jaxlib and source with the system C++ compiler (``$CXX``, else
``c++``) against the FFI headers of the installed jaxlib, for the baseline instruction set with
clones for wider vectors (see `adadelta.h`), and cached in ``$OPTAX_ADADELTA_CACHE`` (else
``~/.cache/optax_adadelta``) beside a record of its size and SHA-256, checked before every load
(dlopen of a truncated file kills the process with SIGBUS): a damaged build is compiled again.
Compiling and falling back are logged (WARNING, the ``optax_adadelta`` logger);
``python -m optax_adadelta.build_native`` compiles ahead of time. Where that fails the package
runs on pure JAX, `is_available()` is False and `unavailable_reason()` says why.
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
from pathlib import Path

import jax
import jaxlib

FLOAT_TARGET = "optax_adadelta_update"  # kernel.cc: float32 and bfloat16 state
TARGET_8BIT = "optax_adadelta_update_8bit"  # kernel_8bit.cc: the 8-bit state
# Each FFI target is the library's function of the same name.
TARGETS = (FLOAT_TARGET, TARGET_8BIT)
SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernel.cc", "kernel_8bit.cc"))
HEADER = Path(__file__).with_name("adadelta.h")
FLAGS = (
  "-std=c++17",
  "-O3",
  "-fno-math-errno",
  "-fno-trapping-math",  # FP exception flags only: comparisons then vectorise
  "-ffp-contract=off",
  "-fPIC",
  "-shared",
)
# What compiling both kernels took, measured (see docs/performance.md); said when it starts.
COMPILE_TIME = "15-17 s of one core, a minute or more on a busy machine"
# The package's logger. Compiling and falling back are said at WARNING, the level Python shows
# with no logging configured (in a terminal and in a notebook's cell output): a first step that
# stalls silently for many seconds, or a kernel that cannot be used, should be seen.
_log = logging.getLogger("optax_adadelta")


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


def build_library() -> Path:
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
        *(path.read_bytes() for path in (*SOURCES, HEADER)),
        jaxlib.__version__.encode(),
        compiler.encode(),
        *map(str.encode, FLAGS),
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
    command = [compiler, *FLAGS, "-isystem", include, *map(str, SOURCES), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not built.exists():
      failure = f"compiling {SOURCES[0].name} failed: {result.stderr.strip()[-2000:]}"
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
  """Why the native kernel cannot be used in this process, or None if it can (logged once).

  The first call builds (or finds) the library, loads it and registers every FFI target.
  """
  if os.environ.get("OPTAX_ADADELTA_NATIVE") == "0":
    reason, level = "disabled by OPTAX_ADADELTA_NATIVE=0", logging.INFO
  elif os.name == "nt":
    reason, level = "the native kernel is built on Linux and macOS only", logging.INFO
  else:
    try:
      library = ctypes.cdll.LoadLibrary(str(build_library()))
      for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)))
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
