"""The training code behind `paper_reproduction.ipynb`: Zeiler (2012) §4.1 under candidate setups.

The paper fixes the network (784-500-300-10, softmax output), the batch size (100), the number
of epochs (6 for the tables), the optimizers and the activation of each experiment (ReLU for
Tables 1 and 2 and Figure 1, tanh for §4.1's 2.00 % run and Figure 2). It leaves open the rest
of `Setup`: the weight initialisation, the input scaling, whether the loss is a mean or a sum
over the batch, and momentum's constant. A setup is applied to *every* cell of a table; nothing
here is tuned per cell.

`paper_reproduction_runs.py` trains the long runs into the cache beside this file, which the
notebook reads through the same `group_errors`.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_adadelta

try:
  from optax_adadelta import datasets
except ImportError:  # the loaders may move under optax_adadelta.demo
  from optax_adadelta.demo import datasets  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
CACHE = HERE / "paper_reproduction_runs.json"
SIZES = (784, 500, 300, 10)
BATCH = 100
EPOCHS = 6


class Setup(NamedTuple):
  """The network's activation (stated by the paper per experiment) and the choices it leaves
  open; one setup is applied to every cell of a table."""

  activation: str  # "tanh" or "relu"
  init: str  # "normal": N(0, 0.01²); "glorot": U(±√(6/(fan_in+fan_out))); "he": N(0, 2/fan_in)
  inputs: str  # "unit": pixels / 255; "standard": (pixels/255 − mean) / sd over the training set
  loss: str  # "mean" or "sum" of the cross-entropy over the batch
  momentum: float = 0.9  # momentum's constant (Table 1's momentum row only)

  @property
  def key(self) -> str:
    """The setup as a cache key; the default momentum is left out (older keys stay valid)."""
    tail = [] if self.momentum == 0.9 else [f"m={self.momentum:g}"]
    return "/".join([*self[:4], *tail])


# The screened setups. The activation is the paper's (ReLU for Tables 1 and 2 and Figure 1);
# D, E, F differ only in the initialisation; the notebook derives the later candidates (inputs,
# loss, momentum's constant) from the closest of them with `Setup._replace`.
CANDIDATES = {
  "D": Setup("relu", "normal", "unit", "mean"),
  "E": Setup("relu", "glorot", "unit", "mean"),
  "F": Setup("relu", "he", "unit", "mean"),
  # The former tanh setups (kept for benchmarks/low_memory.py, which trains under C).
  "A": Setup("tanh", "glorot", "unit", "mean"),
  "C": Setup("tanh", "normal", "unit", "mean"),
}
SUM_LOSS = Setup("tanh", "glorot", "unit", "sum")

# The cells in the order of the paper's tables (rows first).
LRS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
TABLE1_METHODS = ("SGD", "MOMENTUM", "ADAGRAD")
RHOS = (0.9, 0.95, 0.99)
EPSS = (1e-2, 1e-4, 1e-6, 1e-8)
# False: a run missing from the cache raises `NotRunError` instead of training (the notebook's full
# mode shows what `paper_reproduction_runs.py` has run; PAPER_TRAIN=1 trains what is missing).
TRAIN_MISSING = True


class NotRunError(LookupError):
  """A full-mode run that is not in `paper_reproduction_runs.json` and was not to be trained."""


# A table's rows as groups of cells; groups with the same optimizer family train in one vmap.
GROUPS = {"table1": ("sgd", "momentum", "adagrad"), "table2": ("adadelta",)}


def paper_tables(data: Path) -> dict[str, np.ndarray]:
  """The paper's numbers (test error %) as (methods, lrs) and (rhos, epss) arrays."""
  tables = json.loads((data / "zeiler2012" / "tables.json").read_text())
  t1, t2 = tables["table1_learning_rate_rows"], tables["table2_eps_rows_rho_columns"]
  return {
    "table1": np.array(
      [
        [t1[f"{lr:.0e}".replace("e+00", "e0").replace("e-0", "e-")][m] for lr in LRS]
        for m in TABLE1_METHODS
      ]
    ),
    "table2": np.array(
      [[t2[f"{e:.0e}".replace("e-0", "e-")][f"{r:g}"] for e in EPSS] for r in RHOS]
    ),
  }


def adagrad(lr):
  """Adagrad as the paper's eq. (5): η / √(Σ g²) · g, the sum starting at 0 (optax's at 0.1)."""
  return optax.adagrad(lr, initial_accumulator_value=0.0, eps=0.0)


def sgd(lr, momentum):
  """SGD with momentum as the paper's eq. (4); momentum 0 is plain SGD (the trace is g itself)."""
  return optax.sgd(lr, momentum=momentum)


def adadelta(rho, eps):
  return optax_adadelta.adadelta(1.0, rho=rho, eps=eps)


