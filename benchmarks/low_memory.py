"""The low-memory states (#14): bytes per parameter, step time, and accuracy.

    python -m benchmarks.low_memory speed --smoke     # seconds: every case ~1000x smaller
    python -m benchmarks.low_memory speed             # cases (a), (b), (c) of step.py
    python -m benchmarks.low_memory accuracy --smoke  # seconds: a few steps of each task
    python -m benchmarks.low_memory accuracy          # 3 seeds x 4 state formats x 6 tasks
    python -m benchmarks.low_memory figure1 --out benchmarks/results  # 50 epochs, 3 seeds
    python -m benchmarks.low_memory accuracy --tasks l1-matrix --formats float32 factored \
        "factored hybrid"                            # the factored state where it factors

Formats: the float32 state (the default, the native CPU kernel where it applies, and the
pure-JAX path), bfloat16 rounded to nearest (``accumulator_dtype=jnp.bfloat16``), bfloat16
rounded stochastically, 8-bit codes (``state_bits=8``: the native CPU kernel, and the
pure-JAX path), the factored state (``factored=True``: a matrix's two averages kept as row and
column means) and two hybrids, one average factored and the other per entry in float32:
"factored hybrid" (E[g²] factored) and "factored dx2-only" (E[Δx²] factored). The factored
formats factor leaves whose two largest dimensions are at least ``min_dim_size_to_factor``
(128, or ``--min-dim-size-to-factor``); the vector tasks' ``-matrix`` variants hold the same
4,096 weights as a 64×64 matrix factored at 64. Bytes per parameter are counted
from the state's arrays. Step time: medians of interleaved single steps (as step.py), ratios
against the float32 state and against ``optax.adadelta``. Accuracy: mean ± sd over seeds.
Prints markdown tables; ``--out`` also writes them and the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_adadelta
from benchmarks import _contenders
from benchmarks.step import CASES, _transformer_shapes, case_shapes

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

FORMATS = {
  "float32": {},
  "float32 (pure JAX)": {"implementation": "jax"},
  "bfloat16": {"accumulator_dtype": jnp.bfloat16},
  "bfloat16 + SR": {"accumulator_dtype": jnp.bfloat16, "stochastic_rounding": True},
  "8-bit": {"state_bits": 8},
  "8-bit (pure JAX)": {"state_bits": 8, "implementation": "jax"},
  "factored": {"factored": True},
  "factored hybrid": {"factored": True, "factor_e_dx2": False},
  "factored dx2-only": {"factored": True, "factor_e_g2": False},
}
ACCURACY_FORMATS = ["float32", "bfloat16", "bfloat16 + SR", "8-bit"]  # the default run's
ACCURACY_CHOICES = [*ACCURACY_FORMATS, "factored", "factored hybrid", "factored dx2-only"]


def make_adadelta(rho, eps, keywords, learning_rate=1.0) -> optax.GradientTransformation:
  """``optax_adadelta.adadelta(learning_rate, rho, eps, **keywords)``, for any FORMATS value.

  ``factor_e_dx2`` and ``factor_e_g2`` (False: one average factored, the other per entry in
  float32) are keywords of ``scale_by_adadelta_factored`` only, so those formats are chained
  here as ``adadelta`` chains the others: the scaling, then −η.
  """
  keywords = dict(keywords)
  if "factor_e_dx2" not in keywords and "factor_e_g2" not in keywords:
    return optax_adadelta.adadelta(learning_rate, rho, eps, **keywords)
  del keywords["factored"]
  scaling = optax_adadelta.scale_by_adadelta_factored(rho, eps, **keywords)
  return optax.chain(scaling, optax.scale(-learning_rate))


def _factored_at(keywords, min_dim_size_to_factor):
  """A factored format's keywords with this task's factoring size unless one was given."""
  if not keywords.get("factored"):
    return keywords
  return {"min_dim_size_to_factor": min_dim_size_to_factor, **keywords}


def state_bytes_per_parameter(tx, params) -> float:
  state = jax.eval_shape(tx.init, params)
  nbytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
  return nbytes / sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


# Speed --------------------------------------------------------------------------------


def speed(args) -> dict:
  rng = np.random.default_rng(0)
  sections = {}
  for case in args.cases:
    shapes = case_shapes(case, args.smoke)
    if case == "b" and not args.smoke and args.shrink_b > 1:
      shapes = _transformer_shapes(args.shrink_b)
    params = {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, s in shapes.items()}
    contenders, bytes_per = [], {}
    for name, keywords in FORMATS.items():
      tx = make_adadelta(0.95, 1e-6, keywords)
      contenders.append(_contenders.JaxContender(name, tx, params, grads))
      bytes_per[name] = state_bytes_per_parameter(tx, params)
    baseline = optax.adadelta(learning_rate=1.0, rho=0.95, eps=1e-6)
    contenders.append(_contenders.JaxContender("optax.adadelta", baseline, params, grads))
    bytes_per["optax.adadelta"] = state_bytes_per_parameter(baseline, params)
    times = _contenders.interleaved_times(contenders, args.repeats)
    medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    sections[case] = {
      "title": f"({case}) {CASES[case]}: {len(shapes):,} leaves, "
      f"{sum(int(np.prod(s)) for s in shapes.values()):,} parameters",
      "median_ms": medians,
      "bytes_per_parameter": bytes_per,
    }
    print(_speed_table(sections[case]), flush=True)
  return sections


def _speed_table(section) -> str:
  medians, bytes_per = section["median_ms"], section["bytes_per_parameter"]
  lines = [
    f"\n### {section['title']}\n",
    "| state | bytes/param | median ms | × float32 state time | × optax.adadelta time |",
    "|---|---|---|---|---|",
  ]
  for name, ms in medians.items():
    ratio_f32, ratio_optax = ms / medians["float32"], ms / medians["optax.adadelta"]
    lines.append(
      f"| {name} | {bytes_per[name]:.3f} | {ms:.3f} | {ratio_f32:.2f} | {ratio_optax:.2f} |"
    )
  return "\n".join(lines)


# Accuracy -----------------------------------------------------------------------------


def _paper_lib():
  """notebooks/paper_reproduction_lib.py, whose MNIST batching and setups these runs share."""
  path = Path(__file__).resolve().parents[1] / "notebooks" / "paper_reproduction_lib.py"
  if "paper_reproduction_lib" not in sys.modules:
    spec = importlib.util.spec_from_file_location("paper_reproduction_lib", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["paper_reproduction_lib"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
  return sys.modules["paper_reproduction_lib"]


def _mnist_data():
  from optax_adadelta.demo import datasets

  data = datasets.load_mnist(os.environ.get("MNIST_DIR", "../shared/data/mnist"))
  return tuple(map(jnp.asarray, (data.x_train, data.y_train, data.x_test, data.y_test)))


def _mnist_task(rho, eps, epochs, smoke):
  from optax_adadelta.demo import mlp

  lib = _paper_lib()
  x_train, y_train, x_test, y_test = _mnist_data()
  num_train = 2000 if smoke else len(x_train)

  def run(keywords, seed):
    tx = make_adadelta(rho, eps, keywords)
    key = jax.random.PRNGKey(seed)
    params = mlp.init(key, mlp.layer_sizes(x_train.shape[1]))
    state = tx.init(params)
    steps = jax.jit(mlp.make_steps(tx))
    for epoch in range(1 if smoke else epochs):
      batches = lib.epoch_batches(key, epoch, num_train)
      params, state, _ = steps(params, state, x_train, y_train, batches)
    return 100 * float(mlp.error_rate(params, x_test, y_test))

  return f"MNIST 784-500-300-10, ρ={rho}, ε={eps:g}, {epochs} epochs: test error %", run


def _airfoil_task(smoke):
  from optax_adadelta.demo import datasets

  features, target = datasets.load_airfoil(os.environ.get("DATA_DIR", "../shared/data"))
  features, target = jnp.asarray(features), jnp.asarray(target)
  loss = lambda p, x, y: jnp.mean((x @ p["w"][:, 0] + p["b"][0] - y) ** 2) / 2

  def run(keywords, seed):
    # A (5, 1) and a (1,) leaf: a factored format keeps them per entry unless
    # --min-dim-size-to-factor 1, and then its rank-1 fit of one column is the column itself.
    tx = make_adadelta(0.9, 1e-5, keywords)
    key = jax.random.PRNGKey(seed)
    params = {"w": 0.01 * jax.random.normal(key, (5, 1)), "b": jnp.zeros(1)}
    state = tx.init(params)

    @jax.jit
    def epoch(params, state, order):
      def step(carry, batch):
        params, state = carry
        grads = jax.grad(loss)(params, features[batch], target[batch])
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

      return jax.lax.scan(step, (params, state), order)[0]

    for e in range(2):
      order = jax.random.permutation(jax.random.fold_in(key, e), 1500).reshape(150, 10)
      params, state = epoch(params, state, order)
    return float(loss(params, features, target))

  return "d2l airfoil, ρ=0.9, ε=1e-5, 2 epochs of batch 10: training loss", run


def _slow_regression_task(smoke, matrix=False):
  """Least squares in 4,096 dimensions whose feature scales span 3 decades: the small-scale
  coordinates converge over thousands of steps, where a stalled average shows. ``matrix``:
  the same weights held as a 64×64 matrix factored at 64 (the loss is unchanged); its
  per-coordinate scales are random, far from the rank-1 the factored state assumes."""
  dim, num, batch_size, num_steps = 4096, 8192, 256, 100 if smoke else 4000
  shape = (64, 64) if matrix else (dim,)
  rng = np.random.default_rng(123)
  scales = np.exp(rng.uniform(np.log(1e-3), 0.0, dim)).astype(np.float32)
  x = (rng.standard_normal((num, dim)) * scales).astype(np.float32)
  w_true = rng.standard_normal(dim).astype(np.float32)
  y = x @ w_true + 0.01 * rng.standard_normal(num).astype(np.float32)
  x, y = jnp.asarray(x), jnp.asarray(y)
  loss = lambda w, xb, yb: jnp.mean((xb @ w.reshape(dim) - yb) ** 2) / 2

  def run(keywords, seed):
    tx = make_adadelta(0.95, 1e-6, _factored_at(keywords, 64) if matrix else keywords)
    key = jax.random.PRNGKey(seed)
    w = jnp.zeros(shape)
    state = tx.init(w)

    @jax.jit
    def steps(w, state):
      def step(carry, t):
        w, state = carry
        batch = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, num)
        updates, state = tx.update(jax.grad(loss)(w, x[batch], y[batch]), state, w)
        return (optax.apply_updates(w, updates), state), None

      return jax.lax.scan(step, (w, state), jnp.arange(num_steps))[0]

    w, _ = steps(w, state)
    return float(loss(w, x, y))

  weights = "64×64 weights (the 4,096, reshaped)" if matrix else "4,096 weights"
  return f"slow regression ({weights}, {num_steps} steps of batch 256): training loss", run


def _separable_l1_task(num_steps, smoke, matrix=False):
  """Σ aᵢ|wᵢ − cᵢ| from w = 0, aᵢ log-uniform in [0.01, 1]: each gradient is ±aᵢ until wᵢ
  reaches cᵢ, the constant-gradient regime where a bfloat16 average rounded to nearest
  stalls (E[Δx²] stops growing once its increments fall under half an ulp). ``matrix``: w,
  a and c held as 64×64 matrices factored at 64 (the loss is unchanged); E[g²] = aᵢ² is
  then an i.i.d. log-uniform matrix, not rank 1."""
  dim = 4096
  shape = (64, 64) if matrix else (dim,)
  num_steps = min(num_steps, 50) if smoke else num_steps

  def run(keywords, seed):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(np.exp(rng.uniform(np.log(1e-2), 0, dim)).astype(np.float32).reshape(shape))
    c = jnp.asarray(rng.standard_normal(dim).astype(np.float32).reshape(shape))
    loss = lambda w: jnp.sum(a * jnp.abs(w - c))
    tx = make_adadelta(0.95, 1e-6, _factored_at(keywords, 64) if matrix else keywords)

    @jax.jit
    def steps(w, state):
      def step(carry, _):
        w, state = carry
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        return (optax.apply_updates(w, updates), state), None

      return jax.lax.scan(step, (w, state), None, length=num_steps)[0]

    w = jnp.zeros(shape)
    w, _ = steps(w, tx.init(w))
    return float(loss(w))

  weights = "64×64 weights (the 4,096, reshaped)" if matrix else "4,096 weights"
  return f"separable L1, {weights}, constant-magnitude gradients, {num_steps} steps: loss", run


def _keywords(args, fmt) -> dict:
  """FORMATS[fmt], with --min-dim-size-to-factor where the format is factored."""
  keywords = FORMATS[fmt]
  if keywords.get("factored") and args.min_dim_size_to_factor is not None:
    keywords = {**keywords, "min_dim_size_to_factor": args.min_dim_size_to_factor}
  return keywords


def git_commit() -> str:
  """The checkout's commit, for the record of a run ("unknown" outside git)."""
  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _run_record(args) -> dict:
  """How and where a run was made, written beside its numbers."""
  return {
    "command": "python -m benchmarks.low_memory " + shlex.join(args.argv),
    "commit": git_commit(),
    "jax": jax.__version__,
    "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    "load_average_at_start": os.getloadavg(),
  }


