"""What every state format shares: the options it is built from and the interface it implements.

A *state format* is one way of keeping Adadelta's two running averages (per-leaf arrays, packed
flat arrays, 16-bit rounded, 8-bit codes). Each lives in a module of this folder, implements
:class:`StateFormat`, and is listed once in `formats.FORMATS`; the front
(:func:`optax_adadelta.scale_by_adadelta`) validates the keywords into :class:`Options` and asks
the registry for the one format they select. Nothing outside this folder looks at a state to learn
its format: it asks `formats.format_of(node)`, and the format answers (`averages` for interop,
`zero_shardings` for :func:`optax_adadelta.sharding.state_shardings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import optax

from optax_adadelta import _checks, _rules, native

UPDATE_RULES = tuple(_rules.RULES)
IMPLEMENTATIONS = ("auto", "native", "jax")


@dataclasses.dataclass(frozen=True)
class Options:
  """Every keyword of ``scale_by_adadelta``, validated (see :func:`options`).

  ``accumulator_dtype`` is a NumPy dtype or None; ``stochastic_rounding`` is resolved to a bool
  (``None`` means on for ``state_bits=8`` only) and ``min_8bit_size`` to an int (``None``
  means 4096, bitsandbytes' default).
  """

  rho: Any
  eps: Any
  accumulator_dtype: Any = None
  update_rule: str = "default"
  implementation: str = "auto"
  packed_state: bool = False
  stochastic_rounding: bool = False
  state_bits: int | None = None
  min_8bit_size: int = 4096
  factored: bool = False
  min_dim_size_to_factor: int = 128

  @property
  def low_memory(self) -> bool:
    """Whether a low-memory keyword (stochastic rounding, 8-bit codes) is set."""
    return self.stochastic_rounding or self.state_bits is not None


def options(
  rho: Any,
  eps: Any,
  *,
  accumulator_dtype: Any = None,
  update_rule: str = "default",
  implementation: str = "auto",
  packed_state: bool = False,
  stochastic_rounding: bool | None = None,
  state_bits: int | None = None,
  min_8bit_size: int | None = None,
  factored: bool = False,
  min_dim_size_to_factor: int | None = None,
) -> Options:
  """The keywords checked one by one (a clear error naming the first bad one), as Options."""
  _checks.check_in_range("rho", rho, low=0.0, high=1.0, low_open=False)
  _checks.check_in_range("eps", eps, low=0.0, high=None, low_open=True)
  dtype = _checks.check_accumulator_dtype(accumulator_dtype)
  _checks.check_choice("update_rule", update_rule, _rules.RULES)
  _checks.check_choice("implementation", implementation, IMPLEMENTATIONS)
  _checks.check_flag("packed_state", packed_state)
  rounding = _checks.check_low_memory(state_bits, stochastic_rounding, min_8bit_size, dtype)
  _checks.check_flag("factored", factored)
  min_dim = _checks.check_min_dim_size_to_factor(min_dim_size_to_factor)
  return Options(
    rho=rho,
    eps=eps,
    accumulator_dtype=dtype,
    update_rule=update_rule,
    implementation=implementation,
    packed_state=packed_state,
    stochastic_rounding=rounding,
    state_bits=state_bits,
    min_8bit_size=4096 if min_8bit_size is None else int(min_8bit_size),
    factored=factored,
    min_dim_size_to_factor=min_dim,
  )


class StateFormat(Protocol):
  """The interface every state format implements (one object per format, in `FORMATS`)."""

  @property
  def name(self) -> str:
    """ "full", "packed", "16-bit", "8-bit", "factored": what errors and docs call it."""
    ...

  @property
  def state_types(self) -> tuple[type, ...]:
    """The state classes it makes: `format_of` maps them to it."""
    ...

  def selected_by(self, options: Options) -> bool:
    """Whether these options ask for this format (``"full"``, asked for by none, is chosen
    when no other format is)."""
    ...

  def refuse(self, options: Options) -> None:
    """Raises ValueError naming an option this format cannot be combined with."""
    ...

  def transformation(self, options: Options) -> optax.GradientTransformation:
    """Adadelta on this format; decides here, once, "native kernel or XLA"."""
    ...

  def averages(self, state: Any) -> tuple[Any, Any]:
    """E[g²], E[Δx²] as trees of float arrays shaped like the parameters (interop's export);
    or raises ValueError saying why this format's state cannot be exported."""
    ...

  def with_averages(self, state: Any, e_g2: Any, e_dx2: Any) -> Any:
    """`state` holding these averages (interop's import; `averages`' trees, new leaves); or
    raises ValueError saying why this format cannot be loaded."""
    ...

  def zero_shardings(self, state: Any, leaf_sharding: Callable[[Any], Any]) -> Any:
    """The ZeRO-1 shardings of `state`, a tree like it; `leaf_sharding(array)` is the sharding
    of one array shaped like a parameter. Raises TypeError if the format cannot be split."""
    ...


def leaf_update(options: Options) -> Callable[..., tuple]:
  """`(g, E[g²], E[Δx²]) -> (Δx, E[g²], E[Δx²])` of one leaf by the options' rule."""
  return _rules.leaf_update(_rules.RULES[options.update_rule], options.rho, options.eps)


def is_none(x: Any) -> bool:
  return x is None


def unzip3(treedef: Any, results: list[tuple]) -> tuple[Any, Any, Any]:
  """Three trees of structure `treedef` from a list of (Δx, E[g²], E[Δx²]), one per leaf."""
  columns = list(zip(*results, strict=True)) or [(), (), ()]
  return tuple(treedef.unflatten(column) for column in columns)


def decide_native(options: Options, refusal: str | None = None) -> native.Hyper | None:
  """(ρ, 1−ρ, ε) to update with the native kernel, or None for XLA: a format's one decision.

  Raises ValueError for ``implementation="native"`` where the kernel cannot be used; `refusal`
  is the format's own reason it cannot use the kernel, if any.
  """
  return native.decide(
    options.rho, options.eps, options.update_rule, options.implementation, refusal
  )
