"""Adadelta state to and from PyTorch's ``state_dict``, Keras's optimizer variables and
TensorFlow.js's ``optimizer.getWeights()``.

A run started in PyTorch, Keras or TF.js continues here with the same next steps, and back:

  opt_state = interop.from_torch(tx.init(params), torch_optimizer.state_dict())
  torch_optimizer.load_state_dict(interop.to_torch(opt_state, torch_optimizer.state_dict()))
  opt_state = interop.from_keras(tx.init(params), keras_optimizer)
  interop.to_keras(opt_state, keras_optimizer)
  opt_state = interop.from_tfjs(tx.init(params), weights)   # [(name, array), ...]
  weights = interop.to_tfjs(opt_state)                      # for optimizer.setWeights

Parameters are matched by position: the leaves of the optax state, in ``jax.tree.leaves``
order, against PyTorch's parameter indices (in ``param_groups`` order) or Keras's
trainable variables (the order the optimizer was built with). Shapes must match exactly
(a PyTorch ``Linear`` weight is (out, in), a Flax ``Dense`` kernel (in, out): transpose
the parameters themselves first). PyTorch's per-parameter ``step``, Keras's and TF.js's
``iterations`` go to the step counters the optax state has (a learning-rate schedule's,
the parameter EMA's; ``presets.tfjs`` always has one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_adadelta import formats
from optax_adadelta.transforms import ParamsEmaState

_COUNTED = (optax.ScaleByScheduleState, ParamsEmaState)


class _Found(NamedTuple):  # the one Adadelta state in an optax state
  state: Any
  format: Any
  e_g2: Any
  e_dx2: Any


def _adadelta_state(opt_state: Any, loading: bool = False) -> _Found:
  """The one Adadelta state in opt_state; its format says what it holds (or why not)."""
  found = _nodes(opt_state, formats.is_state)
  if len(found) != 1:
    raise ValueError(
      f"opt_state must hold exactly one ScaleByAdadeltaState, found {len(found)}; "
      "pass the state of an optax_adadelta optimizer (adadelta() or a preset)"
    )
  fmt = formats.format_of(found[0])
  assert fmt is not None
  e_g2, e_dx2 = fmt.averages(found[0])  # raises for a format that does not convert
  if loading:  # a format that cannot be loaded refuses now, before anything is converted
    fmt.with_averages(found[0], e_g2, e_dx2)
  return _Found(found[0], fmt, e_g2, e_dx2)


def _replace(ours: _Found, opt_state: Any, e_g2: list, e_dx2: list, step, ema=None):
  """A copy of opt_state with new Adadelta leaves, step counters and EMA."""
  unflatten = lambda leaves: jax.tree.unflatten(jax.tree.structure(ours.e_g2), leaves)
  new = ours.format.with_averages(ours.state, unflatten(e_g2), unflatten(e_dx2))

  def swap(node):
    if formats.is_state(node):
      return new
    if isinstance(node, ParamsEmaState) and step is not None:
      average = node.ema if ema is None else jax.tree.unflatten(jax.tree.structure(node.ema), ema)
      return ParamsEmaState(steps=jnp.asarray(step, jnp.int32), ema=average)
    if isinstance(node, optax.ScaleByScheduleState) and step is not None:
      return optax.ScaleByScheduleState(count=jnp.asarray(step, jnp.int32))
    return node

  is_leaf = lambda x: formats.is_state(x) or isinstance(x, _COUNTED)
  return jax.tree.map(swap, opt_state, is_leaf=is_leaf)


def _checked(values: list, like: list, source: str, field: str | None = None) -> list:
  """values converted to the dtypes of `like`, after checking count, shapes and (with the
  name of an average as `field`) that they are finite and >= 0, as averages of squares are."""
  if len(values) != len(like):
    raise ValueError(
      f"{source} has state for {len(values)} parameters but the optax state has {len(like)} "
      "leaves; build both optimizers on the same parameters, in the same order"
    )
  out = []
  for i, (value, ref) in enumerate(zip(values, like, strict=True)):
    value = np.asarray(value)
    if value.shape != ref.shape:
      raise ValueError(
        f"parameter {i}: {source} has shape {value.shape} but the optax state has {ref.shape}"
      )
    if np.iscomplexobj(value) != jnp.iscomplexobj(ref):
      raise TypeError(
        f"parameter {i}: {source} has dtype {value.dtype}, the optax state {ref.dtype}; "
        "complex and real state do not convert into each other: build the optax state on "
        "parameters of the same kind"
      )
    parts = (value.real, value.imag) if np.iscomplexobj(value) else (value,)
    if field is not None and not all(np.all(np.isfinite(x) & (x >= 0)) for x in parts):
      bad = next(x for x in parts if not np.all(np.isfinite(x) & (x >= 0)))
      worst = bad[~(np.isfinite(bad) & (bad >= 0))].ravel()[0]
      raise ValueError(
        f"parameter {i}: {source} has {field} = {worst} at some coordinate, but an average of "
        "squares is finite and >= 0: the state is damaged, or not an Adadelta state"
      )
    out.append(jnp.asarray(value, ref.dtype))
  return out


def _parameter_indices(state_dict: Any, what: str, keys: tuple[str, ...] = ()) -> list:
  """The parameter indices of a state_dict's param_groups, in order, or a clear error; the
  state_dict must also have `keys`."""
  dict_like = isinstance(state_dict, dict) and set(keys) <= set(state_dict)
  if not dict_like or not isinstance(state_dict.get("param_groups"), list):
    got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
    raise ValueError(
      f"{what} must be torch.optim.Adadelta(...).state_dict(), a dict with 'state' and a "
      f"list 'param_groups'; got {got}"
    )
  indices = []
  for n, group in enumerate(state_dict["param_groups"]):
    if not isinstance(group, dict) or not isinstance(group.get("params"), list):
      raise ValueError(
        f"{what}['param_groups'][{n}] must be a dict with a list 'params' of parameter "
        f"indices, got {group!r}"
      )
    indices += group["params"]
  return indices


def _check_torch_count(indices: list, like: list) -> None:
  if len(indices) != len(like):
    raise ValueError(
      f"the PyTorch optimizer has {len(indices)} parameters but the optax state has "
      f"{len(like)} leaves; build both on the same parameters, in the same order"
    )


def _export_step(opt_state: Any, step: Any) -> int:
  """The step count to export: `step`, else the optax state's own counter (if it has one)."""
  step = _step_count(opt_state) if step is None else step
  if step is None:
    raise ValueError("this optax state counts no steps: pass step=<number of steps taken>")
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be an int >= 0, the number of steps taken; got {step!r}")
  return int(step)


