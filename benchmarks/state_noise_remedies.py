"""Remedies for the narrow states' late divergence on the long noisy quadratic (#22 item 1).

    python -m benchmarks.state_noise_remedies [--seeds 0,1,2] [--draw-seed 7] [--remedies a,b]

A float64 NumPy model of each way to store Adadelta's two averages, run on the long-run
problem of tests/long_horizon.py (the (4, 256) quadratic, curvature 10^U(−1.5, 1.5), gradient
noise 0.01, 10,000 steps, x₀ = 0, lr = 1) at its three (ρ, ε), beside float64 Adadelta on the
same gradient noise. The rounding is modelled, not the package's kernels: the 8-bit code is the
grid S·2^(−γk), γ = 24/254, S the block's (row's) largest value, code 0 = 0, rounded up with
probability (E − low)/(high − low) (E[g²]'s lifted, a positive E[g²] never coded 0); bfloat16 is
8 significant bits rounded up with probability (v − low)/ulp. Printed per remedy: the ratios of
the final loss and of the largest |Δx| over the last 1,000 steps to float64's, per seed; then
the mean |Δx| over float64's on random gradients (no feedback through x, where the steps' bias
shows): per coordinate g = s·N(0, 1), s log-normal, ρ = 0.95, ε = 1e-4 and ρ = 0.99, ε = 1e-8.

Remedies (see benchmarks/results/state_noise_remedies.md for the argument and the numbers):
  indep        each average its own uniform draw, E[g²]'s lift ρ/(1+ρ) (the package before #22)
  shared       one draw for both averages, half the lift (the package since #22)
  golden       shared, but the draw of coordinate i at step t is frac(o_i + t·φ), φ the golden
               ratio, o_i a fixed uniform offset: a low-discrepancy (Weyl) sequence per coordinate
  ratio        store E[g²] and R = (E[Δx²] + ε)/(E[g²] + ε) (8-bit codes each, one draw), read
               E[Δx²] = R·(E[g²] + ε) − ε: the step's r² is R·(E[g²]~ + ε)/(ρ·E[g²]~ + (1 − ρ)·g²
               + ε), so E[g²]'s rounding reaches r only through the (1 − ρ)·g² term, and R's once
  ratio_<a>_<b>  R in a bits, E[g²] in b bits (2 bytes in all for a + b = 16); _o<n>: R's code over
               n octaves (24 by default); _golden: golden draws; _lh / _l1: E[g²]'s rounding lifted
               by ρ/2 / ρ (the step is concave in it); no lift otherwise
  nearest_g2   E[g²] rounded to the nearer code, E[Δx²] stochastically
  nearest_dx2  E[Δx²] to the nearer code, E[g²] stochastically (lift ρ/(1+ρ))
  bf16 / bf16_shared / bf16_golden / bf16_ratio / bf16_ratio_golden: the same for bfloat16
  bf16_ratio16 E[g²] in bfloat16, R as a 16-bit block code over 40 octaves (4 bytes in all)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tests import long_horizon as lh

GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0  # frac(φ): the rotation with the lowest discrepancy


def grid_round(x, u, levels, octaves=24.0, lift=None, floor_up=False, nearest=False):
  """Non-negative x (..., 256) to a block code of `levels` non-zero levels S·2^(−γk) over
  `octaves`, S the row's maximum; up with probability p (lifted by w·p(1−p)·gap/(x + ε))."""
  gamma = octaves / (levels - 1)
  scale = np.max(x, axis=-1, keepdims=True)
  safe = np.where(scale > 0, scale, 1.0)
  y = x / safe
  k = np.floor(-np.log2(np.maximum(y, 1e-300)) / gamma)
  k = k - (y > 2.0 ** (-gamma * k))  # log2's last ulp, either way
  k = k + (y < 2.0 ** (-gamma * (k + 1)))
  k = np.clip(k, 0, levels - 1)  # y in [2^(−γ(k+1)), 2^(−γk)]; below the last level: [0, it]
  high = 2.0 ** (-gamma * k)
  low = np.where(k >= levels - 1, 0.0, 2.0 ** (-gamma * (k + 1)))
  gap = high - low
  p = np.clip((y - low) / gap, 0.0, 1.0)
  if lift is not None:
    weight, eps = lift
    p = p + np.where(low > 0, weight, 0.0) * p * (1 - p) * gap / (y + eps / safe)
  up = p > 0.5 if nearest else u < p
  out = np.where(up, high, low)
  if floor_up:
    out = np.where((out == 0) & (y > 0), 2.0 ** (-gamma * (levels - 1)), out)
  return out * scale


