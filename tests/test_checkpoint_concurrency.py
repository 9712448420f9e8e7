"""Two processes saving to one checkpoint path at once, and saves that cannot start.

Two writer processes save different arrays, steps and configs to the same path in the same
instant, trial after trial (the second one up to 160 ms later in some trials, to vary the
interleaving). Exactly one may report success, and the checkpoint must then restore to
that writer's data bit for bit; the other must be told that the path is in use or already
holds a checkpoint. The expected arrays are built here with NumPy, not read back through the
code under test.

A save into a read-only directory must fail at once and let the process exit: orbax's
background threads used to hold it for about five minutes after the error.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint", reason="needs orbax-checkpoint (the [checkpoint] extra)")

import optax_adadelta
from optax_adadelta import checkpoint
from tests.helpers import free_port, worker_env

SIZE = 200_000  # float32 per array: 2.4 MB per checkpoint, long enough for the saves to overlap
MANAGED_STEP = 7  # both writers of a managed trial save this step
WRITER = textwrap.dedent(
  """
  import json, os, sys, time
  import jax, jax.numpy as jnp, numpy as np
  import optax_adadelta
  from optax_adadelta import checkpoint

  mode, root = sys.argv[1], sys.argv[2]
  writer, trials, size, managed_step = (int(a) for a in sys.argv[3:])
  tx = optax_adadelta.adadelta()
  base = np.random.default_rng(size).normal(size=size).astype(np.float32)
  params = {"w": jnp.asarray(base + np.float32(writer))}
  opt_state = jax.tree.map(lambda x: x + writer, tx.init(params))
  config = {"writer": writer}

  def meet(trial):
    # Both writers arrive, then start together or writer 2 later by 2.5 to 160 ms: its save
    # then begins at another phase of writer 1's (under a second to save on CI).
    open(os.path.join(root, f"ready-{trial}-{writer}"), "w").close()
    other = os.path.join(root, f"ready-{trial}-{3 - writer}")
    while not os.path.exists(other):
      time.sleep(0.0005)
    if writer == 2 and trial % 8:
      time.sleep(0.0025 * 2 ** (trial % 8 - 1))

  for trial in range(trials):
    path = os.path.join(root, str(trial))
    meet(trial)
    try:
      if mode == "plain":
        checkpoint.save(path, params, opt_state, step=writer, config=config)
      else:
        with checkpoint.Checkpoints(path) as checkpoints:
          checkpoints.save(params, opt_state, step=managed_step, config=config)
      outcome = "ok"
    except Exception as error:
      outcome = f"{type(error).__name__}: {error}"
    print(json.dumps({"trial": trial, "outcome": outcome}), flush=True)
  """
)


def _run_writers(mode: str, root: Path, trials: int) -> dict[int, dict[int, str]]:
  """Runs the two writers; returns {trial: {writer: "ok" or the error}}."""
  root.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, "-c", WRITER, mode, str(root)]
  writers = {
    w: subprocess.Popen(
      [*command, str(w), str(trials), str(SIZE), str(MANAGED_STEP)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=worker_env(),
      text=True,
    )
    for w in (1, 2)
  }
  outcomes: dict[int, dict[int, str]] = {t: {} for t in range(trials)}
  try:
    for w, process in writers.items():
      out, err = process.communicate(timeout=120 + 10 * trials)
      assert process.returncode == 0, f"writer {w} exited with {process.returncode}:\n{err[-3000:]}"
      for line in out.splitlines():
        record = json.loads(line)
        outcomes[record["trial"]][w] = record["outcome"]
  finally:
    for process in writers.values():
      if process.poll() is None:
        process.kill()
        process.wait()
  return outcomes


def _expected(writer: int, mode: str) -> tuple[list[np.ndarray], int]:
  """Writer `writer`'s leaves (params w, E[g²], E[Δx²]) and step, built with NumPy."""
  base = np.random.default_rng(SIZE).normal(size=SIZE).astype(np.float32)
  leaves = [base + np.float32(writer), np.full(SIZE, writer, np.float32)]
  leaves.append(leaves[1])
  return leaves, (writer if mode == "plain" else MANAGED_STEP)


def _templates():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {"w": jax.ShapeDtypeStruct((SIZE,), jnp.float32, sharding=device)}
  return params, jax.eval_shape(optax_adadelta.adadelta().init, params)


def _holder(mode: str, path: Path) -> str:
  """Whose data the checkpoint at `path` restores to: "1", "2", "mixed", or the error."""
  try:
    if mode == "plain":
      restored = checkpoint.restore(path, *_templates())
    else:
      with checkpoint.Checkpoints(path) as checkpoints:
        restored = checkpoints.restore(*_templates())
  except ValueError as error:
    return f"refused ({' '.join(str(error).split())[:150]})"
  got = [np.asarray(x) for x in jax.tree.leaves((restored.params, restored.opt_state))]
  for writer in (1, 2):
    leaves, step = _expected(writer, mode)
    if restored.step == step and all(
      np.array_equal(a, b) for a, b in zip(got, leaves, strict=True)
    ):
      return str(writer)
  return f"mixed (step {restored.step})"


