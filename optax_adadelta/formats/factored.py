"""The factored state: each matrix's two averages as row and column means (Adafactor's rank-1).

Adafactor (Shazeer & Stern 2018) keeps Adam's second moment of an n × m matrix as its n row
means and m column means and reads entry (i, j) back as their outer product over the grand
mean. Both of Adadelta's averages are running means of squares, so both factor the same way:
O(n + m) state per matrix instead of O(n·m). A leaf is factored over its two largest
dimensions when both are at least ``min_dim_size_to_factor`` (optax.adafactor's rule); every
other leaf (vectors, scalars, small matrices, complex leaves) keeps full per-entry averages,
updated by Algorithm 1 exactly as the full state does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from optax_adadelta import _checks, _rules
from optax_adadelta.formats import base, low_memory
from optax_adadelta.formats.base import Options


class FactoredAverage(NamedTuple):
  """One average of a factored leaf: its means along each of the two factored axes.

  For a parameter of shape ``(..., n, ..., m, ...)`` factored over axes ``d0 < d1``:

  Attributes:
    rows: float32 means over axis ``d1``, the parameter's shape without it (n rows).
    cols: float32 means over axis ``d0``, the parameter's shape without it (m columns).
  """

  rows: jax.Array
  cols: jax.Array


class FactoredAdadeltaState(NamedTuple):
  """State of :func:`scale_by_adadelta_factored` (``scale_by_adadelta(factored=True)``).

  Attributes:
    count: int32 number of updates so far.
    e_g2: E[g²], a tree shaped like the parameters: a :class:`FactoredAverage` for each
      factored leaf, an array like the full state's for every other.
    e_dx2: E[Δx²], the same layout. With ``factor_e_g2=False`` (or ``factor_e_dx2=False``)
      that average is kept as arrays like the full state's everywhere.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  e_g2: Any
  e_dx2: Any


# So that a `jax.export`-ed step taking this state can be serialized.
jax.export.register_namedtuple_serialization(
  FactoredAverage, serialized_name="optax_adadelta.FactoredAverage"
)
jax.export.register_namedtuple_serialization(
  FactoredAdadeltaState, serialized_name="optax_adadelta.FactoredAdadeltaState"
)


def is_factored(node: Any) -> bool:
  return isinstance(node, FactoredAverage)


def factored_axes(shape: tuple[int, ...], min_dim_size_to_factor: int) -> tuple[int, int] | None:
  """The two axes a leaf of `shape` is factored over (in increasing order), or None.

  The two largest dimensions (the later one of equal sizes, as ``np.argsort`` orders them),
  when both are at least `min_dim_size_to_factor`: optax.adafactor's rule.
  """
  if len(shape) < 2:
    return None
  second, first = (int(a) for a in np.argsort(shape, kind="stable")[-2:])
  if shape[second] < min_dim_size_to_factor:
    return None
  return min(first, second), max(first, second)


def estimate(average: FactoredAverage, axes: tuple[int, int]) -> jax.Array:
  """Every entry of a factored average: rows_i · cols_j / mean(rows) (0 where all are 0)."""
  d0, d1 = axes
  rows = jnp.expand_dims(average.rows, d1)
  cols = jnp.expand_dims(average.cols, d0)
  total = jnp.expand_dims(jnp.mean(average.rows, axis=d0), (d0, d1))
  return rows * (cols / jnp.where(total > 0, total, 1.0))  # cols / total ~ 1: no underflow


def factor(values: jax.Array, axes: tuple[int, int]) -> FactoredAverage:
  """The row and column means of `values` (float32)."""
  values = values.astype(jnp.float32)
  return FactoredAverage(jnp.mean(values, axis=axes[1]), jnp.mean(values, axis=axes[0]))


def _axes_of(node: FactoredAverage, shape: tuple[int, ...]) -> tuple[int, int] | None:
  """The axes `node` factors a leaf of `shape` over, or None if it cannot be that leaf's."""
  axes = factored_axes(shape, 1)  # the leaf's two largest: the same ones as at init
  if axes is None:
    return None
  without = lambda axis: shape[:axis] + shape[axis + 1 :]
  if (tuple(node.rows.shape), tuple(node.cols.shape)) != (without(axes[1]), without(axes[0])):
    return None
  return axes


