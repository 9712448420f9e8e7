"""A small byte-level transformer language model trained with each Adadelta state (#26).

    python -m benchmarks.transformer_lm --smoke                  # seconds: a tiny model, 4 steps
    python -m benchmarks.transformer_lm --out benchmarks/results # 6 states x 3 seeds, ~1 h
    python -m benchmarks.transformer_lm --memory-only --out benchmarks/results  # seconds

A decoder-only transformer (pre-norm, learned positions, GELU MLP, biases, untied output) in
plain JAX, whose parameters are mostly matrices of at least 128 x 128, so the factored state
factors them at its default ``min_dim_size_to_factor=128``. The text is the source of a fixed
list of Python standard-library modules (``CORPUS_MODULES``, concatenated in that order as
bytes): deterministic for a given Python version, and present wherever Python is. The last 10 %
is held out. Every state starts from the same initialisation and sees the same batches for a
given seed. Reports the validation loss in bits per byte (mean ± sd over seeds) along the run,
bytes of optimizer state per parameter, and median step times of interleaved single steps
(full training step, and optimizer update alone) as ratios against the float32 state and
``optax.adadelta`` measured in the same run. ``--out`` writes ``<name>.md`` and ``<name>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
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

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

# Pure-Python modules that are single source files from Python 3.9 to 3.13, sorted.
CORPUS_MODULES = (
  "argparse", "ast", "calendar", "configparser", "csv", "dataclasses", "difflib", "enum",
  "fractions", "functools", "heapq", "inspect", "ipaddress", "pprint", "random", "shutil",
  "statistics", "string", "textwrap", "threading", "tokenize", "typing",
)  # fmt: skip
HELD_OUT = 0.1
BITS_PER_NAT = 1 / math.log(2)


@dataclasses.dataclass(frozen=True)
class Model:
  d_model: int = 128
  layers: int = 4
  heads: int = 4
  context: int = 128
  vocab: int = 256  # bytes


def load_corpus(smoke: bool = False) -> tuple[np.ndarray, dict]:
  """The modules' source files as one byte array, and what it is (files, bytes, sha256)."""
  texts, files = [], []
  for name in CORPUS_MODULES[:1] if smoke else CORPUS_MODULES:
    origin = importlib.util.find_spec(name).origin
    if origin is None or not origin.endswith(".py"):
      raise RuntimeError(f"stdlib module {name!r} has no .py source here (origin {origin!r})")
    data = Path(origin).read_bytes()
    texts.append(data)
    files.append({"module": name, "file": Path(origin).name, "bytes": len(data)})
  corpus = b"".join(texts)
  description = {
    "python": platform.python_version(),
    "implementation": platform.python_implementation(),
    "files": files,
    "bytes": len(corpus),
    "sha256": hashlib.sha256(corpus).hexdigest(),
  }
  return np.frombuffer(corpus, np.uint8), description


def init_params(key, model: Model) -> dict:
  keys = iter(jax.random.split(key, 4 + 4 * model.layers))
  normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, jnp.float32)
  d, residual_std = model.d_model, 0.02 / math.sqrt(2 * model.layers)
  norm = lambda: {"scale": jnp.ones(d), "bias": jnp.zeros(d)}
  dense = lambda n, m, std=0.02: {"w": normal((n, m), std), "b": jnp.zeros(m)}
  params = {
    "embed": normal((model.vocab, d)),
    "positions": normal((model.context, d)),
    "final_norm": norm(),
    "unembed": normal((d, model.vocab)),
  }
  for layer in range(model.layers):
    params[f"layer_{layer}"] = {
      "norm_1": norm(),
      "qkv": dense(d, 3 * d),
      "attention_out": dense(d, d, residual_std),
      "norm_2": norm(),
      "mlp_in": dense(d, 4 * d),
      "mlp_out": dense(4 * d, d, residual_std),
    }
  return params


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  variance = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + 1e-5) * p["scale"] + p["bias"]


