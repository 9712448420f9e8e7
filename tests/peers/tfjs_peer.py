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


def available() -> bool:
  return shutil.which("node") is not None and (HERE / "node_modules" / "@tensorflow").is_dir()


def _call(case: parity_cases.Case) -> dict:
  params0, grads = parity_cases.inputs(case)
  payload = {
    "kwargs": case["kwargs"],
    "params": [p.ravel().tolist() for p in params0],
    "grads": [[g.ravel().tolist() for g in step] for step in grads],
  }
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


def version() -> str:
  out = _call(parity_cases.CASES[0] | {"steps": 1, "peer": "tfjs"})
  return f"tfjs-core {out['version']} (cpu backend, epsilon {out['epsilon']})"
