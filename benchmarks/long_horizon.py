"""The long-run table of #22: every state format × (ρ, ε) against float64 Adadelta.

    python -m benchmarks.long_horizon                    # 10,000 steps, (4, 256): the tests' run
    python -m benchmarks.long_horizon --long --seeds 0,1,2   # the slow profile's runs
    python -m benchmarks.long_horizon --state-noise  # float32 with noise injected in its averages
    python -m benchmarks.long_horizon --seeds 0,1,2 --formats float32 8bit factored \
        factored_hybrid --out benchmarks/results/factored_long_horizon.md   # the factored state

The problem and both runs are tests/long_horizon.py's (the one tests/test_long_horizon.py
asserts on): a noisy quadratic with curvature over three decades, beside two 8-bit blocks
whose gradients span 10⁵×. For each format and (ρ, ε): the final loss and the largest |step|
of the quadratic over the last 1,000 steps, and their ratios to float64's; the range over
the mixed blocks' coordinates of |Δx| (√ of the mean Δx² over the last 1,000 steps) as a
ratio to float64's. Then float64's own spread over 6 other noise draws, the yardstick for
the narrow formats. Writes benchmarks/results/long_horizon.md (--out to change).

Beside the tests' formats: ``factored`` (``factored=True``, ``min_dim_size_to_factor=4``, so
the quadratic's (rows, 256) leaf is factored and the (2, 256) mixed blocks are not) and
``factored_hybrid`` (the same with E[Δx²] per entry: ``scale_by_adadelta_factored(...,
factor_e_dx2=False)``) and ``factored_dx2_only`` (E[g²] per entry, ``factor_e_g2=False``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import time
import types
from pathlib import Path
from unittest import mock

import jax
import numpy as np

from benchmarks import low_memory
from tests import long_horizon as lh

FACTORED_FORMATS = {  # name -> low_memory.make_adadelta keywords
  "factored": {"factored": True, "min_dim_size_to_factor": 4},
  "factored_hybrid": {"factored": True, "factor_e_dx2": False, "min_dim_size_to_factor": 4},
  "factored_dx2_only": {"factored": True, "factor_e_g2": False, "min_dim_size_to_factor": 4},
}


@contextlib.contextmanager
def _factored_formats():
  """lh.run_format with the factored formats too. It builds its optimizer as
  ``optax_adadelta.adadelta(1.0, rho, eps, **FORMATS[fmt])``, and the hybrid is no keyword of
  ``adadelta``, so for this run that call goes through low_memory.make_adadelta (which is
  ``adadelta`` itself for every other format)."""
  package = types.SimpleNamespace(
    adadelta=lambda lr, rho, eps, **keywords: low_memory.make_adadelta(rho, eps, keywords, lr)
  )
  with (
    mock.patch.dict(lh.FORMATS, FACTORED_FORMATS),
    mock.patch.object(lh, "optax_adadelta", package),
  ):
    yield


def _spread(problem: lh.Problem, rho: float, eps: float, draws: int = 6) -> tuple[float, float]:
  """max / min of float64's final loss and largest step over other noise draws."""
  losses, steps = [], []
  for draw in range(draws):
    rng = np.random.default_rng(100 + draw)
    noise = (lh.NOISE * rng.standard_normal(problem.noise.shape)).astype(np.float32)
    run = lh.run_float64(dataclasses.replace(problem, noise=noise), rho, eps)
    losses.append(run.final_loss)
    steps.append(run.largest_step)
  return max(losses) / min(losses), max(steps) / min(steps)


