"""Checkpoints under faults: a process SIGKILLed during a large save, flipped bytes in array
files, metadata files cut short or deleted. Every fault ends in an earlier checkpoint
restored bit for bit or in a ValueError naming the checkpoint, never in wrong numbers.

The expected arrays are written out here with NumPy (seeded random values plus the step),
not read back through the code under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
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

LARGE = 4_000_000  # float32 per array: 48 MB per checkpoint, about 2 s to save on CI
CHILD = textwrap.dedent(
  """
  import sys
  import jax, jax.numpy as jnp, numpy as np
  import optax_adadelta
  from optax_adadelta import checkpoint

  mode, root, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
  tx = optax_adadelta.adadelta()

  def tree(step):
    base = np.random.default_rng(size).normal(size=size).astype(np.float32)
    params = {"w": jnp.asarray(base + np.float32(step))}
    return params, jax.tree.map(lambda x: x + step, tx.init(params))

  if mode == "manager":
    with checkpoint.Checkpoints(root, max_to_keep=2) as checkpoints:
      checkpoints.save(*tree(1), step=1)
      print("saving 2", flush=True)
      checkpoints.save(*tree(2), step=2)
  else:
    checkpoint.save(root + "/a", *tree(1), step=1)
    print("saving 2", flush=True)
    checkpoint.save(root + "/b", *tree(2), step=2)
  print("finished", flush=True)
  """
)


def _base(size: int) -> np.ndarray:
  """Random values: tensorstore compresses its chunks, and would shrink an arange."""
  return np.random.default_rng(size).normal(size=size).astype(np.float32)


def _expected(step: int, size: int) -> list[np.ndarray]:
  """Leaves of (params, opt_state, step) as the child built them: E[g²] and E[Δx²] = step."""
  values = _base(size) + np.float32(step)
  return [values, np.full(size, step, np.float32), np.full(size, step, np.float32)]


def _templates(size: int):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {"w": jax.ShapeDtypeStruct((size,), jnp.float32, sharding=device)}
  return params, jax.eval_shape(optax_adadelta.adadelta().init, params)


def _assert_restored(restored, step: int, size: int) -> None:
  assert restored.step == step
  got = [np.asarray(x) for x in jax.tree.leaves((restored.params, restored.opt_state))]
  assert len(got) == 3
  for a, b in zip(got, _expected(step, size), strict=True):
    np.testing.assert_array_equal(a, b)


def _temporary_dirs(root: Path) -> list[Path]:
  return [p for p in root.rglob("*") if p.is_dir() and "orbax-checkpoint-tmp" in p.name]


def _bytes_written(root: Path) -> int:
  total = 0
  for path in (p for t in _temporary_dirs(root) for p in t.rglob("*")):
    with contextlib.suppress(FileNotFoundError):  # orbax's lock files come and go
      total += path.stat().st_size if path.is_file() else 0
  return total


def _kill_during_second_save(mode: str, root: Path) -> Path:
  """Runs the child until it is writing its second checkpoint, then SIGKILLs it; returns
  the temporary directory it was writing."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  child = subprocess.Popen(
    [sys.executable, "-c", CHILD, mode, str(root), str(LARGE)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env=env,
    text=True,
  )
  try:
    line = child.stdout.readline()
    assert line == "saving 2\n", f"child said {line!r}; stderr:\n{child.stderr.read()[-3000:]}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
      if _bytes_written(root) > 1 << 20:  # arrays under way
        break
      time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  assert child.returncode == -signal.SIGKILL, "the save finished before the kill"
  (temporary,) = [t for t in _temporary_dirs(root) if t.name.startswith(("2.", "b."))]
  return temporary


