"""How the 8-bit state's step bias depends on the spacing of its codes, and on the lift (#14).

    python -m benchmarks.code_spacing_bias

Adadelta per coordinate on random gradients (scales spread log-normally), once in float64 and
once with both averages rounded stochastically, after every step, to a logarithmic grid
whose adjacent values differ by the factor 2^γ, γ = octaves / 254 (the 8-bit code covers 24
octaves with 254 steps). Each rounding is unbiased, but its noise accumulates in the running
average, and Δx² ∝ 1/(E[g²] + ε) is convex, so E[Δx²] and the step run long. Two remedies:
a finer grid (fewer octaves per 254 steps, so small values of a block drop to zero sooner),
or the package's lift of E[g²]'s rounding probability by ρ/(1+ρ)·p(1−p)·spread/(E + ε)
(`optax_adadelta.formats.codes_8bit.lift_weight`). Prints, for several octave counts, the ratio of
the rounded run's mean E[Δx²] and mean |Δx| (last 100 steps) to the float64 run's, unlifted,
lifted with independent draws for the two averages (the package before #22), and as the
package rounds since #22: one uniform number for both averages and half the lift.

Measured 2026-11-30 (ρ = 0.95, ε = 1e-4, 20,000 coordinates, 300 steps), unlifted: 24 octaves
(spacing 6.8 %) E[Δx²] × 1.077, |Δx| × 1.021; 16 octaves (4.5 %) × 1.027, × 1.007; 12 (3.3 %)
× 1.019, × 1.005; 8 (2.2 %) × 1.008, × 1.002. Lifted, the second run: 24 octaves × 1.031,
× 0.9998; 16 × 1.012, × 1.0002; 12 × 1.008, × 1.0005; 8 × 1.003, × 1.0004 (benchmarks/README.md,
E6). Again 2026-12-05 (the same first two columns to the third digit), one draw and half the
lift: 24 × 0.983, × 0.9911; 16 × 0.996, × 0.9978; 12 × 0.998, × 0.9983; 8 × 1.000, × 0.9995.
On this fixed grid per coordinate the shared draw's covariance cancels a little more than
half the convexity's term; the package's codes, whose grid moves with the block's maximum
every step, give × 0.998 and × 1.002 (`test_8bit_steps_are_not_biased_against_float64_adadelta`).
"""

from __future__ import annotations

import numpy as np


def round_to_grid(values, gamma, uniform, lift=None):
  """Each value to one of its two neighbours on the grid 2^(γk), unbiased in value, or with
  the probability of the upper lifted by w·p(1−p)·(high − low)/(value + ε), lift = (w, ε)."""
  k = np.floor(np.log2(np.maximum(values, 1e-30)) / gamma)
  low, high = 2.0 ** (gamma * k), 2.0 ** (gamma * (k + 1))
  p = (values - low) / (high - low)
  if lift is not None:
    weight, eps = lift
    p = p + weight * p * (1 - p) * (high - low) / (values + eps)
  return np.where(uniform < p, high, low)


def bias(gamma, rng, lifted, rho=0.95, eps=1e-4, size=20_000, steps=300, shared=False):
  """(mean E[Δx²], mean |Δx| over the last 100 steps), rounded over float64. `shared`: one
  uniform number rounds both averages, and the lift is halved (the package since #22)."""
  lift = ((0.5 if shared else 1.0) * rho / (1 + rho), eps) if lifted else None
  scale = np.exp(rng.standard_normal(size)) * 0.05
  states = {"exact": (np.zeros(size), np.zeros(size)), "rounded": (np.zeros(size), np.zeros(size))}
  step_sums = {"exact": 0.0, "rounded": 0.0}
  for t in range(steps):
    g = rng.standard_normal(size) * scale
    for name, (e_g2, e_dx2) in states.items():
      e_g2 = rho * e_g2 + (1 - rho) * g * g
      step = g * np.sqrt((e_dx2 + eps) / (e_g2 + eps))
      e_dx2 = rho * e_dx2 + (1 - rho) * step * step
      if name == "rounded":
        uniform = rng.random(size)
        e_g2 = round_to_grid(e_g2, gamma, uniform, lift)
        e_dx2 = round_to_grid(e_dx2, gamma, uniform if shared else rng.random(size))
      states[name] = e_g2, e_dx2
      if t >= steps - 100:
        step_sums[name] += float(np.abs(step).mean())
  ratio = states["rounded"][1].mean() / states["exact"][1].mean()
  return ratio, step_sums["rounded"] / step_sums["exact"]


def main() -> None:
  rng = np.random.default_rng(0)
  print(
    "| octaves | spacing | E[Δx²] ratio | |Δx| ratio | lifted: E[Δx²] ratio | |Δx| ratio "
    "| one draw, half lift: E[Δx²] ratio | |Δx| ratio |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for octaves in (24, 16, 12, 8):
    gamma = octaves / 254
    plain = bias(gamma, rng, lifted=False)
    lifted = bias(gamma, rng, lifted=True)
    shared = bias(gamma, rng, lifted=True, shared=True)
    print(
      f"| {octaves} | {100 * (2**gamma - 1):.1f} % | {plain[0]:.3f} | {plain[1]:.4f} "
      f"| {lifted[0]:.3f} | {lifted[1]:.4f} | {shared[0]:.3f} | {shared[1]:.4f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