def _torch_step(step: Any, what: str) -> int:
  """A step count: a whole number >= 0 (PyTorch keeps it as a float tensor)."""
  try:
    value = math.nan if isinstance(step, (bool, str, bytes)) else float(_to_numpy(step))
  except (TypeError, ValueError):  # not a number, or not one number
    value = math.nan
  if not (math.isfinite(value) and value >= 0 and value == int(value)):
    raise ValueError(f"{what} must be a whole number >= 0, got {step!r}")
  return int(value)


def _nodes(tree: Any, test: Callable[[Any], bool]) -> list:
  """The nodes of `tree` that pass `test`, in ``jax.tree.leaves`` order."""
  return [node for node in jax.tree.leaves(tree, is_leaf=test) if test(node)]


def _step_count(opt_state: Any) -> int | None:
  counted = _nodes(opt_state, lambda x: isinstance(x, _COUNTED))
  if not counted:
    return None
  first = counted[0]
  return int(first.steps if isinstance(first, ParamsEmaState) else first.count)


def _to_numpy(x: Any) -> np.ndarray:
  return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


# PyTorch ------------------------------------------------------------------------------


def from_torch(opt_state: Any, state_dict: dict) -> Any:
  """``opt_state`` with E[g²], E[Δx²] and the step taken from ``torch.optim.Adadelta``'s
  ``state_dict()`` (``square_avg``, ``acc_delta``, ``step``)."""
  indices = _parameter_indices(state_dict, "state_dict", keys=("state",))
  ours = _adadelta_state(opt_state, loading=True)
  like = jax.tree.leaves(ours.e_g2)
  _check_torch_count(indices, like)
  if not isinstance(state_dict["state"], dict):
    kind = type(state_dict["state"]).__name__
    raise ValueError(f"state_dict['state'] must be a dict of per-parameter state, got {kind}")
  # Keys that name no parameter (strings after a JSON round trip, say) would load as zeros.
  unknown = [k for k in state_dict["state"] if k not in indices]
  if unknown:
    raise ValueError(
      f"state_dict['state'] has state for {unknown!r}, which are not parameter indices of "
      f"its param_groups ({indices}): is it a state_dict of this optimizer, with int keys?"
    )
  per_param = [state_dict["state"].get(i, {}) for i in indices]
  for i, state in zip(indices, per_param, strict=True):
    missing = {"square_avg", "acc_delta", "step"} - set(state)
    if state and missing:
      raise ValueError(
        f"PyTorch parameter {i} has no {sorted(missing)}: is this an Adadelta state?"
      )
  zeros = [np.zeros(r.shape, r.dtype) for r in like]  # for parameters without state yet
  arrays = lambda key: [_to_numpy(s[key]) if s else zeros[n] for n, s in enumerate(per_param)]
  read = lambda key: _checked(arrays(key), like, "the PyTorch state_dict", key)
  steps = {
    _torch_step(s["step"], f"the step of PyTorch parameter {i}")
    for i, s in zip(indices, per_param, strict=True)
    if s
  }
  if len(steps) > 1:
    raise ValueError(
      f"PyTorch parameters have different step counts {sorted(steps)}; the optax state "
      "keeps one count for all: convert a state whose parameters all took the same steps"
    )
  return _replace(
    ours,
    opt_state,
    read("square_avg"),
    read("acc_delta"),
    steps.pop() if steps else 0,
  )


