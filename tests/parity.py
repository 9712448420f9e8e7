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

GOLDEN = Path(__file__).resolve().parent / "golden"
PRESETS = {
  "torch": presets.pytorch,
  "keras": presets.keras,
  "tfjs": presets.tfjs,
  "tf1": presets.tf1,
  "d2l": presets.d2l,
}
LEARNING_RATE_NAMES = ("lr", "learning_rate")


def _schedule(spec: Any):
  if isinstance(spec, dict):
    base, gamma = spec["exponential"]
    return lambda count: base * jnp.asarray(gamma, jnp.float32) ** count
  return spec


def build_preset(case: parity_cases.Case) -> optax.GradientTransformation:
  kwargs = {k: _schedule(v) if k in LEARNING_RATE_NAMES else v for k, v in case["kwargs"].items()}
  return PRESETS[case["peer"]](**kwargs)


def run_ours(case: parity_cases.Case) -> dict[str, list]:
  params0, grads = parity_cases.inputs(case)
  tx = build_preset(case)
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


def _real(x) -> np.ndarray:
  x = np.asarray(x)
  if np.iscomplexobj(x):
    return np.stack([x.real, x.imag], axis=-1).astype(np.float64)
  return x.astype(np.float64)


def worst_relative_error(ours: dict[str, list], theirs: dict[str, list]) -> tuple[float, str]:
  """max over steps, leaves and quantities of max|ours − theirs| / max|theirs| (per leaf)."""
  worst, where = 0.0, ""
  assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
  for key in ours:
    assert len(ours[key]) == len(theirs[key])
    for t, (a_step, b_step) in enumerate(zip(ours[key], theirs[key], strict=True)):
      for i, (a, b) in enumerate(zip(a_step, b_step, strict=True)):
        a, b = _real(a), _real(np.asarray(b).reshape(np.shape(a_step[i])))
        scale = max(float(np.max(np.abs(b))), 1e-30)
        error = float(np.max(np.abs(a - b))) / scale
        if error > worst:
          worst, where = error, f"{key} at step {t}, leaf {i}"
  return worst, where


# Golden trajectories -------------------------------------------------------------------


def inputs_digest(case: parity_cases.Case) -> str:
  params, grads = parity_cases.inputs(case)
  digest = hashlib.sha256()
  for array in [*params, *(g for step in grads for g in step)]:
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def encode(record: dict[str, list]) -> dict[str, list]:
  return {
    key: [[_real(x).astype(np.float32).tolist() for x in step] for step in steps]
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