def _check_factored_leaf(path: Any, grad: Any, node: FactoredAverage) -> None:
  shape = tuple(jnp.shape(grad))
  if _axes_of(node, shape) is None:
    where = jax.tree_util.keystr(path) or "the root"
    raise ValueError(
      f"The gradient at {where} has shape {shape}, but its parameter was factored at init "
      f"into row means of shape {tuple(node.rows.shape)} and column means of shape "
      f"{tuple(node.cols.shape)}. Pass gradients shaped like the parameters given to init."
    )
  _checks.check_gradient_leaf(path, grad, jax.ShapeDtypeStruct(shape, node.rows.dtype))


def scale_by_adadelta_factored(
  rho: Any = 0.95,
  eps: Any = 1e-6,
  *,
  min_dim_size_to_factor: int | None = None,
  factor_e_g2: bool = True,
  factor_e_dx2: bool = True,
  accumulator_dtype: Any = None,
  update_rule: _rules.UpdateRule = "default",
) -> optax.GradientTransformation:
  r"""Adadelta's :func:`~optax_adadelta.scale_by_adadelta` with factored averages (O(n + m)).

  A leaf whose two largest dimensions are both at least ``min_dim_size_to_factor`` keeps,
  for each average :math:`E`, only its means over each of those axes, :math:`R_i = \frac1m
  \sum_j E_{ij}` and :math:`C_j = \frac1n \sum_i E_{ij}` (other axes are kept), and reads
  every entry back as Adafactor's rank-1 estimate :math:`\hat E_{ij} = R_i C_j / \bar R`,
  :math:`\bar R = \frac1n \sum_i R_i` (0 where :math:`\bar R = 0`). A step factors the
  history and keeps the present gradient exact:

  .. math::
    E[g^2]_t &= \rho\, \hat E[g^2]_{t-1} + (1 - \rho)\, g_t^2 \\
    \Delta x_t &= g_t \sqrt{\frac{\hat E[\Delta x^2]_{t-1} + \epsilon}{E[g^2]_t + \epsilon}} \\
    E[\Delta x^2]_t &= \rho\, \hat E[\Delta x^2]_{t-1} + (1 - \rho)\, \Delta x_t^2

  and stores the row and column means of :math:`E[g^2]_t` and :math:`E[\Delta x^2]_t`.

  *Consistency with Algorithm 1.* The rank-1 estimate keeps the row and column means it is
  built from, so the stored means follow Algorithm 1's own recursion exactly,
  :math:`R_t = \rho R_{t-1} + (1 - \rho)\,\mathrm{mean}_j\, x_{t,ij}` with :math:`x = g^2`
  or :math:`\Delta x^2`: they are the row and column means of running averages that start
  at 0. Where an average is rank-1 (:math:`E_{ij} = a_i b_j`: one scale per row times one per
  column, as from the same input scale in every column) the estimate is exact and every step
  is Algorithm 1's. Because the present :math:`g_t^2` enters exactly, :math:`E[g^2]_t \ge
  (1 - \rho) g_t^2` as in Algorithm 1, so no step exceeds :math:`\sqrt{(\hat E[\Delta x^2] +
  \epsilon)/(1 - \rho)}` however poor the estimate of a single entry.

  *What it gives up.* Each entry's history is only its row's and column's: an entry whose
  gradients are far larger or smaller than the product of its row and column scales (a
  sparse feature, a coordinate with its own curvature) gets the rank-1 value of both
  averages. For E[Δx²] that costs little; for E[g²] it breaks a balance Adadelta relies on.
  In Algorithm 1, :math:`E[\Delta x^2]` grows per step by the factor :math:`\rho + (1 -
  \rho)\, g_t^2 / E[g^2]_t` (ignoring ε), whose mean is 1 once :math:`E[g^2]` tracks
  :math:`g^2`: the steps' scale is kept, not inflated. With a factored :math:`E[g^2]` an
  entry whose :math:`g^2` its row and column underestimate grows its :math:`E[\Delta x^2]`
  step after step, and one they overestimate shrinks it; nothing restores them but the
  loss's own curvature. On gradients whose spread per entry is not rank-1 and that do not
  respond to the steps, the factored state's steps grow without bound (measured in
  ``tests/test_factored.py``), while factoring only :math:`E[\Delta x^2]`
  (``factor_e_g2=False``) keeps the balance: the mean of :math:`g^2 / E[g^2]` is still 1
  per entry. Unfactored leaves lose nothing.

  Args:
    rho: decay rate of both running averages, in [0, 1].
    eps: added inside both square roots, > 0.
    min_dim_size_to_factor: a leaf is factored when its two largest dimensions are both at
      least this (optax.adafactor's keyword; ``None`` means its default, 128).
    factor_e_g2: ``False`` keeps E[g²] per entry (in ``accumulator_dtype``) and factors
      only E[Δx²]: about 4 bytes per parameter, and no drift (see above).
    factor_e_dx2: ``False`` keeps E[Δx²] per entry and factors only E[g²]. At least one
      of the two must be factored.
    accumulator_dtype: dtype of the unfactored averages (see
      :func:`~optax_adadelta.scale_by_adadelta`); the factored means are float32 (or wider).
    update_rule: whose order of floating-point operations to follow in the step (see
      :func:`~optax_adadelta.scale_by_adadelta`).

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`FactoredAdadeltaState`. Same as ``scale_by_adadelta(factored=True, ...)``.

  References:
    N. Shazeer, M. Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    ICML 2018, arXiv:1804.04235.
  """
  _checks.check_flag("factor_e_g2", factor_e_g2)
  _checks.check_flag("factor_e_dx2", factor_e_dx2)
  if not (factor_e_g2 or factor_e_dx2):
    raise ValueError(
      "factor_e_g2 and factor_e_dx2 are both False: nothing would be factored; use "
      "scale_by_adadelta (the full state) instead"
    )
  options = base.options(
    rho,
    eps,
    accumulator_dtype=accumulator_dtype,
    update_rule=update_rule,
    factored=True,
    min_dim_size_to_factor=min_dim_size_to_factor,
  )
  fields = ("e_g2",) * factor_e_g2 + ("e_dx2",) * factor_e_dx2
  return FORMAT.build(options, fields)


