"""What benchmarks/step.py times: JAX optimizers, torch.optim.Adadelta, and the native reference.

Every contender has `prepare()` (untimed: the work a training step does before the optimizer,
e.g. producing fresh gradients) and `run()` (timed: one optimizer step, finished). All start
from the same parameters and gradients and a zero state.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

import optax_adadelta

LEARNING_RATE, RHO, EPS = 1.0, 0.95, 1e-6  # the paper's defaults
SOURCE = Path(__file__).with_name("native_reference.c")
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
KERNELS = ("adadelta_step", "bandwidth")
JAX_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


# A real copy: jit does not forward inputs to outputs here (checked in JaxContender).
_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class JaxContender:
  """`jax.jit(step, donate_argnums=(0, 1, 2))` around `tx.update` and `optax.apply_updates`.

  The gradients are donated as in a real training step, where they die inside it; so
  `prepare()` makes a fresh copy of them for every step, outside the timed region.
  """

  def __init__(self, name: str, tx, params: dict, grads: dict, note: str = ""):
    self.name, self.note, self._grads = name, note, grads
    self.params = _copy_tree(params)
    self.state = tx.init(self.params)

    def train_step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    self.prepare()
    start = time.perf_counter()
    lowered = self._step.lower(self.params, self.state, self._fresh_grads)
    traced = time.perf_counter()
    compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - start
    self.memory = {"state_bytes": _tree_bytes(self.state), "temp_source": "XLA temp"}
    self.memory["trace_seconds"] = traced - start
    stats = compiled.memory_analysis()
    if stats is not None:
      for field in ("temp", "alias", "argument", "output", "peak_memory"):
        key = f"{field}_size_in_bytes" if field != "peak_memory" else "peak_memory_in_bytes"
        self.memory[f"{field}_bytes"] = getattr(stats, key, None)
    leaves = jax.tree.leaves(grads)
    if jax.default_backend() == "cpu":
      fresh = jax.tree.leaves(self._fresh_grads)[0]
      assert fresh.unsafe_buffer_pointer() != leaves[0].unsafe_buffer_pointer()

  def prepare(self) -> None:
    self._fresh_grads = jax.block_until_ready(_copy_tree(self._grads))

  def run(self) -> None:
    self.params, self.state = self._step(self.params, self.state, self._fresh_grads)
    jax.block_until_ready((self.params, self.state))


class TorchContender:
  """`torch.optim.Adadelta(...).step()` under `torch.no_grad()`, gradients set once."""

  def __init__(self, name: str, foreach: bool, params: dict, grads: dict, dtype: str, note=""):
    import torch

    self._torch, self.name, self.note, self.compile_seconds = torch, name, note, None
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    self.params = []
    for key in params:
      param = torch.tensor(params[key], dtype=torch_dtype, requires_grad=True)
      param.grad = torch.tensor(grads[key], dtype=torch_dtype)
      self.params.append(param)
    self.optimizer = torch.optim.Adadelta(
      self.params, lr=LEARNING_RATE, rho=RHO, eps=EPS, foreach=foreach
    )
    self.memory = {"temp_source": "RSS growth"}

  def prepare(self) -> None:
    pass

  def run(self) -> None:
    with self._torch.no_grad():
      self.optimizer.step()
    state = self.optimizer.state.values()
    self.memory["state_bytes"] = sum(
      t.nbytes for s in state for t in s.values() if isinstance(t, self._torch.Tensor)
    )


def interleaved_times(contenders, repeats: int) -> dict[str, list[float]]:
  """Seconds of `repeats` single steps of each contender (`prepare()`, then a timed `run()`),
  after one warm-up step each; the contenders take turns, each repeat starting one later, so
  that drifts of the machine fall on all of them alike."""
  for contender in contenders:  # warm-up: compiles, allocates the state, faults pages in
    contender.prepare()
    contender.run()
  times: dict[str, list[float]] = {c.name: [] for c in contenders}
  gc.collect()
  gc.disable()  # a collection inside a timed step would be charged to whoever ran then
  try:
    for repeat in range(repeats):
      turn = repeat % len(contenders)
      for contender in contenders[turn:] + contenders[:turn]:
        contender.prepare()
        time.sleep(0.005)  # lets the previous step's worker threads go to sleep
        start = time.perf_counter()
        contender.run()
        times[contender.name].append(time.perf_counter() - start)
  finally:
    gc.enable()
  return times


def optax_adadelta_implementations() -> list[str]:
  """The values of `implementation` to time: ["auto", "jax"] once the keyword exists."""
  if "implementation" in inspect.signature(optax_adadelta.adadelta).parameters:
    return ["auto", "jax"]
  return ["auto"]


def bandwidth_transformation() -> optax.GradientTransformation:
  """Adadelta's loads and stores (float32 state) with trivial arithmetic, for XLA to compile.

  On an accelerator this is the limit the JAX contenders are measured against; on a CPU it
  separates the cost of XLA's loops from the cost of Adadelta's square roots and division.
  """

  def init(params):
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)
    return jax.tree.map(zeros, params), jax.tree.map(zeros, params)

  def update(grads, state, params=None):
    del params
    average = lambda a, g: RHO * a + (1 - RHO) * jnp.square(g.astype(a.dtype))
    state = tuple(jax.tree.map(average, accumulator, grads) for accumulator in state)
    return jax.tree.map(lambda g: -LEARNING_RATE * g, grads), state

  return optax.GradientTransformation(init, update)


def jax_contenders(params: dict, grads: dict, dtype: str, bandwidth_name: str) -> list:
  """optax_adadelta (one per implementation, and with a packed state), optax.adadelta (and, on
  trees of many leaves, `optax.flatten` of it) and XLA's bandwidth kernel."""
  jax_dtype = JAX_DTYPES[dtype]
  params = {k: jnp.array(v, jax_dtype) for k, v in params.items()}
  grads = {k: jnp.array(v, jax_dtype) for k, v in grads.items()}
  accumulator = {"accumulator_dtype": jnp.float32} if dtype == "bf16" else {}
  contenders = []
  for implementation in optax_adadelta_implementations():
    keyword = {} if implementation == "auto" else {"implementation": implementation}
    label = "pure JAX" if implementation == "jax" else implementation
    tx = optax_adadelta.adadelta(LEARNING_RATE, RHO, EPS, **accumulator, **keyword)
    note = "f32 state" if dtype == "bf16" else ""
    contenders.append(JaxContender(f"optax_adadelta ({label})", tx, params, grads, note))
  if "packed_state" in inspect.signature(optax_adadelta.adadelta).parameters:
    tx = optax_adadelta.adadelta(LEARNING_RATE, RHO, EPS, **accumulator, packed_state=True)
    note = "f32 state, packed" if dtype == "bf16" else "packed"
    contenders.append(JaxContender("optax_adadelta (packed state)", tx, params, grads, note))
  tx = optax.adadelta(learning_rate=LEARNING_RATE, rho=RHO, eps=EPS)
  note = "bf16 state (follows params)" if dtype == "bf16" else ""
  contenders.append(JaxContender("optax.adadelta", tx, params, grads, note))
  if len(params) >= 100:  # optax's own remedy for many leaves: one flat vector for everything
    note = "bf16 state, one vector" if dtype == "bf16" else "one vector"
    contenders.append(
      JaxContender("optax.flatten(optax.adadelta)", optax.flatten(tx), params, grads, note)
    )
  bandwidth = bandwidth_transformation()
  note = "f32 state" if dtype == "bf16" else ""
  contenders.append(JaxContender(bandwidth_name, bandwidth, params, grads, note))
  return contenders


