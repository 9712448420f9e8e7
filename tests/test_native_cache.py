"""The native kernel's cache: a damaged build is never loaded, and building is race-safe.

dlopen maps the shared object, so a truncated one used to kill every process with SIGBUS
before Python could fall back. Each case runs in its own process (a crash fails the test,
not pytest) with its own cache, and a stand-in compiler that copies a real build of the
kernels into place: a rebuild then costs a copy, not a compile, and everything else (the
check, the record, the rename, dlopen, the FFI registration, the update) is the real path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optax_adadelta import native
from optax_adadelta.native import build

# Prints what a user's first adadelta() meets: whether the kernel runs, and its update of a
# small leaf beside XLA's (both within 1 ulp of each other on any jaxlib).
_PROBE = """
import json, sys, numpy as np, jax.numpy as jnp, optax_adadelta as oa
from optax_adadelta import native
grads = {"w": jnp.linspace(-3, 3, 1000, dtype=jnp.float32)}
def step(implementation):
  tx = oa.adadelta(implementation=implementation)
  return np.asarray(tx.update(grads, tx.init(grads))[0]["w"]).tolist()
report = {"available": oa.native_available(), "reason": native.unavailable_reason()}
if report["available"]:
  report["native"], report["xla"] = step("native"), step("jax")
print(json.dumps(report))
"""

# A compiler that "compiles" by copying a real build to its -o argument; FAIL=1 makes it fail.
_STAND_IN = """#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done
if [ -n "$STAND_IN_FAIL" ]; then echo "stand-in compiler told to fail" >&2; exit 1; fi
sleep "${STAND_IN_SECONDS:-0}"
cp "$STAND_IN_LIBRARY" "$out"
"""


@pytest.fixture(scope="module")
def real_build(tmp_path_factory) -> Path:
  reason = native.unavailable_reason()
  if reason and os.environ.get("OPTAX_ADADELTA_REQUIRE_NATIVE") != "1":
    pytest.skip(f"native kernel: {reason}")
  kept = tmp_path_factory.mktemp("build") / "kernel.so"
  shutil.copyfile(build.build_library(), kept)
  return kept


@pytest.fixture
def env(tmp_path, real_build) -> dict[str, str]:
  compiler = tmp_path / "stand-in-c++"
  compiler.write_text(_STAND_IN)
  compiler.chmod(0o755)
  environment = {k: v for k, v in os.environ.items() if k != "OPTAX_ADADELTA_NATIVE"}
  return {
    **environment,
    "CXX": str(compiler),
    "STAND_IN_LIBRARY": str(real_build),
    "OPTAX_ADADELTA_CACHE": str(tmp_path / "cache"),
  }


def _run(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess:
  command = [sys.executable, *(args or ("-c", _PROBE))]
  return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=300)


def _probe(env: dict[str, str], **extra: str) -> dict:
  result = _run(env, **extra)
  assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-3000:]}"
  return {**json.loads(result.stdout.splitlines()[-1]), "stderr": result.stderr}


def _assert_kernel_works(report: dict):
  assert report["available"], report["reason"]
  np.testing.assert_allclose(report["native"], report["xla"], rtol=2e-7, atol=0)


def _libraries(env) -> list[Path]:
  return sorted(Path(env["OPTAX_ADADELTA_CACHE"]).glob("*.so"))


def _truncate_to_4_kb(path: Path):
  path.write_bytes(path.read_bytes()[:4096])


def _truncate_to_half(path: Path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _garbage_of_the_same_size(path: Path):
  path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


@pytest.mark.parametrize(
  "damage",
  [  # the default run: garbage of the same size (the SHA-256 check); truncations: slow tier
    pytest.param(_truncate_to_4_kb, marks=pytest.mark.slow),
    pytest.param(_truncate_to_half, marks=pytest.mark.slow),
    _garbage_of_the_same_size,
  ],
  ids=lambda f: f.__name__,
)
def test_a_damaged_cached_kernel_is_rebuilt_not_loaded(env, damage):
  _assert_kernel_works(_probe(env))
  (library,) = _libraries(env)
  damage(library)  # in place, as a full disk or an interrupted copy leaves it
  report = _probe(env)
  _assert_kernel_works(report)
  assert "unusable, rebuilding" in report["stderr"]
  assert "compiling the native CPU kernels" in report["stderr"]
  assert _probe(env)["stderr"] == "", "the rebuilt kernel is not used as it is"


@pytest.mark.slow
def test_a_cached_kernel_without_its_build_record_is_not_loaded(env):
  _assert_kernel_works(_probe(env))
  for record in Path(env["OPTAX_ADADELTA_CACHE"]).glob("*.json"):
    record.unlink()
  for library in _libraries(env):  # unverifiable, and in fact damaged
    _truncate_to_half(library)
  report = _probe(env)
  _assert_kernel_works(report)
  assert "has no build record" in report["stderr"]


@pytest.mark.slow
def test_a_damaged_kernel_that_cannot_be_rebuilt_falls_back_and_says_why(env):
  _probe(env)
  (library,) = _libraries(env)
  _truncate_to_4_kb(library)
  report = _probe(env, STAND_IN_FAIL="1")
  assert not report["available"]
  assert f"{library.name} has 4096 bytes" in report["reason"]
  assert "stand-in compiler told to fail" in report["reason"]
  assert "using XLA's update (same results, slower)" in report["stderr"]


@pytest.mark.slow
def test_two_processes_building_at_once_each_load_a_verified_kernel(env):
  slow = {**env, "STAND_IN_SECONDS": "2"}  # both are compiling at the same time
  runs = [
    subprocess.Popen(
      [sys.executable, "-c", _PROBE], env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for _ in range(2)
  ]
  for run in runs:
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err.decode()[-3000:]
    _assert_kernel_works(json.loads(out.decode().splitlines()[-1]))
  leftovers = [p.name for p in Path(env["OPTAX_ADADELTA_CACHE"]).iterdir() if p.is_dir()]
  assert not leftovers, leftovers  # each one's scratch directory is gone
  _assert_kernel_works(_probe(env))


def test_compiling_is_announced_with_where_the_cache_is(env):
  first = _probe(env)["stderr"]
  assert "compiling the native CPU kernels" in first
  assert env["OPTAX_ADADELTA_CACHE"] in first
  assert "python -m optax_adadelta.build_native" in first
  assert _probe(env)["stderr"] == "", "a cached kernel is loaded silently"


def test_a_missing_compiler_is_announced_with_the_reason(env):
  report = _probe(env, CXX="no-such-compiler")
  assert not report["available"]
  assert "using XLA's update (same results, slower)" in report["stderr"]
  assert "no C++ compiler ('no-such-compiler' not found; set CXX)" in report["stderr"]


def test_build_native_builds_ahead_of_time_and_says_where(env):
  built = _run(env, "-m", "optax_adadelta.build_native")
  assert built.returncode == 0, built.stderr
  path = Path(built.stdout.strip().splitlines()[-1].split(": ", 1)[1])
  assert path.parent == Path(env["OPTAX_ADADELTA_CACHE"]) and path.exists()
  report = _probe(env)
  _assert_kernel_works(report)
  assert "compiling" not in report["stderr"], "the first adadelta() compiled again"
  again = _run(env, "-m", "optax_adadelta.build_native")
  assert again.returncode == 0 and again.stdout == built.stdout and "compiling" not in again.stderr


def test_build_native_fails_with_the_reason(env):
  failed = _run(env, "-m", "optax_adadelta.build_native", CXX="no-such-compiler")
  assert failed.returncode == 1
  assert "no C++ compiler ('no-such-compiler' not found; set CXX)" in failed.stderr