def bf16_round(x, u, nearest=False):
  """Non-negative x to 8 significant bits, up with probability (x − low)/ulp."""
  _, exponent = np.frexp(x)
  ulp = np.ldexp(1.0, exponent - 8)
  low = np.floor(x / ulp) * ulp
  p = (x - low) / ulp
  up = p > 0.5 if nearest else u < p
  return np.where(up, low + ulp, low)


class Draws:
  """Uniform numbers per coordinate and step: independent, or frac(o_i + t·φ)."""

  def __init__(self, shape, rng, golden):
    self.shape, self.rng, self.golden = shape, rng, golden
    self.offset = rng.random(shape)
    self.offset2 = rng.random(shape)

  def __call__(self, t, second=False):
    if not self.golden:
      return self.rng.random(self.shape)
    return np.mod((self.offset2 if second else self.offset) + t * GOLDEN, 1.0)


def make_store(name, shape, rng, rho, eps):
  """(store, read): store(t, e_g2, e_dx2) keeps a format's state, read() gives (E[g²], E[Δx²])."""
  golden = "golden" in name
  draws = Draws(shape, rng, golden)
  lift_full = (rho / (1 + rho), eps)
  lift_half = (0.5 * rho / (1 + rho), eps)
  # The step's r² = R·(E[g²]~ + ε)/(ρ·E[g²]~ + (1 − ρ)·g² + ε) is concave in the stored E[g²]~:
  # its rounding noise Var lowers the mean step by ½·ρ·Var/(E + ε)/(E + ε) (to first order in
  # 1 − ρ), which a mean raised by ρ·Var/(E + ε) cancels.
  lift_ratio = (rho, eps)
  kept = {}

  def store(t, a, b):
    u = draws(t)
    if name == "float64":
      kept["a"], kept["b"] = a, b
    elif name == "indep":
      kept["a"] = grid_round(a, u, 255, lift=lift_full, floor_up=True)
      kept["b"] = grid_round(b, draws(t, second=True), 255)
    elif name in ("shared", "golden"):
      kept["a"] = grid_round(a, u, 255, lift=lift_half, floor_up=True)
      kept["b"] = grid_round(b, u, 255)
    elif name.startswith("ratio"):  # ratio[_<R bits>_<E[g²] bits>][_o<R octaves>][_golden][_l...]
      fields = name.split("_")
      bits = [int(f) for f in fields if f.isdigit()]
      r_bits, g_bits = bits if bits else (8, 8)
      octaves = next((float(f[1:]) for f in fields if f.startswith("o")), 24.0)
      lift = {"l1": lift_ratio, "lh": (0.5 * rho, eps)}.get(fields[-1])
      ratio = (b + eps) / (a + eps)
      kept["a"] = grid_round(a, u, 2**g_bits - 1, lift=lift, floor_up=True)
      kept["r"] = grid_round(ratio, u, 2**r_bits - 1, octaves=octaves)
    elif name == "nearest_g2":
      kept["a"] = grid_round(a, u, 255, floor_up=True, nearest=True)
      kept["b"] = grid_round(b, u, 255)
    elif name == "nearest_dx2":
      kept["a"] = grid_round(a, u, 255, lift=lift_full, floor_up=True)
      kept["b"] = grid_round(b, u, 255, nearest=True)
    elif name == "bf16":
      kept["a"], kept["b"] = bf16_round(a, u), bf16_round(b, draws(t, second=True))
    elif name in ("bf16_shared", "bf16_golden"):
      kept["a"], kept["b"] = bf16_round(a, u), bf16_round(b, u)
    elif name.startswith("bf16_ratio16"):  # R as a 16-bit code over 40 octaves
      kept["a"] = bf16_round(a, u)
      kept["r"] = grid_round((b + eps) / (a + eps), u, 2**16 - 1, octaves=40.0)
    elif name.startswith("bf16_ratio"):
      kept["a"], kept["r"] = bf16_round(a, u), bf16_round((b + eps) / (a + eps), u)
    else:
      raise ValueError(f"unknown remedy {name!r}")

  def read():
    if "r" in kept:
      return kept["a"], np.maximum(kept["r"] * (kept["a"] + eps) - eps, 0.0)
    return kept["a"], kept["b"]

  return store, read


