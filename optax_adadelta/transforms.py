"""Composable pieces that work with any optax optimizer (Keras's optimizer features)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


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
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
  if overwrite_frequency is not None and (
    not isinstance(overwrite_frequency, int) or overwrite_frequency < 1
  ):
    raise ValueError(
      f"overwrite_frequency must be None or an int >= 1, got {overwrite_frequency!r}"
    )
  if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
    raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")

  def init_fn(params):
    return ParamsEmaState(steps=jnp.zeros([], jnp.int32), ema=jax.tree.map(jnp.array, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the parameters: call update(updates, state, params)")
    iteration = state.steps // accumulation_steps
    new_params = optax.apply_updates(params, updates)

    def average(ema, x):
      m = jnp.where(iteration != 0, momentum, 0.0).astype(x.dtype)
      return m * ema + (1 - m) * x

    ema = jax.tree.map(average, state.ema, new_params)
    if overwrite_frequency is not None:
      overwrite = (iteration + 1) % overwrite_frequency == 0
      updates = jax.tree.map(
        lambda u, e, p: jnp.where(overwrite, (e - p).astype(u.dtype), u), updates, ema, params
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
  if jax.tree.structure(ema) == jax.tree.structure(params):  # type: ignore[operator]  # jaxlib stub
    return ema
  raise ValueError(
    "The parameter average in opt_state does not have the structure of params:\n"
    f"  params: {jax.tree.structure(params)}\n  average: {jax.tree.structure(ema)}"
  )


def clip_by_leaf_norm(max_norm: float) -> optax.GradientTransformation:
  r"""Rescales each leaf to an L2 norm of at most ``max_norm``, independently.

  :math:`g \leftarrow g \cdot c / \max(\lVert g \rVert_2, c)`, Keras's per-variable
  ``clipnorm`` (``optax.clip_by_global_norm`` takes one norm over all leaves instead).
  """
  if not max_norm > 0:
    raise ValueError(f"max_norm must be > 0, got {max_norm!r}")

  def clip(g):
    norm = jnp.sqrt(jnp.sum(jnp.square(g)))
    return g * max_norm / jnp.maximum(norm, max_norm)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(clip, updates), state

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
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"every must be an int >= 1, got {every!r}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return AccumulateGradientsState(
      calls=jnp.zeros([], jnp.int32),
      grad_sum=jax.tree.map(jnp.zeros_like, params),
      inner=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
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
