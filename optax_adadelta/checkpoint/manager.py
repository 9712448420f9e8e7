"""Periodic checkpoints of one run: orbax's ``CheckpointManager`` with the checks of
:func:`~optax_adadelta.checkpoint.save` and :func:`~optax_adadelta.checkpoint.restore`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp

from optax_adadelta.checkpoint.lock import LOCK_SUFFIX, one_writer
from optax_adadelta.checkpoint.record import (
  METADATA_KEY,
  TrainState,
  absolute,
  check_contents,
  check_fit,
  checkpoint_metadata,
  checkpoint_tree,
  concrete,
  reading_checkpoint,
)


class Checkpoints:
  """Periodic checkpoints of one run in ``directory/<step>``: orbax's ``CheckpointManager``
  with the signature, config and checksum checks of :func:`save` and :func:`restore`.

  Each step is written to a temporary directory and renamed when complete, so a crash
  during a save leaves the earlier steps restorable and :meth:`restore` takes the latest
  complete one. Only the last ``max_to_keep`` steps are kept::

    with checkpoint.Checkpoints("/ckpt", max_to_keep=3) as checkpoints:
      if checkpoints.latest_step() is not None:
        params, opt_state, start = checkpoints.restore(abstract_params, abstract_state)
      ...
      checkpoints.save(params, opt_state, step)

  Every process of a multi-process run must make the same calls.

  Args:
    directory: the run's checkpoint directory (created if missing).
    max_to_keep: how many of the latest steps to keep; ``None`` keeps all.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
    if max_to_keep is not None and (
      isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
      raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
    self.directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=False,
      # What a killed save left behind: save() removes it under its lock, as orbax's
      # cleanup here could delete the directory another process is saving into.
      cleanup_tmp_directories="://" in self.directory,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def close(self) -> None:
    self._manager.close()

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints, in increasing order."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The latest complete step, or None if there is none yet."""
    return self._manager.latest_step()

  def save(
    self,
    params: optax.Params,
    opt_state: optax.OptState,
    step: int,
    *,
    config: Mapping[str, Any] | None = None,
  ) -> None:
    """Writes ``directory/<step>`` (as :func:`save` does), then drops the oldest steps
    beyond ``max_to_keep``.

    Raises:
      ValueError: that step, or a later one, is already saved.
      CheckpointInUseError: another process (or thread) is saving into ``directory``;
        nothing was written.
      PermissionError: ``directory`` is not writable.
    """
    tree = checkpoint_tree(params, opt_state, step)
    metadata = checkpoint_metadata(tree, config)
    with one_writer(
      os.path.join(self.directory, LOCK_SUFFIX), self.directory, lambda: self._check_new(step)
    ):
      self._manager.reload()  # process 0 did in _check_new; the others see its checks' result
      saved = self._manager.save(
        tree["step"], args=ocp.args.StandardSave(tree), custom_metadata=metadata
      )
      self._manager.wait_until_finished()
    if not saved:
      raise ValueError(f"orbax declined to save step {step} in {self.directory}")

  def _check_new(self, step: int) -> None:
    """Refuses a step saved already, or below the latest (orbax would skip it silently),
    and removes the temporary directories of killed saves: run under the save's lock."""
    self._manager.reload()  # another process may have saved since
    steps = self.all_steps()
    if step in steps:
      raise ValueError(
        f"step {step} is already saved in {self.directory}; checkpoints of one run "
        "have increasing steps"
      )
    if steps and steps[-1] > step:
      raise ValueError(
        f"step {step} is below the latest step saved in {self.directory}, {steps[-1]}; "
        "checkpoints of one run have increasing steps (save a restarted run elsewhere)"
      )
    if "://" not in self.directory:
      for name in os.listdir(self.directory):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def restore(
    self,
    params: optax.Params,
    opt_state: optax.OptState,
    *,
    step: int | None = None,
    config: Mapping[str, Any] | None = None,
  ) -> TrainState:
    """Reads ``step`` (by default the latest complete one) into the templates' structure
    and shardings, with the checks of :func:`restore`."""
    steps = self.all_steps()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise ValueError(f"There is no complete checkpoint in {self.directory} to restore")
    elif step not in steps:
      raise ValueError(f"step {step!r} is not saved in {self.directory}; saved steps: {steps}")
    where = f"{self.directory}, step {step} (steps saved: {steps})"
    target = {"params": params, "opt_state": opt_state, "step": 0}
    path = os.path.join(self.directory, str(step))
    with reading_checkpoint(where, path):
      recorded = (self._manager.metadata(step).custom_metadata or {}).get(METADATA_KEY)
    recorded = check_fit(where, path, recorded, target, config)
    abstract = jax.tree.map(concrete, target)
    with reading_checkpoint(where, path):
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    check_contents(where, recorded, restored)
    return TrainState(restored["params"], restored["opt_state"], int(restored["step"]))
