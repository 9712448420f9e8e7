"""Save and restore ``(params, opt_state, step)`` with orbax, refusing a wrong restore.

Orbax writes the arrays (sharded ones included, from every process of a multi-process
run) with tensorstore and its metadata as JSON; nothing is pickled. Orbax already rejects
a target whose tree paths differ from the checkpoint, but silently casts a leaf to the
target's dtype, and it cannot see hyper-parameters at all: ``adadelta(rho=0.9)`` and
``adadelta(rho=0.95)``, or coupled and decoupled weight decay, have states of the same
shape. :func:`save` therefore records a signature of every leaf (path, dtype, shape) and an
optional ``config`` of hyper-parameters, and :func:`restore` compares both with the target
before reading anything, raising a :class:`ValueError` that lists each difference.

The arrays go to disk without checksums (tensorstore's zarr chunks here carry none: a
flipped byte reads back as a wrong number). :func:`save` therefore also records two 32-bit
checksums of every array's bytes and of the step, computed on the global array (so they do
not depend on how it is sharded), and a SHA-256 digest of that record with the signature and
config; :func:`restore` recomputes them: any changed byte in an array file, a step from
another save, or an edited config fails the restore, naming the checkpoint and the leaf.
A metadata file cut short or garbled fails with the checkpoint's name and orbax's reason.
Not detected: a checkpoint replaced as a whole by another valid one of the same shapes.

Crash safety is orbax's: each checkpoint is written to a temporary directory and renamed
when complete, so a process killed during :func:`save` leaves no checkpoint at
``directory`` and every earlier one intact. ``overwrite=True`` is the exception: orbax
deletes the old checkpoint before writing. :class:`Checkpoints` (orbax's
``CheckpointManager``) writes each step to its own directory, keeps the last few and
restores the latest complete one: use it for periodic checkpoints of a long run.

One writer at a time: orbax's temporary directory has a fixed name, so two saves to one
path at once would write into each other's files. A save takes an exclusive lock first (a
file beside that temporary directory, ``fcntl.flock``, released by the kernel if its holder
dies; in a multi-process run process 0 holds it for all); a second save to the path in use
raises :class:`CheckpointInUseError` before writing anything. URLs (``gs://``) get no lock.

Needs the ``checkpoint`` extra: ``pip install "optax-adadelta[checkpoint]"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp

from optax_adadelta.checkpoint.lock import LOCK_SUFFIX, CheckpointInUseError, one_writer
from optax_adadelta.checkpoint.manager import Checkpoints
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

__all__ = ["CheckpointInUseError", "Checkpoints", "TrainState", "restore", "save"]


def save(
  directory: str | os.PathLike,
  params: optax.Params,
  opt_state: optax.OptState,
  step: int,
  *,
  config: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> None:
  """Writes a checkpoint of ``(params, opt_state, step)`` into a new ``directory``.

  Every process of a multi-process run must call it with its (global) arrays. The
  checkpoint appears at ``directory`` only once complete (orbax writes a temporary
  directory and renames it), so a crash during the save leaves earlier checkpoints intact.

  Args:
    directory: where to write; must not exist unless ``overwrite``.
    params: the parameters, a pytree of arrays (sharded or not).
    opt_state: the optimizer state, as returned by ``tx.init`` / ``tx.update``.
    step: the number of updates applied so far.
    config: optional hyper-parameters (JSON values) that :func:`restore` will require
      to be equal, e.g. ``{"rho": 0.95, "eps": 1e-6, "learning_rate": 1.0}``.
    overwrite: replace an existing checkpoint at ``directory``. Orbax deletes the old one
      first, so a crash during this save loses both: prefer a new directory per save
      (:class:`Checkpoints`).

  Raises:
    ValueError: ``directory`` exists and ``overwrite`` is False.
    CheckpointInUseError: another save to ``directory`` is in progress (in any process
      that uses this module); nothing was written.
    PermissionError: the directory that holds ``directory`` is not writable.
    TypeError: ``step`` is not an int, or ``config`` holds values JSON cannot represent.
  """
  tree = checkpoint_tree(params, opt_state, step)
  metadata = checkpoint_metadata(tree, config)
  directory = absolute(directory)

  def refuse_an_existing_checkpoint() -> None:
    if not overwrite and os.path.exists(directory):
      raise ValueError(
        f"directory {directory} already exists; pass overwrite=True to replace the "
        "checkpoint there, or save to a new directory"
      )

  # The lock file sits where orbax puts its temporary directory: <directory>.orbax-...-tmp.
  lock = one_writer(directory + LOCK_SUFFIX, directory, refuse_an_existing_checkpoint)
  with lock, ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree, force=overwrite, custom_metadata=metadata)


def restore(
  directory: str | os.PathLike,
  params: optax.Params,
  opt_state: optax.OptState,
  *,
  config: Mapping[str, Any] | None = None,
) -> TrainState:
  """Reads a checkpoint written by :func:`save` into the structure of the templates.

  The checkpoint may have been written by any number of processes with any shardings:
  each array is read into its template's sharding (for example, a 2-process checkpoint
  into one process, or a replicated state into the ZeRO layout of
  :func:`optax_adadelta.sharding.state_shardings`).

  Args:
    directory: a checkpoint written by :func:`save`.
    params: a template of the parameters: arrays or ``jax.ShapeDtypeStruct`` objects. Each
      restored array takes its template's sharding, which may differ from the saved one.
    opt_state: a template of the state, e.g. ``jax.eval_shape(tx.init, params)`` for the
      optimizer to resume (with ``Explicit`` mesh axes it carries the shardings; call
      restore inside ``jax.set_mesh(mesh)`` then), or ``tx.init(params)``.
    config: if given, must equal the ``config`` the checkpoint was saved with.

  Returns:
    A :class:`TrainState` ``(params, opt_state, step)``.

  Raises:
    ValueError: the checkpoint's leaves (paths, dtypes, shapes) or config differ from the
      templates'; the message lists every difference. Or the checkpoint is missing,
      damaged (a metadata file cut short) or corrupted (array bytes changed since the
      save); the message names the checkpoint and what is wrong.
  """
  directory = absolute(directory)
  target = {"params": params, "opt_state": opt_state, "step": 0}
  with ocp.StandardCheckpointer() as checkpointer:
    with reading_checkpoint(directory, directory):
      recorded = (checkpointer.metadata(directory).custom_metadata or {}).get(METADATA_KEY)
    recorded = check_fit(directory, directory, recorded, target, config)
    abstract = jax.tree.map(concrete, target)
    with reading_checkpoint(directory, directory):
      restored = checkpointer.restore(directory, abstract)
  check_contents(directory, recorded, restored)
  return TrainState(restored["params"], restored["opt_state"], int(restored["step"]))
