"""Composable pieces that work with any optax optimizer (Keras's optimizer features)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_adadelta import _checks


class ParamsEmaState(NamedTuple):
  """State of :func:`params_ema`.

  Attributes:
    steps: number of updates seen (int32).
    ema: the exponential moving average of the parameters, shaped like them.
  """

  steps: jax.Array
  ema: optax.Params


def params_ema(
  momentum: float = 0.99,
  overwrite_frequency: int | None = None,
  *,
  accumulation_steps: int = 1,
) -> optax.GradientTransformation:
  r"""Keeps an exponential moving average of the parameters after each update.

  Put it last in a chain. With :math:`x_{t+1} = x_t + u_t` the parameters after this
  update and :math:`k = \lfloor t / \text{accumulation\_steps} \rfloor`:

  .. math::
    m = \begin{cases} 0 & k = 0 \\ \text{momentum} & k > 0 \end{cases}, \qquad
    \bar x \leftarrow m\, \bar x + (1 - m)\, x_{t+1}

  and when ``overwrite_frequency`` is set and :math:`(k + 1)` is a multiple of it, the
  update is replaced so that the parameters become :math:`\bar x`. This is Keras 3's
  ``use_ema`` (``BaseOptimizer._update_model_variables_moving_average``), whose
  iteration counter advances once per ``gradient_accumulation_steps`` calls; pass the
  same number as ``accumulation_steps``. Read the average with
  :func:`optax_adadelta.finalize`.

  Args:
    momentum: weight of the old average, in [0, 1].
    overwrite_frequency: if set (an int ≥ 1), copy the average into the parameters every
      this many iterations.
    accumulation_steps: calls per iteration (int ≥ 1).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ParamsEmaState`; its
    ``update`` needs ``params``.
  """
  values = _checks.real_values("momentum", momentum)  # None when traced
  if values is not None and (values.shape or not 0.0 <= float(values) <= 1.0):
    raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
  if overwrite_frequency is not None:
    _check_count("overwrite_frequency", overwrite_frequency, "None or an int >= 1")
  _check_count("accumulation_steps", accumulation_steps, "an int >= 1")

  def init_fn(params):
    return ParamsEmaState(steps=jnp.zeros([], jnp.int32), ema=jax.tree.map(jnp.array, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the parameters: call update(updates, state, params)")
    _check_like("params_ema", "parameters", params, state.ema, "parameters given to init")
    _check_like("params_ema", "updates", updates, params, "parameters", none_ok=True)
    iteration = state.steps // accumulation_steps
    # A None update (a frozen parameter) leaves the parameter as it is; it is still averaged.
    moved = jax.tree.map(
      lambda u, p: jnp.zeros_like(p) if u is None and p is not None else u,
      updates,
      params,
      is_leaf=_is_none,
    )
    new_params = optax.apply_updates(params, moved)

    def average(ema, x):
      m = jnp.where(iteration != 0, momentum, 0.0).astype(x.dtype)
      return m * ema + (1 - m) * x

    ema = jax.tree.map(average, state.ema, new_params)
    if overwrite_frequency is not None:
      overwrite = (iteration + 1) % overwrite_frequency == 0
      updates = jax.tree.map(
        lambda u, e, p: jnp.where(overwrite, (e - p).astype(u.dtype), u), moved, ema, params
      )
    return updates, ParamsEmaState(steps=state.steps + 1, ema=ema)

  return optax.GradientTransformation(init_fn, update_fn)


def finalize(params: optax.Params, opt_state: Any) -> optax.Params:
  """The parameters to keep at the end of training (Keras's ``finalize_variable_values``).

  Returns the moving average of the parameters when ``opt_state`` holds a
  :class:`ParamsEmaState` (from :func:`params_ema`, e.g. ``presets.keras(use_ema=True)``),
  otherwise ``params`` unchanged.
  """
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEmaState))
    if isinstance(s, ParamsEmaState)
  ]
  if not found:
    return params
  if len(found) > 1:
    raise ValueError(
      f"opt_state holds {len(found)} parameter averages (params_ema); keep one per optimizer"
    )
  ema = found[0].ema
  if jax.tree.structure(ema) != jax.tree.structure(params):  # type: ignore[operator]  # jaxlib stub
    raise ValueError(
      "The parameter average in opt_state does not have the structure of params:\n"
      f"  params: {jax.tree.structure(params)}\n  average: {jax.tree.structure(ema)}"
    )
  _check_like("finalize", "params", params, ema, "parameter average in opt_state", dtype=True)
  return ema


def clip_by_leaf_norm(max_norm: float) -> optax.GradientTransformation:
  r"""Rescales each leaf to an L2 norm of at most ``max_norm``, independently.

  :math:`g \leftarrow g \cdot c / \max(\lVert g \rVert_2, c)`, Keras's per-variable
  ``clipnorm`` (``optax.clip_by_global_norm`` takes one norm over all leaves instead).
  """
  values = _checks.real_values("max_norm", max_norm)
  if values is not None and (values.shape or not float(values) > 0):
    raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
  # inf would give inf / inf = NaN; below float32's smallest normal number, 0 / 0.
  _checks.check_in_range("max_norm", max_norm, low=0.0, high=None, low_open=True)

  def clip(path, g):
    where = jax.tree_util.keystr(path) or "the root"
    _checks.check_array_like("gradient", where, g)
    if not jnp.issubdtype(jnp.result_type(g), jnp.inexact):
      raise TypeError(
        f"The gradient at {where} has dtype {jnp.result_type(g)}; clip_by_leaf_norm needs "
        "floating or complex gradients"
      )
    squares = jnp.square(jnp.abs(g)) if jnp.iscomplexobj(g) else jnp.square(g)
    norm = jnp.sqrt(jnp.sum(squares))
    return g * max_norm / jnp.maximum(norm, max_norm)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class AccumulateGradientsState(NamedTuple):
  """State of :func:`accumulate_gradients`.

  Attributes:
    calls: number of updates seen (int32).
    grad_sum: the sum of the gradients since the inner optimizer last stepped.
    inner: the inner optimizer's state.
  """

  calls: jax.Array
  grad_sum: optax.Updates
  inner: optax.OptState


def accumulate_gradients(
  inner: optax.GradientTransformation, every: int
) -> optax.GradientTransformationExtraArgs:
  r"""Steps ``inner`` on the mean of every ``every`` gradients; zero updates in between.

  Keras 3's ``gradient_accumulation_steps``: the gradients are *summed*, and on every
  ``every``-th call the inner optimizer gets :math:`(g_t + \sum g) / n`.
  ``optax.MultiSteps`` does the same with a running mean, which rounds differently: when
  the gradients nearly cancel the two differ by far more than float32's 1e-7 (the parity
  tests saw 6e-6), so the Keras preset uses this one.
  """
  _check_count("every", every, "an int >= 1")
  every = int(every)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return AccumulateGradientsState(
      calls=jnp.zeros([], jnp.int32),
      grad_sum=jax.tree.map(jnp.zeros_like, params),
      inner=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _check_like(
      "accumulate_gradients",
      "gradients",
      updates,
      state.grad_sum,
      "parameters given to init",
      dtype=True,
    )
    total = jax.tree.map(jnp.add, updates, state.grad_sum)

    def step(_):
      mean = jax.tree.map(lambda g: g / every, total)
      new_updates, new_inner = inner.update(mean, state.inner, params, **extra_args)
      return new_updates, new_inner, jax.tree.map(jnp.zeros_like, total)

    def accumulate(_):
      return jax.tree.map(jnp.zeros_like, updates), state.inner, total

    is_step = (state.calls + 1) % every == 0
    new_updates, new_inner, grad_sum = jax.lax.cond(is_step, step, accumulate, None)
    return new_updates, AccumulateGradientsState(state.calls + 1, grad_sum, new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_none(x: Any) -> bool:
  return x is None


def _check_count(name: str, value: Any, allowed: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_like(
  who: str, what: str, tree: Any, like: Any, like_name: str, *, dtype=False, none_ok=False
) -> None:
  """Raises ValueError unless `tree` has the structure and shapes (and dtypes) of `like`,
  naming the first leaf that differs: a reshaped leaf would otherwise broadcast."""
  treedef: Any = jax.tree.structure(like)
  try:
    leaves = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
      f"{who}: the {what} do not have the structure of the {like_name}:\n"
      f"  {what}: {jax.tree.structure(tree, is_leaf=lambda x: x is None)}\n"
      f"  {like_name}: {treedef}"
    ) from err
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(like)[0], leaves, strict=True):
    where = jax.tree_util.keystr(path) or "the root"
    if got is None and none_ok:
      continue
    if got is None:
      raise ValueError(f"{who}: the {what} at {where} is None, but the {like_name} has an array")
    _checks.check_array_like(what[:-1] if what.endswith("s") else what, where, got)
    if jnp.shape(got) != jnp.shape(want) or (dtype and jnp.result_type(got) != want.dtype):
      raise ValueError(
        f"{who}: the {what} at {where} has shape {jnp.shape(got)} and dtype "
        f"{jnp.result_type(got)}, but the {like_name} has shape {jnp.shape(want)} and dtype "
        f"{want.dtype}"
      )
