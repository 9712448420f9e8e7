"""Adadelta (Zeiler 2012) as optax gradient transformations."""

from __future__ import annotations

from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

from optax_adadelta import _checks, _native, _packed

Scalar: TypeAlias = float | jax.Array
ScalarOrSchedule: TypeAlias = optax.ScalarOrSchedule


class ScaleByAdadeltaState(NamedTuple):
  """State of :func:`scale_by_adadelta`: two trees shaped like the parameters.

  Attributes:
    e_g2: E[g²], the running average of squared gradients.
    e_dx2: E[Δx²], the running average of squared (unscaled) steps.

  Both start at zero. For a complex parameter the leaf is complex: its real
  part holds the average for the real coordinate and its imaginary part the
  average for the imaginary coordinate (PyTorch's ``view_as_real`` layout).
  """

  e_g2: optax.Params
  e_dx2: optax.Params


def _adadelta_coordinates(g, e_g2, e_dx2, rho, one_minus_rho, eps):
  """Algorithm 1 of the paper on real arrays of one dtype, in one pass."""
  e_g2 = rho * e_g2 + one_minus_rho * (g * g)
  step = g * jnp.sqrt((e_dx2 + eps) / (e_g2 + eps))  # _kernel.cc: the same operations
  e_dx2 = rho * e_dx2 + one_minus_rho * (step * step)
  return step, e_g2, e_dx2


def _coordinates(x: jax.Array) -> tuple[jax.Array, ...]:
  return (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)


def _from_coordinates(parts, dtype) -> jax.Array:
  whole = jax.lax.complex(*parts) if len(parts) == 2 else parts[0]
  return whole.astype(dtype)


