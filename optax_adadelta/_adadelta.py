"""Adadelta (Zeiler 2012) as optax gradient transformations."""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp
import optax

from optax_adadelta import _checks, _rules, formats
from optax_adadelta.formats import base

Scalar: TypeAlias = float | jax.Array
Implementation: TypeAlias = Literal["auto", "native", "jax"]


def scale_by_adadelta(
  rho: Scalar = 0.95,
  eps: Scalar = 1e-6,
  *,
  accumulator_dtype: Any = None,
  update_rule: _rules.UpdateRule = "default",
  implementation: Implementation = "auto",
  packed_state: bool = False,
  stochastic_rounding: bool | None = None,
  state_bits: int | None = None,
  min_8bit_size: int | None = None,
  factored: bool = False,
  min_dim_size_to_factor: int | None = None,
) -> optax.GradientTransformation:
  r"""Rescales gradients by Adadelta's ratio of running averages.

  Per coordinate, with :math:`E[g^2]_0 = E[\Delta x^2]_0 = 0`:

  .. math::
    E[g^2]_t &= \rho\, E[g^2]_{t-1} + (1 - \rho)\, g_t^2 \\
    \Delta x_t &= g_t \sqrt{\frac{E[\Delta x^2]_{t-1} + \epsilon}{E[g^2]_t + \epsilon}} \\
    E[\Delta x^2]_t &= \rho\, E[\Delta x^2]_{t-1} + (1 - \rho)\, \Delta x_t^2

  and the update returned is :math:`\Delta x_t` (positive, like every optax ``scale_by_*``;
  :func:`adadelta` flips the sign and applies the learning rate). :math:`E[\Delta x^2]`
  accumulates this unscaled step, as the paper, PyTorch, Keras and optax do. The real and
  imaginary parts of a complex gradient are independent coordinates (PyTorch's convention).
  The arithmetic runs in at least float32; the state keeps its dtype and the updates come
  back in the gradients' dtype.

  Args:
    rho: decay rate of both running averages, in [0, 1]. A float or a JAX array (traced
      values are accepted, e.g. under ``jax.vmap``).
    eps: added inside both square roots, > 0. A float or a JAX array.
    accumulator_dtype: real floating dtype of the state (for example ``jnp.float32`` for
      bfloat16 parameters). ``None`` keeps each parameter's dtype; complex parameters get
      the matching complex dtype.
    update_rule: whose order of floating-point operations to follow: ``"default"`` (one
      square root, as above), or a peer's, ``"pytorch"``, ``"keras"``, ``"tf1"``,
      ``"d2l"``; ``"tfjs"`` is TensorFlow.js's rule, which divides by the *previous*
      :math:`E[g^2]`. The presets in :mod:`optax_adadelta.presets` choose their peer's.
    implementation: ``"auto"`` updates float32 and bfloat16 leaves on CPU with a fused
      native kernel (the default rule, with Python-number ``rho`` and ``eps``; results
      within 1 ulp of XLA's, bit-identical where XLA fuses as the kernel does), the 8-bit
      state with another (the same codes as XLA's), and everything else with XLA;
      ``"jax"`` always XLA; ``"native"`` like ``"auto"`` but raises where the kernel cannot
      be used. See :func:`optax_adadelta.native_available`.
    packed_state: keep the averages of all leaves below ``2**18`` elements in one flat array
      each (a :class:`PackedAdadeltaState`); for models of many small leaves, whose step
      otherwise passes two state arrays per leaf (1,000 leaves: 1.8–2.5× faster). Opt-in:
      its packed part does not mirror the parameters, so it takes no per-leaf sharding,
      ZeRO split, low-memory format or ``interop``. Real leaves of one floating dtype only;
      the same numbers either way. The same as :func:`scale_by_adadelta_packed`.
    stochastic_rounding: round each new average stochastically and without bias when the
      state is narrower than float32: with ``accumulator_dtype=jnp.bfloat16`` (or float16)
      the 16-bit state, E[g²] in 16 bits and E[Δx²] as a 16-bit code of its ratio to E[g²]
      (:func:`scale_by_adadelta_16bit`); with the 8-bit codes, whose E[g²] rounding is
      lifted so that the steps stay unbiased. ``None``: on for ``state_bits=8`` only. See
      docs/guides/low_memory.md.
    state_bits: ``8`` stores both averages of each leaf of ``min_8bit_size`` elements or
      more as 8-bit logarithmic codes with a float32 scale per block of up to 256
      elements of the last axis (about 2 bytes per parameter); ``None`` (the default)
      keeps them in ``accumulator_dtype``.
    min_8bit_size: leaves with fewer elements keep a full-precision state; ``None`` means
      4096, bitsandbytes' default. With ``optax.inject_hyperparams``, name ``state_bits``
      and ``min_8bit_size`` in ``static_args``.
    factored: keep each matrix's averages as their row and column means, read back as a
      rank-1 estimate (Adafactor's factoring; 8(n + m) bytes for an n × m matrix): the
      history of each average is factored, the present gradient enters exactly. See
      :func:`scale_by_adadelta_factored` for the equations and what it gives up.
    min_dim_size_to_factor: with ``factored``, a leaf is factored when its two largest
      dimensions are both at least this (optax.adafactor's rule; ``None`` means 128, its
      default); other leaves keep full averages. With ``optax.inject_hyperparams``, name
      it in ``static_args``.

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleByAdadeltaState` (a :class:`PackedAdadeltaState`; with
    ``stochastic_rounding`` a :class:`Rounded16AdadeltaState`; with ``state_bits=8`` a
    :class:`LowMemoryAdadeltaState`; with ``factored`` a :class:`FactoredAdadeltaState`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_adadelta
    >>> tx = optax_adadelta.scale_by_adadelta(rho=0.9, eps=1e-6)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> step, state = tx.update({"w": jnp.array([1.0, -1.0])}, state)
    >>> [round(float(x), 6) for x in step["w"]]  # √(ε / ((1 − ρ) g² + ε)) · g
    [0.003162, -0.003162]

  References:
    M. D. Zeiler, "ADADELTA: An Adaptive Learning Rate Method", 2012, arXiv:1212.5701,
    Algorithm 1.
  """
  options = base.options(
    rho,
    eps,
    accumulator_dtype=accumulator_dtype,
    update_rule=update_rule,
    implementation=implementation,
    packed_state=packed_state,
    stochastic_rounding=stochastic_rounding,
    state_bits=state_bits,
    min_8bit_size=min_8bit_size,
    factored=factored,
    min_dim_size_to_factor=min_dim_size_to_factor,
  )
  return formats.choose(options).transformation(options)


