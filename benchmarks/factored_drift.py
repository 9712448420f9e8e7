"""Why factoring E[g²] makes Adadelta's steps drift (#26): a float64 NumPy model.

    python -m benchmarks.factored_drift

Gradients gᵢⱼ = sᵢⱼ·N(0, 1), drawn afresh every step and not responding to the steps, with a
scale sᵢⱼ = 10^(uᵢ + vⱼ + wᵢⱼ), each of u, v, w uniform over ±decades/2: the per-entry part
w makes E[g²] not rank-1. Printed: √(mean E[Δx²]) after 100, 500, 1,000 and 2,000 steps for
Algorithm 1 and for six ways of keeping the averages of a 64 × 48 matrix:

* ``both``: both averages factored (rows and columns, Adafactor's rank-1 estimate), the
  present g² exact: what ``adadelta(factored=True)`` does;
* ``adafactor_style``: the same with g² entering the factors first (Adafactor's order);
* ``e_g2_only``: E[g²] factored, E[Δx²] per entry (``factor_e_dx2=False``);
* ``e_dx2_only``: E[g²] per entry, E[Δx²] factored (``factor_e_g2=False``);
* ``ratio``: E[g²] and R = (E[Δx²] + ε)/(E[g²] + ε) factored (arithmetic means);
* ``log_ratio``: E[g²] and log R factored (means of log R, a rank-1 fit in log space).

Algorithm 1 multiplies E[Δx²] by ρ + (1 − ρ)·g²/E[g²] a step (ignoring ε), whose mean is 1
when E[g²] is the entry's own; an entry whose E[g²] its row and column underestimate grows its
E[Δx²] every step.
"""

from __future__ import annotations

import numpy as np

RHO, EPS, SHAPE, CHECKPOINTS = 0.95, 1e-6, (64, 48), (99, 499, 999, 1999)


def rank_one(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  total = rows.mean()
  return np.zeros((rows.size, cols.size)) if total == 0 else np.outer(rows, cols) / total


def means(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return a.mean(axis=1), a.mean(axis=0)


def run(variant: str, decades: float, seed: int = 0) -> list[float]:
  rng = np.random.default_rng(seed)
  n, m = SHAPE
  spread = lambda shape: rng.uniform(-decades / 2, decades / 2, shape)
  scale = 10.0 ** (spread((n, 1)) + spread((1, m)) + spread((n, m)))
  zeros = (np.zeros(n), np.zeros(m))
  g2, dx2 = np.zeros(SHAPE), np.zeros(SHAPE)  # whole averages
  g2_f, dx2_f, log_r = zeros, zeros, zeros  # factored ones
  out = []
  with np.errstate(over="ignore", invalid="ignore"):
    for t in range(max(CHECKPOINTS) + 1):
      g = scale * rng.standard_normal(SHAPE)
      if variant == "adafactor_style":
        g2_f = tuple(RHO * a + (1 - RHO) * b for a, b in zip(g2_f, means(g * g), strict=True))
        new_g2 = rank_one(*g2_f)
      else:
        old_g2 = g2 if variant in ("full", "e_dx2_only") else rank_one(*g2_f)
        new_g2 = RHO * old_g2 + (1 - RHO) * g * g
      if variant in ("full", "e_g2_only"):
        old_dx2 = dx2
      elif variant in ("ratio", "log_ratio"):
        r = rank_one(*log_r) if variant == "ratio" else np.exp(_log_rank_one(*log_r))
        r = np.where(t == 0, 1.0, r)  # R starts at ε/ε
        old_dx2 = np.maximum(r * (old_g2 + EPS) - EPS, 0.0)
      else:
        old_dx2 = rank_one(*dx2_f)
      dx = np.sqrt(old_dx2 + EPS) / np.sqrt(new_g2 + EPS) * g
      new_dx2 = RHO * old_dx2 + (1 - RHO) * dx * dx
      g2, dx2 = new_g2, new_dx2
      if variant != "adafactor_style":
        g2_f = means(new_g2)
      dx2_f = means(new_dx2)
      ratio = (new_dx2 + EPS) / (new_g2 + EPS)
      log_r = means(ratio if variant == "ratio" else np.log(ratio))
      if t in CHECKPOINTS:
        out.append(float(np.sqrt(new_dx2.mean())))
  return out


def _log_rank_one(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  return rows[:, None] + cols[None, :] - rows.mean()


VARIANTS = ("full", "both", "adafactor_style", "e_g2_only", "e_dx2_only", "ratio", "log_ratio")


def main() -> None:
  steps = ", ".join(str(c + 1) for c in CHECKPOINTS)
  print(f"sqrt(mean E[dx^2]) after {steps} steps; rho {RHO}, eps {EPS:g}, shape {SHAPE}\n")
  print("| per-entry spread (decades) | variant | " + " | ".join(steps.split(", ")) + " |")
  print("|---|---|" + "---|" * len(CHECKPOINTS))
  for decades in (0.5, 1.0, 2.0, 4.0):
    for variant in VARIANTS:
      values = " | ".join(f"{v:.3g}" for v in run(variant, decades))
      print(f"| {decades} | {variant} | {values} |", flush=True)


if __name__ == "__main__":
  main()
