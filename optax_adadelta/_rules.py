"""Adadelta's per-coordinate update, as each library orders its floating-point operations.

Every rule maps real arrays of one dtype ``(g, E[g²], E[Δx²])`` and the hyper-parameters
``(ρ, 1 − ρ, ε)`` to ``(Δx, E[g²], E[Δx²])``. They are the same equations (Algorithm 1 of the
paper; TensorFlow.js's differs, see `tfjs`), rounded differently: a preset uses its peer's
rule so that the trajectories agree to the last bit the peer allows. Chosen by name with
``scale_by_adadelta(update_rule=...)``.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import jax.numpy as jnp
from jax import lax

UpdateRule: TypeAlias = Literal["default", "pytorch", "keras", "tfjs", "tf1", "d2l"]


def default(g, e_g2, e_dx2, rho, one_minus_rho, eps):
  """(g / √(E[g²]+ε)) · √(E[Δx²]+ε): what the native CPU kernels compute, in this order.

  |g| / √(E[g²]+ε) is at most 1/√(1−ρ), so a large finite gradient cannot underflow it (the
  single root of (E[Δx²]+ε)/(E[g²]+ε) flushed to 0 from |g| ≈ 1e17 at ρ = 0.95). Where g²
  overflows (|g| ≳ 1.8e19 in float32) E[g²] is +inf and the step 0, as in PyTorch and Keras:
  the NaN-guard section of docs/precision.md says how to catch it.
  """
  e_g2 = rho * e_g2 + one_minus_rho * (g * g)
  step = g / _root(e_g2 + eps) * jnp.sqrt(e_dx2 + eps)
  return step, e_g2, rho * e_dx2 + one_minus_rho * (step * step)


def _root(x):
  """√x as a divisor. XLA rewrites a / √x as a · rsqrt(x), which it computes on CPU by an
  approximation the kernel cannot repeat; rounding the root to its own precision (a no-op
  that XLA keeps, and emits no code for) leaves the correctly rounded divide."""
  info = jnp.finfo(x.dtype)
  return lax.reduce_precision(jnp.sqrt(x), exponent_bits=info.nexp, mantissa_bits=info.nmant)


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