@pytest.mark.slow
def test_sigkill_during_a_large_managed_save_leaves_the_earlier_step_restorable(tmp_path):
  temporary = _kill_during_second_save("manager", tmp_path)
  assert not (tmp_path / "2").exists()
  with checkpoint.Checkpoints(tmp_path, max_to_keep=2) as checkpoints:
    assert checkpoints.all_steps() == [1]
    _assert_restored(checkpoints.restore(*_templates(LARGE)), 1, LARGE)
    # The run goes on: the next save of step 2 succeeds and the debris is gone.
    params = {"w": jnp.asarray(_base(LARGE) + np.float32(2))}
    opt_state = jax.tree.map(lambda x: x + 2, optax_adadelta.adadelta().init(params))
    checkpoints.save(params, opt_state, step=2)
    assert checkpoints.all_steps() == [1, 2]
    _assert_restored(checkpoints.restore(*_templates(LARGE)), 2, LARGE)
  assert not temporary.exists()


def test_sigkill_during_a_large_save_leaves_the_earlier_checkpoint_restorable(tmp_path):
  _kill_during_second_save("plain", tmp_path)
  _assert_restored(checkpoint.restore(tmp_path / "a", *_templates(LARGE)), 1, LARGE)
  with pytest.raises(
    ValueError, match=r"The checkpoint at .*/b does not exist: there is no directory"
  ):
    checkpoint.restore(tmp_path / "b", *_templates(LARGE))


# Corruptions ---------------------------------------------------------------------------

SMALL = 4096


