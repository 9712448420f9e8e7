"""Argument and pytree checks with errors that say what to do next."""

from __future__ import annotations

from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HINTS = {
  "rho": "the decay rate of both running averages; the paper uses 0.95",
  "eps": "it keeps the first step nonzero: with eps=0 Adadelta never moves",
  "learning_rate": "the paper uses 1.0",
  "weight_decay": "0 disables it",
  "lr": "PyTorch's default is 1.0",
  "epsilon": "it keeps the first step nonzero",
  "clipnorm": "0 or None: no clipping",
  "clipvalue": "0 or None: no clipping",
  "global_clipnorm": "0 or None: no clipping",
  "loss_scale_factor": "None: no loss scaling",
}


def _is_tracer(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def real_values(name: str, value: Any) -> np.ndarray | None:
  """The concrete values of a hyper-parameter, or None when traced."""
  if _is_tracer(value):
    return None
  if isinstance(value, bool) or value is None or isinstance(value, str):
    raise TypeError(f"{name} must be a real number or array, got {value!r}")
  try:
    values = np.asarray(value)
  except Exception as err:  # a tracer nested in a container, an odd object
    raise TypeError(f"{name} must be a real number or array, got {value!r}") from err
  if not (jnp.issubdtype(values.dtype, jnp.integer) or jnp.issubdtype(values.dtype, jnp.floating)):
    raise TypeError(f"{name} must be a real number or array, got {value!r} of dtype {values.dtype}")
  return values.astype(np.float64)


_F32 = np.finfo(np.float32)


def check_in_range(
  name: str, value: Any, *, low: float, high: float | None, low_open: bool
) -> None:
  """Raises ValueError unless the value is one scalar, finite in float32 and in range.

  One scalar: an array would broadcast the updates and the state to its shape. Finite in
  float32, the precision of the update: 1e39 is inf there. With an open lower bound of 0
  (ε), at least float32's smallest normal number: XLA flushes smaller ones to zero, and
  ε = 0 turns a zero gradient into 0/0 = NaN.
  """
  if _is_tracer(value):
    _check_scalar(name, np.shape(value))
    return
  values = real_values(name, value)
  if values is None:
    return
  above_low = values > low if low_open else values >= low
  below_high = np.isfinite(values) if high is None else values <= high
  if not np.all(above_low & below_high):
    interval = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
    hint = f" ({_HINTS[name]})" if name in _HINTS else ""
    raise ValueError(f"{name} must be finite and in {interval}{hint}, got {value!r}")
  _check_scalar(name, values.shape)
  if np.any(np.abs(values) > _F32.max):
    raise ValueError(
      f"{name} must be finite in float32, the precision the update is computed in "
      f"(at most {_F32.max:.4g}), got {value!r}"
    )
  if low_open and low == 0 and np.any(values < _F32.tiny):
    raise ValueError(
      f"{name} must be at least {_F32.tiny:.4g}, float32's smallest normal number (XLA "
      f"flushes smaller ones to zero, as if {name} were 0), got {value!r}"
    )


def _check_scalar(name: str, shape: tuple[int, ...]) -> None:
  if shape:
    raise ValueError(
      f"{name} must be a scalar (a number or an array of shape ()), got an array of shape "
      f"{shape}: its shape would broadcast into the updates and the state. To try several "
      "values, jax.vmap over them"
    )


def check_learning_rate_like(name: str, value: Any) -> None:
  """A float or array >= 0, or a schedule (a callable of the step count)."""
  if callable(value):
    return
  if value is None:
    raise TypeError(
      f"{name} must be a number, array or optax schedule, got None "
      "(optax.adadelta's learning_rate=None ascends the loss; use 1.0 for the paper's step)"
    )
  check_in_range(name, value, low=0.0, high=None, low_open=False)


def check_flag(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, allowed) -> None:
  if not isinstance(value, str) or value not in allowed:
    choices = ", ".join(repr(a) for a in allowed)
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def is_python_zero(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def check_accumulator_dtype(dtype: Any) -> np.dtype | None:
  """None, or a real floating dtype."""
  if dtype is None:
    return None
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as err:
    raise TypeError(
      f"accumulator_dtype must be None or a floating dtype such as jnp.float32, got {dtype!r}"
    ) from err
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      "accumulator_dtype must be None or a real floating dtype such as jnp.float32 "
      f"(complex parameters get the matching complex dtype), got {dtype}"
    )
  if jnp.finfo(dtype).bits < 16:
    raise TypeError(
      f"accumulator_dtype must have at least 16 bits (jnp.bfloat16, jnp.float16, jnp.float32), "
      f"got {dtype}: averages of squares overflow or vanish in it. For about 2 bytes per "
      "parameter use state_bits=8, whose 8-bit codes carry a float32 scale per block"
    )
  return dtype


_COMPLEX_OF: dict[np.dtype, np.dtype] = {
  np.dtype(np.float32): np.dtype(np.complex64),
  np.dtype(np.float64): np.dtype(np.complex128),
}


def state_dtype(path, param: Any, accumulator_dtype: np.dtype | None) -> np.dtype:
  """The dtype of the state leaf for one parameter."""
  dtype = jnp.result_type(param)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f"Adadelta can only train floating or complex parameters; the parameter at "
      f"{jax.tree_util.keystr(path) or 'the root'} has dtype {dtype}. Keep it out of "
      "the optimizer (optax.masked, optax.multi_transform) or pass None in its place."
    )
  if accumulator_dtype is None:
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))
  accumulator_dtype = np.dtype(jax.dtypes.canonicalize_dtype(accumulator_dtype))
  if not jnp.issubdtype(dtype, jnp.complexfloating):
    return accumulator_dtype
  if accumulator_dtype not in _COMPLEX_OF:
    raise TypeError(
      f"accumulator_dtype={accumulator_dtype} has no complex counterpart for the complex "
      f"parameter at {jax.tree_util.keystr(path) or 'the root'}; use jnp.float32 or jnp.float64"
    )
  return _COMPLEX_OF[accumulator_dtype]