def scale_by_adadelta(
  rho: Scalar = 0.95,
  eps: Scalar = 1e-6,
  *,
  accumulator_dtype: Any = None,
  implementation: str = "auto",
  packed_state: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales gradients by Adadelta's ratio of running averages.

  Per coordinate, with :math:`E[g^2]_0 = E[\Delta x^2]_0 = 0`:

  .. math::
    E[g^2]_t &= \rho\, E[g^2]_{t-1} + (1 - \rho)\, g_t^2 \\
    \Delta x_t &= g_t \sqrt{\frac{E[\Delta x^2]_{t-1} + \epsilon}
                                 {E[g^2]_t + \epsilon}} \\
    E[\Delta x^2]_t &= \rho\, E[\Delta x^2]_{t-1} + (1 - \rho)\, \Delta x_t^2

  and the update returned is :math:`\Delta x_t` (positive, like every optax
  ``scale_by_*``; :func:`adadelta` flips the sign and applies the learning
  rate). :math:`E[\Delta x^2]` accumulates this unscaled step, as the paper,
  PyTorch, Keras and optax do.

  The real and imaginary parts of a complex gradient are independent
  coordinates (PyTorch's convention). The arithmetic runs in at least float32;
  the state is stored in its own dtype, which never changes across updates,
  and the updates come back in the gradients' dtype.

  On CPU, float32 and bfloat16 leaves are updated by a fused native loop
  (built at install time, see ``implementation``) with bit-identical results;
  elsewhere, and for other dtypes or traced ``rho``/``eps``, by XLA.

  Args:
    rho: decay rate of both running averages, in [0, 1]. A float, or a JAX
      array (traced values are accepted, e.g. under ``jax.vmap``).
    eps: added inside both square roots, > 0. Float or JAX array.
    accumulator_dtype: real floating dtype of the state (for example
      ``jnp.float32`` for bfloat16 parameters). ``None`` keeps each
      parameter's dtype. Complex parameters get the matching complex dtype.
    implementation: ``"auto"`` uses the native CPU kernel where it applies
      (Python-number ``rho`` and ``eps``; float32 or bfloat16 leaves) and XLA
      elsewhere; ``"jax"`` always XLA; ``"native"`` like auto, but raises if
      the kernel was not built or ``rho``/``eps`` are traced.
    packed_state: keep the averages of all leaves below 2¹⁸ elements as one
      flat array each (a :class:`PackedAdadeltaState`) instead of one array
      per leaf; larger leaves keep their own, shaped and sharded like the
      parameter. Faster for models of many small leaves (JAX passes two
      arrays through the step instead of two per leaf); the packed part
      does not follow the small parameters' shardings, and every leaf must
      be real, of one floating dtype. Same numbers either way.

  Returns:
    An :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleByAdadeltaState` (or a :class:`PackedAdadeltaState`).

  References:
    M. D. Zeiler, "ADADELTA: An Adaptive Learning Rate Method", 2012,
    arXiv:1212.5701, Algorithm 1.
  """
  _checks.check_in_range("rho", rho, low=0.0, high=1.0, low_open=False)
  _checks.check_in_range("eps", eps, low=0.0, high=None, low_open=True)
  accumulator_dtype = _checks.check_accumulator_dtype(accumulator_dtype)
  _checks.check_implementation(implementation)
  _checks.check_flag("packed_state", packed_state)
  native = None
  if implementation != "jax":
    native = _native_hyper(rho, eps, required=implementation == "native")
  if packed_state:
    by_xla = _leaf_update_by_xla(_adadelta_coordinates, rho, 1 - rho, eps)
    return _packed.scale_by_packed_kernel(by_xla, accumulator_dtype, native)
  return scale_by_kernel(_adadelta_coordinates, rho, eps, accumulator_dtype, native)


def _native_hyper(rho, eps, required: bool) -> _native.Hyper | None:
  """(ρ, 1−ρ, ε) for the native kernel, or None to use XLA (an error if `required`)."""
  reason = _native.unavailable_reason()
  hyper = _native.static_hyper(rho, 1 - rho, eps)
  if hyper is None and reason is None:
    reason = "rho and eps must be Python numbers or concrete scalars, not traced arrays"
  if required and reason is not None:
    raise ValueError(f"implementation='native' is not possible here: {reason}")
  return hyper if reason is None else None


def _leaf_update_by_xla(kernel, rho, one_minus_rho, eps):
  """`(g, e_g2, e_dx2) -> (step, e_g2, e_dx2)` for one array through XLA, in at least float32."""

  def by_xla(g, e_g2, e_dx2):
    dtype = jnp.promote_types(jnp.real(e_g2).dtype, jnp.real(g).dtype)
    dtype = jnp.promote_types(dtype, jnp.float32)
    hyper = [jnp.asarray(h, dtype) for h in (rho, one_minus_rho, eps)]
    per_coordinate = [
      kernel(*(c.astype(dtype) for c in coords), *hyper)
      for coords in zip(_coordinates(g), _coordinates(e_g2), _coordinates(e_dx2), strict=True)
    ]
    step, new_e_g2, new_e_dx2 = zip(*per_coordinate, strict=True)
    return (
      _from_coordinates(step, g.dtype),
      _from_coordinates(new_e_g2, e_g2.dtype),
      _from_coordinates(new_e_dx2, e_dx2.dtype),
    )

  return by_xla


def scale_by_kernel(
  kernel, rho, eps, accumulator_dtype, native: _native.Hyper | None = None
) -> optax.GradientTransformation:
  """The Adadelta state and tree plumbing around a per-coordinate `kernel`.

  `kernel(g, e_g2, e_dx2, rho, one_minus_rho, eps)` returns `(step, e_g2, e_dx2)` for real
  arrays of one dtype; presets pass their peer's order of operations. With `native` (the
  hyper-parameters as floats), float32/bfloat16 leaves go through the native kernel, which
  computes `_adadelta_coordinates`. Arguments are validated by the caller.
  """
  one_minus_rho = 1 - rho  # in Python double precision when rho is a float

  def init_fn(params):
    def zeros(path, p):
      dtype = _checks.state_dtype(path, p, accumulator_dtype)
      return jnp.zeros_like(p, dtype=dtype)  # keeps the parameter's sharding

    # Two separate trees: aliased buffers could not both be donated.
    return ScaleByAdadeltaState(
      e_g2=jax.tree_util.tree_map_with_path(zeros, params),
      e_dx2=jax.tree_util.tree_map_with_path(zeros, params),
    )

  def update_leaves(paths, grads, e_g2, e_dx2):
    results: list = [None] * len(grads)
    by_kernel = []
    for i, (path, g, a, b) in enumerate(zip(paths, grads, e_g2, e_dx2, strict=True)):
      if g is None:
        results[i] = (None, a, b)
        continue
      g = jnp.asarray(g)
      _checks.check_gradient_leaf(path, g, a)
      if native is not None and _native.supports(g, a, b):
        by_kernel.append((i, (g, a, b)))
      else:
        results[i] = by_xla(g, a, b)
    if by_kernel and native is not None:
      indices, leaves = zip(*by_kernel, strict=True)
      updated = _native.update_leaves(list(leaves), native, by_xla)
      for i, result in zip(indices, updated, strict=True):
        results[i] = result
    return results

  by_xla = _leaf_update_by_xla(kernel, rho, one_minus_rho, eps)

  def update_fn(updates, state, params=None):
    del params
    paths, grads, treedef = _checks.flatten_gradients(updates)
    e_g2 = _checks.leaves_like_state(treedef, state.e_g2, "e_g2")
    e_dx2 = _checks.leaves_like_state(treedef, state.e_dx2, "e_dx2")
    results = update_leaves(paths, grads, e_g2, e_dx2)
    steps, new_e_g2, new_e_dx2 = (
      (jax.tree.unflatten(treedef, column) for column in zip(*results, strict=True))
      if results
      else (updates, state.e_g2, state.e_dx2)
    )
    return steps, ScaleByAdadeltaState(e_g2=new_e_g2, e_dx2=new_e_dx2)

  return optax.GradientTransformation(init_fn, update_fn)


def _keep_gradient_dtypes(
  inner: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """Casts the final updates back to the gradients' dtypes.

  An array learning rate or weight decay (a schedule, ``inject_hyperparams``)
  would otherwise promote bfloat16 updates to float32.
  """

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = inner.update(updates, state, params, **extra_args)
    new_updates = jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), new_updates, updates)
    return new_updates, state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def adadelta(
  learning_rate: ScalarOrSchedule = 1.0,
  rho: Scalar = 0.95,
  eps: Scalar = 1e-6,
  *,
  weight_decay: ScalarOrSchedule = 0.0,
  weight_decay_mask: Any = None,
  decoupled_weight_decay: bool = False,
  maximize: bool = False,
  accumulator_dtype: Any = None,
  implementation: str = "auto",
  packed_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The Adadelta optimizer: descends by :math:`\eta\, \Delta x_t`.

  With :math:`\Delta x_t` from :func:`scale_by_adadelta` and gradient
  :math:`g_t` (negated first when ``maximize``):

  .. math::
    \text{coupled (default):}\quad
      &g_t \leftarrow g_t + \lambda\, x_t, \quad
      x_{t+1} = x_t - \eta\, \Delta x_t \\
    \text{decoupled:}\quad
      &x_{t+1} = x_t - \eta\, (\Delta x_t + \lambda\, x_t)

  The defaults are the paper's (:math:`\eta = 1, \rho = 0.95,
  \epsilon = 10^{-6}`). Coupled decay is PyTorch's and optax's; decoupled is
  Keras's (AdamW-style). ``maximize`` is PyTorch's: the gradient is negated
  before weight decay, so decay still shrinks the parameters.

  Args:
    learning_rate: :math:`\eta \ge 0`, a float, JAX array or optax schedule.
      Unlike ``optax.adadelta(learning_rate=None)``, this always descends.
    rho: decay rate of both running averages, in [0, 1].
    eps: added inside both square roots, > 0.
    weight_decay: :math:`\lambda \ge 0`, a float, JAX array or schedule. With
      the float 0 (the default) the transform never needs ``params``.
    weight_decay_mask: optional tree of booleans (or a function of the params
      returning one), True where weight decay applies.
    decoupled_weight_decay: apply :math:`\eta \lambda x_t` outside the adaptive
      scaling instead of adding :math:`\lambda x_t` to the gradient.
    maximize: climb the objective instead of descending it.
    accumulator_dtype: real floating dtype of the Adadelta state; see
      :func:`scale_by_adadelta`.
    implementation: ``"auto"``, ``"native"`` or ``"jax"``; see
      :func:`scale_by_adadelta`.
    packed_state: pack the small leaves' state into flat arrays; see
      :func:`scale_by_adadelta`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` (an ``optax.chain``).
  """
  _checks.check_learning_rate_like("learning_rate", learning_rate)
  _checks.check_learning_rate_like("weight_decay", weight_decay)
  _checks.check_flag("decoupled_weight_decay", decoupled_weight_decay)
  _checks.check_flag("maximize", maximize)

  core = scale_by_adadelta(
    rho,
    eps,
    accumulator_dtype=accumulator_dtype,
    implementation=implementation,
    packed_state=packed_state,
  )
  return descend_with(
    core, learning_rate, weight_decay, weight_decay_mask, decoupled_weight_decay, maximize
  )


def descend_with(
  core: optax.GradientTransformation,
  learning_rate: ScalarOrSchedule,
  weight_decay: ScalarOrSchedule,
  weight_decay_mask: Any,
  decoupled_weight_decay: bool,
  maximize: bool,
) -> optax.GradientTransformationExtraArgs:
  """Sign, weight decay and learning rate around a `scale_by_*` core (validated by the caller)."""
  decay = []
  if not _checks.is_python_zero(weight_decay):
    decay = [optax.add_decayed_weights(weight_decay, weight_decay_mask)]
  chain = optax.chain(
    *([optax.scale(-1.0)] if maximize else []),
    *([] if decoupled_weight_decay else decay),
    core,
    *(decay if decoupled_weight_decay else []),
    optax.scale_by_learning_rate(learning_rate),
  )
  return _keep_gradient_dtypes(chain)
