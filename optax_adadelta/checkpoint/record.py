"""What :func:`~optax_adadelta.checkpoint.save` records beside the arrays, and the checks
:func:`~optax_adadelta.checkpoint.restore` makes with it: the signature of every leaf, the
config, the checksums and their digest; and the errors that name a damaged checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from optax_adadelta.checkpoint.checksums import checksums, record_digest

METADATA_KEY = "optax_adadelta"


class TrainState(NamedTuple):
  """What :func:`restore` returns."""

  params: optax.Params
  opt_state: optax.OptState
  step: int


def absolute(directory: str | os.PathLike) -> str:
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)  # orbax needs it


def signature(tree: Any) -> dict[str, str]:
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
def reading_checkpoint(where: str, directory: str) -> Iterator[None]:
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


def concrete(leaf: Any) -> Any:
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


def json_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
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


def checkpoint_tree(params: Any, opt_state: Any, step: int) -> dict[str, Any]:
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"step must be a Python int, got {step!r}")
  if step < 0:
    raise ValueError(f"step must be >= 0, the number of updates applied so far; got {step}")
  return {"params": params, "opt_state": opt_state, "step": int(step)}


def checkpoint_metadata(tree: Any, config: Mapping[str, Any] | None) -> dict[str, Any]:
  record = {
    "signature": signature(tree),
    "config": json_config(config),
    "checksums": checksums(tree),
  }
  return {METADATA_KEY: {**record, "digest": record_digest(record)}}


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


def check_fit(
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
  problems = _mismatches(recorded["signature"], signature(target))
  if problems:
    raise ValueError(
      f"The checkpoint at {where} does not fit the params and opt_state given to "
      "restore (a different model, optimizer configuration or accumulator dtype?):\n"
      + "\n".join(problems)
      + "\nBuild the templates with the parameters and optimizer the checkpoint was saved with."
    )
  wanted = json_config(config)
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


def check_contents(where: str, recorded: Mapping[str, Any], restored: Any) -> None:
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
