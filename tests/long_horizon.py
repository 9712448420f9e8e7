"""A long noisy run of every state format against the float64 transcription (#22).

One tree of two leaves, trained together in one `lax.scan`:

``quadratic``
  f(x) = ½ Σ h (x − x*)², curvature h = 10^U(−1.5, 1.5) per coordinate (three decades),
  x* ~ N(0, 1), x₀ = 0, gradient h (x − x*) + σ·N(0, 1) with the noise drawn in advance, so
  that the float64 run sees the same sequence.
``mixed``
  Two 256-element rows (one 8-bit block each) whose gradients do not depend on x: random
  signs times fixed magnitudes, row 0 from 10 down to 10⁻⁴ (10⁵×), row 1 at 10 everywhere
  but two coordinates at 2·10⁻³ and 10⁻⁴ (#22 item 2's block). Here Adadelta's |Δx| has a
  known target per coordinate, and each one is compared with float64's.

Used by tests/test_long_horizon.py and benchmarks/long_horizon.py (the table).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_adadelta
from tests import reference

FORMATS = {  # name -> adadelta keywords, or (rho, eps) -> optimizer: every state format
  "float32": {},
  "float32_jax": {"implementation": "jax"},
  "bf16_sr": {"accumulator_dtype": jnp.bfloat16, "stochastic_rounding": True},
  "8bit": {"state_bits": 8, "min_8bit_size": 0},
  "packed": {"packed_state": True},
  # Factored at 2: the quadratic's (4, 256) leaf and the (2, 256) mixed blocks.
  "factored": {"factored": True, "min_dim_size_to_factor": 2},
  "factored_dx2": lambda rho, eps: optax.chain(
    optax_adadelta.scale_by_adadelta_factored(
      rho, eps, min_dim_size_to_factor=2, factor_e_g2=False
    ),
    optax.scale(-1.0),
  ),
}


def optimizer(fmt: str, rho: float, eps: float) -> optax.GradientTransformation:
  """The format's optimizer at learning rate 1."""
  spec = FORMATS[fmt]
  return spec(rho, eps) if callable(spec) else optax_adadelta.adadelta(1.0, rho, eps, **spec)


HYPERS = [(0.9, 1e-6), (0.95, 1e-6), (0.99, 1e-8)]
NOISE = 0.01
TAIL = 1000  # the steps over which the largest step and each coordinate's |Δx| are taken


@dataclasses.dataclass(frozen=True)
class Problem:
  curvature: np.ndarray  # float32, (rows, 256)
  target: np.ndarray
  noise: np.ndarray  # (steps, rows, 256), float32: σ·N(0, 1)
  mixed_magnitude: np.ndarray  # (2, 256)
  mixed_signs: np.ndarray  # (steps, 2, 256), int8 ±1

  @property
  def num_steps(self) -> int:
    return self.noise.shape[0]


def make_problem(num_steps: int = 10_000, rows: int = 4, seed: int = 0) -> Problem:
  rng = np.random.default_rng(seed)
  shape = (rows, 256)
  curvature = (10.0 ** rng.uniform(-1.5, 1.5, shape)).astype(np.float32)
  target = rng.standard_normal(shape).astype(np.float32)
  noise = (NOISE * rng.standard_normal((num_steps, *shape))).astype(np.float32)
  magnitude = np.stack([10.0 ** np.linspace(1.0, -4.0, 256), np.full(256, 10.0)])
  magnitude[1, 100], magnitude[1, 200] = 2e-3, 1e-4
  signs = rng.choice(np.array([-1, 1], np.int8), size=(num_steps, 2, 256))
  return Problem(curvature, target, noise, magnitude.astype(np.float32), signs)


@dataclasses.dataclass(frozen=True)
class Outcome:
  final_loss: float  # f at the last parameters
  largest_step: float  # max |Δx| of the quadratic over the last TAIL steps
  mixed_step_rms: np.ndarray  # per coordinate of `mixed`: √(mean Δx²) over the last TAIL steps
  finite: bool  # parameters, updates and every state leaf stayed finite throughout