def accuracy(args) -> dict:
  tasks = []
  for name in args.tasks:
    if name == "mnist":
      tasks += [_mnist_task(rho, eps, 6, args.smoke) for rho, eps in args.cells]
    elif name == "airfoil":
      tasks.append(_airfoil_task(args.smoke))
    elif name in ("regression", "regression-matrix"):
      tasks.append(_slow_regression_task(args.smoke, matrix=name.endswith("matrix")))
    elif name in ("l1", "l1-matrix"):
      tasks += [_separable_l1_task(n, args.smoke, name.endswith("matrix")) for n in (300, 3000)]
  results: dict = {**_run_record(args), "results": {}, "seconds_per_run": {}}
  for title, run in tasks:
    results["results"][title], results["seconds_per_run"][title] = {}, {}
    for fmt in args.formats:
      seeds = range(args.first_seed, args.first_seed + args.seeds)
      start = time.perf_counter()
      values = [run(_keywords(args, fmt), seed) for seed in seeds]
      seconds = (time.perf_counter() - start) / len(seeds)
      results["results"][title][fmt] = values
      results["seconds_per_run"][title][fmt] = round(seconds, 1)
      print(
        f"{title} | {fmt}: {_mean_sd(values)}  {values}  ({seconds:.0f} s per run)",
        file=sys.stderr,
        flush=True,
      )
    print(_accuracy_table(title, results["results"][title]), flush=True)
    results["load_average_now"] = os.getloadavg()
    if args.out is not None:  # after every task, so a long run keeps what it finished
      args.out.mkdir(parents=True, exist_ok=True)
      (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
  return results


def figure1(args) -> dict:
  """Figure 1's run (Adadelta, ρ = 0.95, ε = 1e-6, 50 epochs) under the paper reproduction's
  chosen setup C (tanh, N(0, 0.01²) weights, pixels / 255, mean loss), as its notebook
  trains it: the same initial weights and batches per seed (``lib.train_grid``'s keys), so
  the float32 curve of seed 0 is the notebook's Figure 1 Adadelta curve. Seeds are vmapped;
  the formats take turns epoch by epoch, and the test errors so far are written to
  ``--out`` after every epoch, so a run cut short leaves every format at the same epoch."""
  lib = _paper_lib()
  setup = lib.CANDIDATES["C"]
  x_train, y_train, x_test, y_test = _mnist_data()
  if args.smoke:
    x_train, y_train, x_test, y_test = x_train[:2000], y_train[:2000], x_test[:500], y_test[:500]
  seeds = list(range(args.seeds))
  keys = jax.random.split(jax.random.key(0), max(seeds) + 1)[jnp.array(seeds)]
  loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
    lib.apply(p, x, setup.activation), y
  ).mean()
  error = jax.jit(
    jax.vmap(
      lambda p, x, y: jnp.mean(jnp.argmax(lib.apply(p, x, setup.activation), -1) != y),
      in_axes=(0, None, None),
    )
  )
  order = jax.jit(jax.vmap(lambda k, e: lib.epoch_batches(k, e, len(x_train)), in_axes=(0, None)))
  runs = {}
  for fmt in args.formats:
    tx = make_adadelta(0.95, 1e-6, _keywords(args, fmt))

    def init_one(key, tx=tx):
      params = lib.init_params(jax.random.fold_in(key, 0), setup.init)
      return params, tx.init(params)

    def epoch_one(params, state, batches, x, y, tx=tx):
      def step(carry, batch):
        params, state = carry
        grads = jax.grad(loss)(params, x[batch], y[batch])
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

      return jax.lax.scan(step, (params, state), batches)[0]

    epoch_fn = jax.vmap(epoch_one, in_axes=(0, 0, 0, None, None))
    runs[fmt] = [*jax.vmap(init_one)(keys), jax.jit(epoch_fn, donate_argnums=(0, 1))]
  epochs = 1 if args.smoke else args.epochs
  results: dict = {
    **_run_record(args),
    "task": "MNIST 784-500-300-10, setup C (tanh, N(0, 0.01^2), unit, mean), rho 0.95, "
    "eps 1e-6, batch 100: test error % after each epoch",
    "seeds": seeds,
    "epochs_planned": epochs,
    "errors": {fmt: [] for fmt in runs},
    "seconds": {fmt: 0.0 for fmt in runs},
  }
  for epoch in range(epochs):
    batches = order(keys, epoch)
    for fmt, run in runs.items():
      start = time.perf_counter()
      run[0], run[1] = run[2](run[0], run[1], batches, x_train, y_train)
      errors = 100 * np.asarray(error(run[0], x_test, y_test))
      results["errors"][fmt].append(errors.round(3).tolist())
      results["seconds"][fmt] += time.perf_counter() - start
    results["epochs_done"] = epoch + 1
    results["load_average_now"] = os.getloadavg()
    last = {f: _mean_sd(e[-1]) for f, e in results["errors"].items()}
    print(f"epoch {epoch + 1}: {last}", file=sys.stderr, flush=True)
    if args.out is not None:
      args.out.mkdir(parents=True, exist_ok=True)
      (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
  print(_figure1_table(results), flush=True)
  return results


def _figure1_table(results) -> str:
  done = results["epochs_done"]
  marks = sorted({e for e in (1, 6, 10, 20, 30, 40, 50, done) if e <= done})
  lines = [
    f"\n### {results['task']} (mean ± sd over seeds {results['seeds']}, {done} epochs)\n",
    "| state | " + " | ".join(f"epoch {e}" for e in marks) + " |",
    "|---|" + "---|" * len(marks),
  ]
  for fmt, errors in results["errors"].items():
    lines.append(f"| {fmt} | " + " | ".join(_mean_sd(errors[e - 1]) for e in marks) + " |")
  return "\n".join(lines)


def _mean_sd(values) -> str:
  sd = np.std(values, ddof=1) if len(values) > 1 else float("nan")
  return f"{np.mean(values):.4g} ± {sd:.2g}"


def _accuracy_table(title, by_format) -> str:
  lines = [f"\n### {title}\n", "| state | mean ± sd | seeds |", "|---|---|---|"]
  for fmt, values in by_format.items():
    lines.append(f"| {fmt} | {_mean_sd(values)} | {', '.join(f'{v:.4g}' for v in values)} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("what", choices=["speed", "accuracy", "figure1"])
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--cases", nargs="+", default=["a", "b", "c"], choices=sorted(CASES))
  parser.add_argument(
    "--tasks",
    nargs="+",
    default=["l1", "regression", "airfoil", "mnist"],
    choices=["l1", "regression", "airfoil", "mnist", "l1-matrix", "regression-matrix"],
  )
  parser.add_argument("--seeds", type=int, default=None, help="how many seeds")
  parser.add_argument("--first-seed", type=int, default=0, help="accuracy: seeds from this")
  parser.add_argument(
    "--formats",
    nargs="+",
    default=ACCURACY_FORMATS,
    choices=ACCURACY_CHOICES,
    help="accuracy, figure1",
  )
  parser.add_argument(
    "--min-dim-size-to-factor",
    type=int,
    default=None,
    help="accuracy, figure1: the factored formats' min_dim_size_to_factor on every task",
  )
  parser.add_argument(
    "--cells",
    nargs="+",
    default=None,
    help="mnist: Table 2 cells as rho:eps, e.g. 0.9:1e-2 (default 0.95:1e-6 0.99:1e-8)",
  )
  parser.add_argument("--epochs", type=int, default=50, help="figure1: epochs to train")
  parser.add_argument(
    "--shrink-b", type=int, default=1, help="divide case (b)'s d_model by this (memory)"
  )
  parser.add_argument("--out", type=Path, default=None, help="write <name>.json here")
  parser.add_argument("--name", default=None, help="the JSON's name (default low_memory_<what>)")
  args = parser.parse_args(argv)
  args.argv = sys.argv[1:] if argv is None else list(argv)
  args.name = args.name or f"low_memory_{args.what}"
  args.repeats = args.repeats or (3 if args.smoke else 15)
  if args.smoke and args.what == "speed" and args.cases == ["a", "b", "c"]:
    args.cases = ["a", "b"]  # (c)'s 1,000 leaves take minutes to compile six times
  args.seeds = args.seeds or (2 if args.smoke else 3)
  if args.cells is not None:
    args.cells = [tuple(float(v) for v in cell.split(":")) for cell in args.cells]
  else:
    args.cells = [(0.95, 1e-6)] if args.smoke else [(0.95, 1e-6), (0.99, 1e-8)]
  if args.what == "figure1":
    figure1(args)  # writes its JSON after every epoch
    return
  results = speed(args) if args.what == "speed" else accuracy(args)
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