def logits(params, tokens, model: Model):
  batch, length = tokens.shape
  head_dim = model.d_model // model.heads
  x = params["embed"][tokens] + params["positions"][:length]
  causal = jnp.tril(jnp.ones((length, length), bool))
  for layer in range(model.layers):
    p = params[f"layer_{layer}"]
    qkv = _layer_norm(x, p["norm_1"]) @ p["qkv"]["w"] + p["qkv"]["b"]
    q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, model.heads, head_dim), 2, 0)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(head_dim)
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    attended = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(x.shape)
    x = x + attended @ p["attention_out"]["w"] + p["attention_out"]["b"]
    hidden = jax.nn.gelu(_layer_norm(x, p["norm_2"]) @ p["mlp_in"]["w"] + p["mlp_in"]["b"])
    x = x + hidden @ p["mlp_out"]["w"] + p["mlp_out"]["b"]
  return _layer_norm(x, params["final_norm"]) @ params["unembed"]


def loss_nats(params, windows, model: Model):
  """Mean next-byte cross-entropy over windows of context + 1 bytes."""
  predicted = logits(params, windows[:, :-1], model)
  labels = windows[:, 1:].astype(jnp.int32)
  return optax.softmax_cross_entropy_with_integer_labels(predicted, labels).mean()


def contenders(lr, rho, eps, min_dim) -> dict:
  """The optimizers compared; the factored ones only where optax_adadelta has them."""
  txs = {
    "float32 state": lambda: optax_adadelta.adadelta(lr, rho, eps),
    "8-bit": lambda: optax_adadelta.adadelta(lr, rho, eps, state_bits=8),
  }
  if hasattr(optax_adadelta, "scale_by_adadelta_factored"):
    factored = optax_adadelta.scale_by_adadelta_factored
    txs["factored"] = lambda: optax_adadelta.adadelta(
      lr, rho, eps, factored=True, min_dim_size_to_factor=min_dim
    )
    for name, full in (
      ("hybrid (E[Δx²] full)", "factor_e_dx2"),
      ("hybrid (E[g²] full)", "factor_e_g2"),
    ):
      txs[name] = lambda full=full: optax.chain(
        factored(rho, eps, min_dim_size_to_factor=min_dim, **{full: False}), optax.scale(-lr)
      )
  txs["optax.adadelta"] = lambda: optax.adadelta(lr, rho, eps)
  return txs


def state_bytes(tx, params) -> dict:
  """Bytes of the state's arrays, in all and per parameter (jax.eval_shape: nothing allocated)."""
  shapes = jax.eval_shape(tx.init, params)
  nbytes = [int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes)]
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return {"bytes": sum(nbytes), "per_parameter": sum(nbytes) / count, "parameters": count}


# Memory only (--memory-only): the same architecture at larger sizes, nothing trained.
LARGER_MODELS = (Model(128), Model(256), Model(512, 8, 8, 512), Model(768, 12, 12, 1024))


def memory_only(txs, args) -> str:
  rows, record = [], {"command": "python -m benchmarks.transformer_lm --memory-only"}
  record.update(provenance(), models=[])
  for model in LARGER_MODELS:
    params = jax.eval_shape(lambda model=model: init_params(jax.random.key(0), model))
    sizes = [(int(np.prod(p.shape)), p.ndim) for p in jax.tree.leaves(params)]
    vectors = sum(n for n, ndim in sizes if ndim < 2) / sum(n for n, _ in sizes)
    per = {name: state_bytes(make(), params)["per_parameter"] for name, make in txs.items()}
    record["models"].append({**dataclasses.asdict(model), "vector_share": vectors, **per})
    described = f"d_model {model.d_model}, {model.layers} layers, context {model.context}"
    count = sum(n for n, _ in sizes)
    rows.append(
      f"| {described} | {count:,} | {vectors:.2%} | {8 * vectors:.4f} | "
      + " | ".join(f"{v:.4f}" for v in per.values())
      + " |"
    )
  lines = [
    "# Bytes of Adadelta state per parameter: this transformer at larger sizes (#26)",
    "",
    f"`{record['command']}` at commit {record['commit']}: counted from "
    "`jax.eval_shape(tx.init, params)`, nothing trained. Vectors: the biases and layer-norm "
    "parameters, which the factored states keep in full (8 bytes each): their bytes per "
    "parameter of the whole model are a floor for the factored state.",
    "",
    "| model | parameters | vectors | vectors' bytes/param | " + " | ".join(txs) + " |",
    "|---|---|---|---|" + "---|" * len(txs),
    *rows,
  ]
  report = "\n".join(lines) + "\n"
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}_memory.md").write_text(report)
    (args.out / f"{args.name}_memory.json").write_text(json.dumps(record, indent=1) + "\n")
  return report