def _save_small(directory: Path) -> None:
  tx = optax_adadelta.adadelta()
  params = {"w": jnp.asarray(_base(SMALL) + np.float32(1))}
  checkpoint.save(directory, params, jax.tree.map(lambda x: x + 1, tx.init(params)), step=1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
  directory = tmp_path_factory.mktemp("pristine") / "ckpt"
  _save_small(directory)
  _assert_restored(checkpoint.restore(directory, *_templates(SMALL)), 1, SMALL)
  return directory


def _damaged_copy(pristine: Path, relative: str, damage, tmp_path: Path) -> Path:
  """A copy of the checkpoint with one file damaged; a new path each time (tensorstore
  caches what it read by path)."""
  copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
  subprocess.run(["cp", "-r", str(pristine), str(copy)], check=True)
  damage(copy / relative)
  return copy


def _outcome(directory: Path) -> str:
  """'equal' (restored bit for bit) or the error message; anything else fails the test."""
  try:
    restored = checkpoint.restore(directory, *_templates(SMALL))
  except ValueError as error:
    assert str(directory) in str(error), str(error)
    return str(error)
  _assert_restored(restored, 1, SMALL)  # a harmless change, or a file orbax does not need
  return "equal"


def _files(pristine: Path) -> list[str]:
  return sorted(str(p.relative_to(pristine)) for p in pristine.rglob("*") if p.is_file())


def test_a_flipped_byte_in_an_array_file_is_refused_naming_the_checkpoint(pristine, tmp_path):
  largest = max(_files(pristine), key=lambda f: (pristine / f).stat().st_size)
  size = (pristine / largest).stat().st_size
  assert size > SMALL * 4 * 3 // 4, "the parameters' random values are in this file"

  def flip(position):
    def damage(path):
      data = bytearray(path.read_bytes())
      data[position] ^= 0x10
      path.write_bytes(bytes(data))

    return damage

  outcomes = [
    _outcome(_damaged_copy(pristine, largest, flip(p), tmp_path))
    for p in range(7, size, size // 24)
  ]
  corrupted = [o for o in outcomes if "is corrupted: the bytes read back for" in o]
  print(f"{len(outcomes)} flips: {len(corrupted)} checksum errors, {outcomes.count('equal')} equal")
  # Without checksums most flips in the raw zarr chunks read back silently as other numbers.
  assert len(corrupted) >= len(outcomes) // 2
  assert all(o == "equal" or "checkpoint at" in o for o in outcomes)


@pytest.mark.parametrize("damage", ["cut_in_half", "emptied", "deleted"])
def test_a_damaged_metadata_file_fails_naming_the_checkpoint_and_the_problem(
  damage, pristine, tmp_path
):
  actions = {
    "cut_in_half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "emptied": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.unlink(),
  }
  outcomes = {
    name: _outcome(_damaged_copy(pristine, name, actions[damage], tmp_path))
    for name in _files(pristine)
  }
  for name, outcome in outcomes.items():
    print(f"{damage} {name}: {outcome[:200]}")
  # The files orbax cannot do without; the others are redundant copies or optional.
  for name in ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt"):
    assert outcomes[name] != "equal", name
  assert "_CHECKPOINT_METADATA" in outcomes["_CHECKPOINT_METADATA"]
  if damage != "deleted":
    assert "damaged metadata file" in outcomes["_CHECKPOINT_METADATA"]
    assert "JSONDecodeError" in outcomes["_METADATA"]


def test_a_damaged_managed_step_names_the_step_and_an_earlier_step_still_restores(tmp_path):
  tx = optax_adadelta.adadelta()
  with checkpoint.Checkpoints(tmp_path / "run", max_to_keep=None) as checkpoints:
    for step in (1, 2):
      params = {"w": jnp.asarray(_base(SMALL) + np.float32(step))}
      checkpoints.save(params, jax.tree.map(lambda x, s=step: x + s, tx.init(params)), step=step)
  data = max((tmp_path / "run" / "2").rglob("*"), key=lambda p: p.is_file() and p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  data.write_bytes(bytes(raw))
  with checkpoint.Checkpoints(tmp_path / "run") as checkpoints:
    with pytest.raises(ValueError, match=r"/run, step 2 \(steps saved: \[1, 2\]\) is corrupted"):
      checkpoints.restore(*_templates(SMALL))
    _assert_restored(checkpoints.restore(*_templates(SMALL), step=1), 1, SMALL)


# Checkpoints: keeping, refusing ------------------------------------------------------


def test_checkpoints_keep_the_last_n_steps_and_restore_the_latest(tmp_path):
  tx = optax_adadelta.adadelta()
  with checkpoint.Checkpoints(tmp_path, max_to_keep=2) as checkpoints:
    assert checkpoints.latest_step() is None
    with pytest.raises(ValueError, match=r"no complete checkpoint in"):
      checkpoints.restore(*_templates(SMALL))
    for step in (1, 2, 3):
      params = {"w": jnp.asarray(_base(SMALL) + np.float32(step))}
      checkpoints.save(params, jax.tree.map(lambda x, s=step: x + s, tx.init(params)), step=step)
    assert checkpoints.all_steps() == [2, 3]
    _assert_restored(checkpoints.restore(*_templates(SMALL)), 3, SMALL)
    _assert_restored(checkpoints.restore(*_templates(SMALL), step=2), 2, SMALL)
    with pytest.raises(ValueError, match=r"step 1 is not saved in .*; saved steps: \[2, 3\]"):
      checkpoints.restore(*_templates(SMALL), step=1)
    with pytest.raises(ValueError, match=r"step 3 is already saved in"):
      checkpoints.save(params, tx.init(params), step=3)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]


@pytest.mark.parametrize("max_to_keep", [0, -1, 1.5, True])
def test_checkpoints_refuse_a_bad_max_to_keep_naming_it(max_to_keep, tmp_path):
  with pytest.raises(ValueError, match=r"max_to_keep must be a positive int or None, got "):
    checkpoint.Checkpoints(tmp_path, max_to_keep=max_to_keep)


def test_save_refuses_an_existing_directory_and_overwrite_replaces_it(tmp_path):
  tx = optax_adadelta.adadelta()
  directory = tmp_path / "ckpt"
  _save_small(directory)
  params = {"w": jnp.asarray(_base(SMALL) + np.float32(5))}
  opt_state = jax.tree.map(lambda x: x + 5, tx.init(params))
  with pytest.raises(ValueError, match=r"ckpt already exists; pass overwrite=True"):
    checkpoint.save(directory, params, opt_state, step=5)
  _assert_restored(checkpoint.restore(directory, *_templates(SMALL)), 1, SMALL)
  checkpoint.save(directory, params, opt_state, step=5, overwrite=True)
  _assert_restored(checkpoint.restore(directory, *_templates(SMALL)), 5, SMALL)


def test_restore_given_a_config_refuses_a_checkpoint_saved_without_one(tmp_path):
  _save_small(tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"saved without a config, but restore was given config"):
    checkpoint.restore(tmp_path / "ckpt", *_templates(SMALL), config={"rho": 0.95})
  _assert_restored(checkpoint.restore(tmp_path / "ckpt", *_templates(SMALL)), 1, SMALL)


# What the checksums cover beyond the arrays --------------------------------------------


def _save_at(directory: Path, step: int, config=None) -> None:
  """The same arrays as _save_small, at another step."""
  tx = optax_adadelta.adadelta()
  params = {"w": jnp.asarray(_base(SMALL) + np.float32(1))}
  opt_state = jax.tree.map(lambda x: x + 1, tx.init(params))
  checkpoint.save(directory, params, opt_state, step=step, config=config)


def test_a_step_that_came_from_another_save_is_refused(tmp_path):
  """Equal arrays, the step of another save: what two writers to one path could leave."""
  _save_at(tmp_path / "a", 1)
  _save_at(tmp_path / "b", 2)
  shutil.copytree(tmp_path / "b", tmp_path / "mixed")
  shutil.copy(tmp_path / "a" / "_CHECKPOINT_METADATA", tmp_path / "mixed")
  with pytest.raises(ValueError, match=r"mixed is corrupted: the bytes read back for \['step'\]"):
    checkpoint.restore(tmp_path / "mixed", *_templates(SMALL))
  _assert_restored(checkpoint.restore(tmp_path / "a", *_templates(SMALL)), 1, SMALL)


def test_a_config_edited_after_the_save_is_refused(tmp_path):
  _save_at(tmp_path / "ckpt", 1, config={"rho": 0.95})
  metadata = tmp_path / "ckpt" / "_CHECKPOINT_METADATA"
  text = metadata.read_text()
  assert text.count('"rho": 0.95') == 1
  metadata.write_text(text.replace('"rho": 0.95', '"rho": 0.9'))
  with pytest.raises(ValueError, match=r"ckpt is corrupted: its metadata .* was changed"):
    checkpoint.restore(tmp_path / "ckpt", *_templates(SMALL), config={"rho": 0.9})


def test_a_checkpoint_from_before_the_step_checksum_and_digest_still_restores(tmp_path):
  _save_at(tmp_path / "ckpt", 1, config={"rho": 0.95})
  metadata = tmp_path / "ckpt" / "_CHECKPOINT_METADATA"
  content = json.loads(metadata.read_text())
  record = content["custom_metadata"]["optax_adadelta"]
  del record["digest"], record["checksums"]["['step']"]  # what earlier releases wrote
  metadata.write_text(json.dumps(content))
  restored = checkpoint.restore(tmp_path / "ckpt", *_templates(SMALL), config={"rho": 0.95})
  _assert_restored(restored, 1, SMALL)


def test_checkpoints_refuse_a_step_below_the_latest_instead_of_skipping_it(tmp_path):
  tx = optax_adadelta.adadelta()
  params = {"w": jnp.asarray(_base(SMALL) + np.float32(3))}
  opt_state = jax.tree.map(lambda x: x + 3, tx.init(params))
  with checkpoint.Checkpoints(tmp_path) as checkpoints:
    checkpoints.save(params, opt_state, step=3)
    with pytest.raises(ValueError, match=r"step 2 is below the latest step saved in .*, 3"):
      checkpoints.save(params, opt_state, step=2)
    assert checkpoints.all_steps() == [3]
