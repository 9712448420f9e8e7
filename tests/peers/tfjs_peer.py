"""tf.train.adadelta of TensorFlow.js (tfjs-core + CPU backend under Node.js) on a parity case.

Needs `node` and `npm ci` run once in tests/peers/tfjs (CI does both).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from tests import parity_cases

HERE = Path(__file__).resolve().parent / "tfjs"
_TFJS_DTYPES = {"float32": "float32", "int32": "int32"}


def _values(value) -> list:
  return np.asarray(value).ravel().tolist()


def available() -> bool:
  return shutil.which("node") is not None and (HERE / "node_modules" / "@tensorflow").is_dir()


def _call(case: parity_cases.Case, params0=None, grads=None, weights=None) -> dict:
  if params0 is None:
    params0, grads = parity_cases.inputs(case)
  payload = {
    "kwargs": case["kwargs"],
    "params": [np.asarray(p).ravel().tolist() for p in params0],
    "grads": [[np.asarray(g).ravel().tolist() for g in step] for step in grads],
  }
  if weights is not None:
    payload["weights"] = [
      {"name": name, "dtype": _TFJS_DTYPES[np.asarray(v).dtype.name], "values": _values(v)}
      for name, v in weights
    ]
  done = subprocess.run(
    ["node", str(HERE / "run.mjs")],
    input=json.dumps(payload),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  if done.returncode != 0:
    raise RuntimeError(f"the TensorFlow.js runner failed:\n{done.stderr}")
  return json.loads(done.stdout)


def run(case: parity_cases.Case) -> dict[str, list]:
  out = _call(case)
  shapes = case["shapes"]
  return {
    key: [
      [
        np.asarray(leaf, np.float32).reshape(shape)
        for leaf, shape in zip(step, shapes, strict=True)
      ]
      for step in out[key]
    ]
    for key in ("params", "e_g2", "e_dx2")
  }


def run_with_weights(case, params0, grads, weights=None) -> tuple[list, int, list]:
  """Trains from `params0` on `grads`, after `optimizer.setWeights(weights)` if given.

  Returns the parameters after each step (flat float32 arrays per leaf), the optimizer's
  `iterations` at the end, and its `getWeights()` at the end as (name, array) pairs.
  """
  out = _call(case, params0, grads, weights)
  params = [[np.asarray(leaf, np.float32) for leaf in step] for step in out["params"]]
  saved = [(w["name"], np.asarray(w["values"], w["dtype"])) for w in out["weights"]]
  saved[0] = (saved[0][0], saved[0][1].reshape(()))  # 'iter' is a scalar
  return params, int(out["iterations"]), saved


def version() -> str:
  out = _call(parity_cases.CASES[0] | {"steps": 1, "peer": "tfjs"})
  return f"tfjs-core {out['version']} (cpu backend, epsilon {out['epsilon']})"