def _batches(train, seed, steps, batch, context) -> np.ndarray:
  starts = np.random.default_rng([seed, 1]).integers(0, len(train) - context, (steps, batch))
  return train[starts[..., None] + np.arange(context + 1)]


def _validation_windows(valid, count, context) -> np.ndarray:
  """`count` windows spread evenly over the held-out bytes (all of them if fewer fit)."""
  starts = np.arange(0, len(valid) - context, context + 1)
  starts = starts[np.linspace(0, len(starts) - 1, min(count, len(starts))).astype(int)]
  return valid[starts[:, None] + np.arange(context + 1)]


def _validation_loss(params, windows, model, eval_batch) -> float:
  chunks = np.array_split(windows, max(1, len(windows) // eval_batch))
  return float(np.mean([_evaluate(params, c, model) for c in chunks]) * BITS_PER_NAT)


_evaluate = jax.jit(loss_nats, static_argnums=2)


def train_runs(make_tx, seeds, args, data) -> list[dict]:
  """One training run per seed; the step is compiled once for all of them."""
  train, windows = data
  model, tx = args.model, make_tx()

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_nats)(params, batch, model)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  eval_at = set(np.linspace(0, args.steps, args.curve_points + 1).astype(int).tolist())
  runs = []
  for seed in seeds:
    params = init_params(jax.random.key(seed), model)
    state = tx.init(params)
    batches = _batches(train, seed, args.steps, args.batch, model.context)
    curve, train_losses, start = [], [], time.perf_counter()
    for i in range(args.steps + 1):
      if i in eval_at:
        recent = (
          float(np.mean(jnp.stack(train_losses[-20:])) * BITS_PER_NAT) if train_losses else None
        )
        valid = _validation_loss(params, windows, model, args.eval_batch)
        curve.append({"step": i, "valid_bits": valid, "train_bits": recent})
        elapsed = time.perf_counter() - start
        print(f"  seed {seed} step {i}: {valid:.4f} bits/byte, {elapsed:.0f} s", file=sys.stderr)
      if i < args.steps:
        params, state, loss = step(params, state, batches[i])
        train_losses.append(loss)  # a device array: the host does not wait for it
    wall = time.perf_counter() - start
    runs.append({"seed": seed, "curve": curve, "final_bits": curve[-1]["valid_bits"]})
    runs[-1]["wall_s"] = wall
    print(f"{seed=}: {curve[-1]['valid_bits']:.4f} bits/byte, {wall:.0f} s", file=sys.stderr)
  return runs


class _TrainStep:
  """One full training step (forward, backward, update), in _contenders' prepare/run shape."""

  def __init__(self, name, tx, params, batch, model):
    self.name, self._batch = name, batch
    self.params, self.state = params, tx.init(params)

    def step(params, state, batch):
      grads = jax.grad(loss_nats)(params, batch, model)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self._step = jax.jit(step, donate_argnums=(0, 1))
    self.params = jax.tree.map(jnp.copy, params)

  def prepare(self):
    pass

  def run(self):
    self.params, self.state = self._step(self.params, self.state, self._batch)
    jax.block_until_ready((self.params, self.state))


def interleaved_medians(runners, repeats) -> dict:
  """Median ms of `repeats` single steps each, taking turns (as benchmarks/step.py)."""
  times = _contenders.interleaved_times(runners, repeats)
  return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def timings(txs, args, train) -> dict:
  params = init_params(jax.random.key(0), args.model)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  batch = jnp.asarray(_batches(train, 0, 1, args.batch, args.model.context)[0])
  full = [_TrainStep(n, make(), params, batch, args.model) for n, make in txs.items()]
  update = [_contenders.JaxContender(n, make(), params, grads) for n, make in txs.items()]
  return {
    "train_step_ms": interleaved_medians(full, args.timing_repeats),
    "update_ms": interleaved_medians(update, args.timing_repeats * 3),
  }


def _mean_sd(values) -> str:
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"


def _loss_tables(runs, names) -> list[str]:
  lines = [
    "",
    "## Validation loss, bits per byte (mean ± sd over seeds)",
    "",
    "Δ: this state's final loss minus the float32 state's on the same seed (same initialisation "
    "and batches), mean ± sd over seeds.",
    "",
    "| state | final | Δ vs float32 state | wall s per run |",
    "|---|---|---|---|",
  ]
  reference = {r["seed"]: r["final_bits"] for r in runs.get("float32 state", [])}
  for name in names:
    finals = [r["final_bits"] for r in runs[name]]
    deltas = [r["final_bits"] - reference[r["seed"]] for r in runs[name] if r["seed"] in reference]
    delta = _mean_sd(deltas) if deltas else "–"
    wall = np.mean([r["wall_s"] for r in runs[name]])
    lines.append(f"| {name} | {_mean_sd(finals)} | {delta} | {wall:.0f} |")
  steps = [p["step"] for p in runs[names[0]][0]["curve"]]
  lines += ["", "## Loss curve: validation bits per byte (mean over seeds) at step", ""]
  lines += ["| state | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
  for name in names:
    means = np.mean([[p["valid_bits"] for p in r["curve"]] for r in runs[name]], axis=0)
    lines.append(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
  return lines


def markdown(record) -> str:
  runs, config = record["runs"], record["config"]
  names, corpus = list(record["state_bytes"]), record["corpus"]
  files = ", ".join(f"{f['module']} ({f['bytes']:,})" for f in corpus["files"])
  lines = [
    "# Byte-level transformer LM, each Adadelta state (#26)",
    "",
    f"- Command: `{record['command']}`",
    f"- Commit {record['commit']}, {record['date']}; {record['elapsed_min']:.1f} min in all"
    + (
      f"; package files changed: {record['package_changes']}" if record["package_changes"] else ""
    ),
    f"- Machine: {record['machine']}; load average {record['load_start']} at start, "
    f"{record['load_end']} at end (other jobs share the cores)",
    f"- Versions: {record['versions']}",
    f"- Text: the source files of {len(corpus['files'])} standard-library modules of "
    f"{corpus['implementation']} {corpus['python']}, concatenated in this order: {files}; "
    f"{corpus['bytes']:,} bytes (sha256 {corpus['sha256'][:16]}…). The last "
    f"{HELD_OUT:.0%} is held out; validation: {config['validation_windows']} windows of "
    f"{config['context'] + 1} bytes spread evenly over it.",
    f"- Model: d_model {config['d_model']}, {config['layers']} layers, {config['heads']} "
    f"heads, context {config['context']}, vocabulary 256 (bytes); "
    f"{record['parameters']:,} parameters. Batch {config['batch']} windows, "
    f"{config['steps']} steps; learning rate {config['lr']}, ρ {config['rho']}, "
    f"ε {config['eps']}, min_dim_size_to_factor {config['min_dim']}.",
    f"- Seeds {config['seeds']}: a seed fixes the initialisation and the batches, the same "
    "for every state.",
  ]
  trained = [name for name in names if name in runs]
  if trained:
    lines += _loss_tables(runs, trained)
  lines += ["", "## State memory and step time", ""]
  lines += [
    "Medians of interleaved single jitted steps on one batch (full step: forward, backward and "
    "update; update: `tx.update` and `apply_updates` on fixed random gradients); × = this "
    "state's time / the reference's, from the same run.",
    "",
    "| state | state bytes | bytes/param | full step ms | × float32 | × optax | update ms | "
    "× float32 | × optax |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  timing = record.get("timing") or {}
  for name in names:
    memory = record["state_bytes"][name]
    row = [name, f"{memory['bytes']:,}", f"{memory['per_parameter']:.4f}"]
    for key in ("train_step_ms", "update_ms"):
      ms = timing.get(key, {})
      if name in ms:
        row.append(f"{ms[name]:.2f}")
        for reference in ("float32 state", "optax.adadelta"):
          row.append(f"{ms[name] / ms[reference]:.2f}" if reference in ms else "–")
      else:
        row += ["–"] * 3
    lines.append("| " + " | ".join(row) + " |")
  lines += [""] + [f"- {note}" for note in record["notes"]]
  return "\n".join(lines) + "\n"


def provenance() -> dict:
  """The commit, and the package files that differ from it (a run on a dirty tree says so)."""
  root = Path(__file__).resolve().parents[1]
  git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True).stdout.decode()
  factored = root / "optax_adadelta" / "formats" / "factored.py"
  return {
    "commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
    "package_changes": git("status", "--porcelain", "--", "optax_adadelta").splitlines(),
    "factored_py_sha256": hashlib.sha256(factored.read_bytes()).hexdigest()
    if factored.exists()
    else None,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="a tiny model, a few steps")
  parser.add_argument(
    "--memory-only", action="store_true", help="bytes per parameter at larger sizes, no training"
  )
  parser.add_argument("--timing-only", action="store_true", help="step times, no training")
  parser.add_argument("--report", type=Path, help="rewrite the markdown of this JSON record")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, help="training steps per run (500; smoke 4)")
  parser.add_argument("--batch", type=int, help="windows per batch (8; smoke 2)")
  parser.add_argument("--d-model", type=int, default=Model.d_model)
  parser.add_argument("--layers", type=int, default=Model.layers)
  parser.add_argument("--context", type=int, default=Model.context)
  parser.add_argument("--lr", type=float, default=1.0)
  parser.add_argument("--rho", type=float, default=0.95)
  parser.add_argument("--eps", type=float, default=1e-6)
  parser.add_argument("--states", help="comma-separated subset of the states (default: all)")
  parser.add_argument("--validation-windows", type=int, help="(128; smoke 4)")
  parser.add_argument("--curve-points", type=int, default=5)
  parser.add_argument("--timing-repeats", type=int, help="full steps timed per state (10)")
  parser.add_argument("--out", type=Path, help="write <name>.md and <name>.json here")
  parser.add_argument("--name", default="factored_transformer")
  args = parser.parse_args(argv)
  if args.report is not None:
    args.report.with_suffix(".md").write_text(markdown(json.loads(args.report.read_text())))
    return
  smoke = args.smoke
  args.model = Model(32, 1, 2, 16) if smoke else Model(args.d_model, args.layers, 4, args.context)
  args.steps = args.steps or (4 if smoke else 500)
  args.batch = args.batch or (2 if smoke else 8)
  args.validation_windows = args.validation_windows or (4 if smoke else 128)
  if args.timing_repeats is None:
    args.timing_repeats = 2 if smoke else 10
  args.curve_points = min(args.curve_points, args.steps)
  args.eval_batch = 32
  min_dim = 16 if smoke else 128  # the smoke model's matrices are 32 wide: factor them too
  seeds = [int(s) for s in args.seeds.split(",")]
  txs = contenders(args.lr, args.rho, args.eps, min_dim)
  notes = []
  if "factored" not in txs:
    notes.append("factored and hybrids skipped: optax_adadelta has no scale_by_adadelta_factored")
  if args.states:
    wanted = args.states.split(",")
    unknown = sorted(set(wanted) - set(txs))
    if unknown:
      parser.error(f"--states: unknown {unknown}; choose from {list(txs)}")
    txs = {name: txs[name] for name in wanted}
  if args.memory_only:
    print(memory_only(txs, args))
    return
  started, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
  corpus, description = load_corpus(smoke)
  split = int(len(corpus) * (1 - HELD_OUT))
  windows = _validation_windows(corpus[split:], args.validation_windows, args.model.context)
  data = (corpus[:split], windows)
  params = jax.eval_shape(lambda: init_params(jax.random.key(0), args.model))
  config = {**dataclasses.asdict(args.model), "steps": args.steps, "batch": args.batch}
  config.update(lr=args.lr, rho=args.rho, eps=args.eps, min_dim=min_dim, seeds=seeds)
  config.update(validation_windows=len(windows), curve_points=args.curve_points)
  cpu = platform.processor() or platform.machine()
  record = {
    "command": "python -m benchmarks.transformer_lm " + shlex.join(argv or sys.argv[1:]),
    **provenance(),
    "machine": f"{cpu}, {os.cpu_count()} cores, {jax.default_backend()}",
    "load_start": load_start,
    "versions": f"python {platform.python_version()}, jax {jax.__version__}, "
    f"optax {optax.__version__}, numpy {np.__version__}",
    "corpus": description,
    "config": config,
    "parameters": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
    "state_bytes": {name: state_bytes(make(), params) for name, make in txs.items()},
    "runs": {},
    "timing": None,
    "notes": notes,
  }
  for name, make_tx in txs.items() if not args.timing_only else ():
    print(name, file=sys.stderr, flush=True)
    record["runs"][name] = train_runs(make_tx, seeds, args, data)
    _write(record, started, args)  # after each state, so that a cut-short run keeps its part
  if args.timing_repeats > 0:
    record["timing"] = timings(txs, args, corpus[:split])
  print(_write(record, started, args))


def _write(record, started, args) -> str:
  record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  record["elapsed_min"] = (time.perf_counter() - started) / 60
  record["load_end"] = [round(x, 2) for x in os.getloadavg()]
  report = markdown(record)
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(report)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
  return report


if __name__ == "__main__":
  main()