REMEDIES = [
  "indep", "shared", "golden", "ratio", "ratio_golden", "ratio_golden_lh", "ratio_9_7_golden",
  "ratio_10_6_golden", "ratio_10_6_o40_golden", "nearest_g2", "nearest_dx2", "bf16", "bf16_shared",
  "bf16_golden", "bf16_ratio", "bf16_ratio_golden", "bf16_ratio16", "bf16_ratio16_golden",
  "ratio_16_8_o40", "ratio_16_8_o40_golden",
]  # fmt: skip


def adadelta_step(g, e_g2, e_dx2, rho, eps):
  """Algorithm 1 (Zeiler 2012): accumulate g², step, accumulate Δx² (float64)."""
  e_g2 = rho * e_g2 + (1 - rho) * g * g
  dx = -np.sqrt((e_dx2 + eps) / (e_g2 + eps)) * g
  return dx, e_g2, rho * e_dx2 + (1 - rho) * dx * dx


def quadratic_run(name, problems, rho, eps, draw_seed):
  """(final loss, largest |Δx| over the last TAIL steps) per problem, all problems at once."""
  h = np.stack([p.curvature for p in problems]).astype(np.float64)
  target = np.stack([p.target for p in problems]).astype(np.float64)
  steps = problems[0].num_steps
  x = np.zeros_like(h)
  store, read = make_store(name, h.shape, np.random.default_rng(draw_seed), rho, eps)
  store(0, np.zeros_like(h), np.zeros_like(h))
  largest = np.zeros(len(problems))
  for t in range(steps):
    noise = np.stack([p.noise[t] for p in problems]).astype(np.float64)
    g = h * (x - target) + noise
    dx, a, b = adadelta_step(g, *read(), rho, eps)
    store(t + 1, a, b)
    x = x + dx
    if t >= steps - lh.TAIL:
      largest = np.maximum(largest, np.max(np.abs(dx), axis=(1, 2)))
  loss = 0.5 * np.sum(h * (x - target) ** 2, axis=(1, 2))
  return loss, largest


def random_gradient_bias(name, rho, eps, seed, rows=80, steps=600, tail=300):
  """Mean |Δx| of the format over float64's on the same random gradients (last `tail` steps)."""
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.standard_normal((rows, 256))) * 0.05
  exact = (np.zeros_like(scale), np.zeros_like(scale))
  store, read = make_store(name, scale.shape, np.random.default_rng(seed + 1000), rho, eps)
  store(0, *exact)
  sums = np.zeros(2)
  for t in range(steps):
    g = rng.standard_normal(scale.shape) * scale
    dx_exact, *exact = adadelta_step(g, *exact, rho, eps)
    dx, a, b = adadelta_step(g, *read(), rho, eps)
    store(t + 1, a, b)
    if t >= steps - tail:
      sums += [np.abs(dx).sum(), np.abs(dx_exact).sum()]
  return sums[0] / sums[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--steps", type=int, default=10_000)
  parser.add_argument("--remedies", default=",".join(REMEDIES))
  parser.add_argument("--draw-seed", type=int, default=7, help="seed of the rounding draws")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  remedies = args.remedies.split(",")
  problems = [lh.make_problem(num_steps=args.steps, seed=s) for s in seeds]
  start = time.time()
  print("| remedy | ρ, ε | loss × float64 (per seed) | largest step × float64 |")
  print("|---|---|---|---|")
  base = {hyper: quadratic_run("float64", problems, *hyper, 0) for hyper in lh.HYPERS}
  for hyper in lh.HYPERS:
    loss, step = base[hyper]
    row = ", ".join(f"{v:.3g}" for v in loss), ", ".join(f"{v:.3g}" for v in step)
    print(f"| float64 (absolute) | {hyper[0]}, {hyper[1]:g} | {row[0]} | {row[1]} |", flush=True)
  for name in remedies:
    for hyper in lh.HYPERS:
      loss, step = quadratic_run(name, problems, *hyper, args.draw_seed)
      ratio_loss = ", ".join(f"{v:.3g}" for v in loss / base[hyper][0])
      ratio_step = ", ".join(f"{v:.3g}" for v in step / base[hyper][1])
      print(f"| {name} | {hyper[0]}, {hyper[1]:g} | {ratio_loss} | {ratio_step} |", flush=True)
  print(f"\n({time.time() - start:.0f} s)\n")
  print("| remedy | mean abs step × float64, ρ 0.95 ε 1e-4 (2 seeds) | ρ 0.99 ε 1e-8 |")
  print("|---|---|---|")
  for name in remedies:
    cells = []
    for rho, eps in ((0.95, 1e-4), (0.99, 1e-8)):
      cells.append(", ".join(f"{random_gradient_bias(name, rho, eps, s):.4f}" for s in (0, 1)))
    print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
  main()