def _noisy_adadelta(problem, rho, eps, sigma, seed, curvature_scale):
  """(final loss, largest step) of a float32 Adadelta on the quadratic whose two averages are
  multiplied by (1 + σ·U(−1, 1)) after each update: unbiased noise the size of a format's
  rounding (bfloat16 ±2⁻⁸, float16 ±2⁻¹¹, 8-bit codes ±3.4 %), with no format involved."""
  import jax.numpy as jnp

  curvature = jnp.asarray(problem.curvature * curvature_scale)
  target = jnp.asarray(problem.target)
  tail_start = problem.num_steps - lh.TAIL

  def step(carry, inputs):
    x, e_g2, e_dx2, key, largest = carry
    noise, t = inputs
    g = curvature * (x - target) + noise
    key, key_g2, key_dx2 = jax.random.split(key, 3)
    e_g2 = (rho * e_g2 + (1 - rho) * g * g) * (
      1 + sigma * jax.random.uniform(key_g2, g.shape, minval=-1)
    )
    dx = g * jnp.sqrt((e_dx2 + eps) / (e_g2 + eps))
    e_dx2 = (rho * e_dx2 + (1 - rho) * dx * dx) * (
      1 + sigma * jax.random.uniform(key_dx2, g.shape, minval=-1)
    )
    largest = jnp.where(t >= tail_start, jnp.maximum(largest, jnp.max(jnp.abs(dx))), largest)
    return (x - dx, e_g2, e_dx2, key, largest), None

  zeros = jnp.zeros_like(curvature)
  carry = (zeros, zeros, zeros, jax.random.key(seed), jnp.float32(0))
  inputs = (jnp.asarray(problem.noise), jnp.arange(problem.num_steps))
  (x, *_, largest), _ = jax.jit(lambda c, i: jax.lax.scan(step, c, i))(carry, inputs)
  return float(0.5 * jnp.sum(curvature * (x - target) ** 2)), float(largest)


