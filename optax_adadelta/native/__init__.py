"""The native CPU layer: two C++ kernels through XLA's FFI, built at first use.

`kernel.cc` updates the float32/bfloat16 state, `kernel_8bit.cc` the 8-bit state; both include
`adadelta.h` (Adadelta's equations and the shared plumbing), compiled into one library by
`build`. Each kernel is one JAX primitive (`primitive.kernel_primitive`) that updates up to 256
leaves of a step in one call and stands for a pure-JAX update given by the caller, which it
lowers instead where the kernel cannot run (other platforms, ``jax.export``, steps sharded
over devices that the kernel cannot partition) and differentiates.

This package imports nothing else from optax_adadelta. Its API:

* `is_available()`, `unavailable_reason()`: whether the kernels are built and loaded;
* `decide(...)`: the one decision, kernel (a `Hyper`) or XLA (None);
* `update_leaves(...)`, `update_leaves_8bit(...)`: a step's leaves by the kernels.
"""

from __future__ import annotations

import jax
import numpy as np

from optax_adadelta.native.build import is_available, unavailable_reason
from optax_adadelta.native.float_kernel import update_leaves
from optax_adadelta.native.kernel_8bit import update_leaves_8bit
from optax_adadelta.native.primitive import Hyper

__all__ = [
  "Hyper",
  "decide",
  "is_available",
  "unavailable_reason",
  "update_leaves",
  "update_leaves_8bit",
]


def decide(
  rho, eps, update_rule: str, implementation: str, refusal: str | None = None
) -> Hyper | None:
  """(ρ, 1 − ρ, ε) to update by the kernel, or None to use XLA.

  The kernels compute ``update_rule="default"`` with ``rho`` and ``eps`` known when the
  transformation is built (Python numbers or concrete scalars). `refusal` is a state format's
  own reason it cannot use a kernel. ``implementation="jax"`` is always None; "auto" is None
  where any reason holds; "native" raises ValueError with the reason.
  """
  if implementation == "jax":
    return None
  reason = refusal
  if reason is None and update_rule != "default":
    reason = f"the kernel computes update_rule='default' only, got {update_rule!r}"
  if reason is None:
    reason = unavailable_reason()
  if reason is None and any(_traced(v) for v in (rho, eps)):
    reason = "rho and eps must be Python numbers or concrete scalars, not traced arrays"
  if reason is not None:
    if implementation == "native":
      raise ValueError(f"implementation='native' is not possible here: {reason}")
    return None
  return float(rho), 1 - float(rho), float(eps)


def _traced(value) -> bool:
  return isinstance(value, jax.core.Tracer) or np.ndim(value) != 0
