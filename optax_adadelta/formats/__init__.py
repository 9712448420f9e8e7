"""The state formats, one module each, and the registry that chooses among them.

Adding a format: a module implementing :class:`base.StateFormat`, and one entry in `FORMATS`.
"""

from __future__ import annotations

from typing import Any

from optax_adadelta.formats import eight_bit, factored, full, packed, rounded16
from optax_adadelta.formats.base import Options, StateFormat

# A state type made by several formats is answered for by the first listed.
FORMATS: tuple[StateFormat, ...] = (
  full.FORMAT,
  packed.FORMAT,
  eight_bit.FORMAT,
  rounded16.FORMAT,
  factored.FORMAT,
)


def choose(options: Options) -> StateFormat:
  """The one format the options select (``full`` when none does), after every selected
  format's refusals: a combination that no format can take raises ValueError."""
  selected = [f for f in FORMATS if f.selected_by(options)]
  for fmt in selected:
    fmt.refuse(options)
  if len(selected) > 1:
    names = ", ".join(f.name for f in selected)
    raise ValueError(f"these options select several state formats ({names}); drop one")
  return selected[0] if selected else full.FORMAT


def format_of(node: Any) -> StateFormat | None:
  """The format whose state `node` is, or None: the one place that maps a state to its format."""
  return next((f for f in FORMATS if isinstance(node, f.state_types)), None)


def is_state(node: Any) -> bool:
  """Whether `node` is the state of some format (for ``jax.tree`` functions' ``is_leaf``)."""
  return format_of(node) is not None
