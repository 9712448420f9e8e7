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

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from optax_adadelta._checkpoint_checksums import checksums, record_digest
from optax_adadelta._checkpoint_lock import LOCK_SUFFIX, CheckpointInUseError, one_writer

__all__ = ["CheckpointInUseError", "Checkpoints", "TrainState", "restore", "save"]

_KEY = "optax_adadelta"


class TrainState(NamedTuple):
  """What :func:`restore` returns."""

  params: optax.Params
  opt_state: optax.OptState
  step: int


def _absolute(directory: str | os.PathLike) -> str:
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)  # orbax needs it


def _signature(tree: Any) -> dict[str, str]:
  """``{path: "float32[8,6]"}`` for every leaf (arrays, ShapeDtypeStructs or numbers)."""

  def describe(leaf: Any) -> str:
    if not hasattr(leaf, "dtype"):  # a Python number such as the step
      return type(leaf).__name__
    dims = ",".join(str(d) for d in np.shape(leaf))
    return f"{np.dtype(leaf.dtype).name}[{dims}]"

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): describe(leaf) for path, leaf in leaves}


# Errors -------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(where: str, directory: str) -> Iterator[None]:
  """Orbax's and tensorstore's errors on a damaged checkpoint, as one that names it."""
  try:
    yield
  except Exception as error:  # tensorstore raises plain Exceptions; JSON and OS errors too
    reason = " ".join(str(error).split())
    reason = reason if len(reason) <= 400 else reason[:400] + " ..."
    if "://" not in directory and not os.path.exists(directory):
      raise ValueError(
        f"There is no checkpoint at {where}: the directory does not exist (a save that was "
        "interrupted leaves only a temporary directory next to it)."
      ) from error
    if "Topology mismatch" in reason or "devices are different" in reason:
      raise ValueError(
        f"The checkpoint at {where} was saved on other devices, and a template leaf has "
        "no sharding to restore it with: give every leaf of params and opt_state a "
        "sharding for these devices (jax.ShapeDtypeStruct(shape, dtype, sharding=...); "
        "jax.eval_shape under Explicit mesh axes, or sharding.state_shardings, give them)."
      ) from error
    raise ValueError(
      f"The checkpoint at {where} cannot be read, damaged or incomplete? "
      f"{type(error).__name__}: {reason} -- restore an earlier checkpoint."
    ) from error


def _concrete(leaf: Any) -> Any:
  """The leaf's ShapeDtypeStruct, on the current mesh if its sharding names an abstract one."""
  leaf = ocp.utils.to_shape_dtype_struct(leaf)
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding) or not isinstance(
    sharding.mesh, jax.sharding.AbstractMesh
  ):
    return leaf
  mesh = jax.sharding.get_mesh()
  if mesh.empty or mesh.abstract_mesh != sharding.mesh:
    raise ValueError(
      f"A template's sharding is on the abstract mesh {sharding.mesh} (from jax.eval_shape) "
      f"but the current mesh is {mesh}; call restore inside `with jax.set_mesh(mesh):` "
      "with the mesh the templates were made for."
    )
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding.update(mesh=mesh))


def _json_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
  if config is None:
    return None
  try:
    # allow_nan=False: NaN != NaN, so a config holding one could never be confirmed.
    return json.loads(json.dumps(dict(config), sort_keys=True, allow_nan=False))
  except (TypeError, ValueError) as err:
    raise TypeError(
      "config must map names to JSON values (finite numbers, strings, booleans, lists, dicts); "
      f"got {config!r}. Pass str(dtype) for a dtype, a name for a schedule."
    ) from err


def _tree(params: Any, opt_state: Any, step: int) -> dict[str, Any]:
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"step must be a Python int, got {step!r}")
  if step < 0:
    raise ValueError(f"step must be >= 0, the number of updates applied so far; got {step}")
  return {"params": params, "opt_state": opt_state, "step": int(step)}


def _record(tree: Any, config: Mapping[str, Any] | None) -> dict[str, Any]:
  record = {
    "signature": _signature(tree),
    "config": _json_config(config),
    "checksums": checksums(tree),
  }
  return {_KEY: {**record, "digest": record_digest(record)}}


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
  tree = _tree(params, opt_state, step)
  metadata = _record(tree, config)
  directory = _absolute(directory)

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