def adadelta(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  rho: Scalar = 0.95,
  eps: Scalar = 1e-6,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Any = None,
  decoupled_weight_decay: bool = False,
  maximize: bool = False,
  accumulator_dtype: Any = None,
  update_rule: _rules.UpdateRule = "default",
  implementation: Implementation = "auto",
  packed_state: bool = False,
  stochastic_rounding: bool | None = None,
  state_bits: int | None = None,
  min_8bit_size: int | None = None,
  factored: bool = False,
  min_dim_size_to_factor: int | None = None,
) -> optax.GradientTransformation:
  r"""The Adadelta optimizer: descends by :math:`\eta\, \Delta x_t`.

  With :math:`\Delta x_t` from :func:`scale_by_adadelta` and gradient :math:`g_t` (negated
  first when ``maximize``):

  .. math::
    \text{coupled (default):}\quad
      &g_t \leftarrow g_t + \lambda\, x_t, \quad x_{t+1} = x_t - \eta\, \Delta x_t \\
    \text{decoupled:}\quad
      &x_{t+1} = x_t - \eta\, (\Delta x_t + \lambda\, x_t)

  The defaults are the paper's (:math:`\eta = 1, \rho = 0.95, \epsilon = 10^{-6}`). Coupled
  decay is PyTorch's and optax's; decoupled is Keras's (AdamW-style). ``maximize`` is
  PyTorch's: the gradient is negated before weight decay, so decay still shrinks the
  parameters. It is ``optax.chain(maximize?, decay, scale_by_adadelta, decay?, -η)``, whose
  state has the same structure however the hyper-parameters arrive (numbers, arrays,
  ``optax.inject_hyperparams``).

  Args:
    learning_rate: :math:`\eta \ge 0`, a float, JAX array or optax schedule. Unlike
      ``optax.adadelta(learning_rate=None)``, this always descends.
    rho: decay rate of both running averages, in [0, 1].
    eps: added inside both square roots, > 0.
    weight_decay: :math:`\lambda \ge 0`, a float, JAX array or schedule. With the number 0
      (the default), ``update`` needs no ``params``.
    weight_decay_mask: optional tree of booleans (or a function of the params returning
      one), True where weight decay applies.
    decoupled_weight_decay: apply :math:`\eta \lambda x_t` outside the adaptive scaling
      instead of adding :math:`\lambda x_t` to the gradient.
    maximize: climb the objective instead of descending it.
    accumulator_dtype: real floating dtype of the state; see :func:`scale_by_adadelta`.
    update_rule: whose order of operations to follow; see :func:`scale_by_adadelta`.
    implementation: ``"auto"``, ``"native"`` or ``"jax"``; see :func:`scale_by_adadelta`.
    packed_state: pack the small leaves' state into flat arrays; see
      :func:`scale_by_adadelta`.
    stochastic_rounding, state_bits, min_8bit_size: the low-memory state; see
      :func:`scale_by_adadelta`.
    factored, min_dim_size_to_factor: the factored state; see :func:`scale_by_adadelta`.

  Returns:
    An :class:`optax.GradientTransformation` (an ``optax.chain``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_adadelta
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optax_adadelta.adadelta())
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> [round(float(x), 4) for x in optax.apply_updates(params, updates)["w"]]
    [0.9955, -1.9955]
  """
  _checks.check_learning_rate_like("learning_rate", learning_rate)
  _checks.check_learning_rate_like("weight_decay", weight_decay)
  _checks.check_flag("decoupled_weight_decay", decoupled_weight_decay)
  _checks.check_flag("maximize", maximize)
  core = scale_by_adadelta(
    rho,
    eps,
    accumulator_dtype=accumulator_dtype,
    update_rule=update_rule,
    implementation=implementation,
    packed_state=packed_state,
    stochastic_rounding=stochastic_rounding,
    state_bits=state_bits,
    min_8bit_size=min_8bit_size,
    factored=factored,
    min_dim_size_to_factor=min_dim_size_to_factor,
  )
  decay = _add_decayed_weights(weight_decay, weight_decay_mask)
  first, *rest = [
    *([optax.scale(-1.0)] if maximize else []),
    *([core, decay] if decoupled_weight_decay else [decay, core]),
    _in_updates_dtype(optax.scale_by_learning_rate(learning_rate)),
  ]
  return optax.chain(_checked_first(first), *rest)


