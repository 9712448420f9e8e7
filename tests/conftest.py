"""Test setup: 8 virtual CPU devices (before jax is imported) and hypothesis profiles."""

import os

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


def _load_example(name: str):
  import importlib.util
  from pathlib import Path

  path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"{name}_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def example():
  """examples/data_parallel.py, imported as a module."""
  return _load_example("data_parallel")
