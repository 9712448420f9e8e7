"""Helpers shared by the test modules (one copy each): ulp distances, worker processes.

Import as `from tests import helpers` or `from tests.helpers import ulps`. Nothing here imports
the package, orbax or flax, so every test module can use it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

WORKER_TIMEOUT_S = 240  # a whole multi-process run, startup and compilation of each worker too


def is_none(x: Any) -> bool:
  """`is_leaf` for jax.tree functions: a None (an absent gradient) is a leaf, not an empty node."""
  return x is None


# --- ulp distances ---------------------------------------------------------------------------


def ulps(got, want) -> np.ndarray:
  """|got − want| elementwise, in units in the last place of their (common) dtype.

  Symmetric: the unit is the finer spacing of the two values, so a difference across a power of
  two is counted in the smaller number's ulps (never fewer ulps than either value's own spacing
  gives). Equal values (infinities included) and NaN against NaN: 0; NaN or an infinity against a
  different value: inf.
  Complex: the worse of the real and imaginary parts. To count in another dtype's ulps (for
  example bfloat16 values in float32 ulps), cast both arrays first.
  """
  got, want = np.asarray(got), np.asarray(want)
  if got.dtype != want.dtype or got.shape != want.shape:
    raise TypeError(
      f"ulps compares arrays of one dtype and shape, got {got.dtype}{list(got.shape)} "
      f"and {want.dtype}{list(want.shape)}"
    )
  if np.iscomplexobj(got):
    return np.maximum(ulps(got.real, want.real), ulps(got.imag, want.imag))
  if not jax.dtypes.issubdtype(got.dtype, np.inexact):
    raise TypeError(f"ulps needs floating-point arrays, got {got.dtype}")
  wide_got, wide_want = got.astype(np.float64), want.astype(np.float64)
  spacing = np.fmin(np.spacing(np.abs(got)), np.spacing(np.abs(want))).astype(np.float64)
  with np.errstate(invalid="ignore"):
    distance = np.abs(wide_got - wide_want) / spacing
  unbounded = np.isnan(wide_got) | np.isnan(wide_want) | np.isinf(wide_got) | np.isinf(wide_want)
  same = (wide_got == wide_want) | (np.isnan(wide_got) & np.isnan(wide_want))
  return np.where(same, 0.0, np.where(unbounded, np.inf, distance))


def worst_ulps(got, want) -> float:
  """The largest `ulps` over two pytrees of one structure, leaf dtypes and shapes; leaves that
  are not floating point (a step count, 8-bit codes) must be equal."""
  assert jax.tree.structure(got) == jax.tree.structure(want), (
    f"different trees:\n  got:  {jax.tree.structure(got)}\n  want: {jax.tree.structure(want)}"
  )
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if jax.dtypes.issubdtype(b.dtype, np.inexact):
      worst = max(worst, float(ulps(a, b).max(initial=0.0)))  # ulps never gives NaN
    else:
      np.testing.assert_array_equal(a, b)
  return worst


# --- worker processes (multi-process tests) ------------------------------------------------


def free_port() -> int:
  """A loopback TCP port free now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env() -> dict[str, str]:
  """This process's environment without its 8 forced host devices (workers pick their own)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def tail(path: Path, lines: int = 40) -> str:
  """The last lines of a log file."""
  return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_workers(commands: list[list[str]], logs: Path, timeout_s: float = WORKER_TIMEOUT_S) -> None:
  """Runs the commands together; fails fast with the stderr of the first that dies."""
  logs.mkdir(parents=True, exist_ok=True)
  procs = []
  try:
    for i, command in enumerate(commands):
      with open(logs / f"{i}.out", "wb") as out, open(logs / f"{i}.err", "wb") as err:
        procs.append(subprocess.Popen(command, stdout=out, stderr=err, env=worker_env()))
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if p.poll() not in (None, 0):
          pytest.fail(
            f"worker {i} of {len(procs)} exited with code {p.returncode}; its stderr:\n"
            + tail(logs / f"{i}.err")
          )
      if time.monotonic() > deadline:
        running = [i for i, p in enumerate(procs) if p.poll() is None]
        pytest.fail(
          f"workers {running} still running after {timeout_s} s; stderr of worker "
          f"{running[0]}:\n" + tail(logs / f"{running[0]}.err")
        )
      time.sleep(0.1)
    for i, p in enumerate(procs):
      assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{tail(logs / f'{i}.err')}"
  finally:
    for p in procs:  # never leave a worker behind, whatever failed
      if p.poll() is None:
        p.kill()
      p.wait(timeout=30)