def group_grid(group: str, setup: Setup) -> tuple[Callable, dict[str, list[float]]]:
  """The optimizer factory of a group of cells and its hyper-parameters, one entry per cell."""
  if group in ("sgd", "momentum"):
    return sgd, {"lr": list(LRS), "momentum": [0.0 if group == "sgd" else setup.momentum] * 5}
  if group == "adagrad":
    return (lambda lr: adagrad(lr)), {"lr": list(LRS)}
  if group == "adadelta_0.95_1e-6":  # §4.1's tanh run and Figure 1's Adadelta
    return adadelta, {"rho": [0.95], "eps": [1e-6]}
  if group == "adadelta":
    return adadelta, {
      "rho": [r for r in RHOS for _ in EPSS],
      "eps": [e for _ in RHOS for e in EPSS],
    }
  raise ValueError(f"group={group!r}: expected one of sgd, momentum, adagrad, adadelta")


def load_data(data: Path, inputs: str, fast: bool = False):
  """MNIST as device arrays (x_train, y_train, x_test, y_test), scaled as `inputs` says."""
  mnist = datasets.load_mnist(data / "mnist")
  x_train, y_train, x_test, y_test = mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test
  if fast:
    x_train, y_train, x_test, y_test = x_train[:1000], y_train[:1000], x_test[:500], y_test[:500]
  if inputs == "standard":
    mean, sd = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / sd, (x_test - mean) / sd
  return tuple(map(jnp.asarray, (x_train, y_train, x_test, y_test)))


def init_params(key, init: str):
  params = []
  for k, fan_in, fan_out in zip(
    jax.random.split(key, len(SIZES) - 1), SIZES[:-1], SIZES[1:], strict=True
  ):
    if init == "glorot":
      limit = (6.0 / (fan_in + fan_out)) ** 0.5
      w = jax.random.uniform(k, (fan_in, fan_out), minval=-limit, maxval=limit)
    elif init == "he":
      w = (2.0 / fan_in) ** 0.5 * jax.random.normal(k, (fan_in, fan_out))
    elif init == "normal":
      w = 0.01 * jax.random.normal(k, (fan_in, fan_out))
    else:
      raise ValueError(f"init={init!r}: expected normal, glorot or he")
    params.append({"w": w, "b": jnp.zeros(fan_out)})
  return params


def apply(params, x, activation: str):
  act = jnp.tanh if activation == "tanh" else jax.nn.relu
  for layer in params[:-1]:
    x = act(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def epoch_batches(key, epoch, num_examples: int, batch: int = BATCH) -> jax.Array:
  """Epoch `epoch`'s minibatches, indices of shape (num_examples // batch, batch): a fresh
  permutation from `key` folded with epoch + 1, the incomplete last batch dropped.

  Shared with benchmarks/low_memory.py, so that its MNIST runs batch as these do.
  """
  num = num_examples // batch
  perm = jax.random.permutation(jax.random.fold_in(key, epoch + 1), num_examples)
  return perm[: num * batch].reshape(num, batch)


def train_grid(
  make_tx, grid, seeds, epochs, setup: Setup, data, probe=None, probe_every=None, curves=True
):
  """Test error per epoch, shape (cells, seeds, epochs), every cell and seed in one vmap;
  with `curves=False` after the last epoch alone (cells, seeds, 1), which saves 5 % of the time.

  Each seed gives every cell the same initial weights and the same batch order (paired cells).
  `probe(opt_state, hp)`, if given, is called (vmapped) every `probe_every` batches.
  """
  x_train, y_train, x_test, y_test = data
  cells = len(next(iter(grid.values())))
  hp = {k: jnp.repeat(jnp.asarray(v, jnp.float32), len(seeds)) for k, v in grid.items()}
  seed_keys = jax.random.split(jax.random.key(0), max(seeds) + 1)[jnp.array(seeds)]
  keys = seed_keys[jnp.tile(jnp.arange(len(seeds)), cells)]
  reduce = jnp.mean if setup.loss == "mean" else jnp.sum

  def loss(params, x, y):
    logits = apply(params, x, setup.activation)
    return reduce(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def init_one(hp, key):
    params = init_params(jax.random.fold_in(key, 0), setup.init)
    return params, make_tx(**hp).init(params)

  def steps_one(hp, params, state, batches):
    tx = make_tx(**hp)

    def step(carry, batch):
      params, state = carry
      grads = jax.grad(loss)(params, x_train[batch], y_train[batch])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, state), batches)[0]

  def order_one(key, epoch):
    return epoch_batches(key, epoch, len(x_train))

  def error_one(params):
    return jnp.mean(jnp.argmax(apply(params, x_test, setup.activation), -1) != y_test)

  params, state = jax.jit(jax.vmap(init_one))(hp, keys)
  steps = jax.jit(jax.vmap(steps_one))
  order = jax.jit(jax.vmap(order_one, in_axes=(0, None)))
  error = jax.jit(jax.vmap(error_one))
  num_batches = len(x_train) // BATCH
  every = probe_every or num_batches
  errors, probes = [], []
  for epoch in range(epochs):
    batches = order(keys, epoch)
    for start in range(0, num_batches, every):
      params, state = steps(hp, params, state, batches[:, start : start + every])
      if probe is not None:
        probes.append(np.asarray(probe(state, hp)))
    if curves or epoch == epochs - 1:
      errors.append(np.asarray(error(params)))
  return np.stack(errors, -1).reshape(cells, len(seeds), len(errors)), probes