def _judge(mode: str, root: Path, outcomes: dict[int, dict[int, str]]) -> list[str]:
  """One line per wrong trial: two successes, or a success whose data did not survive."""
  wrong = []
  for trial, said in outcomes.items():
    assert sorted(said) == [1, 2], f"trial {trial}: a writer did not report: {said}"
    winners = [w for w in (1, 2) if said[w] == "ok"]
    holder = _holder(mode, root / str(trial))
    if len(winners) != 1 or holder != str(winners[0]):
      wrong.append(f"trial {trial}: writers said {said}; the checkpoint holds {holder}")
      continue
    loser = said[3 - winners[0]]
    refusals = ("CheckpointInUseError", "already exists", "already saved")
    if not any(r in loser for r in refusals):
      wrong.append(f"trial {trial}: the second writer got an unexpected error: {loser}")
  return wrong


def _two_writers(mode: str, tmp_path: Path, trials: int) -> None:
  outcomes = _run_writers(mode, tmp_path, trials)
  wrong = _judge(mode, tmp_path, outcomes)
  losers = sorted(
    {o.split(":")[0] for said in outcomes.values() for o in said.values() if o != "ok"}
  )
  print(f"{mode}: {len(wrong)} of {trials} trials wrong; the second writers got {losers}")
  for line in wrong[:10]:
    print(line[:600])
  assert not wrong, f"{len(wrong)} of {trials} trials wrong:\n" + "\n".join(wrong[:5])
  # What the lock leaves behind: nothing but the checkpoints.
  assert not list(tmp_path.rglob("*optax_adadelta-lock")), "a lock file was left behind"


@pytest.mark.parametrize("mode", ["plain", pytest.param("managed", marks=pytest.mark.slow)])
def test_two_processes_saving_to_one_path_at_once_give_one_success_and_its_data(mode, tmp_path):
  _two_writers(mode, tmp_path, trials=8)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", pytest.param("managed", marks=pytest.mark.slow)])
def test_two_processes_saving_to_one_path_at_once_many_trials(mode, tmp_path):
  _two_writers(mode, tmp_path, trials=60)


def test_a_second_thread_saving_to_a_path_in_use_is_refused_and_the_first_save_holds(tmp_path):
  """Within one process: a save while another is under way (from a second thread)."""
  import threading

  tx = optax_adadelta.adadelta()
  params = {"w": jnp.asarray(_expected(1, "plain")[0][0])}
  opt_state = jax.tree.map(lambda x: x + 1, tx.init(params))
  path = tmp_path / "ckpt"
  started, errors = threading.Event(), []
  original = checkpoint.ocp.StandardCheckpointer

  class SlowCheckpointer(original):  # holds the first save open until the second has tried
    def save(self, *args, **kwargs):
      started.set()
      second.join(timeout=60)
      return super().save(*args, **kwargs)

  def second_save():
    started.wait(timeout=60)
    try:
      checkpoint.save(path, {"w": params["w"] + 1}, opt_state, step=2)
    except checkpoint.CheckpointInUseError as error:
      errors.append(str(error))

  second = threading.Thread(target=second_save)
  second.start()
  checkpoint.ocp.StandardCheckpointer = SlowCheckpointer
  try:
    checkpoint.save(path, params, opt_state, step=1)
  finally:
    checkpoint.ocp.StandardCheckpointer = original
    second.join(timeout=60)
  assert len(errors) == 1 and "another thread of this process is saving to it" in errors[0]
  assert checkpoint.restore(path, *_templates()).step == 1


def test_a_lock_left_by_a_killed_writer_does_not_block_the_next_save(tmp_path):
  """The lock is the kernel's (flock): a writer killed while holding it releases it."""
  path = tmp_path / "ckpt"
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
      "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'a writer that will be killed'); "
      "print('locked', flush=True); time.sleep(600)",
      str(path) + ".optax_adadelta-lock",
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == "locked\n"
    tx = optax_adadelta.adadelta()
    params = {"w": jnp.asarray(_expected(1, "plain")[0][0])}
    with pytest.raises(checkpoint.CheckpointInUseError, match="a writer that will be killed"):
      checkpoint.save(path, params, tx.init(params), step=1)
    assert not path.exists()
  finally:
    holder.kill()
    holder.wait()
  assert (tmp_path / "ckpt.optax_adadelta-lock").exists()  # what a crash leaves
  checkpoint.save(path, params, jax.tree.map(lambda x: x + 1, tx.init(params)), step=1)
  restored = checkpoint.restore(path, *_templates())
  assert restored.step == 1
  np.testing.assert_array_equal(restored.params["w"], _expected(1, "plain")[0][0])
  assert not (tmp_path / "ckpt.optax_adadelta-lock").exists()


# Multi-process saves ------------------------------------------------------------------