def state_noise(problem, out: str) -> None:
  """Why narrow states lose on this problem: the same damage from injected unbiased noise."""
  lines = [
    "# Unbiased noise in Adadelta's averages, on the long-run quadratic (#22)",
    "",
    "`python -m benchmarks.long_horizon --state-noise`: float32 Adadelta (no state format) whose",
    "E[g²] and E[Δx²] are multiplied by (1 + σ·U(−1, 1)) after every update, against the same run",
    "with σ = 0; two noise seeds. Curvature ×1 is the tests' (stiffest h ≈ 31, which reach",
    "Adadelta's edge of stability, lr·h ≈ 2); ×0.1 keeps every h ≤ 3.2.",
    "",
    "| ρ, ε | curvature | σ | final loss × | largest step × |",
    "|---|---|---|---|---|",
  ]
  for rho, eps in lh.HYPERS:
    for scale in (1.0, 0.1):
      base_loss, base_step = _noisy_adadelta(problem, rho, eps, 0.0, 0, scale)
      for name, sigma in (
        ("2⁻¹¹ (float16)", 2.0**-11),
        ("2⁻⁸ (bfloat16)", 2.0**-8),
        ("3.4 % (8-bit)", 0.034),
      ):
        runs = [_noisy_adadelta(problem, rho, eps, sigma, seed, scale) for seed in (0, 1)]
        loss = ", ".join(f"{r[0] / base_loss:.3g}" for r in runs)
        step = ", ".join(f"{r[1] / base_step:.3g}" for r in runs)
        lines.append(f"| {rho}, {eps:g} | ×{scale:g} | {name} | {loss} | {step} |")
        print(lines[-1], flush=True)
  Path(out).write_text("\n".join(lines) + "\n")
  print(f"wrote {out}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--long", action="store_true", help="20,000 steps on an (8, 256) quadratic")
  parser.add_argument("--seeds", default="0", help="problem seeds, comma separated")
  parser.add_argument("--out", default="benchmarks/results/long_horizon.md")
  parser.add_argument(
    "--formats",
    nargs="+",
    default=list(lh.FORMATS),
    choices=[*lh.FORMATS, *FACTORED_FORMATS],
    help="state formats to run beside float64",
  )
  parser.add_argument(
    "--state-noise",
    action="store_true",
    help="instead: float32 Adadelta with unbiased noise injected into its averages",
  )
  args = parser.parse_args()
  if args.state_noise:
    state_noise(lh.make_problem(), "benchmarks/results/long_horizon_state_noise.md")
    return
  size = {"num_steps": 20_000, "rows": 8} if args.long else {"num_steps": 10_000, "rows": 4}
  every = args.formats == list(lh.FORMATS)
  command = (
    f"python -m benchmarks.long_horizon{' --long' if args.long else ''} --seeds {args.seeds}"
  )
  if not every:
    command += " --formats " + " ".join(args.formats)
  lines = [
    "# Long runs: every state format against float64 (#22)"
    if every
    else f"# Long runs: {', '.join(args.formats)} against float64",
    "",
    f"`{command}`; "
    f"{size['num_steps']:,} steps, quadratic ({size['rows']}, 256); jax {jax.__version__}, "
    f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
    f"commit {low_memory.git_commit()}, load average {os.getloadavg()[0]:.1f} at the start.",
    "",
    "| seed | ρ, ε | format | final loss | × float64 | largest step | × float64 "
    "| mixed-block \\|Δx\\| / float64 | finite |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  spreads, ratios = [], {}  # ratios: (rho, eps, fmt) -> [(loss ×, largest step ×) per seed]
  with _factored_formats():
    _run_table(args, size, lines, spreads, ratios)
  lines += ["", *_ratio_summary(args.formats, ratios)]
  lines += [
    "",
    "float64's own spread over 6 other noise draws (same curvature and target), max / min:",
    "",
    "| ρ, ε | final loss | largest step |",
    "|---|---|---|",
    *(f"| {rho}, {eps:g} | {loss:.3g} | {step:.3g} |" for rho, eps, loss, step in spreads),
  ]
  Path(args.out).write_text("\n".join(lines) + "\n")
  print("\n".join(lines[-len(spreads) - 5 :]))
  print(f"wrote {args.out}")


def _run_table(args, size, lines, spreads, ratios) -> None:
  for seed in (int(s) for s in args.seeds.split(",")):
    problem = lh.make_problem(seed=seed, **size)
    for rho, eps in lh.HYPERS:
      want = lh.run_float64(problem, rho, eps)
      head = f"| {seed} | {rho}, {eps:g} |"
      lines.append(
        f"{head} float64 | {want.final_loss:.4g} | 1 | {want.largest_step:.4g} | 1 | 1 | yes |"
      )
      for fmt in args.formats:
        start = time.perf_counter()
        got = lh.run_format(problem, rho, eps, fmt)
        seconds = time.perf_counter() - start
        ratio = got.mixed_step_rms / want.mixed_step_rms
        ratios.setdefault((rho, eps, fmt), []).append(
          (got.final_loss / want.final_loss, got.largest_step / want.largest_step)
        )
        lines.append(
          f"{head} {fmt} | {got.final_loss:.4g} | {got.final_loss / want.final_loss:.3g} "
          f"| {got.largest_step:.4g} | {got.largest_step / want.largest_step:.3g} "
          f"| {np.nanmin(ratio):.3g} – {np.nanmax(ratio):.3g} | {'yes' if got.finite else 'NO'} |"
        )
        print(lines[-1], f"({seconds:.1f} s)", flush=True)
      if seed == int(args.seeds.split(",")[0]):
        spreads.append((rho, eps, *_spread(problem, rho, eps)))


def _ratio_summary(formats, ratios) -> list[str]:
  """Mean ± sd over the seeds of each format's final loss and largest step × float64's."""
  mean_sd = lambda v: f"{np.mean(v):.3g} ± {np.std(v, ddof=1) if len(v) > 1 else np.nan:.2g}"
  lines = [
    "Mean ± sd over the seeds of final loss × float64 / largest step × float64:",
    "",
    "| ρ, ε | " + " | ".join(formats) + " |",
    "|---|" + "---|" * len(formats),
  ]
  for rho, eps in lh.HYPERS:
    cells = []
    for fmt in formats:
      loss, step = np.array(ratios[rho, eps, fmt]).T
      cells.append(f"{mean_sd(loss)} / {mean_sd(step)}")
    lines.append(f"| {rho}, {eps:g} | " + " | ".join(cells) + " |")
  return lines


if __name__ == "__main__":
  main()