def find_compiler() -> str | None:
  for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def load_native() -> tuple[ctypes.CDLL | None, str]:
  """Compiles native_reference.c; returns (library, compiler and flags) or (None, why not)."""
  compiler = find_compiler()
  if compiler is None:
    return None, "no C compiler found (set CC)"
  library_path = os.path.join(tempfile.mkdtemp(prefix="adadelta-bench-"), "reference.so")
  command = [compiler, *CFLAGS, "-shared", "-fPIC", str(SOURCE), "-o", library_path, "-lm"]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    return None, f"`{' '.join(command)}` failed: {result.stderr.strip()[:300]}"
  library = ctypes.CDLL(library_path)
  for dtype in JAX_DTYPES:
    for kernel in KERNELS:
      function = getattr(library, f"{kernel}_{dtype}")
      function.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_float] * 4
      function.restype = None
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
  return library, f"{version.stdout.splitlines()[0]}, {' '.join(CFLAGS)}"


def _pointers(arrays: list[np.ndarray]):
  return (ctypes.c_void_p * len(arrays))(*(a.ctypes.data for a in arrays))


class NativeTree:
  """One tree's buffers for the native kernels, with the pointer arrays built once.

  For "bf16", parameters and gradients are rounded to bfloat16 and held as uint16 bit
  patterns; the accumulators are float32 and start at zero.
  """

  def __init__(self, library, dtype: str, params: list, grads: list):
    def storage(x):
      if dtype == "f32":
        return np.array(x, np.float32).ravel()
      return x.astype(ml_dtypes.bfloat16).view(np.uint16).ravel()

    self.params, self.grads = [storage(p) for p in params], [storage(g) for g in grads]
    self.e_g2 = [np.zeros(p.size, np.float32) for p in params]
    self.e_dx2 = [np.zeros(p.size, np.float32) for p in params]
    self.sizes = np.array([p.size for p in params], np.int64)
    columns = (self.params, self.grads, self.e_g2, self.e_dx2)
    # 1 - RHO in double precision, then rounded once, like the JAX contenders.
    self.hyper = (RHO, 1.0 - RHO, EPS, LEARNING_RATE)
    self._arguments = (len(params), self.sizes.ctypes.data, *map(_pointers, columns), *self.hyper)
    self._functions = {k: getattr(library, f"{k}_{dtype}") for k in KERNELS}
    self.state_bytes = sum(a.nbytes for a in self.e_g2 + self.e_dx2)

  def run(self, kernel: str) -> None:
    self._functions[kernel](*self._arguments)

  def run_leaf_by_leaf(self, kernel: str) -> None:
    """One ctypes call per leaf: the alternative to `run`, timed once for the record."""
    function, columns = self._functions[kernel], (self.params, self.grads, self.e_g2, self.e_dx2)
    for leaf in range(len(self.sizes)):
      function(
        1, self.sizes[leaf:].ctypes.data, *(_pointers([c[leaf]]) for c in columns), *self.hyper
      )

  def params_as_float32(self) -> list[np.ndarray]:
    if self.params[0].dtype == np.float32:
      return [p.copy() for p in self.params]
    return [p.view(ml_dtypes.bfloat16).astype(np.float32) for p in self.params]