def _is_none(x: Any) -> bool:
  return x is None


def flatten_gradients(updates: Any):
  """Paths, leaves and structure of a gradient tree; None leaves are kept."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_none)
  paths = [path for path, _ in with_paths]
  leaves = [leaf for _, leaf in with_paths]
  return paths, leaves, treedef


# Keys of nodes that name no parameter: an attribute (flax nnx's Variable and linen's
# Partitioned hold their array as `.value`) or an unnamed child of a custom node.
_WRAPPER_KEYS = (jax.tree_util.GetAttrKey, jax.tree_util.FlattenedIndexKey)


def leaf_names(paths) -> tuple[str, ...]:
  """Each leaf's key path as a string, without the keys of wrappers around that one array.

  Frameworks box a parameter in a node of its own and unbox it between init and update:
  nnx.Optimizer inits on a state of nnx.Param Variables (``['bias'].value``) and updates with
  plain arrays (``['bias']``). The boxes are not part of what a leaf is, so a trailing
  attribute or unnamed key whose node holds only this leaf is dropped, as often as it
  recurs. Named keys (a dict's, a list's index) and nodes holding several leaves stay.
  """
  paths = [tuple(path) for path in paths]
  leaves_under = Counter(path[:depth] for path in paths for depth in range(len(path)))
  names = []
  for path in paths:
    end = len(path)
    while end and isinstance(path[end - 1], _WRAPPER_KEYS) and leaves_under[path[: end - 1]] == 1:
      end -= 1
    names.append(jax.tree_util.keystr(path[:end]))
  return tuple(names)


def check_leaf_names(built: tuple[str, ...], paths, treedef, what: str) -> None:
  """Raises unless the gradients' leaves are those, in that order, that built `what`.

  Compares :func:`leaf_names`, so boxes added or stripped between init and update pass, and
  a renamed, missing, extra or reordered leaf fails, naming the first difference.
  """
  got = leaf_names(paths)
  if got == built:
    return
  first = next(
    (i for i, (a, b) in enumerate(zip(got, built, strict=False)) if a != b),
    min(len(got), len(built)),
  )
  name = lambda names: (names[first] or "the root") if first < len(names) else "(no more leaves)"
  raise ValueError(
    f"The gradients do not have the structure of the parameters that built the {what}: the "
    f"first difference is leaf {first}, {name(got)} in the gradients but {name(built)} in the "
    f"state.\n  gradients: {treedef}\n  state:     {_list_names(built)}\n"
    "(Boxes around one array, such as nnx.Param or nn.Partitioned, are ignored.) Pass "
    "gradients shaped like the parameters given to init, or call init again."
  )


def _list_names(names: tuple[str, ...], most: int = 12) -> str:
  shown = ", ".join(name or "the root" for name in names[:most])
  more = f", ... ({len(names)} leaves)" if len(names) > most else ""
  return f"leaves {shown}{more}" if names else "no leaves"


def check_gradients(updates: Any, e_g2_tree: Any) -> None:
  """Raises a clear error unless `updates` fit `e_g2_tree`, a per-leaf average init built."""
  paths, grads, treedef = flatten_gradients(updates)
  e_g2 = leaves_like_state(treedef, e_g2_tree, "e_g2")
  for path, g, a in zip(paths, grads, e_g2, strict=True):
    if g is not None:
      check_gradient_leaf(path, g, a)


def check_gradients_like_params(updates: Any, params: Any) -> None:
  """Raises a clear error unless `updates` fit `params`, naming the first leaf that does not.

  For what runs before scale_by_adadelta checks the gradients (maximize's negation, coupled
  weight decay g + λx): an int32 gradient would otherwise be cast to float, a Python float
  or a reshaped one broadcast against its parameter, a different tree get optax's error.
  Without params, only each leaf's type and dtype are checked.
  """
  paths, grads, treedef = flatten_gradients(updates)
  if params is None:
    for path, g in zip(paths, grads, strict=True):
      if g is not None:
        _check_gradient_dtype(jax.tree_util.keystr(path) or "the root", g)
    return
  try:
    like = treedef.flatten_up_to(params)
  except (ValueError, TypeError) as err:
    raise ValueError(
      "The gradients do not have the structure of the parameters.\n"
      f"  gradients:  {treedef}\n  parameters: {jax.tree.structure(params)}\n"
      "Pass gradients shaped like the parameters."
    ) from err
  for path, g, p in zip(paths, grads, like, strict=True):
    if g is not None and p is not None:
      check_gradient_leaf(path, g, p)


def leaves_like_state(treedef, state_tree: Any, field: str) -> list[Any]:
  """The state's leaves in the gradients' order, or an error showing both trees."""
  try:
    return treedef.flatten_up_to(state_tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
      "The gradients do not have the structure of the parameters that built the "
      "optimizer state (init).\n"
      f"  gradients:    {treedef}\n"
      f"  state.{field}: {jax.tree.structure(state_tree)}\n"
      "Pass gradients shaped like the parameters given to init, or call init again."
    ) from err


def check_gradient_leaf(path, grad: Any, state_leaf: Any) -> None:
  """Raises a clear error when one gradient leaf does not fit its state leaf."""
  where = jax.tree_util.keystr(path) or "the root"
  if state_leaf is None:
    raise ValueError(
      f"The gradient at {where} is an array, but that parameter was None at init, "
      "so the optimizer has no state for it. Call init with the parameter present."
    )
  dtype = _check_gradient_dtype(where, grad)
  if jnp.iscomplexobj(grad) != jnp.iscomplexobj(state_leaf):
    raise TypeError(
      f"The gradient at {where} has dtype {dtype} but its state has dtype "
      f"{state_leaf.dtype}: a complex parameter needs complex gradients, "
      "a real one real gradients."
    )
  if jnp.shape(grad) != jnp.shape(state_leaf):
    raise ValueError(
      f"The gradient at {where} has shape {jnp.shape(grad)} but its parameter had "
      f"shape {jnp.shape(state_leaf)} at init."
    )


def _check_gradient_dtype(where: str, grad: Any) -> Any:
  check_array_like("gradient", where, grad)
  dtype = jnp.result_type(grad)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f"The gradient at {where} has dtype {dtype}; Adadelta needs floating or complex gradients."
    )
  return dtype


def check_array_like(what: str, where: str, leaf: Any) -> None:
  """Raises TypeError unless the leaf is an array or a number (a string names a dtype to jnp)."""
  if isinstance(leaf, (bool, str, bytes)) or not (
    (hasattr(leaf, "dtype") and hasattr(leaf, "shape")) or isinstance(leaf, (int, float, complex))
  ):
    raise TypeError(
      f"The {what} at {where} is {leaf!r} of type {type(leaf).__name__}; it must be an array "
      "(or a Python number)"
    )


def check_low_memory(
  state_bits: Any, stochastic_rounding: Any, min_8bit_size: Any, accumulator_dtype: Any
) -> bool:
  """Validates the low-memory keywords; returns whether stochastic rounding is on.

  ``stochastic_rounding=None`` means on for ``state_bits=8``, off otherwise.
  """
  static = "; with optax.inject_hyperparams, name it in static_args"
  if state_bits is not None and (
    isinstance(state_bits, bool) or not isinstance(state_bits, (int, np.integer)) or state_bits != 8
  ):
    hint = static if _is_tracer(state_bits) or isinstance(state_bits, jax.Array) else ""
    raise ValueError(
      f"state_bits must be 8 (8-bit averages with a float32 scale per block) or None "
      f"(the averages in accumulator_dtype), got {state_bits!r}{hint}"
    )
  if stochastic_rounding is not None:
    check_flag("stochastic_rounding", stochastic_rounding)
  if min_8bit_size is None:
    min_8bit_size = 4096
  if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, (int, np.integer)):
    hint = static if _is_tracer(min_8bit_size) or isinstance(min_8bit_size, jax.Array) else ""
    raise TypeError(f"min_8bit_size must be an int or None, got {min_8bit_size!r}{hint}")
  if min_8bit_size < 0:
    raise ValueError(
      f"min_8bit_size must be >= 0 (leaves with fewer elements keep a full-precision "
      f"state; bitsandbytes uses 4096), got {min_8bit_size}"
    )
  if stochastic_rounding and state_bits is None and accumulator_dtype is not None:
    check_narrow_state(np.dtype(accumulator_dtype))
  return bool(state_bits == 8 if stochastic_rounding is None else stochastic_rounding)


def check_min_dim_size_to_factor(size: Any) -> int:
  """`size` as an int >= 1 (``None``: 128, optax.adafactor's default), or a clear error."""
  if size is None:
    return 128
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    static = _is_tracer(size) or isinstance(size, jax.Array)
    hint = "; with optax.inject_hyperparams, name it in static_args" if static else ""
    raise ValueError(
      "min_dim_size_to_factor must be an int >= 1 or None (a leaf is factored when its two "
      f"largest dimensions are both at least this; None means 128, optax.adafactor's "
      f"default), got {size!r}{hint}"
    )
  return int(size)


def check_narrow_state(dtype: Any) -> None:
  """Stochastic rounding of a 16-bit state: refuse one of 32 bits or more."""
  if jnp.finfo(dtype).bits >= 32:
    raise ValueError(
      "stochastic_rounding=True needs a state narrower than float32: pass "
      "accumulator_dtype=jnp.bfloat16 (or jnp.float16, or bfloat16 parameters with "
      f"accumulator_dtype=None) or state_bits=8; the state here is {np.dtype(dtype).name}, "
      "which rounds to nearest without stalling"
    )