def _update_leaf(leaf: low_memory.CodedLeaf, update_leaf: Callable[..., tuple]) -> tuple:
  """(Δx, E[g²] node, E[Δx²] node) of one leaf with a factored average."""
  g, e_g2, e_dx2, _ = leaf
  node = e_g2 if is_factored(e_g2) else e_dx2
  axes = _axes_of(node, tuple(jnp.shape(g)))
  assert axes is not None  # the gradient was checked against this node
  read = lambda a: estimate(a, axes) if is_factored(a) else low_memory.widen(a)
  step, new_g2, new_dx2 = update_leaf(g, read(e_g2), read(e_dx2))
  store = lambda new, old: factor(new, axes) if is_factored(old) else new.astype(old.dtype)
  return step, store(new_g2, e_g2), store(new_dx2, e_dx2)


class FactoredFormat:
  """``factored=True``: row and column means for each matrix, full averages elsewhere."""

  name = "factored"
  state_types: tuple[type, ...] = (FactoredAdadeltaState,)

  def selected_by(self, options: Options) -> bool:
    return options.factored

  def refuse(self, options: Options) -> None:
    for keyword, value in (  # state_bits=8 turns stochastic_rounding on: named first
      ("state_bits", options.state_bits),
      ("packed_state", options.packed_state),
      ("stochastic_rounding", options.stochastic_rounding),
    ):
      if value:
        raise ValueError(
          f"factored=True cannot be combined with {keyword}={value!r}: the factored state "
          "keeps row and column means of each matrix in float32 and its other leaves per "
          "entry; drop one of the two"
        )
    if options.implementation == "native":
      raise ValueError(
        "implementation='native' cannot be combined with factored=True: the factored "
        "state is updated by XLA; use implementation='auto' or 'jax'"
      )

  def transformation(self, options: Options) -> optax.GradientTransformation:
    return self.build(options, ("e_g2", "e_dx2"))

  def build(self, options: Options, fields: tuple[str, ...]) -> optax.GradientTransformation:
    """The transformation factoring the averages named in `fields` ("e_g2", "e_dx2")."""
    self.refuse(options)
    update_leaf = base.leaf_update(options)

    def init_factored(p: Any, dtype: Any, field: str) -> FactoredAverage | None:
      axes = factored_axes(tuple(p.shape), options.min_dim_size_to_factor)
      if field not in fields or axes is None or not jnp.issubdtype(dtype, jnp.floating):
        return None
      zeros = jnp.zeros_like(p, dtype=jnp.promote_types(dtype, jnp.float32))
      return factor(zeros, axes)  # sums of zeros_like: each mean keeps its axes' sharding

    return low_memory.transformation(
      update_leaf,
      options.accumulator_dtype,
      stochastic_rounding=False,
      what="scale_by_adadelta(factored=True)",
      coded=is_factored,
      init_coded=init_factored,
      update_coded=lambda leaves, state: [_update_leaf(leaf, update_leaf) for leaf in leaves],
      make_state=FactoredAdadeltaState,
      state_type=FactoredAdadeltaState,
      check_coded=_check_factored_leaf,
      wrap_coded=False,
    )

  def averages(self, state: FactoredAdadeltaState) -> tuple[Any, Any]:
    """Both averages per entry: the rank-1 estimates of the factored leaves."""

    def dense(node: Any, like: Any) -> Any:
      if not is_factored(node):
        return node
      rows, cols = node
      shape = _shape_of(rows.shape, cols.shape, like)
      return estimate(node, factored_axes(shape, 1))  # type: ignore[arg-type]

    e_g2 = jax.tree.map(lambda n: dense(n, None), state.e_g2, is_leaf=is_factored)
    return e_g2, jax.tree.map(dense, state.e_dx2, e_g2, is_leaf=is_factored)

  def with_averages(self, state: FactoredAdadeltaState, e_g2: Any, e_dx2: Any) -> Any:
    """`state` holding these per-entry averages: the row and column means of each factored
    leaf's (what the factored state keeps of any average), the others as given."""

    def load(node: Any, new: Any) -> Any:
      if not is_factored(node):
        return jnp.asarray(new, node.dtype)
      axes = _axes_of(node, tuple(jnp.shape(new)))
      if axes is None:
        raise ValueError(
          f"an average of shape {tuple(jnp.shape(new))} does not fit a factored leaf with "
          f"row means {tuple(node.rows.shape)} and column means {tuple(node.cols.shape)}"
        )
      return factor(jnp.asarray(new), axes)

    return FactoredAdadeltaState(
      state.count,
      jax.tree.map(load, state.e_g2, e_g2, is_leaf=is_factored),
      jax.tree.map(load, state.e_dx2, e_dx2, is_leaf=is_factored),
    )

  def zero_shardings(self, state: FactoredAdadeltaState, leaf_sharding: Any) -> Any:
    """Row and column means split as their parameter is (its split without the averaged
    axis): their rank-1 estimate is then split like the gradient. Split each on its own,
    both could take the one mesh axis, and no product of the two can be laid out so."""

    def one(node: Any) -> Any:
      if not is_factored(node):
        return leaf_sharding(node)
      shape = _shape_of(tuple(node.rows.shape), tuple(node.cols.shape), None)
      d0, d1 = factored_axes(shape, 1)  # type: ignore[misc]
      whole = leaf_sharding(jax.ShapeDtypeStruct(shape, node.rows.dtype))
      spec = tuple(whole.spec) + (None,) * (len(shape) - len(whole.spec))
      without = lambda axis: whole.update(spec=P(*spec[:axis], *spec[axis + 1 :]))
      return FactoredAverage(without(d1), without(d0))

    return jax.tree.map(one, state, is_leaf=is_factored)


def _shape_of(rows: tuple[int, ...], cols: tuple[int, ...], like: Any) -> tuple[int, ...]:
  """The parameter shape whose row and column means have these shapes.

  `like` (an array of that shape, e.g. E[g²]'s estimate) decides; without it, the shape
  whose two largest axes, removed one at a time, give `rows` and `cols`."""
  if like is not None:
    return tuple(like.shape)
  ndim = len(rows) + 1
  for d1 in range(1, ndim):
    for d0 in range(d1):
      shape = (*rows[:d1], cols[d1 - 1], *rows[d1:])
      if factored_axes(shape, 1) == (d0, d1) and shape[:d0] + shape[d0 + 1 :] == cols:
        return shape
  raise ValueError(f"no parameter shape has row means {rows} and column means {cols}")


FORMAT = FactoredFormat()