JOB_WRITER = textwrap.dedent(
  """
  import os, sys, time
  import jax

  port, process_id, path, root = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 1)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=120
  )
  import numpy as np
  import optax_adadelta
  from optax_adadelta import checkpoint

  mesh = jax.make_mesh((2,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  values = np.arange(8, dtype=np.float32)
  params = {"w": jax.make_array_from_callback((8,), sharding, lambda index: values[index])}
  opt_state = optax_adadelta.adadelta().init(params)

  def attempt(name):
    try:
      checkpoint.save(path, params, opt_state, step=3)
      outcome = "ok"
    except Exception as error:
      outcome = f"{type(error).__name__}: {error}"
    with open(os.path.join(root, f"{name}-{process_id}"), "w") as file:
      file.write(outcome)

  attempt("first")  # while the test holds the lock
  while not os.path.exists(os.path.join(root, "go")):
    time.sleep(0.05)
  attempt("second")
  jax.distributed.shutdown()
  """
)


def _wait_for(paths: list[Path], processes: list[subprocess.Popen], timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while not all(p.exists() for p in paths):
    for process in processes:
      if process.poll() is not None:
        pytest.fail(f"a worker exited with {process.returncode}:\n{process.stderr.read()[-3000:]}")
    assert time.monotonic() < deadline, f"no {[p.name for p in paths]} after {timeout_s} s"
    time.sleep(0.1)


@pytest.mark.slow
def test_a_two_process_save_to_a_path_in_use_fails_on_every_process_then_succeeds(tmp_path):
  """Process 0 takes the lock for the job; both processes learn that it is held and raise
  (none hangs, none writes), and once it is free the job's save succeeds."""
  path = tmp_path / "ckpt"
  port = free_port()
  lock = os.open(str(path) + ".optax_adadelta-lock", os.O_RDWR | os.O_CREAT)
  fcntl.flock(lock, fcntl.LOCK_EX)
  os.write(lock, b"held by the test")
  env = worker_env()
  command = [sys.executable, "-c", JOB_WRITER, str(port)]
  workers = [
    subprocess.Popen(
      [*command, str(i), str(path), str(tmp_path)], stderr=subprocess.PIPE, env=env, text=True
    )
    for i in (0, 1)
  ]
  try:
    _wait_for([tmp_path / f"first-{i}" for i in (0, 1)], workers, timeout_s=240)
    assert not path.exists()
    os.unlink(str(path) + ".optax_adadelta-lock")
    os.close(lock)
    (tmp_path / "go").touch()
    _wait_for([tmp_path / f"second-{i}" for i in (0, 1)], workers, timeout_s=240)
    for worker in workers:
      worker.wait(timeout=60)
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  first = [(tmp_path / f"first-{i}").read_text() for i in (0, 1)]
  print(first)
  assert first[0].startswith("CheckpointInUseError: ") and "held by the test" in first[0]
  assert first[1].startswith("CheckpointInUseError: ") and "process 0 could not start" in first[1]
  assert [(tmp_path / f"second-{i}").read_text() for i in (0, 1)] == ["ok", "ok"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=device)}
  opt_state = jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
    jax.eval_shape(optax_adadelta.adadelta().init, params),
  )
  restored = checkpoint.restore(path, params, opt_state)
  assert restored.step == 3
  np.testing.assert_array_equal(restored.params["w"], np.arange(8, dtype=np.float32))


# A save that cannot start ------------------------------------------------------------

READ_ONLY_WRITER = textwrap.dedent(
  """
  import sys
  import jax.numpy as jnp
  import optax_adadelta
  from optax_adadelta import checkpoint

  mode, path = sys.argv[1], sys.argv[2]
  tx = optax_adadelta.adadelta()
  params = {"w": jnp.arange(8.0)}
  try:
    if mode == "plain":
      checkpoint.save(path, params, tx.init(params), step=1)
    else:
      with checkpoint.Checkpoints(path) as checkpoints:
        checkpoints.save(params, tx.init(params), step=1)
  except PermissionError as error:
    print(f"PermissionError: {error}", flush=True)
  """
)


def _without_root_override() -> list[str]:
  """A command prefix under which chmod binds this user (root ignores it otherwise)."""
  if os.geteuid() != 0:
    return []
  if shutil.which("setpriv") is None:
    pytest.skip("running as root without setpriv: a read-only directory would be writable")
  return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("mode", ["plain", pytest.param("managed", marks=pytest.mark.slow)])
def test_a_save_into_a_read_only_directory_fails_at_once_and_the_process_exits(mode, tmp_path):
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  target = read_only / ("ckpt" if mode == "plain" else "")  # a run directory that exists
  read_only.chmod(0o555)
  started = time.monotonic()
  try:
    # Orbax's coordination timeout is 300 s: a process held by it would pass 200 s.
    done = subprocess.run(
      [*_without_root_override(), sys.executable, "-c", READ_ONLY_WRITER, mode, str(target)],
      capture_output=True,
      text=True,
      env=worker_env(),
      timeout=200,
    )
  finally:
    read_only.chmod(0o755)
  print(f"{mode}: the process exited after {time.monotonic() - started:.1f} s")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "PermissionError" in done.stdout, done.stdout + done.stderr[-3000:]
  assert "is that directory read-only?" in done.stdout, done.stdout
  assert list(read_only.iterdir()) == []