def _loss(curvature, target, x):
  return 0.5 * np.sum(np.asarray(curvature, np.float64) * (x - target) ** 2)


def run_format(problem: Problem, rho: float, eps: float, fmt: str) -> Outcome:
  """The format's `optimizer`, every step in one scan."""
  tx = optimizer(fmt, rho, eps)
  curvature, target = jnp.asarray(problem.curvature), jnp.asarray(problem.target)
  magnitude = jnp.asarray(problem.mixed_magnitude)
  tail_start = problem.num_steps - TAIL

  def all_finite(tree):
    leaves = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves))

  def step(carry, inputs):
    params, state, largest, sum_sq, finite = carry
    t, noise, signs = inputs
    grads = {
      "quadratic": curvature * (params["quadratic"] - target) + noise,
      "mixed": magnitude * signs.astype(jnp.float32),
    }
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(jnp.add, params, updates)
    in_tail = t >= tail_start
    largest = jnp.where(
      in_tail, jnp.maximum(largest, jnp.max(jnp.abs(updates["quadratic"]))), largest
    )
    sum_sq = jnp.where(in_tail, sum_sq + updates["mixed"] ** 2, sum_sq)
    finite = finite & all_finite((params, updates, state))
    return (params, state, largest, sum_sq, finite), None

  @jax.jit
  def train(noise, signs):
    params = {"quadratic": jnp.zeros_like(curvature), "mixed": jnp.zeros_like(magnitude)}
    carry = (params, tx.init(params), jnp.float32(0), jnp.zeros_like(magnitude), jnp.bool_(True))
    steps = jnp.arange(problem.num_steps)
    (params, _, largest, sum_sq, finite), _ = jax.lax.scan(step, carry, (steps, noise, signs))
    return params, largest, sum_sq, finite

  params, largest, sum_sq, finite = train(
    jnp.asarray(problem.noise), jnp.asarray(problem.mixed_signs)
  )
  x = np.asarray(params["quadratic"], np.float64)
  return Outcome(
    final_loss=float(_loss(problem.curvature, problem.target, x)),
    largest_step=float(largest),
    mixed_step_rms=np.sqrt(np.asarray(sum_sq, np.float64) / TAIL),
    finite=bool(finite),
  )


def run_float64(problem: Problem, rho: float, eps: float) -> Outcome:
  """The same run by tests/reference.py (float64 NumPy), on the same gradient sequence."""
  curvature = problem.curvature.astype(np.float64)
  target = problem.target.astype(np.float64)
  magnitude = problem.mixed_magnitude.astype(np.float64)
  tail_start = problem.num_steps - TAIL
  seen = {"previous": None, "largest": 0.0, "sum_sq": np.zeros_like(magnitude)}

  def gradients(x, t):
    # x is the parameters before step t, so x − (the previous x) is step t − 1's update.
    if seen["previous"] is not None and t - 1 >= tail_start:
      seen["largest"] = max(seen["largest"], float(np.max(np.abs(x[0] - seen["previous"][0]))))
      seen["sum_sq"] += (x[1] - seen["previous"][1]) ** 2
    seen["previous"] = [a.copy() for a in x]
    return [curvature * (x[0] - target) + problem.noise[t], magnitude * problem.mixed_signs[t]]

  start = [np.zeros_like(curvature), np.zeros_like(magnitude)]
  run = reference.run(start, gradients, problem.num_steps, rho=rho, eps=eps, keep_steps=False)
  last = run.params
  seen["largest"] = max(seen["largest"], float(np.max(np.abs(last[0] - seen["previous"][0]))))
  seen["sum_sq"] += (last[1] - seen["previous"][1]) ** 2
  return Outcome(
    final_loss=float(_loss(curvature, target, last[0])),
    largest_step=seen["largest"],
    mixed_step_rms=np.sqrt(seen["sum_sq"] / TAIL),
    finite=bool(all(np.isfinite(a).all() for a in last)),
  )
