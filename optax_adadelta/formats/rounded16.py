"""The 16-bit state: bfloat16 (or float16) averages rounded stochastically.

Each new average is rounded to one of the two neighbouring 16-bit numbers, the upper with
probability (v − lo)/(hi − lo), so it is v in expectation. Rounded to nearest,
(1 − ρ)(g² − E[g²]) falls under half an ulp once E[g²] is within 2⁻⁹/(1 − ρ) of its target
(bfloat16, 1/0.05 · 2⁻⁹ ≈ 4 %), and the average stalls there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_adadelta import _rules
from optax_adadelta.formats import base, low_memory
from optax_adadelta.formats.base import Options
from optax_adadelta.formats.low_memory import LowMemoryAdadeltaState

_REFUSAL = "the 16-bit low-memory state is updated by XLA"


def scale_by_adadelta_16bit(
  rho: Any = 0.95,
  eps: Any = 1e-6,
  *,
  accumulator_dtype: Any = jnp.bfloat16,
  update_rule: _rules.UpdateRule = "default",
) -> optax.GradientTransformation:
  r"""Adadelta's :func:`~optax_adadelta.scale_by_adadelta` on a 16-bit state (4 bytes/param).

  Each step widens both averages to float32, runs Algorithm 1 in float32,

  .. math::
    E[g^2]_t &= \rho\, E[g^2]_{t-1} + (1 - \rho)\, g_t^2 \\
    \Delta x_t &= g_t \sqrt{\frac{E[\Delta x^2]_{t-1} + \epsilon}{E[g^2]_t + \epsilon}} \\
    E[\Delta x^2]_t &= \rho\, E[\Delta x^2]_{t-1} + (1 - \rho)\, \Delta x_t^2

  and rounds each average stochastically to ``accumulator_dtype``: up with probability
  (v − lo)/(hi − lo), so that it is unbiased. Same as ``scale_by_adadelta(accumulator_dtype=
  ..., stochastic_rounding=True)``.

  Args:
    rho: decay rate of both running averages, in [0, 1].
    eps: added inside both square roots, > 0.
    accumulator_dtype: ``jnp.bfloat16`` (the default) or ``jnp.float16``; ``None`` keeps
      each parameter's dtype (then at least one parameter must be narrower than float32).
    update_rule: whose order of floating-point operations to follow (see
      :func:`~optax_adadelta.scale_by_adadelta`).

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`~optax_adadelta.LowMemoryAdadeltaState`.
  """
  return FORMAT.transformation(
    base.options(
      rho,
      eps,
      accumulator_dtype=accumulator_dtype,
      update_rule=update_rule,
      stochastic_rounding=True,
    )
  )


class Rounded16Format:
  """``stochastic_rounding=True`` without ``state_bits``: 16-bit averages rounded so."""

  name = "16-bit"
  state_types: tuple[type, ...] = (LowMemoryAdadeltaState,)

  def selected_by(self, options: Options) -> bool:
    return bool(options.stochastic_rounding) and options.state_bits is None

  def refuse(self, options: Options) -> None:
    if options.packed_state:
      raise ValueError(
        "packed_state=True cannot be combined with stochastic_rounding=True or state_bits=8: "
        "the low-memory state mirrors the parameters leaf by leaf; drop one of the two"
      )
    if options.implementation == "native":
      raise ValueError(
        "implementation='native' cannot be combined with stochastic_rounding=True without "
        f"state_bits=8: {_REFUSAL}; drop one of the two"
      )

  def transformation(self, options: Options) -> optax.GradientTransformation:
    self.refuse(options)
    return low_memory.transformation(
      base.leaf_update(options),
      options.accumulator_dtype,
      stochastic_rounding=True,
      what="scale_by_adadelta(stochastic_rounding=True)",
    )

  def averages(self, state: LowMemoryAdadeltaState) -> tuple[Any, Any]:
    widen = lambda a: a.astype(jnp.float32) if low_memory.narrower_than_float32(a.dtype) else a
    return jax.tree.map(widen, state.e_g2), jax.tree.map(widen, state.e_dx2)

  def with_averages(self, state: LowMemoryAdadeltaState, e_g2: Any, e_dx2: Any) -> Any:
    raise ValueError(low_memory.NOT_LOADABLE)

  def zero_shardings(self, state: LowMemoryAdadeltaState, leaf_sharding: Any) -> Any:
    return low_memory.zero_shardings(state, leaf_sharding, lambda node: False)


FORMAT = Rounded16Format()
