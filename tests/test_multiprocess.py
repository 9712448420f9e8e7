"""Real processes joined by `jax.distributed` train exactly like one device.

The test starts 2 and 4 copies of `examples/data_parallel.py`, each with 2 CPU devices and
gloo collectives, coordinated over loopback on a port free at run time. Their final
parameters (saved by process 0) must equal a single-process, single-device run of the same
example in this process, up to the order of the gradient sums. A 2-process run stopped
halfway with an orbax checkpoint and resumed by 2 new processes must equal the
uninterrupted 2-process run bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from tests.helpers import free_port, run_workers

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"
DEVICES_PER_PROCESS = 2
STEPS = 20
BATCH_SIZE = 32


def _worker_command(num_processes: int, process_id: int, port: int, *options: str) -> list[str]:
  return [
    sys.executable,
    str(EXAMPLE),
    f"--coordinator=127.0.0.1:{port}",
    f"--num-processes={num_processes}",
    f"--process-id={process_id}",
    f"--cpu-devices={DEVICES_PER_PROCESS}",
    f"--batch-size={BATCH_SIZE}",
    *options,
  ]


def launch_example(num_processes: int, logs: Path, *options: str) -> str:
  """Runs the example on `num_processes` processes; returns what process 0 printed."""
  port = free_port()
  run_workers(
    [_worker_command(num_processes, i, port, *options) for i in range(num_processes)], logs
  )
  return (logs / "0.out").read_text()


def _load(path: Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as saved:
    return dict(saved)


def _resume_to_the_end(checkpoint: Path, saved_at: int, tmp_path: Path) -> dict[str, np.ndarray]:
  """2 new processes resume from `checkpoint` (saved at step `saved_at`) and train to step
  STEPS; returns the final parameters that process 0 saved."""
  out = tmp_path / "resumed.npz"
  printed = launch_example(
    2, tmp_path / "resumed", f"--steps={STEPS}", f"--resume={checkpoint}", f"--out={out}"
  )
  assert f"{STEPS - saved_at} steps to step {STEPS}" in printed, printed
  return _load(out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Final parameters of a full multi-process run, one launch per process count."""
  runs: dict[int, dict[str, np.ndarray]] = {}

  def get(num_processes: int) -> dict[str, np.ndarray]:
    if num_processes not in runs:
      logs = tmp_path_factory.mktemp(f"full{num_processes}")
      printed = launch_example(num_processes, logs, f"--steps={STEPS}", f"--out={logs / 'p.npz'}")
      assert f"{num_processes} processes x {DEVICES_PER_PROCESS} cpu devices" in printed, printed
      runs[num_processes] = _load(logs / "p.npz")
    return runs[num_processes]

  return get


@pytest.fixture(scope="module")
def single_device_params(example):
  mesh = Mesh(np.array(jax.devices("cpu")[:1]), ("data",))  # the workers' platform
  params, _ = example.train(mesh, STEPS, BATCH_SIZE)
  return {name: np.asarray(value) for name, value in params.items()}


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [2, 4])
def test_processes_joined_by_jax_distributed_match_a_single_device_run(
  num_processes, example, single_device_params, uninterrupted
):
  got = uninterrupted(num_processes)
  assert sorted(got) == sorted(single_device_params)
  worst = max(float(np.max(np.abs(got[k] - single_device_params[k]))) for k in got)
  print(f"{num_processes} processes: max |multi-process - single device| = {worst:.3g}")
  for name, expected in single_device_params.items():
    np.testing.assert_allclose(got[name], expected, rtol=2e-6, atol=1e-7, err_msg=name)
  # The run moved: equal parameters are not just the unchanged initial ones.
  assert not np.allclose(got["w1"], example.init_params()["w1"], atol=1e-3)


@pytest.mark.slow
def test_processes_resumed_from_an_orbax_checkpoint_match_the_uninterrupted_run_bit_for_bit(
  uninterrupted, tmp_path
):
  pytest.importorskip("orbax.checkpoint")  # the example saves and restores with orbax
  checkpoint_dir = tmp_path / "checkpoint"
  launch_example(2, tmp_path / "first", f"--steps={STEPS // 2}", f"--save={checkpoint_dir}")
  got, want = _resume_to_the_end(checkpoint_dir, STEPS // 2, tmp_path), uninterrupted(2)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_worker_that_dies_fails_the_run_fast_with_its_stderr(tmp_path):
  port = free_port()
  survivor = _worker_command(2, 0, port)  # waits for its peer
  dying = [sys.executable, "-c", "raise SystemExit('worker 1 could not start: no data')"]
  # Reported as a death, not as the timeout the survivor (blocked on its peer) would reach.
  with pytest.raises(pytest.fail.Exception, match="worker 1 of 2 exited with code 1") as failure:
    run_workers([survivor, dying], tmp_path, timeout_s=120)
  assert "worker 1 could not start: no data" in str(failure.value)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process_and_back(example, uninterrupted, tmp_path):
  """2 processes (4 devices) -> this process (1 device) -> 2 processes again: each restore
  reads the arrays into the new topology, and the runs continue to the uninterrupted
  2-process run's numbers (up to the order of the gradient sums on 4 devices or 1)."""
  pytest.importorskip("orbax.checkpoint")  # the example saves and restores with orbax
  # Explicit axes: jax.eval_shape(tx.init, ...) in the example then carries the shardings
  # of this topology, which orbax needs to restore another topology's checkpoint.
  mesh = jax.make_mesh(
    (1,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices("cpu")[:1]
  )
  third, two_thirds = STEPS // 3, 2 * STEPS // 3
  launch_example(2, tmp_path / "first", f"--steps={third}", f"--save={tmp_path / 'a'}")
  # Saved by 2 processes, restored and continued here, saved again by 1 process.
  _, losses = example.train(
    mesh, two_thirds, BATCH_SIZE, resume=tmp_path / "a", save=tmp_path / "b"
  )
  assert len(losses) == two_thirds - third
  got, want = _resume_to_the_end(tmp_path / "b", two_thirds, tmp_path), uninterrupted(2)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=1e-7, err_msg=name)
