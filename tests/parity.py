"""Runs a parity case through this package's preset and compares records with a peer's."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_adadelta import presets
from tests import parity_cases
from tests.reference import as_real

GOLDEN = Path(__file__).resolve().parent / "golden"
PRESETS = {
  "torch": presets.pytorch,
  "keras": presets.keras,
  "tfjs": presets.tfjs,
  "tf1": presets.tf1,
  "d2l": presets.d2l,
}
LEARNING_RATE_NAMES = ("lr", "learning_rate")
# float32 throughout. The presets follow each peer's order of operations; what remains is
# 1-ulp differences (fused multiply-adds in the peers' kernels, pow in schedules), which
# stay at the 1e-6 level over 40 steps. See the closing table in docs/peers.md.
TOLERANCE = 2e-6
# The steps x_{t+1} − x_t, relative to their own size (worst_step_error): at η = 1e-3 a step
# is ~1e-6 of |x|, so TOLERANCE, relative to max|x|, can pass a 10 % error in it. Measured:
# ≤ 2e-5 on the golden records, ≤ 2.1e-4 on 120 random problems (a float32 parameter that
# rounds to the other neighbour in one library, mostly at Keras's EMA overwrites); a step
# 10 % too long gives 0.1.
STEP_TOLERANCE = 2e-3


def _schedule(spec: Any):
  if isinstance(spec, dict):
    base, gamma = spec["exponential"]
    return lambda count: base * jnp.asarray(gamma, jnp.float32) ** count
  return spec


def build_preset(case: parity_cases.Case) -> optax.GradientTransformation:
  kwargs = {k: _schedule(v) if k in LEARNING_RATE_NAMES else v for k, v in case["kwargs"].items()}
  return PRESETS[case["peer"]](**kwargs)


def run_ours(case: parity_cases.Case, step_error: float = 0.0) -> dict[str, list]:
  """Our record of the case; `step_error` = 0.1 makes every step 10 % too long (a fault
  that the comparisons must catch)."""
  params0, grads = parity_cases.inputs(case)
  tx = build_preset(case)
  if step_error:
    tx = optax.chain(tx, optax.scale(1.0 + step_error))
  params = [jnp.asarray(p) for p in params0]
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  keys = ["params", "e_g2", "e_dx2"] + (["ema"] if case["kwargs"].get("use_ema") else [])
  record: dict[str, list] = {key: [] for key in keys}
  for g in grads:
    params, state = step(params, state, [jnp.asarray(x) for x in g])
    record["params"].append([np.asarray(p) for p in params])
    for key in keys[1:]:
      record[key].append([np.asarray(x) for x in optax.tree.get(state, key)])
  return record


def worst_relative_error(ours: dict[str, list], theirs: dict[str, list]) -> tuple[float, str]:
  """max over steps, leaves and quantities of max|ours − theirs| / max|theirs|, the latter
  over the leaf's steps so far: a leaf that passes near 0 still carries the rounding of its
  earlier, larger values."""
  worst, where = 0.0, ""
  assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
  for key in ours:
    assert len(ours[key]) == len(theirs[key])
    largest: dict[int, float] = {}
    for t, (a_step, b_step) in enumerate(zip(ours[key], theirs[key], strict=True)):
      for i, (a, b) in enumerate(zip(a_step, b_step, strict=True)):
        a, b = as_real(a), as_real(np.asarray(b).reshape(np.shape(a_step[i])))
        largest[i] = max(largest.get(i, 1e-30), float(np.max(np.abs(b))))
        error = float(np.max(np.abs(a - b))) / largest[i]
        if error > worst:
          worst, where = error, f"{key} at step {t}, leaf {i}"
  return worst, where


def worst_step_error(
  ours: dict[str, list], theirs: dict[str, list], initial: list[np.ndarray]
) -> tuple[float, str]:
  """max over leaves of ‖Δours − Δtheirs‖ / ‖Δtheirs‖, where Δ = x_{t+1} − x_t and the norm
  runs over the leaf's coordinates and every step (`initial`: the parameters before step 0)."""
  worst, where = 0.0, ""
  for i, x0 in enumerate(initial):
    shape = as_real(x0).shape
    a = np.stack([as_real(x0)] + [as_real(step[i]) for step in ours["params"]])
    b = np.stack([as_real(x0)] + [as_real(step[i]).reshape(shape) for step in theirs["params"]])
    step_a, step_b = np.diff(a, axis=0), np.diff(b, axis=0)
    miss = np.abs(step_a - step_b).reshape(len(step_a), -1)
    error = float(np.linalg.norm(miss)) / max(float(np.linalg.norm(step_b)), 1e-30)
    if error > worst:
      t = int(np.argmax(np.linalg.norm(miss, axis=1)))
      worst, where = error, f"params' steps, leaf {i} (largest difference at step {t})"
  return worst, where


def assert_follows(case: parity_cases.Case, ours: dict[str, list], theirs: dict[str, list]):
  """Our record equals the peer's: every recorded value to TOLERANCE of its leaf's largest
  |value|, and the parameters' steps to STEP_TOLERANCE of their size."""
  label = f"{case['name']} {case['kwargs']}"
  error, where = worst_relative_error(ours, theirs)
  assert error <= TOLERANCE, f"{label}: relative error {error:.2e} in {where}"
  error, where = worst_step_error(ours, theirs, parity_cases.inputs(case)[0])
  assert error <= STEP_TOLERANCE, f"{label}: relative step error {error:.2e} in {where}"


# Golden trajectories -------------------------------------------------------------------


def inputs_digest(case: parity_cases.Case) -> str:
  params, grads = parity_cases.inputs(case)
  digest = hashlib.sha256()
  for array in [*params, *(g for step in grads for g in step)]:
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def encode(record: dict[str, list]) -> dict[str, list]:
  return {
    key: [[as_real(x).astype(np.float32).tolist() for x in step] for step in steps]
    for key, steps in record.items()
  }


def decode(encoded: dict[str, list], case: parity_cases.Case) -> dict[str, list]:
  def leaf(values):
    x = np.asarray(values, np.float32)
    return x[..., 0] + 1j * x[..., 1] if case["complex"] else x

  return {key: [[leaf(x) for x in step] for step in steps] for key, steps in encoded.items()}


def load_golden(peer: str) -> dict:
  return json.loads((GOLDEN / f"{peer}.json").read_text())


# Live peers ----------------------------------------------------------------------------


def live_peer(peer: str):
  """The peer's runner module, or a skip (a failure when OPTAX_ADADELTA_REQUIRE_PEERS=1)."""
  try:
    module = importlib.import_module(f"tests.peers.{peer}_peer")
    if peer == "tfjs" and not module.available():
      raise ImportError("node or tests/peers/tfjs/node_modules missing (run npm ci there)")
  except ImportError as err:
    if os.environ.get("OPTAX_ADADELTA_REQUIRE_PEERS"):
      raise
    pytest.skip(f"live {peer} not installed ({err}); compared with the golden record only")
  return module