def _mismatches(saved: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
  lines = []
  for path in sorted(saved.keys() | wanted.keys()):
    if path not in wanted:
      lines.append(f"  {path}: {saved[path]} in the checkpoint, absent from the target")
    elif path not in saved:
      lines.append(f"  {path}: {wanted[path]} in the target, absent from the checkpoint")
    elif saved[path] != wanted[path]:
      lines.append(f"  {path}: {saved[path]} in the checkpoint, {wanted[path]} in the target")
  return lines


def _why_unrecorded(directory: str) -> str:
  """Why a checkpoint's metadata holds no signature: the file is damaged, or not ours."""
  path = os.path.join(directory, "_CHECKPOINT_METADATA")
  if "://" not in directory and not os.path.isdir(directory):
    return (
      "does not exist: there is no directory there (a save that was interrupted leaves "
      "only a temporary directory next to it)."
    )
  if "://" not in directory:
    try:
      with open(path, encoding="utf-8") as file:
        json.load(file)
    except FileNotFoundError:
      return f"has no metadata file {path} (deleted, or not copied?); restore an earlier one."
    except (ValueError, OSError) as error:
      return (
        f"has a damaged metadata file {path} (cut short or garbled: {error}); "
        "restore an earlier checkpoint."
      )
  return (
    "was not written by optax_adadelta.checkpoint.save (no signature recorded in its "
    "metadata); restore it with orbax directly."
  )


def _check_fit(
  where: str,
  directory: str,
  recorded: Any,
  target: Any,
  config: Mapping[str, Any] | None,
) -> Mapping[str, Any]:
  """Refuses, before reading any array, a checkpoint that does not fit the templates;
  returns what save recorded."""
  if not isinstance(recorded, Mapping) or "signature" not in recorded:
    raise ValueError(f"The checkpoint at {where} {_why_unrecorded(directory)}")
  if "digest" in recorded and recorded["digest"] != record_digest(recorded):
    raise ValueError(
      f"The checkpoint at {where} is corrupted: its metadata (signature, config or "
      "checksums) was changed after the save. Restore an earlier checkpoint."
    )
  problems = _mismatches(recorded["signature"], _signature(target))
  if problems:
    raise ValueError(
      f"The checkpoint at {where} does not fit the params and opt_state given to "
      "restore (a different model, optimizer configuration or accumulator dtype?):\n"
      + "\n".join(problems)
      + "\nBuild the templates with the parameters and optimizer the checkpoint was saved with."
    )
  wanted = _json_config(config)
  if wanted is not None and recorded["config"] is None:
    raise ValueError(
      f"The checkpoint at {where} was saved without a config, but restore was given "
      f"config {wanted}: nothing recorded can confirm these hyper-parameters. Restore "
      "without config (and check them yourself), or save with config next time."
    )
  if wanted is not None and wanted != recorded["config"]:
    raise ValueError(
      f"The checkpoint at {where} was saved with config {recorded['config']}, "
      f"but restore was given config {wanted}. Resume with the saved hyper-parameters."
    )
  return recorded


def _check_contents(where: str, recorded: Mapping[str, Any], restored: Any) -> None:
  """Refuses arrays whose bytes differ from those saved (checkpoints with checksums)."""
  saved = recorded.get("checksums")
  if saved is None:
    return
  read = checksums(restored)
  damaged = sorted(path for path in saved if read.get(path) != saved[path])
  if damaged:
    raise ValueError(
      f"The checkpoint at {where} is corrupted: the bytes read back for "
      f"{', '.join(damaged)} differ from those saved (checksum {read.get(damaged[0])} "
      f"read, {saved[damaged[0]]} saved). Its array files were changed after the save, "
      "or mixed with another save's; restore an earlier checkpoint."
    )


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
  directory = _absolute(directory)
  target = {"params": params, "opt_state": opt_state, "step": 0}
  with ocp.StandardCheckpointer() as checkpointer:
    with _reading(directory, directory):
      recorded = (checkpointer.metadata(directory).custom_metadata or {}).get(_KEY)
    recorded = _check_fit(directory, directory, recorded, target, config)
    abstract = jax.tree.map(_concrete, target)
    with _reading(directory, directory):
      restored = checkpointer.restore(directory, abstract)
  _check_contents(directory, recorded, restored)
  return TrainState(restored["params"], restored["opt_state"], int(restored["step"]))


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
    self.directory = _absolute(directory)
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
    tree = _tree(params, opt_state, step)
    metadata = _record(tree, config)
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
    with _reading(where, path):
      recorded = (self._manager.metadata(step).custom_metadata or {}).get(_KEY)
    recorded = _check_fit(where, path, recorded, target, config)
    abstract = jax.tree.map(_concrete, target)
    with _reading(where, path):
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    _check_contents(where, recorded, restored)
    return TrainState(restored["params"], restored["opt_state"], int(restored["step"]))