def _read_cache() -> dict:
  return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def store(key: str, entry: dict) -> None:
  """Adds one run to the cache; written whole and renamed, so that concurrent runs (the script
  may run in several processes) never read a half-written file."""
  cache = _read_cache() | {key: entry}
  partial = CACHE.with_suffix(f".{os.getpid()}.tmp")
  partial.write_text(json.dumps(cache, indent=0))
  partial.replace(CACHE)


def group_errors(
  setup: Setup,
  groups: tuple[str, ...],
  seeds: list[int],
  data_dir: Path,
  fast: bool = False,
  recompute: bool = False,
  epochs: int = EPOCHS,
) -> np.ndarray:
  """Test error % after `epochs` for every cell of `groups` under `setup`: (seeds, cells).

  The groups must share an optimizer factory (sgd and momentum do): their missing runs train
  together in one vmap. Full-mode results are kept in `paper_reproduction_runs.json` keyed by
  setup, group and seed, so a re-run of the notebook reuses them.
  """
  key = lambda group, seed: f"{setup.key}:{group}:epochs={epochs}:seed={seed}"
  cache = {} if fast else _read_cache()
  todo = [s for s in seeds if recompute or any(key(g, s) not in cache for g in groups)]
  if todo and not fast and not TRAIN_MISSING:
    raise NotRunError(f"{setup.key}: {'+'.join(groups)}, seeds {todo}: not run")
  if todo:
    grids = [group_grid(g, setup) for g in groups]
    grid = {k: list(itertools.chain(*(g[k] for _, g in grids))) for k in grids[0][1]}
    start = time.perf_counter()
    data = load_data(data_dir, setup.inputs, fast)
    length = 1 if fast else epochs
    errors = 100 * train_grid(grids[0][0], grid, todo, length, setup, data, curves=False)[0]
    errors, seconds = errors[:, :, -1].T, round(time.perf_counter() - start)  # (todo, cells)
    if fast:
      return errors
    bounds = np.cumsum([0] + [len(next(iter(g.values()))) for _, g in grids])
    for i, seed in enumerate(todo):
      for j, group in enumerate(groups):
        cells = errors[i, bounds[j] : bounds[j + 1]]
        cache[key(group, seed)] = {"errors": np.round(cells, 3).tolist(), "seconds": seconds}
        store(key(group, seed), cache[key(group, seed)])
  rows = [list(itertools.chain(*(cache[key(g, s)]["errors"] for g in groups))) for s in seeds]
  return np.array(rows)


def table_errors(setup: Setup, table: str, seeds: list[int], data_dir: Path, **kw) -> np.ndarray:
  """The table's cells under `setup`, (seeds, rows, columns) as the paper's table is laid out."""
  fused = [("sgd", "momentum"), ("adagrad",)] if table == "table1" else [("adadelta",)]
  rows = [group_errors(setup, groups, seeds, data_dir, **kw) for groups in fused]
  return np.concatenate(rows, 1).reshape(len(seeds), 3, -1)


def adadelta_probe(eps: float, quantiles=(0.1, 0.5, 0.9)):
  """Per layer: quantiles of √(E[Δx²]+ε)/√(E[g²]+ε) over its weights, their mean and sd, then
  the median E[g²]/ε.

  The ratio is the paper's Figure 2 quantity (Adadelta's step per unit gradient). Weights whose
  gradient has always been zero (MNIST's blank border pixels) are left out: their ratio is 1 by
  construction. Returns an array (layers, len(quantiles) + 3) for one network's state.
  """
  q = jnp.asarray(quantiles)

  def probe(opt_state, hp=None):
    rows = []
    e_g2s, e_dx2s = optax.tree.get(opt_state, "e_g2"), optax.tree.get(opt_state, "e_dx2")
    for e_g2, e_dx2 in zip(e_g2s, e_dx2s, strict=True):
      seen = e_g2["w"] > 0
      ratio = jnp.where(seen, jnp.sqrt(e_dx2["w"] + eps) / jnp.sqrt(e_g2["w"] + eps), jnp.nan)
      g2 = jnp.nanmedian(jnp.where(seen, e_g2["w"], jnp.nan)) / eps
      spread = jnp.stack([jnp.nanmean(ratio), jnp.nanstd(ratio)])
      rows.append(jnp.concatenate([jnp.nanquantile(ratio, q), spread, g2[None]]))
    return jnp.stack(rows)

  return probe


def distance(ours: np.ndarray, paper: np.ndarray) -> tuple[float, float]:
  """Mean and largest |ours − paper| over the cells of a table, in percentage points."""
  diff = np.abs(np.asarray(ours) - paper)
  return float(diff.mean()), float(diff.max())