def to_torch(opt_state: Any, template: dict, step: int | None = None) -> dict:
  """A ``state_dict`` for ``torch.optim.Adadelta.load_state_dict``.

  Args:
    opt_state: the optax state.
    template: the target optimizer's own ``state_dict()``; its ``param_groups``
      (hyper-parameters and parameter indices) are kept.
    step: the step count to record; by default the optax state's own counter, if it
      has one (a learning-rate schedule or parameter EMA), else required.
  """
  import torch

  indices = _parameter_indices(template, "template")
  ours = _adadelta_state(opt_state)
  e_g2, e_dx2 = jax.tree.leaves(ours.e_g2), jax.tree.leaves(ours.e_dx2)
  _check_torch_count(indices, e_g2)
  step = _export_step(opt_state, step)
  state = {
    i: {
      "step": torch.tensor(float(step)),
      "square_avg": torch.from_numpy(np.array(a)),
      "acc_delta": torch.from_numpy(np.array(b)),
    }
    for i, a, b in zip(indices, e_g2, e_dx2, strict=True)
  }
  return {"state": state, "param_groups": [dict(g) for g in template["param_groups"]]}


# Keras --------------------------------------------------------------------------------


def _keras_slots(optimizer: Any) -> dict[str, list]:
  if not getattr(optimizer, "built", False):
    raise ValueError("build the Keras optimizer first: optimizer.build(model.trainable_variables)")
  steps = getattr(optimizer, "gradient_accumulation_steps", None)
  if steps:
    raise ValueError(
      f"the Keras optimizer has gradient_accumulation_steps={steps}, and its gradient "
      "accumulators are not converted; convert an optimizer built with "
      "gradient_accumulation_steps=None (between accumulation cycles the averages are the same)"
    )
  return {
    "e_g2": list(optimizer._accumulated_grads),
    "e_dx2": list(optimizer._accumulated_delta_vars),
    "ema": list(getattr(optimizer, "_model_variables_moving_average", None) or []),
  }


def from_keras(opt_state: Any, optimizer: Any) -> Any:
  """``opt_state`` with the state of a built ``keras.optimizers.Adadelta``:
  ``accumulated_grad``, ``accumulated_delta_var``, ``iterations`` and, with
  ``use_ema``, the parameter averages."""
  slots = _keras_slots(optimizer)
  ours = _adadelta_state(opt_state, loading=True)
  like = jax.tree.leaves(ours.e_g2)
  convert = lambda variables, field=None: _checked(
    [_to_numpy(v.value) for v in variables], like, "the Keras optimizer", field
  )
  ema = convert(slots["ema"]) if slots["ema"] else None
  return _replace(
    ours,
    opt_state,
    convert(slots["e_g2"], "accumulated_grad"),
    convert(slots["e_dx2"], "accumulated_delta_var"),
    int(_to_numpy(optimizer.iterations)),
    ema,
  )


def to_keras(opt_state: Any, optimizer: Any, step: int | None = None) -> None:
  """Writes the optax state into a built ``keras.optimizers.Adadelta`` (in place).

  ``iterations`` becomes ``step``, by default the optax state's own counter if it has one
  (it matters to Keras for learning-rate schedules and the EMA).
  """
  slots = _keras_slots(optimizer)
  ours = _adadelta_state(opt_state)
  if step is not None or _step_count(opt_state) is not None:  # checked before any write
    step = _export_step(opt_state, step)
  for name, values in (("e_g2", ours.e_g2), ("e_dx2", ours.e_dx2)):
    leaves = jax.tree.leaves(values)
    _checked([_to_numpy(v.value) for v in slots[name]], leaves, "the Keras optimizer")
    for variable, value in zip(slots[name], leaves, strict=True):
      variable.assign(np.asarray(value))
  if step is not None:
    optimizer.iterations.assign(step)
  averages = _nodes(opt_state, lambda x: isinstance(x, ParamsEmaState))
  if slots["ema"] and averages:
    for variable, value in zip(slots["ema"], jax.tree.leaves(averages[0].ema), strict=True):
      variable.assign(np.asarray(value))


# TensorFlow.js ----------------------------------------------------------------------------

