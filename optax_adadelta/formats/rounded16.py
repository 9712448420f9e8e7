"""The 16-bit state: E[g²] in bfloat16 (or float16) and E[Δx²] as a 16-bit ratio code.

In exact arithmetic Adadelta's ratio r² = (E[Δx²] + ε)/(E[g²] + ε) is nearly conserved from
step to step, so a rounding error of either stored average is never forgotten: it rescales
the step for good, and independent roundings add up to a random walk of log r. Two 16-bit
averages rounded stochastically (this format before #22) drifted so over 10,000 steps, to
1.2× float64's loss and 2.3× its largest step. This format stores instead

* E[g²] as a 16-bit float, rounded stochastically (up with probability (v − lo)/(hi − lo)),
* R = (E[Δx²] + ε)/(E[g²] + ε) as a 16-bit logarithmic block code (:mod:`.ratio_code`:
  levels 0.042 % apart over 40 octaves, a float32 scale per block of up to 256), rounded
  stochastically with the same uniform number,

and reads E[Δx²] = max(R·(E[g²] + ε) − ε, 0). The step's r² is then R·(E[g²] + ε)/(ρ·E[g²]
+ (1 − ρ)·g² + ε): E[g²]'s rounding reaches it only through the (1 − ρ)·g² term, R's once,
and R's is 10 times finer than bfloat16's. 4 + 4/B bytes per parameter (B the block).

R depends on ε, so the state keeps the ε its ratios were formed with and reads E[Δx²] with
it: a traced ε (``vmap``), or one that ``optax.inject_hyperparams`` changes, reads the
average stored, and the next store uses the new ε.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_adadelta import _rules
from optax_adadelta.formats import base, low_memory, ratio_code
from optax_adadelta.formats.base import Options
from optax_adadelta.formats.random_bits import bits_from_key
from optax_adadelta.formats.ratio_code import RatioCode, is_ratio_code


class Rounded16AdadeltaState(NamedTuple):
  """State of ``scale_by_adadelta_16bit`` (``scale_by_adadelta(stochastic_rounding=True)``).

  Attributes:
    count: int32 number of updates so far; seeds the stochastic rounding.
    eps: float32, the ε with which the stored ratios were formed (the last update's).
    e_g2: E[g²], a tree shaped like the parameters: 16-bit arrays (full precision for the
      leaves whose state dtype is float32 or wider).
    e_dx2: E[Δx²], the same tree: a :class:`RatioCode` of R = (E[Δx²] + ε)/(E[g²] + ε)
      where E[g²] is 16-bit, else an array like E[g²]'s.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  eps: jax.Array
  e_g2: Any
  e_dx2: Any


jax.export.register_namedtuple_serialization(  # for jax.export-ed steps
  Rounded16AdadeltaState, serialized_name="optax_adadelta.Rounded16AdadeltaState"
)

_REFUSAL = "the 16-bit low-memory state is updated by XLA"


def scale_by_adadelta_16bit(
  rho: Any = 0.95,
  eps: Any = 1e-6,
  *,
  accumulator_dtype: Any = "bfloat16",
  update_rule: _rules.UpdateRule = "default",
) -> optax.GradientTransformation:
  r"""Adadelta's :func:`~optax_adadelta.scale_by_adadelta` on a 16-bit state (~4 bytes/param).

  Each step reads E[g²] (16-bit) and :math:`E[\Delta x^2] = \max(R (E[g^2] + \epsilon) -
  \epsilon, 0)` as float32, runs Algorithm 1 in float32,

  .. math::
    E[g^2]_t &= \rho\, E[g^2]_{t-1} + (1 - \rho)\, g_t^2 \\
    \Delta x_t &= g_t \sqrt{\frac{E[\Delta x^2]_{t-1} + \epsilon}{E[g^2]_t + \epsilon}} \\
    E[\Delta x^2]_t &= \rho\, E[\Delta x^2]_{t-1} + (1 - \rho)\, \Delta x_t^2

  and stores :math:`E[g^2]_t` in ``accumulator_dtype`` and
  :math:`R_t = (E[\Delta x^2]_t + \epsilon) / (E[g^2]_t + \epsilon)` as a 16-bit
  logarithmic code (a float32 scale per block of up to 256 elements of the last axis), both
  rounded stochastically with one uniform number per coordinate, so each is unbiased. Same
  as ``scale_by_adadelta(accumulator_dtype=..., stochastic_rounding=True)``.

  Args:
    rho: decay rate of both running averages, in [0, 1].
    eps: added inside both square roots, > 0; may change between steps
      (``optax.inject_hyperparams``) or be traced (``vmap``).
    accumulator_dtype: ``"bfloat16"`` (the default; a name, so that
      ``optax.inject_hyperparams`` does not take it for a number) or ``jnp.float16``
      (``jnp.bfloat16`` also works); ``None`` keeps each parameter's dtype (then at least
      one parameter must be narrower than float32; the others keep a full-precision state).
    update_rule: whose order of floating-point operations to follow (see
      :func:`~optax_adadelta.scale_by_adadelta`).

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`Rounded16AdadeltaState`.
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


def _zero_ratio(p: Any, dtype: Any, field: str) -> RatioCode | None:
  """E[Δx²] = 0 of a 16-bit leaf as R = ε/ε = 1; None for every other average."""
  if field != "e_dx2" or not low_memory.narrower_than_float32(dtype) or p.size == 0:
    return None
  blocks = 1 if p.ndim == 0 else p.shape[-1] // ratio_code.block_size(low_memory.shard_last(p))
  return ratio_code.ones(p, blocks)


def update_ratio_leaf(
  leaf: low_memory.CodedLeaf, update_leaf: Any, eps_read: jax.Array, eps: jax.Array
) -> tuple[jax.Array, jax.Array, RatioCode]:
  """(Δx, E[g²], R) of one 16-bit leaf (g, E[g²], R, key): read E[Δx²] with the ε its R was
  formed with, update in float32, store E[g²] and the new R, rounded with one uniform number."""
  g, e_g2, ratio, key = leaf
  old_g2 = e_g2.astype(jnp.float32)
  old_dx2 = jnp.maximum(ratio_code.decode(ratio) * (old_g2 + eps_read) - eps_read, 0.0)
  step, new_g2, new_dx2 = update_leaf(g, old_g2, old_dx2)
  bits = bits_from_key(key, g.shape) >> 16
  stored_g2 = low_memory.round_stochastically(new_g2, e_g2.dtype, bits)
  # R from the unrounded E[g²]: its rounding then reaches the next step's ratio only
  # through the (1 − ρ)·g² term. 0xFFFF − bits goes up where bfloat16's carry does.
  new_ratio = (new_dx2 + eps) / (new_g2 + eps)
  blocks = 1 if ratio.scale.ndim == 0 else ratio.scale.shape[-1]
  return step, stored_g2, ratio_code.encode(new_ratio, blocks, 0xFFFF - bits)


class Rounded16Format:
  """``stochastic_rounding=True`` without ``state_bits``: E[g²] in 16 bits, R coded."""

  name = "16-bit"
  state_types: tuple[type, ...] = (Rounded16AdadeltaState,)

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
    update_leaf = base.leaf_update(options)
    eps = lambda: jnp.asarray(options.eps, jnp.float32)

    def update_coded(leaves: list[low_memory.CodedLeaf], state: Rounded16AdadeltaState):
      return [update_ratio_leaf(leaf, update_leaf, state.eps, eps()) for leaf in leaves]

    return low_memory.transformation(
      update_leaf,
      options.accumulator_dtype,
      stochastic_rounding=True,
      what="scale_by_adadelta(stochastic_rounding=True)",
      coded=is_ratio_code,
      init_coded=_zero_ratio,
      update_coded=update_coded,
      make_state=lambda count, e_g2, e_dx2: Rounded16AdadeltaState(count, eps(), e_g2, e_dx2),
      state_type=Rounded16AdadeltaState,
      needs_narrow=True,
    )

  def averages(self, state: Rounded16AdadeltaState) -> tuple[Any, Any]:
    return average_values(state)

  def with_averages(self, state: Rounded16AdadeltaState, e_g2: Any, e_dx2: Any) -> Any:
    raise ValueError(low_memory.NOT_LOADABLE)

  def zero_shardings(self, state: Rounded16AdadeltaState, leaf_sharding: Any) -> Any:
    return low_memory.zero_shardings(
      state, leaf_sharding, is_ratio_code, low_memory.whole_blocks("a 16-bit ratio code")
    )


def average_values(state: Rounded16AdadeltaState) -> tuple[Any, Any]:
  """E[g²] and E[Δx²] of a 16-bit state as trees of float32 (or wider) arrays."""
  widen = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))
  e_g2 = jax.tree.map(widen, state.e_g2)

  def e_dx2(node: Any, g2: Any) -> Any:
    if not is_ratio_code(node):
      return widen(node)
    return jnp.maximum(ratio_code.decode(node) * (g2 + state.eps) - state.eps, 0.0)

  return e_g2, jax.tree.map(e_dx2, state.e_dx2, e_g2, is_leaf=is_ratio_code)


# Checkpoints of the layout before #22 --------------------------------------------------
# There the 16-bit state was a LowMemoryAdadeltaState(count, e_g2, e_dx2) of two 16-bit trees.


def _is_state(node: Any) -> bool:
  return isinstance(node, Rounded16AdadeltaState)


def layout_before_22(opt_state: Any) -> Any:
  """`opt_state` (a state or its shapes) with each 16-bit state in the layout before #22: a
  template for ``checkpoint.restore`` of a checkpoint written then."""

  def old(node: Any) -> Any:
    if not _is_state(node):
      return node
    like = lambda code, g2: (
      jax.ShapeDtypeStruct(code.codes.shape, g2.dtype) if is_ratio_code(code) else code
    )
    e_dx2 = jax.tree.map(like, node.e_dx2, node.e_g2, is_leaf=is_ratio_code)
    return low_memory.LowMemoryAdadeltaState(node.count, node.e_g2, e_dx2)

  return jax.tree.map(old, opt_state, is_leaf=_is_state)


def from_layout_before_22(old_state: Any, new_state: Any) -> Any:
  """The state restored with :func:`layout_before_22`'s template, in this layout: `new_state`
  (``tx.init(params)`` of the optimizer to resume) gives the structure, blocks and ε; each
  E[Δx²] becomes R = (E[Δx²] + ε)/(E[g²] + ε), rounded to the nearer code."""

  def convert(new: Any, old: Any) -> Any:
    if not _is_state(new):
      return old

    def ratio(code: Any, e_g2: Any, e_dx2: Any) -> Any:
      if not is_ratio_code(code):
        return e_dx2
      e_g2, e_dx2 = e_g2.astype(jnp.float32), e_dx2.astype(jnp.float32)
      blocks = 1 if code.scale.ndim == 0 else code.scale.shape[-1]
      nearest = jnp.full(e_g2.shape, 0x7FFF, jnp.uint32)  # u just below ½: up when p > ½
      return ratio_code.encode((e_dx2 + new.eps) / (e_g2 + new.eps), blocks, nearest)

    e_dx2 = jax.tree.map(ratio, new.e_dx2, old.e_g2, old.e_dx2, is_leaf=is_ratio_code)
    return Rounded16AdadeltaState(old.count, new.eps, old.e_g2, e_dx2)

  return jax.tree.map(convert, new_state, old_state, is_leaf=_is_state)


FORMAT = Rounded16Format()
