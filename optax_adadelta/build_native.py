"""Builds the native CPU kernels ahead of time: ``python -m optax_adadelta.build_native``.

The first ``adadelta()`` of a machine otherwise compiles them (see
``optax_adadelta.native_available``). Run this in a Docker image's build or a cluster job's
setup, with the same ``$OPTAX_ADADELTA_CACHE`` (else ``~/.cache/optax_adadelta``), jaxlib and
``$CXX`` as the training that will use it. It compiles into the cache unless a verified build
is there, loads the result, prints ``native kernels: <path>`` and exits 0; where the kernels
cannot be built or loaded it prints the reason and exits 1 (training would then use XLA).
"""

from __future__ import annotations

import argparse
import sys

from optax_adadelta.native import build


def main(argv: list[str] | None = None) -> int:
  argparse.ArgumentParser(
    prog="python -m optax_adadelta.build_native",
    description=__doc__.split("\n\n")[1].replace("``", "") if __doc__ else None,
  ).parse_args(argv)
  reason = build.unavailable_reason()
  if reason is not None:
    print(f"native kernels unavailable: {reason}", file=sys.stderr)
    return 1
  print(f"native kernels: {build.build_library()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