class NativeContender:
  """One kernel of native_reference.c on a NativeTree (the references share one tree)."""

  def __init__(self, name: str, tree: NativeTree, kernel: str, note: str = ""):
    self.name, self.note, self.compile_seconds = name, note, None
    self._tree, self._kernel = tree, kernel
    self.memory = {"state_bytes": tree.state_bytes, "temp_bytes": 0, "temp_source": "in place"}

  def prepare(self) -> None:
    pass

  def run(self) -> None:
    self._tree.run(self._kernel)


def check_native(library, dtype: str) -> None:
  """Raises if two fused steps disagree with a float64 NumPy transcription of the paper.

  A reference that skipped work would look fast; this makes sure it does the step.
  """
  rng = np.random.default_rng(0)
  params = [rng.standard_normal(size).astype(np.float32) for size in (1, 7, 1000)]
  grads = [rng.standard_normal(p.size).astype(np.float32) for p in params]
  tree = NativeTree(library, dtype, params, grads)
  start = tree.params_as_float32()
  for _ in range(2):  # the second step starts from a non-zero E[Δx²]
    tree.run("adadelta_step")
  tolerance = 1e-5 if dtype == "f32" else 1e-2
  for p0, g, p1 in zip(start, grads, tree.params_as_float32(), strict=True):
    if dtype == "bf16":
      g = g.astype(ml_dtypes.bfloat16)
    g = g.astype(np.float64)
    p, e_g2, e_dx2 = p0.astype(np.float64), np.zeros_like(g), np.zeros_like(g)
    for _ in range(2):
      e_g2 = RHO * e_g2 + (1 - RHO) * g * g
      dx = np.sqrt(e_dx2 + EPS) / np.sqrt(e_g2 + EPS) * g
      e_dx2 = RHO * e_dx2 + (1 - RHO) * dx * dx
      p = p - LEARNING_RATE * dx
    np.testing.assert_allclose(p1, p, rtol=tolerance, atol=tolerance)
