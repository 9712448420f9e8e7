"""One constructor per peer library, with the peer's own argument names and defaults.

Each reproduces its peer step for step (tests/test_parity_*.py run the real library side
by side); where the peers' order of floating-point operations differs, each preset follows
its own peer's, so the trajectories agree to rounding. See docs/peers.md for the table of
differences.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any, TypeAlias

import jax
import numpy as np
import optax

from optax_adadelta import _adadelta, _checks
from optax_adadelta.transforms import accumulate_gradients, clip_by_leaf_norm, params_ema

GradientTransformation: TypeAlias = optax.GradientTransformationExtraArgs

TFJS_CPU_EPSILON = 1e-7  # tfjs-core 4.22 backends/backend.js: EPSILON_FLOAT32


def _check_common(learning_rate_name, learning_rate, rho, eps_name, eps):
  _checks.check_learning_rate_like(learning_rate_name, learning_rate)
  _checks.check_in_range("rho", rho, low=0.0, high=1.0, low_open=False)
  _checks.check_in_range(eps_name, eps, low=0.0, high=None, low_open=True)


def paper() -> GradientTransformation:
  """Zeiler 2012, Algorithm 1: η = 1, ρ = 0.95, ε = 1e-6."""
  return _adadelta.adadelta(learning_rate=1.0, rho=0.95, eps=1e-6)


def pytorch(
  lr: Any = 1.0, rho: Any = 0.9, eps: Any = 1e-6, weight_decay: Any = 0.0, maximize: bool = False
) -> GradientTransformation:
  """``torch.optim.Adadelta`` (torch 2.13, ``_single_tensor_adadelta``).

  Coupled weight decay (``grad + weight_decay * param``), ``maximize`` negating the gradient
  first, complex parameters as (real, imaginary) pairs. ``lr`` may be an optax schedule of
  the step count (the equivalent of a ``torch.optim.lr_scheduler`` stepped once per step).
  PyTorch also accepts ``eps=0``; this preset requires ``eps > 0`` (with 0 the first step
  is 0 and nothing ever moves).
  """
  _check_common("lr", lr, rho, "eps", eps)
  _checks.check_learning_rate_like("weight_decay", weight_decay)
  _checks.check_flag("maximize", maximize)
  return _adadelta.adadelta(
    lr, rho, eps, weight_decay=weight_decay, maximize=maximize, update_rule="pytorch"
  )


def tfjs(
  learning_rate: Any = 0.001, rho: Any = 0.95, epsilon: Any = None
) -> GradientTransformation:
  """``tf.train.adadelta`` of TensorFlow.js (tfjs-core 4.22) as it behaves.

  It divides by √(E[g²]ₜ₋₁ + ε), the average *before* this step's gradient, so its
  first step is exactly ``-learning_rate * g`` (the paper uses E[g²]ₜ). ``epsilon=None``
  means the backend's epsilon, 1e-7 on the CPU backend. The state counts the steps taken,
  as the optimizer's ``iterations`` that TF.js saves first in ``getWeights()``
  (``optimizer.js``, ``saveIterations``); :func:`optax_adadelta.interop.to_tfjs` writes it.
  """
  epsilon = TFJS_CPU_EPSILON if epsilon is None else epsilon
  _check_common("learning_rate", learning_rate, rho, "epsilon", epsilon)
  if not callable(learning_rate):  # a constant schedule: the same product, and a step count
    learning_rate = optax.constant_schedule(learning_rate)
  return _adadelta.adadelta(learning_rate, rho, epsilon, update_rule="tfjs")


def tf1(learning_rate: Any = 0.001, rho: Any = 0.95, epsilon: Any = 1e-8) -> GradientTransformation:
  """``tf.compat.v1.train.AdadeltaOptimizer`` / the ``ApplyAdadelta`` kernel (ε = 1e-8)."""
  _check_common("learning_rate", learning_rate, rho, "epsilon", epsilon)
  return _adadelta.adadelta(learning_rate, rho, epsilon, update_rule="tf1")


def d2l(rho: Any = 0.9, eps: Any = 1e-5) -> GradientTransformation:
  """The from-scratch Adadelta of "Dive into Deep Learning" §12.9 (no learning rate)."""
  _check_common("learning_rate", 1.0, rho, "eps", eps)
  return _adadelta.adadelta(1.0, rho, eps, update_rule="d2l")


def keras(
  learning_rate: Any = 0.001,
  rho: float = 0.95,
  epsilon: float = 1e-7,
  weight_decay: float | None = None,
  clipnorm: float | None = None,
  clipvalue: float | None = None,
  global_clipnorm: float | None = None,
  use_ema: bool = False,
  ema_momentum: float = 0.99,
  ema_overwrite_frequency: int | None = None,
  loss_scale_factor: float | None = None,
  gradient_accumulation_steps: int | None = None,
  *,
  exclude_from_weight_decay: Sequence[str] | None = None,
) -> GradientTransformation:
  """``keras.optimizers.Adadelta`` (Keras 3.15), every keyword in Keras's order.

  Per call, as ``BaseOptimizer.apply`` and the JAX backend's ``_backend_apply_gradients``:
  gradients divided by ``loss_scale_factor``; with ``gradient_accumulation_steps`` = n,
  summed over n calls and their mean applied on every n-th (:func:`accumulate_gradients`);
  clipped
  (``clipnorm`` per tensor, ``global_clipnorm``, or ``clipvalue``); decoupled weight decay
  x ← x − η·λ·x; the Adadelta step; then the parameter EMA (:func:`params_ema`) with
  its overwrite. Finish with :func:`optax_adadelta.finalize`. Invalid combinations raise
  Keras's errors.

  ``learning_rate`` takes what Keras takes (``base_optimizer._get_current_learning_rate``):
  a float; a schedule of the step count (an optax schedule, or a Keras
  ``LearningRateSchedule``), called with the optimizer's raw iteration count; or a callable
  of no arguments, called with none on every step. Under ``jax.jit`` that call happens once,
  while tracing: a callable that reads Python state (a variable a callback changes) keeps
  the value it read then, and a change is seen only without ``jit`` or after a retrace.
  Keras on JAX does the same: ``model.fit`` compiles the step, and only an eager
  ``optimizer.apply`` calls it anew each step. To change the rate under ``jit``, use a
  schedule or ``optax.inject_hyperparams``.

  ``exclude_from_weight_decay`` is Keras's
  ``optimizer.exclude_from_weight_decay(var_names=...)``, given here at construction: a
  parameter is not decayed when any of these regular expressions is found
  (``re.search``) in its name, the last key of its path in the parameter tree, as Keras
  searches ``variable.name`` (``"kernel"``, ``"bias"``; the last part of
  ``variable.path``). A Flax NNX ``Variable``'s own ``.value`` is not part of the name.
  For any other rule, build ``optax_adadelta.adadelta(weight_decay_mask=...)``.
  """
  if not (isinstance(learning_rate, float) or callable(learning_rate)):
    raise ValueError(
      "Argument `learning_rate` should be float, or an instance of LearningRateSchedule, or "
      "a callable (that takes in the current iteration value and returns the corresponding "
      f"learning rate value). Received instead: learning_rate={learning_rate}"
    )
  accumulation_error = ValueError(
    "`gradient_accumulation_steps` must be an integer >= 2. Received: "
    f"gradient_accumulation_steps={gradient_accumulation_steps!r}"
  )
  if gradient_accumulation_steps is not None and not isinstance(
    gradient_accumulation_steps, (int, float, np.number)
  ):
    raise accumulation_error  # Keras's comparison would fail with an error naming nothing
  if gradient_accumulation_steps and not gradient_accumulation_steps >= 2:
    raise accumulation_error
  if gradient_accumulation_steps and not isinstance(gradient_accumulation_steps, (int, np.integer)):
    raise accumulation_error  # Keras would count calls modulo 2.5
  if use_ema:
    momentum = _checks.real_values("ema_momentum", ema_momentum)  # a number, before Keras's >
    if momentum is not None and momentum.shape:
      _checks.check_in_range("ema_momentum", ema_momentum, low=0.0, high=1.0, low_open=False)
    if ema_momentum > 1 or ema_momentum < 0:
      raise ValueError(
        f"`ema_momentum` must be in the range [0, 1]. Received: ema_momentum={ema_momentum}"
      )
    if ema_overwrite_frequency and (
      not isinstance(ema_overwrite_frequency, int) or ema_overwrite_frequency < 1
    ):
      raise ValueError(
        "`ema_overwrite_frequency` must be an integer >= 1 or None. Received: "
        f"ema_overwrite_frequency={ema_overwrite_frequency}"
      )
  if sum(a is not None for a in (clipnorm, clipvalue, global_clipnorm)) > 1:
    raise ValueError(
      "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: "
      f"clipnorm={clipnorm}, clipvalue={clipvalue}, global_clipnorm={global_clipnorm}"
    )
  _check_common("learning_rate", learning_rate, rho, "epsilon", epsilon)
  # Beyond Keras, which accepts these silently: NaN, inf or a negative value would poison
  # or flip every update (Keras skips clipping at 0 or below; here 0 skips it, < 0 is refused).
  for name, value in (
    ("weight_decay", weight_decay),
    ("clipnorm", clipnorm),
    ("clipvalue", clipvalue),
    ("global_clipnorm", global_clipnorm),
  ):
    if value is not None:
      _checks.check_in_range(name, value, low=0.0, high=None, low_open=False)
      if name != "weight_decay" and value != 0:  # a tiny norm is flushed: 0 / 0 = NaN
        _checks.check_in_range(name, value, low=0.0, high=None, low_open=True)
  if loss_scale_factor is not None:
    _checks.check_in_range(
      "loss_scale_factor", loss_scale_factor, low=0.0, high=None, low_open=True
    )
  if use_ema:
    _checks.check_in_range("ema_momentum", ema_momentum, low=0.0, high=1.0, low_open=False)

  decay_mask = _keras_decay_mask(exclude_from_weight_decay)
  learning_rate = _keras_learning_rate(learning_rate)
  steps = int(gradient_accumulation_steps or 1)
  overwrite_frequency = int(ema_overwrite_frequency) if ema_overwrite_frequency else None
  if callable(learning_rate) and steps > 1:
    schedule = learning_rate
    # The inner schedule counts applied updates k = 0, 1, ...; Keras reads its raw n·k + n − 1.
    learning_rate = lambda count: schedule(count * steps + steps - 1)

  clip: list[optax.GradientTransformation] = []
  if clipnorm and clipnorm > 0:
    clip = [clip_by_leaf_norm(clipnorm)]
  elif global_clipnorm and global_clipnorm > 0:
    clip = [optax.clip_by_global_norm(global_clipnorm)]
  elif clipvalue and clipvalue > 0:
    clip = [optax.clip(clipvalue)]
  core = _adadelta.scale_by_adadelta(rho, epsilon, update_rule="keras")
  inner: optax.GradientTransformation = optax.chain(
    *clip,
    core,
    *([optax.add_decayed_weights(weight_decay, decay_mask)] if weight_decay is not None else []),
    optax.scale_by_learning_rate(learning_rate),
  )
  if steps > 1:
    inner = accumulate_gradients(inner, steps)
  return optax.chain(
    *([optax.scale(1.0 / loss_scale_factor)] if loss_scale_factor is not None else []),
    inner,
    *([params_ema(ema_momentum, overwrite_frequency, accumulation_steps=steps)] if use_ema else []),
  )


def _keras_learning_rate(learning_rate: Any) -> Any:
  """A callable of no arguments as a schedule that ignores the count; anything else as is."""
  if not callable(learning_rate) or not _takes_no_arguments(learning_rate):
    return learning_rate
  no_arguments = learning_rate
  return lambda count: no_arguments()


def _takes_no_arguments(fn: Any) -> bool:
  # Keras tells a schedule by its type; a schedule here may be any callable of the count.
  if any(cls.__name__ == "LearningRateSchedule" for cls in type(fn).__mro__):
    return False
  try:
    inspect.signature(fn).bind()
  except (TypeError, ValueError):  # needs an argument, or has no signature to read
    return False
  return True


def _keras_decay_mask(var_names: Sequence[str] | None):
  """The weight-decay mask of Keras's ``exclude_from_weight_decay(var_names=...)``, or None."""
  if var_names is None:
    return None
  if isinstance(var_names, str) or not all(isinstance(n, str) for n in var_names):
    raise TypeError(
      "exclude_from_weight_decay must be a list of strings (regular expressions searched in "
      f"the parameters' names, as Keras's var_names), got {var_names!r}"
    )
  if not var_names:
    return None
  try:
    pattern = re.compile("|".join(sorted(set(var_names))))  # Keras: "|".join(set(var_names))
  except re.error as error:
    raise ValueError(
      f"exclude_from_weight_decay={list(var_names)!r} is not a valid regular expression "
      f"({error}); escape special characters with re.escape"
    ) from error

  def decayed(path, _leaf) -> bool:
    return pattern.search(_leaf_name(path)) is None

  return lambda params: jax.tree_util.tree_map_with_path(decayed, params)


def _leaf_name(path: tuple) -> str:
  """The last key of a pytree path, as a string (a Flax NNX Variable's `.value` skipped)."""
  keys = list(path)
  is_variable_value = isinstance(keys[-1], jax.tree_util.GetAttrKey) if keys else False
  if len(keys) > 1 and is_variable_value and keys[-1].name in ("value", "raw_value"):
    keys.pop()
  if not keys:
    return ""
  key = keys[-1]
  for field in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)
