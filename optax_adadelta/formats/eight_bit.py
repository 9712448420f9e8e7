"""The 8-bit state: both averages as 8-bit logarithmic codes with a float32 scale per block.

Each average of a leaf of at least ``min_8bit_size`` elements is stored as a
:class:`~optax_adadelta.QuantizedAverage`: uint8 codes of the parameter's shape and a float32
scale per block of up to 256 elements of the last axis (:mod:`.codes_8bit`), rounded
stochastically when ``stochastic_rounding`` is True (the default), else to the nearer code.
Smaller leaves, and leaves whose last axis has no block size, keep an array in their state
dtype (:mod:`.low_memory`). On CPU a native kernel updates the coded leaves
(``native.update_leaves_8bit``): the same codes as XLA's, bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_adadelta import _rules, native
from optax_adadelta.formats import base, low_memory
from optax_adadelta.formats.base import Options
from optax_adadelta.formats.codes_8bit import (
  QuantizedAverage,
  block_size,
  blocks_of,
  dequantize,
  is_quantized,
  lift_weight,
  quantize,
)
from optax_adadelta.formats.low_memory import LowMemoryAdadeltaState
from optax_adadelta.formats.random_bits import bits_from_key

DEFAULT_MIN_8BIT_SIZE = 4096  # bitsandbytes' default


def scale_by_adadelta_8bit(
  rho: Any = 0.95,
  eps: Any = 1e-6,
  *,
  min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
  stochastic_rounding: bool = True,
  accumulator_dtype: Any = None,
  update_rule: _rules.UpdateRule = "default",
  implementation: str = "auto",
) -> optax.GradientTransformation:
  r"""Adadelta's :func:`~optax_adadelta.scale_by_adadelta` on an 8-bit state (~2 bytes/param).

  Each step reads both averages as float32, runs Algorithm 1 in float32,

  .. math::
    E[g^2]_t &= \rho\, E[g^2]_{t-1} + (1 - \rho)\, g_t^2 \\
    \Delta x_t &= g_t \sqrt{\frac{E[\Delta x^2]_{t-1} + \epsilon}{E[g^2]_t + \epsilon}} \\
    E[\Delta x^2]_t &= \rho\, E[\Delta x^2]_{t-1} + (1 - \rho)\, \Delta x_t^2

  and stores each average of a leaf of at least ``min_8bit_size`` elements as codes
  :math:`c` with :math:`E = S \cdot 2^{-\gamma (255 - c)}` (:math:`E = 0` for
  :math:`c = 0`, :math:`\gamma = 24/254`, :math:`S` the largest value of each block of up to
  256 elements of the last axis). Rounded stochastically, one uniform number per coordinate
  decides both averages, and E[g²]'s probability of rounding up is lifted so that the steps
  stay unbiased (docs/guides/low_memory.md). Same as ``scale_by_adadelta(state_bits=8,
  ...)``.

  Args:
    rho: decay rate of both running averages, in [0, 1].
    eps: added inside both square roots, > 0.
    min_8bit_size: leaves with fewer elements keep an array in ``accumulator_dtype``.
    stochastic_rounding: round to a neighbouring code stochastically (unbiased); False
      rounds to the nearer code, which stalls (docs/guides/low_memory.md).
    accumulator_dtype: dtype of the state of the leaves kept as arrays; ``None`` keeps
      each parameter's.
    update_rule: whose order of floating-point operations to follow (see
      :func:`~optax_adadelta.scale_by_adadelta`).
    implementation: ``"auto"`` (the native kernel on CPU where it can be used), ``"native"``
      (raise where it cannot) or ``"jax"``.

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
      implementation=implementation,
      stochastic_rounding=stochastic_rounding,
      state_bits=8,
      min_8bit_size=min_8bit_size,
    )
  )


def update_quantized(
  leaf: low_memory.CodedLeaf, update_leaf: Any, stochastic: bool, rho: Any, eps: Any
) -> tuple[jax.Array, QuantizedAverage, QuantizedAverage]:
  """(Δx, E[g²], E[Δx²]) of one 8-bit leaf (g, E[g²], E[Δx²], key): dequantize, update,
  quantize (rounded stochastically with the key's bits, E[g²]'s lifted, or to nearest)."""
  g, a, b, key = leaf
  step, a_new, b_new = update_leaf(g, dequantize(a), dequantize(b))
  if not stochastic:
    return (
      step,
      quantize(a_new, a.scale.shape[-1], None, floor_up=True),
      quantize(b_new, b.scale.shape[-1], None),
    )
  # One uniform number rounds both averages of a coordinate: each stays unbiased, and their
  # ratio, all that the step uses, carries the least rounding noise the codes allow (the
  # guide's "Long runs": independent draws let it drift until a coordinate oscillates).
  shared = bits_from_key(key, g.shape) >> 16
  lift = (lift_weight(rho), jnp.asarray(eps, jnp.float32))
  return (
    step,
    quantize(a_new, a.scale.shape[-1], shared, lift, floor_up=True),
    quantize(b_new, b.scale.shape[-1], shared),
  )


