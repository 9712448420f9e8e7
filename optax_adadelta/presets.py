"""One constructor per peer library, with the peer's own argument names and defaults.

Each reproduces its peer step for step (tests/test_parity_*.py run the real library side
by side); where the peers' order of floating-point operations differs, each preset follows
its own peer's, so the trajectories agree to rounding. See docs/peers.md for the table of
differences.
"""

from __future__ import annotations

from typing import Any, TypeAlias

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
  means the backend's epsilon, 1e-7 on the CPU backend.
  """
  epsilon = TFJS_CPU_EPSILON if epsilon is None else epsilon
  _check_common("learning_rate", learning_rate, rho, "epsilon", epsilon)
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
) -> GradientTransformation:
  """``keras.optimizers.Adadelta`` (Keras 3.15), every keyword in Keras's order.

  Per call, as ``BaseOptimizer.apply`` and the JAX backend's ``_backend_apply_gradients``:
  gradients divided by ``loss_scale_factor``; with ``gradient_accumulation_steps`` = n,
  summed over n calls and their mean applied on every n-th (:func:`accumulate_gradients`);
  clipped
  (``clipnorm`` per tensor, ``global_clipnorm``, or ``clipvalue``); decoupled weight decay
  x ← x − η·λ·x; the Adadelta step; then the parameter EMA (:func:`params_ema`) with
  its overwrite. ``learning_rate`` is a float or an optax schedule, called like a Keras
  ``LearningRateSchedule`` with the optimizer's raw iteration count. Finish with
  :func:`optax_adadelta.finalize`. Invalid combinations raise Keras's errors.
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
    momentum = _checks._real_values("ema_momentum", ema_momentum)  # a number, before Keras's >
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
    *([optax.add_decayed_weights(weight_decay)] if weight_decay is not None else []),
    optax.scale_by_learning_rate(learning_rate),
  )
  if steps > 1:
    inner = accumulate_gradients(inner, steps)
  return optax.chain(
    *([optax.scale(1.0 / loss_scale_factor)] if loss_scale_factor is not None else []),
    inner,
    *([params_ema(ema_momentum, overwrite_frequency, accumulation_steps=steps)] if use_ema else []),
  )
