"""The core test modules collect without orbax and flax (#24).

orbax ([checkpoint]) and flax ([notebooks]) are optional: a test that needs one imports it
itself (the `checkpoint` fixture in conftest.py, pytest.importorskip), so the rest of the suite
collects and runs where they are missing. Only the modules below are about them: they skip as a
whole there (a module-level pytest.importorskip), never fail to collect. The check runs
`pytest --collect-only` in a subprocess in which importing orbax or flax fails as if they were
not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
NEED_ORBAX_OR_FLAX = [  # the modules about the checkpoints or flax themselves: skipped whole
  "test_checkpoint.py",
  "test_checkpoint_concurrency.py",
  "test_checkpoint_faults.py",
  "test_flax.py",
]
# Run with `python -c`: make orbax and flax unimportable, check that they are, then collect.
COLLECT_WITHOUT_THEM = """
import sys

class Uninstalled:
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in ("orbax", "flax"):
      raise ModuleNotFoundError(f"No module named {name!r} (hidden by test_collection)", name=name)
    return None

sys.meta_path.insert(0, Uninstalled())
for name in ("orbax.checkpoint", "flax"):
  try:
    __import__(name)
  except ModuleNotFoundError:
    pass
  else:
    raise SystemExit(f"{name} could still be imported")

import pytest

raise SystemExit(pytest.main(sys.argv[1:]))
"""


def test_core_modules_collect_without_orbax_and_flax():
  modules = sorted(p.name for p in TESTS.glob("test_*.py"))
  assert set(NEED_ORBAX_OR_FLAX) <= set(modules), "a module in NEED_ORBAX_OR_FLAX was renamed"
  # Without CI's OPTAX_ADADELTA_RECORD_RAN/_DESELECT (this run must not write or read its list).
  env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTAX_ADADELTA_", "PYTEST_"))}
  result = subprocess.run(
    [sys.executable, "-c", COLLECT_WITHOUT_THEM, "--collect-only", "-q", "-p", "no:cacheprovider",
     str(TESTS)],
    cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  output = result.stdout + result.stderr
  assert "could still be imported" not in output, output[-3000:]
  failed = set(re.findall(r"^ERROR (?:\S*/)?(test_\w+\.py)\b", output, flags=re.MULTILINE))
  errors = output[output.find("= ERRORS =") :][:6000]  # the tracebacks, not the collected ids
  assert not failed, f"{sorted(failed)} do not collect without orbax and flax:\n{errors}"
  assert result.returncode == 0, output[-3000:]
  collected = {m for m in modules if f"tests/{m}::" in output}  # the two that needed them (#24)
  assert "test_packed.py" in collected and "test_fuzz.py" in collected, output[-3000:]
  assert not collected & set(NEED_ORBAX_OR_FLAX), "they should skip without orbax and flax"
  skipped = set(re.findall(r"^SKIPPED \[1\] (?:\S*/)?(test_\w+\.py):", output, flags=re.MULTILINE))
  assert skipped == set(NEED_ORBAX_OR_FLAX), output[-3000:]
