"""Save and restore ``(params, opt_state, step)`` with orbax, refusing a wrong restore.

Orbax writes the arrays (sharded ones included, from every process of a multi-process
run) with tensorstore and its metadata as JSON; nothing is pickled. Orbax already rejects
a target whose tree paths differ from the checkpoint, but silently casts a leaf to the
target's dtype, and it cannot see hyper-parameters at all: ``adadelta(rho=0.9)`` and
``adadelta(rho=0.95)``, or coupled and decoupled weight decay, have states of the same
shape. :func:`save` therefore records a signature of every leaf (path, dtype, shape) and an
optional ``config`` of hyper-parameters, and :func:`restore` compares both with the target
before reading anything, raising a :class:`ValueError` that lists each difference.

Needs the ``checkpoint`` extra: ``pip install "optax-adadelta[checkpoint]"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

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
    return json.loads(json.dumps(dict(config), sort_keys=True))
  except (TypeError, ValueError) as err:
    raise TypeError(
      "config must map names to JSON values (numbers, strings, booleans, lists, dicts); "
      f"got {dict(config)!r}. Pass str(dtype) for a dtype, a name for a schedule."
    ) from err


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

  Every process of a multi-process run must call it with its (global) arrays.

  Args:
    directory: where to write; must not exist unless ``overwrite``.
    params: the parameters, a pytree of arrays (sharded or not).
    opt_state: the optimizer state, as returned by ``tx.init`` / ``tx.update``.
    step: the number of updates applied so far.
    config: optional hyper-parameters (JSON values) that :func:`restore` will require
      to be equal, e.g. ``{"rho": 0.95, "eps": 1e-6, "learning_rate": 1.0}``.
    overwrite: replace an existing checkpoint at ``directory``.
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"step must be a Python int, got {step!r}")
  tree = {"params": params, "opt_state": opt_state, "step": int(step)}
  metadata = {_KEY: {"signature": _signature(tree), "config": _json_config(config)}}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(_absolute(directory), tree, force=overwrite, custom_metadata=metadata)


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


def restore(
  directory: str | os.PathLike,
  params: optax.Params,
  opt_state: optax.OptState,
  *,
  config: Mapping[str, Any] | None = None,
) -> TrainState:
  """Reads a checkpoint written by :func:`save` into the structure of the templates.

  Args:
    directory: a checkpoint written by :func:`save`.
    params: a template of the parameters: arrays or ``jax.ShapeDtypeStruct``s. Each
      restored array takes its template's sharding, which may differ from the saved one.
    opt_state: a template of the state, e.g. ``jax.eval_shape(tx.init, params)`` for the
      optimizer to resume (with ``Explicit`` mesh axes it carries the shardings; call
      restore inside ``jax.set_mesh(mesh)`` then), or ``tx.init(params)``.
    config: if given, must equal the ``config`` the checkpoint was saved with.

  Returns:
    A :class:`TrainState` ``(params, opt_state, step)``.

  Raises:
    ValueError: the checkpoint's leaves (paths, dtypes, shapes) or config differ from the
      templates'; the message lists every difference.
  """
  directory = _absolute(directory)
  target = {"params": params, "opt_state": opt_state, "step": 0}
  with ocp.StandardCheckpointer() as checkpointer:
    recorded = (checkpointer.metadata(directory).custom_metadata or {}).get(_KEY)
    if recorded is None:
      raise ValueError(
        f"{directory} was not written by optax_adadelta.checkpoint.save (no signature "
        "recorded); restore it with orbax directly."
      )
    problems = _mismatches(recorded["signature"], _signature(target))
    if problems:
      raise ValueError(
        f"The checkpoint at {directory} does not fit the params and opt_state given to "
        "restore (a different model, optimizer configuration or accumulator dtype?):\n"
        + "\n".join(problems)
        + "\nBuild the templates with the parameters and optimizer the checkpoint was saved with."
      )
    wanted = _json_config(config)
    if wanted is not None and wanted != recorded["config"]:
      raise ValueError(
        f"The checkpoint at {directory} was saved with config {recorded['config']}, "
        f"but restore was given config {wanted}. Resume with the saved hyper-parameters."
      )
    restored = checkpointer.restore(directory, jax.tree.map(_concrete, target))
  return TrainState(restored["params"], restored["opt_state"], int(restored["step"]))
