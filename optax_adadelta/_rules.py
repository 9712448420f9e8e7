"""Adadelta's per-coordinate update, as each library orders its floating-point operations.

Every rule maps real arrays of one dtype ``(g, E[g²], E[Δx²])`` and the hyper-parameters
``(ρ, 1 − ρ, ε)`` to ``(Δx, E[g²], E[Δx²])``. They are the same equations (Algorithm 1 of the
paper; TensorFlow.js's differs, see `tfjs`), rounded differently: a preset uses its peer's
rule so that the trajectories agree to the last bit the peer allows. Chosen by name with
``scale_by_adadelta(update_rule=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp

UpdateRule: TypeAlias = Literal["default", "pytorch", "keras", "tfjs", "tf1", "d2l"]


# The ratio (E[Δx²]+ε)/(E[g²]+ε) is scaled by 2³² inside the root and the step by 2⁻¹⁶ after it:
# exact (powers of two), so the step has the bits of g·√((E[Δx²]+ε)/(E[g²]+ε)) wherever that
# ratio is a normal float32, and the ratio no longer underflows (flushed to 0 from |g| ≈ 1e17 at
# ρ = 0.95, ε = 1e-6) until it falls under 2⁻¹⁵⁸: never before g² overflows for ε ≥ 1e-9.
# Above, it would overflow only if E[Δx²]/ε > 2⁹⁶. `native/adadelta.h` (`Step`) does the same.
RATIO_SCALE, STEP_SCALE = 2.0**32, 2.0**-16


def default(g, e_g2, e_dx2, rho, one_minus_rho, eps):
  """g·√((E[Δx²]+ε)/(E[g²]+ε)) with one root, the ratio scaled by 2³² inside it and the
  step by 2⁻¹⁶ (exact): what the native CPU kernels compute, in this order. Unscaled, the
  ratio underflowed for large finite gradients (g = 1e17, ρ = 0.95: a 0 step for 0.004472).
  """
  e_g2 = rho * e_g2 + one_minus_rho * (g * g)
  step = g * jnp.sqrt((e_dx2 + eps) * RATIO_SCALE / (e_g2 + eps)) * STEP_SCALE
  return step, e_g2, rho * e_dx2 + one_minus_rho * (step * step)


def pytorch(g, e_g2, e_dx2, rho, one_minus_rho, eps):
  """torch/optim/adadelta.py (2.13), `_single_tensor_adadelta`: mul_(rho).addcmul_(g, g)."""
  e_g2 = e_g2 * rho + one_minus_rho * g * g
  step = jnp.sqrt(e_dx2 + eps) / jnp.sqrt(e_g2 + eps) * g
  return step, e_g2, e_dx2 * rho + one_minus_rho * step * step


def keras(g, e_g2, e_dx2, rho, one_minus_rho, eps):
  """keras/src/optimizers/adadelta.py (3.15): (rms(E[Δx²]) · g) / rms(E[g²])."""
  e_g2 = rho * e_g2 + one_minus_rho * jnp.square(g)
  step = (jnp.sqrt(e_dx2 + eps) * g) / jnp.sqrt(e_g2 + eps)
  return step, e_g2, rho * e_dx2 + one_minus_rho * jnp.square(step)


def tfjs(g, e_g2, e_dx2, rho, one_minus_rho, eps):
  """tfjs-core 4.22 optimizers/adadelta_optimizer.js, as it behaves.

  The step divides by the *previous* E[g²] (the variable is assigned only after the step
  is computed), so the first step is exactly g.
  """
  step = jnp.sqrt(e_dx2 + eps) / jnp.sqrt(e_g2 + eps) * g
  e_g2 = e_g2 * rho + jnp.square(g) * one_minus_rho
  return step, e_g2, e_dx2 * rho + jnp.square(step) * one_minus_rho


def tf1(g, e_g2, e_dx2, rho, one_minus_rho, eps):
  """tensorflow/core/kernels/training_ops.cc, ApplyAdadelta: √(E[Δx²]+ε) · rsqrt(E[g²]+ε) · g."""
  e_g2 = e_g2 * rho + jnp.square(g) * one_minus_rho
  step = jnp.sqrt(e_dx2 + eps) * jnp.reciprocal(jnp.sqrt(e_g2 + eps)) * g
  return step, e_g2, e_dx2 * rho + jnp.square(step) * one_minus_rho


def d2l(g, e_g2, e_dx2, rho, one_minus_rho, eps):
  """ "Dive into Deep Learning" §12.9 listing: √(Δ + ε) / √(s + ε) · g."""
  e_g2 = rho * e_g2 + one_minus_rho * (g * g)
  step = jnp.sqrt(e_dx2 + eps) / jnp.sqrt(e_g2 + eps) * g
  return step, e_g2, rho * e_dx2 + one_minus_rho * (step * step)


RULES = {
  "default": default,
  "pytorch": pytorch,
  "keras": keras,
  "tfjs": tfjs,
  "tf1": tf1,
  "d2l": d2l,
}


def leaf_update(rule: Callable[..., tuple], rho, eps) -> Callable[..., tuple]:
  """`(g, E[g²], E[Δx²]) -> (Δx, E[g²], E[Δx²])` for one leaf by `rule`, in at least float32.

  A None gradient (a frozen parameter) leaves its state as it is. The real and imaginary
  parts of a complex leaf are updated as two real coordinates (PyTorch's convention).
  """
  one_minus_rho = 1 - rho  # in double precision when rho is a Python float

  def update_leaf(g, e_g2, e_dx2):
    if g is None:
      return None, e_g2, e_dx2
    g = jnp.asarray(g)
    dtype = jnp.promote_types(jnp.real(e_g2).dtype, jnp.real(g).dtype)
    dtype = jnp.promote_types(dtype, jnp.float32)
    hyper = [jnp.asarray(h, dtype) for h in (rho, one_minus_rho, eps)]
    per_part = [
      rule(*(part.astype(dtype) for part in parts), *hyper)
      for parts in zip(_real_parts(g), _real_parts(e_g2), _real_parts(e_dx2), strict=True)
    ]
    columns = zip(*per_part, strict=True)
    return tuple(_from_parts(c, x.dtype) for c, x in zip(columns, (g, e_g2, e_dx2), strict=True))

  return update_leaf


def _real_parts(x: jax.Array) -> tuple[jax.Array, ...]:
  return (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)


def _from_parts(parts, dtype) -> jax.Array:
  whole = jax.lax.complex(*parts) if len(parts) == 2 else parts[0]
  return whole.astype(dtype)
