"""Test setup: 8 virtual CPU devices (before jax is imported), hypothesis profiles, tiers.

The default run skips the `slow` tests (--run-slow or OPTAX_ADADELTA_SLOW=1 runs them). CI runs
the README's command in a fresh environment, recording what ran (OPTAX_ADADELTA_RECORD_RAN), then
the rest with every peer installed (OPTAX_ADADELTA_DESELECT, OPTAX_ADADELTA_REQUIRE_PEERS).
"""

import os
import re
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()

os.environ.setdefault("KERAS_BACKEND", "jax")  # the Keras parity tests run Keras on JAX
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hypothesis
import pytest

hypothesis.settings.register_profile("default", deadline=None, max_examples=30, print_blob=True)
# CI: the same examples on every run, so a red build is reproducible.
hypothesis.settings.register_profile(
  "ci", deadline=None, max_examples=30, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_addoption(parser):
  parser.addoption(
    "--run-slow",
    action="store_true",
    help="also run the tests marked slow (or set OPTAX_ADADELTA_SLOW=1)",
  )


def _run_slow(config) -> bool:
  return bool(config.getoption("--run-slow") or os.environ.get("OPTAX_ADADELTA_SLOW"))


def pytest_collection_modifyitems(config, items):
  """`slow` tests skip unless asked for; `accelerator` tests skip on CPU-only machines."""
  import jax

  if already_ran := os.environ.get("OPTAX_ADADELTA_DESELECT"):
    # CI: the tests the README's command already ran (their ids, exactly) are not run again.
    ran = set(Path(already_ran).read_text().splitlines())
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in ran])
    items[:] = [item for item in items if item.nodeid not in ran]
  if not _run_slow(config):
    skip_slow = pytest.mark.skip(
      reason="slow: run with `python -m pytest --run-slow` (or OPTAX_ADADELTA_SLOW=1)"
    )
    for item in items:
      if "slow" in item.keywords:
        item.add_marker(skip_slow)
  backend = jax.default_backend()
  if backend not in ("gpu", "tpu"):
    skip = pytest.mark.skip(reason=f"needs a GPU or TPU; jax.default_backend() is {backend!r}")
    for item in items:
      if "accelerator" in item.keywords:
        item.add_marker(skip)


_RAN: list[str] = []
# importorskip's reason when a peer library is missing (parity.live_peer raises by itself).
_MISSING_PEER = re.compile(r"could not import '(torch|keras|tensorflow)\b")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  """Under OPTAX_ADADELTA_REQUIRE_PEERS=1 (CI), a test skipped for a missing peer fails."""
  report = yield
  if report.skipped and os.environ.get("OPTAX_ADADELTA_REQUIRE_PEERS"):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if _MISSING_PEER.search(reason):
      report.outcome = "failed"
      report.longrepr = f"{reason} (OPTAX_ADADELTA_REQUIRE_PEERS=1: every peer must be installed)"
  return report


def pytest_runtest_logreport(report):
  """Notes the tests that ran (passed, or failed as expected) for OPTAX_ADADELTA_RECORD_RAN."""
  if report.when == "call" and (report.passed or hasattr(report, "wasxfail")):
    _RAN.append(report.nodeid)


def pytest_sessionfinish(session):
  if record := os.environ.get("OPTAX_ADADELTA_RECORD_RAN"):
    # CI runs the README's test command with this set, then only the rest (OPTAX_ADADELTA_DESELECT).
    Path(record).write_text("".join(f"{nodeid}\n" for nodeid in _RAN))


def _load_example(name: str):
  import importlib.util

  path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"{name}_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def example():
  """examples/data_parallel.py, imported as a module."""
  return _load_example("data_parallel")


@pytest.fixture(scope="session")
def checkpoint():
  """optax_adadelta.checkpoint; the test skips where orbax is not installed (the core test
  modules collect and run without orbax or flax: tests/test_collection.py)."""
  pytest.importorskip("orbax.checkpoint")
  from optax_adadelta import checkpoint

  return checkpoint
