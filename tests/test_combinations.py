"""Every state format in every context users train in (#22): it works, or it is refused.

A cell that works trains the same tiny model as the float32 per-leaf state in the same
context (tests/matrix.py), within the format's documented precision
(docs/guides/low_memory.md): the packed state gives identical numbers; bfloat16 with
stochastic rounding is off by at most one bfloat16 step (2⁻⁷ = 0.8 %) of each average, so
by at most 0.8 % of a step, 1 % allowed; 8-bit by at most one code step (6.8 %), 7 % allowed.
The float32 cells themselves are compared with the same computation written without the
context. So are the factored cells (#26), with the factored optimizer: its row and column
means are another algorithm, not a rounding of float32's, so no precision bounds its distance
from the float32 run; without the context it must give the same numbers up to float32
rounding, as float32 does. A refused cell must fail before training, with an error naming
the combination.

The guide's table (docs/guides/combinations.md) is rendered from ``EXPECTED``; after a
change, rewrite it with ``python -m tests.test_combinations``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tests import matrix
from tests.sharding_checks import needs_eight_devices

# Largest |difference| allowed from the float32 per-leaf run, relative to the largest
# displacement of the parameters. float32: a few ulps of each of the six steps. factored: the
# same, from the factored run without the context (its means are summed in another order
# when the parameters are split).
TOLERANCE = {"float32": 3e-5, "bf16_sr": 1e-2, "8bit": 7e-2, "packed": 0.0, "factored": 3e-5}
COMPARED_WITHOUT_THE_CONTEXT = ("float32", "factored")  # the others: with float32's run
EIGHT_DEVICES = {"auto_sharded", "explicit_sharded", "zero"}
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "combinations.md"


class Refused(NamedTuple):
  error: type[Exception]
  match: str  # a regex the message must match: it names both sides of the combination
  why: str  # for the guide


class Failing(NamedTuple):
  reason: str  # for the xfail mark and the guide


EXPECTED: dict[tuple[str, str], Refused | Failing] = {  # every other cell works
  ("packed", "zero"): Refused(
    TypeError,
    r"cannot split a PackedAdadeltaState \(adadelta\(packed_state=True\)\).*packed_state=False",
    "its flat array is re-concatenated every step, so a split would be undone by gathers",
  ),
}


def _cells():
  for context in matrix.CONTEXTS:
    for fmt in matrix.FORMATS:
      marks = [needs_eight_devices] if context in EIGHT_DEVICES else []
      expected = EXPECTED.get((fmt, context))
      if isinstance(expected, Failing):
        marks.append(pytest.mark.xfail(strict=True, reason=expected.reason))
      yield pytest.param(fmt, context, marks=marks, id=f"{fmt}-{context}")


@functools.cache
def _float32_run(context):
  return matrix.CONTEXTS[context].run(matrix.FORMATS["float32"])


@functools.cache
def _plain(context, fmt="float32"):
  return matrix.CONTEXTS[context].plain(matrix.FORMATS[fmt])


def _assert_close(got, want, tolerance, what):
  for a, b in zip(got, want, strict=True):
    worst = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    assert scale > 0, "the parameters did not move"
    assert worst <= tolerance * scale, (
      f"{what}: off by {worst:.3g}, {worst / scale:.3g} of {scale:.3g}"
    )


@pytest.mark.parametrize(("fmt", "context"), list(_cells()))
def test_each_format_in_each_context_trains_as_its_reference_or_is_refused(fmt, context):
  run = functools.partial(matrix.CONTEXTS[context].run, matrix.FORMATS[fmt])
  expected = EXPECTED.get((fmt, context))
  if isinstance(expected, Refused):
    with pytest.raises(expected.error, match=expected.match):
      run()
    return
  got = run()
  assert all(np.isfinite(d).all() for d in got)
  if fmt in COMPARED_WITHOUT_THE_CONTEXT:
    _assert_close(got, _plain(context, fmt), TOLERANCE[fmt], f"{fmt} in {context} vs without it")
  elif fmt == "packed":  # the same numbers as the per-leaf state, bit for bit
    for a, b in zip(got, _float32_run(context), strict=True):
      np.testing.assert_array_equal(a, b)
  else:
    _assert_close(got, _float32_run(context), TOLERANCE[fmt], f"{fmt} vs float32 in {context}")


@pytest.mark.parametrize("fmt", COMPARED_WITHOUT_THE_CONTEXT)
def test_the_comparison_without_the_context_can_fail(fmt):
  """The plain loops are not the contexts' own code: a different ρ is seen."""
  other_rho = matrix._plain_loop(matrix.FORMATS[fmt], rho=0.8)
  with pytest.raises(AssertionError, match="off by"):
    _assert_close(other_rho, _plain("jit_donate", fmt), TOLERANCE[fmt], "ρ")


def test_the_factored_cells_are_not_float32s():
  """The factored state trains w (4 × 256, factored) unlike float32 and b (8,, full) alike:
  its cells test the factored update, and the full leaves inside it."""
  factored, float32 = _plain("jit_donate", "factored"), _plain("jit_donate")
  with pytest.raises(AssertionError, match="off by"):
    _assert_close(factored[:1], float32[:1], 0.05, "w factored vs float32")
  _assert_close(factored[1:], float32[1:], TOLERANCE["float32"], "b full in both")


def render_table() -> str:
  """The guide's Markdown table: a row per context, a column per format."""

  def cell(fmt, context):
    expected = EXPECTED.get((fmt, context))
    if expected is None:
      return "works" if fmt != "packed" else "works (identical)"
    if isinstance(expected, Refused):
      return f"refused: {expected.why}"
    return "fails today (#22, being fixed)"

  header = "| context | " + " | ".join(matrix.FORMATS) + " |"
  lines = [header, "|" + " --- |" * (len(matrix.FORMATS) + 1)]
  for context, spec in matrix.CONTEXTS.items():
    lines.append(f"| {spec.title} | " + " | ".join(cell(f, context) for f in matrix.FORMATS) + " |")
  return "\n".join(lines)


BEGIN, END = "<!-- matrix: begin (python -m tests.test_combinations) -->", "<!-- matrix: end -->"


def test_the_guide_shows_the_matrix_the_tests_check():
  text = GUIDE.read_text()
  table = text.split(BEGIN)[1].split(END)[0].strip()
  assert table == render_table(), (
    "docs/guides/combinations.md is stale: python -m tests.test_combinations"
  )


if __name__ == "__main__":
  text = GUIDE.read_text()
  head, rest = text.split(BEGIN)
  GUIDE.write_text(f"{head}{BEGIN}\n{render_table()}\n{END}{rest.split(END)[1]}")
  print(f"wrote the matrix into {GUIDE}")
