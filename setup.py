"""Builds the optional native CPU kernel (optax_adadelta/_kernel.cc).

Everything else is in pyproject.toml. The kernel is compiled with the C++ compiler that
setuptools finds, against the XLA FFI headers shipped in jaxlib. If that is impossible (no
compiler, no headers, OPTAX_ADADELTA_NO_NATIVE=1) the package installs without it and
`optax_adadelta.adadelta` runs its pure-JAX path.
"""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _xla_include_dir():
  try:
    import jaxlib
  except ImportError:
    return None
  include = Path(jaxlib.__file__).parent / "include"
  return str(include) if (include / "xla" / "ffi" / "api" / "ffi.h").is_file() else None


class _OptionalBuildExt(build_ext):
  """Never fails the install: a kernel that does not build is left out, with a warning."""

  def build_extension(self, ext):
    try:
      super().build_extension(ext)
    except Exception as error:  # any build failure means "no kernel"
      self.warn(f"optax_adadelta: native kernel not built ({error}); using the pure-JAX path")


def _extensions():
  include = _xla_include_dir()
  if os.environ.get("OPTAX_ADADELTA_NO_NATIVE") == "1" or include is None or os.name == "nt":
    print("optax_adadelta: building without the native kernel")
    return []
  # -march: the kernel is built on the machine it runs on; set OPTAX_ADADELTA_MARCH (e.g.
  # x86-64-v2) when building for other machines.
  march = os.environ.get("OPTAX_ADADELTA_MARCH", "native")
  flags = ["-std=c++17", "-O3", f"-march={march}", "-fno-math-errno", "-ffp-contract=off"]
  flags += ["-fvisibility=hidden", "-g0", "-isystem", include]  # no warnings from XLA's headers
  return [
    Extension(
      "optax_adadelta._kernel",
      sources=["optax_adadelta/_kernel.cc"],
      extra_compile_args=flags,
      language="c++",
      optional=True,
    )
  ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": _OptionalBuildExt})
