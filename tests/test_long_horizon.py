"""Every state format over 10,000 noisy steps against float64 Adadelta (#22).

The problem is tests/long_horizon.py's: a quadratic whose curvature spans three decades
with gradient noise, beside two 8-bit blocks whose gradients span 10⁵×; float64 is
tests/reference.py on the same gradient sequence. What a user needs, with the bounds:

Final loss and largest |step| over the last 1,000 steps of the quadratic, as a factor of
float64's. The stiffest coordinates (h ≈ 30) train at Adadelta's edge of stability, in
bursts whose timing any perturbation moves: float64 itself, given 6 other noise draws
(`benchmarks/long_horizon.py`), spreads its final loss over up to 1.20× and its largest
step over up to 1.52×. A narrow state must stay inside that spread (×1.25, ×1.6); the
float32 states, whose rounding is 2¹⁶ times finer than bfloat16's, within 5 %. The bfloat16
state stores R = (E[Δx²] + ε)/(E[g²] + ε) in a 16-bit code since #22 (measured: loss ×0.94–1.05,
largest step ×0.96–1.19 over problem seeds 0–2); before, its two bfloat16 averages took the
largest step to ×2.0 at ρ 0.9 (seed 0) and ×2.3–14.7 at ρ 0.95 (these tests fail on that).

Each coordinate of the mixed blocks: √(mean Δx²) over the last 1,000 steps against
float64's. With |g| ≫ √ε, E[Δx²] only grows, by (1 − ρ)ε a step, with nothing pulling it
back, so each rounding's error stays in it. Rounded to nearest (float32) the errors add:
at most N·2⁻²⁴ of E[Δx²] after N steps, half that in |Δx|; 2·N·2⁻²⁴ allowed. Rounded
stochastically they are unbiased but their variance adds up: a value growing through
codes of relative spacing r gathers a relative variance of about r/2 (each crossing of a
spacing adds its width times the increment), so |Δx| has a relative sd of ½·√(r/2):
3.1 % for bfloat16 (r = 2⁻⁷), 9.2 % for 8-bit (r = 2^(24/254) − 1 = 6.8 %); 5 sd allowed
(measured at 10,000 steps, two bfloat16 averages: sd 2.5 %, worst of 512 coordinates 13 %;
with R coded, worst 2.2 %). Where g² is
not on the grid, E[g²]'s own rounding noise also enters E[Δx²]'s growth, a random walk whose
variance grows with the steps: past 10,000 steps the bound grows as √(steps / 10,000).

The factored states (#26) are other algorithms, not roundings of this one, so they are held
to what a user needs of them, not much worse than float64: loss at most ×1.35 and largest
step at most ×1.6 (one-sided), and in the mixed blocks no coordinate's |Δx| over ×2.5
float64's. With E[Δx²] factored alone (``factored_dx2``) they hold (measured: loss ×0.72–1.01,
largest step ×0.50–1.11 over 10,000 steps; over the long profile's 20,000 steps of the
8 × 256 quadratic ×0.55–0.84 at ρ 0.9 and 0.95, but ×1.24–1.25 and step ×1.20–1.29 at
ρ 0.99, ε 1e-8, outside float64's own spread there, ×1.04–1.07: a real cost, not noise; mixed
|Δx| ×0.055–1.42). With both averages factored (``factored``, what
``adadelta(factored=True)`` does) they do not: a rank-1 E[g²] cannot hold curvature spread
over three decades per coordinate, nor a row of gradients spanning 10⁵×, and E[Δx²] then
grows without bound (loss ×10⁹–10¹¹, the mixed blocks overflow): known failures,
docs/guides/factored.md.

Long profile (`--run-slow`): twice the steps, a 2× larger quadratic, three seeds (the noise
is drawn in advance: 20,000 × 2,048 float32, 160 MB).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tests import long_horizon as lh

FLOAT_FORMATS = {"float32", "float32_jax", "packed"}
FACTORED_FORMATS = {"factored", "factored_dx2"}  # held to "no worse", one-sided
NARROW_AND_FACTORED = {"bf16_sr", "8bit", *FACTORED_FORMATS}
LOSS_FACTOR = (
  dict.fromkeys(NARROW_AND_FACTORED, 1.25)
  | dict.fromkeys(FACTORED_FORMATS, 1.35)
  | dict.fromkeys(FLOAT_FORMATS, 1.05)
)
STEP_FACTOR = dict.fromkeys(NARROW_AND_FACTORED, 1.6) | dict.fromkeys(FLOAT_FORMATS, 1.05)
RELATIVE_SPACING = {"bf16_sr": 2.0**-7, "8bit": 2.0 ** (24 / 254) - 1}

EIGHT_BIT_EDGE = (
  "#22, a limit of 2 bytes: the 8-bit averages' rounding noise makes the stiffest "
  "coordinates' (h ~ 30) edge-of-stability bursts larger than float64's seed spread "
  "(docs/guides/low_memory.md)"
)
EIGHT_BIT_FLOOR = (
  "#22, a limit of 2 bytes: an E[g2] under its block's floor S*2^-24 is read as the floor, so "
  "that coordinate steps shorter than float64 (by design), and the 8-bit ratio's rounding "
  "noise random-walks every coordinate's step (up to x1.49 of float64's after 10,000 steps; "
  "docs/guides/low_memory.md)"
)
# What the 8-bit state does promise in a mixed block: no step much longer than float64's (before
# #22 a coordinate under the floor grew x10^8 in 3,000 steps); see test_8bit_mixed_block_*.
EIGHT_BIT_LONGEST = 2.5
FACTORED_E_G2 = (
  "#26, a limit of a rank-1 E[g2]: curvature over three decades per coordinate (and a row of "
  "gradients over 10^5x) is not rank-1; the coordinates whose g^2 it underestimates grow their "
  "E[dx2] without bound (docs/guides/factored.md)"
)
FACTORED_E_DX2 = (
  "#26 by design: a factored E[dx2] gives each coordinate of a mixed block its row's and "
  "column's history, so its |dx| is not float64's (x0.055-1.42; never over x2.5, tested below)"
)
KNOWN = {  # (test, format, (rho, eps)) -> reason
  **{("quadratic", "8bit", h): EIGHT_BIT_EDGE for h in lh.HYPERS},
  **{("mixed", "8bit", h): EIGHT_BIT_FLOOR for h in lh.HYPERS},
  **{(test, "factored", h): FACTORED_E_G2 for test in ("finite", "quadratic") for h in lh.HYPERS},
  **{("mixed", "factored", h): FACTORED_E_G2 for h in lh.HYPERS},
  **{("mixed", "factored_dx2", h): FACTORED_E_DX2 for h in lh.HYPERS},
}
PROFILES = {"default": {"num_steps": 10_000, "rows": 4}, "long": {"num_steps": 20_000, "rows": 8}}
SEEDS = {"default": (0,), "long": (0, 1, 2)}


def _cases(test):
  for profile, seeds in SEEDS.items():
    for seed in seeds:
      for hyper in lh.HYPERS:
        for fmt in lh.FORMATS:
          marks = [pytest.mark.slow] if profile == "long" else []
          reason = KNOWN.get((test, fmt, hyper))
          if reason:  # other seeds of the long profile may land inside the spread
            marks.append(pytest.mark.xfail(strict=profile == "default", reason=reason))
          case_id = f"{profile}-seed{seed}-rho{hyper[0]}-eps{hyper[1]:g}-{fmt}"
          yield pytest.param(profile, seed, hyper, fmt, marks=marks, id=case_id)


@functools.lru_cache(maxsize=1)  # the long profile's noise is 160 MB a seed
def _problem(profile, seed):
  return lh.make_problem(seed=seed, **PROFILES[profile])


@functools.cache
def _float64(profile, seed, hyper):
  return lh.run_float64(_problem(profile, seed), *hyper)


@functools.cache
def _run(profile, seed, hyper, fmt):
  return lh.run_format(_problem(profile, seed), *hyper, fmt)


@pytest.mark.parametrize(("profile", "seed", "hyper", "fmt"), list(_cases("finite")))
def test_parameters_updates_and_state_stay_finite(profile, seed, hyper, fmt):
  assert _float64(profile, seed, hyper).finite
  assert _run(profile, seed, hyper, fmt).finite


@pytest.mark.parametrize(("profile", "seed", "hyper", "fmt"), list(_cases("quadratic")))
def test_final_loss_and_largest_step_are_within_a_factor_of_float64s(profile, seed, hyper, fmt):
  got, want = _run(profile, seed, hyper, fmt), _float64(profile, seed, hyper)
  loss_ratio = got.final_loss / want.final_loss
  step_ratio = got.largest_step / want.largest_step
  print(f"loss x{loss_ratio:.3f}, largest step x{step_ratio:.3f}")
  low = 0.0 if fmt in FACTORED_FORMATS else 1.0  # a factored state may do better
  assert low / LOSS_FACTOR[fmt] <= loss_ratio <= LOSS_FACTOR[fmt], (
    got.final_loss,
    want.final_loss,
  )
  assert low / STEP_FACTOR[fmt] <= step_ratio <= STEP_FACTOR[fmt], (
    got.largest_step,
    want.largest_step,
  )


def mixed_tolerance(fmt: str, num_steps: int) -> float:
  """The largest |ratio − 1| allowed for a coordinate's |Δx| (the module's docstring)."""
  if fmt in FLOAT_FORMATS:
    return 2 * num_steps * 2.0**-24
  if fmt in FACTORED_FORMATS:  # not a rounding: a known failure, see KNOWN
    return 0.05
  return 5 * 0.5 * np.sqrt(RELATIVE_SPACING[fmt] / 2) * np.sqrt(max(1.0, num_steps / 10_000))


@pytest.mark.parametrize(("profile", "seed", "hyper", "fmt"), list(_cases("mixed")))
def test_every_coordinate_of_a_mixed_block_steps_as_in_float64(profile, seed, hyper, fmt):
  got, want = _run(profile, seed, hyper, fmt), _float64(profile, seed, hyper)
  ratio = got.mixed_step_rms / want.mixed_step_rms
  tolerance = mixed_tolerance(fmt, PROFILES[profile]["num_steps"])
  worst = np.unravel_index(np.argmax(np.abs(np.nan_to_num(ratio, nan=np.inf) - 1)), ratio.shape)
  print(f"|dx| ratio in [{np.nanmin(ratio):.4f}, {np.nanmax(ratio):.4f}], worst at {worst}")
  assert np.all(np.abs(ratio - 1) <= tolerance), (
    f"coordinate {worst} (|g| = {_problem(profile, seed).mixed_magnitude[worst]:.3g}): "
    f"|dx| {got.mixed_step_rms[worst]:.4g} against float64's {want.mixed_step_rms[worst]:.4g}"
  )


@pytest.mark.parametrize("hyper", lh.HYPERS, ids=lambda h: f"rho{h[0]}-eps{h[1]:g}")
def test_factored_dx2_mixed_block_never_steps_much_longer_than_float64(hyper):
  """E[Δx²] factored alone, in blocks of gradients spanning 10⁵×: measured ×0.055–1.42."""
  got, want = _run("default", 0, hyper, "factored_dx2"), _float64("default", 0, hyper)
  ratio = got.mixed_step_rms / want.mixed_step_rms
  print(f"|dx| ratio in [{ratio.min():.3f}, {ratio.max():.3f}]")
  assert np.all(np.isfinite(ratio)) and np.all(ratio > 0)
  assert ratio.max() <= EIGHT_BIT_LONGEST, np.unravel_index(np.argmax(ratio), ratio.shape)


@pytest.mark.parametrize("hyper", lh.HYPERS, ids=lambda h: f"rho{h[0]}-eps{h[1]:g}")
def test_8bit_mixed_block_never_steps_much_longer_than_float64(hyper):
  """The 8-bit state's bound in a block of gradients spanning 10⁵× (the docstring's other test
  holds it to float64 and is a known failure): measured ×0.04–1.49 of float64's |Δx|,
  the shortest under the floor."""
  got, want = _run("default", 0, hyper, "8bit"), _float64("default", 0, hyper)
  ratio = got.mixed_step_rms / want.mixed_step_rms
  print(f"|dx| ratio in [{ratio.min():.3f}, {ratio.max():.3f}]")
  assert np.all(np.isfinite(ratio)) and np.all(ratio > 0)
  assert ratio.max() <= EIGHT_BIT_LONGEST, np.unravel_index(np.argmax(ratio), ratio.shape)
