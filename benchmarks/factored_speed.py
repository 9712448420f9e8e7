"""The factored state (#26): bytes of state per parameter and step time on step.py's cases.

    python -m benchmarks.factored_speed --smoke                   # seconds
    python -m benchmarks.factored_speed --out benchmarks/results  # ~10 min on 2 loaded cores

Cases (a), (b), (c), (d) of benchmarks/step.py, and (a-matrix): case (a)'s 2²⁴ parameters as
one 4,096 × 4,096 matrix, the shape factoring is for. States: the float32 state (the native CPU
kernel where it applies, and the pure-JAX path), 8-bit codes, the factored state
(``factored=True``), its two hybrids (one average factored, the other per entry in float32:
``scale_by_adadelta_factored(factor_e_dx2=False)`` or ``factor_e_g2=False``) and
``optax.adadelta``, all at the paper's learning rate 1, ρ 0.95, ε 10⁻⁶. Bytes per parameter
count the state's arrays (``jax.eval_shape(tx.init, params)``), split into the leaves the
factored state factors and the rest. Step time (not for ``--memory-cases``, by default c and
d, whose 1,000 leaves take minutes to compile per state): medians of interleaved single
jitted steps (as step.py), ratios against the float32 state and ``optax.adadelta`` from the
same run. ``--out`` writes ``<name>.md`` and ``<name>.json`` after each case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
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
from benchmarks.step import CASES, case_shapes
from benchmarks.transformer_lm import provenance

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

LEARNING_RATE, RHO, EPS = 1.0, 0.95, 1e-6
GOAL_BYTES_PER_PARAMETER = 0.05
EXTRA_CASES = {"a-matrix": "case (a)'s parameters as one square matrix"}


def states(min_dim: int) -> dict:
  """The optimizers compared, by name: each a function returning a fresh transformation."""
  factored = optax_adadelta.scale_by_adadelta_factored
  lr, rho, eps = LEARNING_RATE, RHO, EPS
  return {
    "float32 state": lambda: optax_adadelta.adadelta(lr, rho, eps),
    "float32 state (pure JAX)": lambda: optax_adadelta.adadelta(lr, rho, eps, implementation="jax"),
    "8-bit": lambda: optax_adadelta.adadelta(lr, rho, eps, state_bits=8),
    "factored": lambda: optax_adadelta.adadelta(
      lr, rho, eps, factored=True, min_dim_size_to_factor=min_dim
    ),
    "hybrid (E[Δx²] full)": lambda: optax.chain(
      factored(rho, eps, min_dim_size_to_factor=min_dim, factor_e_dx2=False), optax.scale(-lr)
    ),
    "hybrid (E[g²] full)": lambda: optax.chain(
      factored(rho, eps, min_dim_size_to_factor=min_dim, factor_e_g2=False), optax.scale(-lr)
    ),
    "optax.adadelta": lambda: optax.adadelta(lr, rho, eps),
  }


def shapes_of(case: str, smoke: bool) -> dict[str, tuple[int, ...]]:
  if case == "a-matrix":
    side = 2**7 if smoke else 2**12
    return {"w": (side, side)}
  return case_shapes(case, smoke)


def is_factored(shape, min_dim: int) -> bool:
  """The contract's rule (optax.adafactor's): the two largest dimensions both ≥ min_dim."""
  return len(shape) >= 2 and sorted(shape)[-2] >= min_dim


def state_bytes(tx, params) -> int:
  state = jax.eval_shape(tx.init, params)
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def memory(tx, shapes, min_dim) -> dict:
  """Bytes per parameter in all, and split into factorable matrices and every other leaf."""
  spec = lambda keep: {
    k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items() if keep(s)
  }
  factorable = spec(lambda s: is_factored(s, min_dim))
  rest = spec(lambda s: not is_factored(s, min_dim))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in tree.values())
  total = state_bytes(tx, {**factorable, **rest})
  result = {"bytes": total, "per_parameter": total / (count(factorable) + count(rest))}
  for part, tree in (("factorable", factorable), ("rest", rest)):
    result[f"{part}_parameters"] = count(tree)
    result[f"{part}_bytes"] = state_bytes(tx, tree) if tree else 0
  # The step count and any other scalar appears in both parts' states: counted once in all.
  return result


def run_case(case, args, timed: bool) -> dict:
  shapes = shapes_of(case, args.smoke)
  makers = states(args.min_dim)
  bytes_per = {name: memory(make(), shapes, args.min_dim) for name, make in makers.items()}
  medians, times = _time_steps(shapes, makers, args.repeats) if timed else ({}, {})
  sizes = [int(np.prod(s)) for s in shapes.values()]
  title = CASES.get(case) or EXTRA_CASES[case]
  return {
    "case": case,
    "title": f"({case}) {title}: {len(sizes):,} leaves, {sum(sizes):,} parameters",
    "leaves": len(sizes),
    "factored_leaves": sum(is_factored(s, args.min_dim) for s in shapes.values()),
    "parameters": sum(sizes),
    "median_ms": medians,
    "times_ms": times,
    "memory": bytes_per,
  }


def _time_steps(shapes, makers, repeats) -> tuple[dict, dict]:
  """Medians (ms) of interleaved single steps, the order rotating each round (as step.py)."""
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, s in shapes.items()}
  contenders = [_contenders.JaxContender(n, make(), params, grads) for n, make in makers.items()]
  del params, grads
  times = _contenders.interleaved_times(contenders, repeats)
  medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
  return medians, {name: [t * 1e3 for t in ts] for name, ts in times.items()}


def _per_parameter(memory_of_state, part) -> str:
  parameters = memory_of_state[f"{part}_parameters"]
  return f"{memory_of_state[f'{part}_bytes'] / parameters:.4f}" if parameters else "–"


def _case_table(section) -> str:
  medians, mem = section["median_ms"], section["memory"]
  factored = mem["factored"]
  share = factored["factorable_parameters"] / section["parameters"]
  lines = [
    f"\n### {section['title']}\n",
    f"{section['factored_leaves']:,} of {section['leaves']:,} leaves factored "
    f"({share:.1%} of the parameters).\n",
    "| state | state bytes | bytes/param | of which: factorable leaves | other leaves | "
    "median ms | × float32 state | × optax.adadelta |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, m in mem.items():
    per = lambda part, m=m: _per_parameter(m, part)
    row = [name, f"{m['bytes']:,}", f"{m['per_parameter']:.4f}", per("factorable"), per("rest")]
    if name in medians:
      ms = medians[name]
      row += [f"{ms:.3f}", f"{ms / medians['float32 state']:.2f}"]
      row.append(f"{ms / medians['optax.adadelta']:.2f}")
    else:
      row += ["not timed"] + ["–"] * 2
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _goal_line(section) -> str:
  per = section["memory"]["factored"]["per_parameter"]
  verdict = "meets" if per <= GOAL_BYTES_PER_PARAMETER else "misses"
  return f"({section['case']}): factored {per:.4f} bytes/param, {verdict} ≤ 0.05"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="every case ~1000x smaller")
  parser.add_argument("--cases", default="a,a-matrix,b,c,d", help="of a, a-matrix, b, c, d")
  parser.add_argument(
    "--memory-cases",
    default="c,d",
    help="cases only counted, not timed (c, d: 1,000 leaves take minutes to compile per state)",
  )
  parser.add_argument("--repeats", type=int, help="timed steps per state (15; smoke 3)")
  parser.add_argument("--min-dim", type=int, help="min_dim_size_to_factor (128; smoke 4)")
  parser.add_argument("--out", type=Path, help="write <name>.md and <name>.json here")
  parser.add_argument("--name", default="factored_speed")
  args = parser.parse_args(argv)
  args.repeats = args.repeats or (3 if args.smoke else 15)
  # The smoke cases are every dimension /32: 768 → 24, so factor from 4 to exercise it.
  args.min_dim = args.min_dim or (4 if args.smoke else 128)
  cases = args.cases.split(",")
  unknown = sorted(set(cases) - set(CASES) - set(EXTRA_CASES))
  if unknown:
    parser.error(f"--cases: unknown {unknown}; choose from {[*CASES, *EXTRA_CASES]}")
  untimed = set(args.memory_cases.split(",")) if args.memory_cases else set()
  cpu = platform.processor() or platform.machine()
  record = {
    "command": "python -m benchmarks.factored_speed " + shlex.join(argv or sys.argv[1:]),
    **provenance(),
    "machine": f"{cpu}, {os.cpu_count()} cores, {jax.default_backend()}",
    "load_start": [round(x, 2) for x in os.getloadavg()],
    "versions": f"python {platform.python_version()}, jax {jax.__version__}, "
    f"optax {optax.__version__}, numpy {np.__version__}",
    "repeats": args.repeats,
    "min_dim_size_to_factor": args.min_dim,
    "sections": [],
  }
  started = time.perf_counter()
  for case in cases:
    print(f"case {case}", file=sys.stderr, flush=True)
    record["sections"].append(run_case(case, args, timed=case not in untimed))
    print(_case_table(record["sections"][-1]), flush=True)
    report = _write(
      record, started, args
    )  # after each case, so that a cut-short run keeps its part
  print(report)


def _write(record, started, args) -> str:
  record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  record["elapsed_min"] = (time.perf_counter() - started) / 60
  record["load_end"] = [round(x, 2) for x in os.getloadavg()]
  sections = record["sections"]
  lines = [
    "# The factored state: bytes per parameter and step time (#26)",
    "",
    f"- Command: `{record['command']}`",
    f"- Commit {record['commit']}, {record['date']}; {record['elapsed_min']:.1f} min in all"
    + (
      f"; package files changed: {record['package_changes']}" if record["package_changes"] else ""
    ),
    f"- Machine: {record['machine']}; load average {record['load_start']} at start, "
    f"{record['load_end']} at end (other jobs share the cores: compare ratios, not ms)",
    f"- Versions: {record['versions']}",
    f"- {record['repeats']} interleaved single steps per state; min_dim_size_to_factor "
    f"{record['min_dim_size_to_factor']}; learning rate 1, ρ 0.95, ε 1e-6. Bytes/param of the "
    "factorable leaves and of the other leaves: each part's state over its own parameters.",
    "- Goal ≤ 0.05 bytes/param: " + "; ".join(_goal_line(s) for s in sections) + ".",
  ]
  report = "\n".join(lines) + "\n" + "\n".join(_case_table(s) for s in sections) + "\n"
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(report)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
  return report


if __name__ == "__main__":
  main()