def _checked_first(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, with the gradients checked against the parameters before it sees them.

  Negation and coupled decay come before the core's own checks: an int gradient would be
  cast, a reshaped one broadcast against its parameter. The state is `inner`'s, unchanged.
  """

  def update_fn(updates, state, params=None):
    _checks.check_gradients_like_params(updates, params)
    return inner.update(updates, state, params)

  return optax.GradientTransformation(inner.init, update_fn)


def _add_decayed_weights(weight_decay, mask) -> optax.GradientTransformation:
  """``optax.add_decayed_weights`` that needs no params when λ is the number 0.

  Always in the chain, so the state's structure does not depend on whether λ arrives as
  the number 0 or as an array (``inject_hyperparams``).
  """
  decay = _in_updates_dtype(optax.add_decayed_weights(weight_decay, mask))
  if not _checks.is_python_zero(weight_decay):
    return decay
  return optax.GradientTransformation(
    decay.init, lambda updates, state, params=None: (updates, state)
  )


def _in_updates_dtype(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, with its updates cast back to the incoming updates' dtypes.

  An array learning rate or weight decay (a schedule, ``inject_hyperparams``) would
  otherwise promote bfloat16 updates to float32.
  """

  def update_fn(updates, state, params=None):
    new_updates, state = inner.update(updates, state, params)
    cast = lambda new, old: new if old is None else new.astype(jnp.result_type(old))
    return jax.tree.map(cast, new_updates, updates, is_leaf=base.is_none), state

  return optax.GradientTransformation(inner.init, update_fn)
