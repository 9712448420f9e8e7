"""benchmarks/transformer_lm.py runs end to end: a tiny model learns and each state is sized.

Run as a command (tests never import the benchmarks). The default tier trains the factored
state for 4 steps, one seed, no step timing (about 10 s of CPU, mostly importing and
compiling); the slow tier runs the whole `--smoke`: six states, three seeds, their step timing.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *options) -> dict:
  command = [sys.executable, "-m", "benchmarks.transformer_lm", "--smoke", "--out", tmp_path]
  subprocess.run([*map(str, command), *options], cwd=ROOT, check=True, capture_output=True)
  assert (tmp_path / "factored_transformer.md").read_text().startswith("# Byte-level")
  return json.loads((tmp_path / "factored_transformer.json").read_text())


def _check_learns_and_sizes(record):
  for name, runs in record["runs"].items():
    for run in runs:
      curve = [point["valid_bits"] for point in run["curve"]]
      assert all(math.isfinite(bits) for bits in curve), (name, curve)
      # A byte model starts near log2(256) = 8 bits; a few steps of Adadelta lower it.
      assert curve[-1] < curve[0] - 0.1, (name, curve)
  memory = {name: m["per_parameter"] for name, m in record["state_bytes"].items()}
  # Two float32 averages per entry are 8 bytes; the smoke model's 32-wide matrices factored
  # keep 8 (n + m) bytes for n·m entries, its vectors 8 each: under 0.5 in all.
  assert memory["factored"] < 0.5
  if "float32 state" in memory:
    assert memory["float32 state"] == pytest.approx(8.0, abs=1e-3)  # plus the step count
  if "hybrid (E[Δx²] full)" in memory:
    assert memory["factored"] < memory["hybrid (E[Δx²] full)"] < memory["float32 state"]


def test_smoke_factored_state_learns_and_keeps_under_half_a_byte_per_parameter(tmp_path):
  record = _run(tmp_path, "--seeds", "0", "--timing-repeats", "0", "--states", "factored")
  assert record["timing"] is None
  _check_learns_and_sizes(record)


@pytest.mark.slow
def test_full_smoke_every_state_learns_and_is_timed(tmp_path):
  record = _run(tmp_path)
  _check_learns_and_sizes(record)
  assert set(record["timing"]["train_step_ms"]) == set(record["runs"])