def update_flat(
  g, codes_g2, scale_g2, codes_dx2, scale_dx2, key, *, update_leaf, stochastic, rho, eps
) -> tuple:
  """:func:`update_quantized` on the native kernel's operands and results (flat arrays)."""
  leaf = (g, QuantizedAverage(codes_g2, scale_g2), QuantizedAverage(codes_dx2, scale_dx2), key)
  step, a, b = update_quantized(leaf, update_leaf, stochastic, rho, eps)
  return step, a.codes, a.scale, b.codes, b.scale


def leaf_blocks(p: Any, min_8bit_size: int) -> int | None:
  """Number of blocks of the last axis for an 8-bit leaf, or None to keep it an array."""
  dtype = jnp.result_type(p)
  if not jnp.issubdtype(dtype, jnp.floating) or p.ndim == 0 or p.size < min_8bit_size:
    return None
  if p.size == 0:  # nothing to scale: an empty full-precision state costs no bytes
    return None
  size = block_size(low_memory.shard_last(p))
  return None if size is None else p.shape[-1] // size


def _zero_average(p: Any, min_8bit_size: int) -> QuantizedAverage | None:
  blocks = leaf_blocks(p, min_8bit_size)
  if blocks is None:
    return None
  codes = jnp.zeros_like(p, dtype=jnp.uint8)  # the parameter's sharding
  scale = jnp.max(blocks_of(jnp.zeros_like(p, jnp.float32), blocks), axis=-1)
  return QuantizedAverage(codes, scale)


def _read(average: Any) -> Any:
  """An average as float32 (codes dequantized, 16 bits widened) or its own dtype."""
  if is_quantized(average):
    return dequantize(average)
  return average.astype(jnp.float32) if low_memory.narrower_than_float32(average.dtype) else average


def average_values(tree: Any) -> Any:
  """A tree of averages (arrays or QuantizedAverage) as float32/own-dtype arrays."""
  return jax.tree.map(lambda a: None if a is None else _read(a), tree, is_leaf=is_quantized)


class EightBitFormat:
  """``state_bits=8``: the averages of large leaves in 8-bit codes."""

  name = "8-bit"
  state_types: tuple[type, ...] = (LowMemoryAdadeltaState,)

  def selected_by(self, options: Options) -> bool:
    return options.state_bits == 8

  def refuse(self, options: Options) -> None:
    if options.packed_state:
      raise ValueError(
        "packed_state=True cannot be combined with stochastic_rounding=True or state_bits=8: "
        "the low-memory state mirrors the parameters leaf by leaf; drop one of the two"
      )

  def transformation(self, options: Options) -> optax.GradientTransformation:
    self.refuse(options)
    rho, eps, stochastic = options.rho, options.eps, options.stochastic_rounding
    update_leaf = base.leaf_update(options)
    pure = functools.partial(
      update_flat, update_leaf=update_leaf, stochastic=stochastic, rho=rho, eps=eps
    )
    hyper = base.decide_native(options)

    def update_coded(leaves: list[low_memory.CodedLeaf], state: Any) -> list:
      del state
      flat = [(g, a.codes, a.scale, b.codes, b.scale, key) for g, a, b, key in leaves]
      if hyper is None:
        results = [pure(*leaf) for leaf in flat]
      else:
        results = native.update_leaves_8bit(flat, hyper, stochastic, pure)
      return [
        (step, QuantizedAverage(codes_g2, scale_g2), QuantizedAverage(codes_dx2, scale_dx2))
        for step, codes_g2, scale_g2, codes_dx2, scale_dx2 in results
      ]

    return low_memory.transformation(
      update_leaf,
      options.accumulator_dtype,
      stochastic_rounding=stochastic,
      coded=is_quantized,
      init_coded=lambda p, dtype, field: _zero_average(p, options.min_8bit_size),
      update_coded=update_coded,
      what="scale_by_adadelta(state_bits=8)",
    )

  def averages(self, state: LowMemoryAdadeltaState) -> tuple[Any, Any]:
    return average_values(state.e_g2), average_values(state.e_dx2)

  def with_averages(self, state: LowMemoryAdadeltaState, e_g2: Any, e_dx2: Any) -> Any:
    raise ValueError(low_memory.NOT_LOADABLE)

  def zero_shardings(self, state: LowMemoryAdadeltaState, leaf_sharding: Any) -> Any:
    return low_memory.zero_shardings(
      state, leaf_sharding, is_quantized, low_memory.whole_blocks("an 8-bit average")
    )


FORMAT = EightBitFormat()