_TFJS_SUFFIXES = ("/accum_grad", "/accum_var")  # adadelta_optimizer.js, applyGradients


def _tfjs_pairs(weights: Any) -> list[tuple[str, np.ndarray]]:
  """(name, array) pairs from [(name, array), ...] or [{"name", "tensor"}, ...]."""
  if isinstance(weights, (str, bytes, dict)) or not hasattr(weights, "__iter__"):
    raise ValueError(
      "weights must be the list TF.js's optimizer.getWeights() returns, as (name, array) "
      f"pairs or {{'name', 'tensor'}} dicts; got {type(weights).__name__}"
    )
  pairs = []
  for i, item in enumerate(weights):
    if isinstance(item, dict) and {"name", "tensor"} <= set(item):
      name, value = item["name"], item["tensor"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
      name, value = item
    else:
      raise ValueError(f"weights[{i}] must be a (name, array) pair or {{'name', 'tensor'}}")
    pairs.append((str(name), _to_numpy(value)))
  return pairs


def from_tfjs(opt_state: Any, weights: Any) -> Any:
  """``opt_state`` with the state of TF.js's ``tf.train.adadelta``: ``iter``, then each
  variable's ``<name>/accum_grad``, then each ``<name>/accum_var``, in the order of
  ``optimizer.getWeights()`` (tfjs-core 4.22). A flat (1-D) array of the right size is
  reshaped to its leaf's shape; any other shape must match exactly."""
  pairs = _tfjs_pairs(weights)
  ours = _adadelta_state(opt_state, loading=True)
  like = jax.tree.leaves(ours.e_g2)
  if not pairs or pairs[0][0] != "iter":
    first = pairs[0][0] if pairs else None
    raise ValueError(
      f"weights must start with TF.js's iteration count 'iter', got {first!r}: pass "
      "optimizer.getWeights() of tf.train.adadelta unchanged"
    )
  step = _torch_step(pairs[0][1], "the TF.js iteration count 'iter'")
  rest = pairs[1:]
  if len(rest) != 2 * len(like):
    raise ValueError(
      f"TF.js saved {len(rest)} accumulators, but the optax state has {len(like)} leaves, "
      f"which need {2 * len(like)} (an accum_grad and an accum_var each); build both "
      "optimizers on the same variables, in the same order"
    )
  halves = rest[: len(like)], rest[len(like) :]
  for suffix, half in zip(_TFJS_SUFFIXES, halves, strict=True):
    for name, _ in half:
      if not name.endswith(suffix):
        raise ValueError(
          f"TF.js weight {name!r} is where tf.train.adadelta keeps a '*{suffix}': "
          "is this the state of an Adadelta optimizer?"
        )
  fit = lambda half: [
    value.reshape(ref.shape) if value.ndim == 1 and value.size == ref.size else value
    for (_, value), ref in zip(half, like, strict=True)
  ]
  return _replace(
    ours,
    opt_state,
    _checked(fit(halves[0]), like, "TF.js's saved state", "accum_grad"),
    _checked(fit(halves[1]), like, "TF.js's saved state", "accum_var"),
    step,
  )


def to_tfjs(
  opt_state: Any, variable_names: list[str] | None = None, step: int | None = None
) -> list[tuple[str, np.ndarray]]:
  """The weights for TF.js's ``optimizer.setWeights``: ``("iter", int32 scalar)``, then
  ``("<name>/accum_grad", E[g²])`` per variable, then ``("<name>/accum_var", E[Δx²])``.

  Args:
    opt_state: the optax state.
    variable_names: TF.js's variable names, in the order of the optax state's leaves
      (TF.js only keeps them as labels); by default the leaves' paths.
    step: the iteration count to record; by default the optax state's own counter
      (``presets.tfjs`` has one), else required.
  """
  ours = _adadelta_state(opt_state)
  with_paths = jax.tree_util.tree_flatten_with_path(ours.e_g2)[0]
  if variable_names is None:
    variable_names = [jax.tree_util.keystr(path) or "leaf" for path, _ in with_paths]
  if len(variable_names) != len(with_paths):
    raise ValueError(
      f"variable_names has {len(variable_names)} names but the optax state has "
      f"{len(with_paths)} leaves"
    )
  step = _export_step(opt_state, step)
  e_g2, e_dx2 = jax.tree.leaves(ours.e_g2), jax.tree.leaves(ours.e_dx2)
  return [
    ("iter", np.asarray(step, np.int32)),
    *((f"{n}/accum_grad", np.asarray(a)) for n, a in zip(variable_names, e_g2, strict=True)),
    *((f"{n}/accum_var", np.asarray(b)) for n, b in zip(variable_names, e_dx2, strict=True)),
  ]
