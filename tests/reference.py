"""An independent float64 NumPy transcription of Adadelta (Zeiler 2012, Algorithm 1).

Written from the paper's equations, not from the package: per real coordinate,
with E[g²]₀ = E[Δx²]₀ = 0,

  E[g²]ₜ  = ρ E[g²]ₜ₋₁ + (1−ρ) gₜ²
  Δxₜ     = −√(E[Δx²]ₜ₋₁+ε) / √(E[g²]ₜ+ε) · gₜ
  E[Δx²]ₜ = ρ E[Δx²]ₜ₋₁ + (1−ρ) Δxₜ²
  xₜ₊₁    = xₜ + η Δxₜ

plus the documented extras: maximize negates g first; coupled weight decay adds λx to g;
decoupled weight decay subtracts ηλx from the new x (x taken before the step).
Complex numbers are split into (real, imaginary) coordinate pairs by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReferenceRun:
  params: list[np.ndarray]
  e_g2: list[np.ndarray]
  e_dx2: list[np.ndarray]
  steps: list[list[np.ndarray]] = field(default_factory=list)  # η·Δx per step, per leaf


def as_real(x) -> np.ndarray:
  """float64 view of a real or complex array; complex gets a trailing (re, im) axis."""
  x = np.asarray(x)
  if np.iscomplexobj(x):
    return np.stack([x.real, x.imag], axis=-1).astype(np.float64)
  return x.astype(np.float64)


def run(
  params: Sequence[np.ndarray],
  gradients: Sequence[Sequence[np.ndarray]] | Callable[[list[np.ndarray], int], list[np.ndarray]],
  num_steps: int | None = None,
  *,
  learning_rate: float | Callable[[int], float] = 1.0,
  rho: float = 0.95,
  eps: float = 1e-6,
  weight_decay: float | Callable[[int], float] = 0.0,
  decay_mask: Sequence[bool] | None = None,
  decoupled: bool = False,
  maximize: bool = False,
  keep_steps: bool = True,
) -> ReferenceRun:
  """Runs Adadelta on each step's gradients (a list, or a function of (params, t)).

  learning_rate and weight_decay are numbers or functions of the step t = 0, 1, ...
  keep_steps=False leaves `steps` empty (long runs: it would hold every step).
  """
  x = [as_real(p) for p in params]
  e_g2 = [np.zeros_like(p) for p in x]
  e_dx2 = [np.zeros_like(p) for p in x]
  mask = [True] * len(x) if decay_mask is None else list(decay_mask)
  if num_steps is None:
    assert not callable(gradients)
    num_steps = len(gradients)
  result = ReferenceRun(x, e_g2, e_dx2)
  for t in range(num_steps):
    grads = gradients(x, t) if callable(gradients) else gradients[t]
    eta = learning_rate(t) if callable(learning_rate) else learning_rate
    lam = weight_decay(t) if callable(weight_decay) else weight_decay
    taken = []
    for i, g in enumerate(grads):
      g = as_real(g)
      if maximize:
        g = -g
      if lam and mask[i] and not decoupled:
        g = g + lam * x[i]
      e_g2[i] = rho * e_g2[i] + (1 - rho) * g**2
      dx = -np.sqrt(e_dx2[i] + eps) / np.sqrt(e_g2[i] + eps) * g
      e_dx2[i] = rho * e_dx2[i] + (1 - rho) * dx**2
      step = eta * dx
      if lam and mask[i] and decoupled:
        step = step - eta * lam * x[i]
      taken.append(step)
      x[i] = x[i] + step
    if keep_steps:
      result.steps.append(taken)
  return result


def step(g, e_g2, e_dx2, rho: float, eps: float):
  """One step of Algorithm 1 for arrays of float64: (Δx, E[g²], E[Δx²]), Δx positive along g
  (scale_by_adadelta's sign), for tests that drive the averages themselves (ε per step, say)."""
  e_g2 = rho * e_g2 + (1 - rho) * g * g
  dx = np.sqrt(e_dx2 + eps) / np.sqrt(e_g2 + eps) * g
  return dx, e_g2, rho * e_dx2 + (1 - rho) * dx * dx


# The factored state (#26), for a 2-D gradient --------------------------------------------
# Written from the estimator's definition (Shazeer & Stern 2018, eq. of Adafactor's factored
# second moment) and the factored step documented in scale_by_adadelta_factored: the history
# of each average is its row means R (over columns) and column means C (over rows), read
# back per entry as R_i C_j / mean(R); the present g² enters each step exactly.


def rank_one(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """Adafactor's estimate of an (n, m) average from its n row means and m column means."""
  total = rows.mean()
  if total == 0:
    return np.zeros((rows.size, cols.size))
  return np.outer(rows, cols) / total


def factored_step(g, g2, dx2, rho: float, eps: float):
  """One factored step of float64 arrays: (Δx, g2, dx2). Each average is either factored,
  a (rows, cols) pair of its row and column means, or kept whole, an (n, m) array."""
  read = lambda a: rank_one(*a) if isinstance(a, tuple) else a
  store = lambda a, like: (a.mean(axis=1), a.mean(axis=0)) if isinstance(like, tuple) else a
  e_g2 = rho * read(g2) + (1 - rho) * g * g
  old_dx2 = read(dx2)
  dx = np.sqrt(old_dx2 + eps) / np.sqrt(e_g2 + eps) * g
  e_dx2 = rho * old_dx2 + (1 - rho) * dx * dx
  return dx, store(e_g2, g2), store(e_dx2, dx2)


def factored_zeros(n: int, m: int, factor_e_g2: bool = True, factor_e_dx2: bool = True):
  """(g2, dx2) of a fresh (n, m) leaf for `factored_step`, each factored or whole."""
  zeros = lambda factored: (np.zeros(n), np.zeros(m)) if factored else np.zeros((n, m))
  return zeros(factor_e_g2), zeros(factor_e_dx2)
