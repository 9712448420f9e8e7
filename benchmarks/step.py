"""Times one Adadelta training step against its peers and against this machine's limit.

    python -m benchmarks.step            # full size, about 10 minutes on 2 cores
    python -m benchmarks.step --smoke    # every case about 1000 times smaller, seconds

For each case and dtype every contender is warmed up, then the contenders take turns, one
step each, for `--repeats` rounds (the order rotates every round, so none always follows the
same neighbour). Writes step.md, step.json and step.png to `--out`; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import jax
import jaxlib
import matplotlib
import numpy as np
import optax

from benchmarks import _contenders as contenders_lib

matplotlib.use("Agg")  # a file, never a window; before pyplot is imported
import matplotlib.pyplot as plt

try:
  import torch
except ImportError:
  torch = None

CASES = {
  "a": "one leaf",
  "b": "transformer-like tree",
  "c": "1,000 small leaves",
  "d": "1,000 leaves of 4,096",
}
PAUSE_S = 0.005
BASELINE, BANDWIDTH, NATIVE = "optax.adadelta", "bandwidth kernel", "native fused step"
# The gradients have no output of their shape and dtype left to alias; donating them states
# that they die in the step, as they do in training, so XLA's notice about it is noise here.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def _transformer_shapes(shrink: int) -> dict[str, tuple[int, ...]]:
  """A 10-layer, d_model 768 transformer with an 8k vocabulary: 164 leaves, 78M parameters."""
  d = 768 // shrink
  shapes = {"embed/tokens": (8192 // shrink, d), "embed/positions": (1024 // shrink, d)}
  for layer in range(10):
    for name, fan_in, fan_out in [(n, d, d) for n in "qkv"] + [("out", d, d)]:
      shapes[f"layer_{layer}/attention_{name}/w"] = (fan_in, fan_out)
      shapes[f"layer_{layer}/attention_{name}/b"] = (fan_out,)
    for name, fan_in, fan_out in (("mlp_in", d, 4 * d), ("mlp_out", 4 * d, d)):
      shapes[f"layer_{layer}/{name}/w"] = (fan_in, fan_out)
      shapes[f"layer_{layer}/{name}/b"] = (fan_out,)
    for norm in ("norm_1", "norm_2"):
      shapes[f"layer_{layer}/{norm}/scale"] = shapes[f"layer_{layer}/{norm}/bias"] = (d,)
  shapes["final_norm/scale"] = shapes["final_norm/bias"] = (d,)
  return shapes


def _small_leaf_shapes(low: int, high: int) -> dict[str, tuple[int, ...]]:
  """1,000 leaves, sizes log-uniform in [low, high], as vectors and as matrices of 2–16 rows."""
  rng = np.random.default_rng(1)
  sizes = np.exp(rng.uniform(np.log(low), np.log(high), 1000)).astype(int)
  rows = rng.choice([1, 2, 4, 8, 16], 1000)
  return {
    f"leaf_{i:04d}": (int(size),) if r == 1 else (int(r), max(1, int(size) // int(r)))
    for i, (size, r) in enumerate(zip(sizes, rows, strict=True))
  }


def case_shapes(case: str, smoke: bool) -> dict[str, tuple[int, ...]]:
  if case == "a":
    return {"w": (2**14,) if smoke else (2**24,)}
  if case == "b":
    return _transformer_shapes(32 if smoke else 1)
  if case == "d":
    return {f"leaf_{i:04d}": (64 if smoke else 4096,) for i in range(1000)}
  return _small_leaf_shapes(4, 64) if smoke else _small_leaf_shapes(256, 4096)


def _rss_growth_bytes(run) -> int | None:
  """Resident memory added at the peak of `run()`, from Linux's high-water mark.

  A lower bound on the temporaries: memory the allocator reuses without new pages is unseen.
  """
  try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
      clear_refs.write("5")  # resets VmHWM to the current resident size
  except OSError:
    return None

  def kib(field):
    with open("/proc/self/status") as status:
      return next(int(line.split()[1]) for line in status if line.startswith(field))

  before = kib("VmRSS:")
  run()
  return max(0, kib("VmHWM:") - before) * 1024


def _make_contenders(shapes, dtype, library, on_cpu, notes):
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}
  grads = {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}
  # On an accelerator XLA's bandwidth kernel is the reference; on a CPU the native one is.
  xla_bandwidth = "bandwidth kernel (XLA)" if on_cpu else BANDWIDTH
  contenders = contenders_lib.jax_contenders(params, grads, dtype, xla_bandwidth)
  if torch is not None and on_cpu:
    note = "bf16 state (follows params)" if dtype == "bf16" else ""
    for name, foreach in (("torch for-loop", False), ("torch foreach", True)):
      contenders.append(contenders_lib.TorchContender(name, foreach, params, grads, dtype, note))
  tree = None
  if library is not None and on_cpu:
    tree = contenders_lib.NativeTree(library, dtype, list(params.values()), list(grads.values()))
    contenders.append(contenders_lib.NativeContender(NATIVE, tree, "adadelta_step"))
    contenders.append(contenders_lib.NativeContender(BANDWIDTH, tree, "bandwidth"))
    bytes_per_parameter = {"f32": 28, "bf16": 22}[dtype]
    notes.add(f"native reference traffic: {bytes_per_parameter} bytes per parameter ({dtype})")
  return contenders, tree


def _summary(times_s: list[float]) -> dict:
  ms = np.asarray(times_s) * 1e3
  q1, median, q3 = np.percentile(ms, [25, 50, 75])
  return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "min_ms": ms.min(), "max_ms": ms.max()}


def run_case(case, dtype, args, library, notes) -> dict:
  on_cpu = jax.default_backend() == "cpu"
  shapes = case_shapes(case, args.smoke)
  sizes = [int(np.prod(s)) for s in shapes.values()]
  itemsize = {"f32": 4, "bf16": 2}[dtype]
  leaves = f"{len(sizes):,} leaves" if len(sizes) > 1 else "1 leaf"
  title = f"({case}) {CASES[case]}, {dtype}: {leaves}, {sum(sizes):,} parameters"
  print(f"\n{title}", file=sys.stderr, flush=True)
  contenders, tree = _make_contenders(shapes, dtype, library, on_cpu, notes)
  for contender in contenders:
    if contender.compile_seconds is not None:
      print(f"  compiled {contender.name} in {contender.compile_seconds:.1f} s", file=sys.stderr)
  for contender in contenders:  # warm-up: the first call allocates the state and faults pages in
    contender.prepare()
    contender.run()
  for contender in contenders:  # a second untimed step, for steady-state memory
    contender.prepare()
    growth = _rss_growth_bytes(contender.run) if on_cpu else None
    contender.memory["rss_growth_bytes"] = growth
    contender.memory.setdefault("temp_bytes", growth)
  times: dict[str, list[float]] = {c.name: [] for c in contenders}
  gc.collect()
  gc.disable()  # a collection inside a timed step would be charged to whoever ran then
  for repeat in range(args.repeats):
    turn = repeat % len(contenders)
    for contender in contenders[turn:] + contenders[:turn]:
      contender.prepare()
      # Lets the last contender's spinning worker threads (OpenMP, Eigen) go to sleep, so
      # that none is charged for its predecessor's thread pool.
      time.sleep(PAUSE_S)
      start = time.perf_counter()
      contender.run()
      times[contender.name].append(time.perf_counter() - start)
  gc.enable()
  print(f"  timed {args.repeats} rounds", file=sys.stderr, flush=True)
  results = {
    c.name: {**_summary(times[c.name]), "times_ms": [t * 1e3 for t in times[c.name]]}
    for c in contenders
  }
  for contender in contenders:
    result = results[contender.name]
    result.update(note=contender.note, compile_s=contender.compile_seconds, **contender.memory)
    for key, reference in (
      ("vs_optax", BASELINE),
      ("of_bandwidth", BANDWIDTH),
      ("of_native", NATIVE),
    ):
      if reference in results:
        result[key] = results[reference]["median_ms"] / result["median_ms"]
  section = {"case": case, "dtype": dtype, "title": title, "leaves": len(sizes)}
  section.update(parameters=sum(sizes), param_bytes=sum(sizes) * itemsize)
  section.update(largest_leaf_bytes=max(sizes) * itemsize, results=results)
  if tree is not None and len(sizes) > 1:
    leaf_by_leaf = []
    for _ in range(3):
      start = time.perf_counter()
      tree.run_leaf_by_leaf("bandwidth")
      leaf_by_leaf.append(time.perf_counter() - start)
    section["bandwidth_leaf_by_leaf_calls_ms"] = float(np.median(leaf_by_leaf) * 1e3)
  return section


def describe_machine(native_description: str) -> dict:
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as cpuinfo:
      cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), cpu)
  device = jax.devices()[0]
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    "backend": jax.default_backend(),
    "device": f"{device.platform}: {getattr(device, 'device_kind', '?')}",
    "versions": {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "optax": optax.__version__,
      "torch": torch.__version__ if torch is not None else "not installed",
      "numpy": np.__version__,
    },
    "native_reference": native_description,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _cell(value, digits=2, prefix=""):
  return "–" if value is None else f"{prefix}{value:.{digits}f}"


def markdown(machine: dict, sections: list[dict], args, notes: set[str]) -> str:
  versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
  lines = [
    "# One Adadelta training step (`python -m benchmarks.step"
    + (" --smoke" if args.smoke else "")
    + (f" --cases {args.cases}" if args.cases != "a,b,c" else "")
    + (f" --dtypes {args.dtypes}" if args.dtypes != "f32,bf16" else "")
    + f" --repeats {args.repeats}`)",
    "",
    f"- Machine: {machine['cpu']}, {machine['cores']} cores, backend {machine['backend']}"
    f" ({machine['device']}), load average at start {machine['load_average_at_start']}",
    f"- Versions: {versions}",
    f"- Native reference: {machine['native_reference']}",
    f"- Date: {machine['date']}; {args.repeats} interleaved repeats per contender",
    "- Median and interquartile range (IQR) of the step time; ratios use medians. "
    "× optax = optax.adadelta time / contender time; of bandwidth, of native = "
    "reference time / contender time (the fraction of this machine's limit).",
    "- temp MB: XLA's temporary buffers for JAX (compiled.memory_analysis()); for torch the "
    "growth of peak resident memory during one step (a lower bound, ≥). In brackets, in units "
    "of the parameters' size: 2× is as much as two full-size temporaries per leaf.",
  ]
  lines += [f"- {note}" for note in sorted(notes)]
  header = ["contender", "median ms", "IQR ms", "× optax", "of bandwidth", "of native"]
  header += ["compile s", "state MB", "temp MB (× params)", "note"]
  for section in sections:
    largest_mb = section["largest_leaf_bytes"] / 1e6
    lines += ["", f"## {section['title']} (largest leaf {largest_mb:.3g} MB)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in section["results"].items():
      temp = r.get("temp_bytes")
      if temp is not None:
        copies = temp / section["param_bytes"]
        at_least = "≥ " if r["temp_source"] == "RSS growth" else ""
        temp = f"{at_least}{temp / 1e6:.3g} ({copies:.2g}×)"
      row = [name, _cell(r["median_ms"], 3), f"{r['q1_ms']:.3f}–{r['q3_ms']:.3f}"]
      row += [_cell(r.get(k)) for k in ("vs_optax", "of_bandwidth", "of_native")]
      row += [_cell(r["compile_s"]), f"{r['state_bytes'] / 1e6:.3g}", temp or "–", r["note"]]
      lines.append("| " + " | ".join(row) + " |")
    if "bandwidth_leaf_by_leaf_calls_ms" in section:
      bandwidth = section["results"][BANDWIDTH]["median_ms"]
      leaf_by_leaf = section["bandwidth_leaf_by_leaf_calls_ms"]
      lines += [
        "",
        f"Bandwidth kernel as one ctypes call per leaf: {leaf_by_leaf:.3f} ms "
        f"(one call for the whole tree, as timed above: {bandwidth:.3f} ms).",
      ]
  return "\n".join(lines) + "\n"


def bar_chart(machine: dict, sections: list[dict], path: Path) -> None:
  have_reference = all(BANDWIDTH in s["results"] for s in sections)
  key, reference = ("of_bandwidth", BANDWIDTH) if have_reference else ("vs_optax", BASELINE)
  names = [n for n in sections[0]["results"] if n != reference]
  figure, axes = plt.subplots(figsize=(10, 5.6), dpi=100)
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values, low, high = [], [], []
    for s in sections:
      r, ref_ms = s["results"][name], s["results"][reference]["median_ms"]
      values.append(r[key])
      low.append(r[key] - ref_ms / r["q3_ms"])
      high.append(ref_ms / r["q1_ms"] - r[key])
    x = np.arange(len(sections)) + (i - (len(names) - 1) / 2) * width
    axes.bar(x, values, width, yerr=[low, high], capsize=2, label=name, color=f"C{i}")
  axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label=f"{reference} (= 1)")
  axes.set_xticks(np.arange(len(sections)))
  axes.set_xticklabels(
    [f"({s['case']}) {s['dtype']}\n{s['parameters'] / 1e6:.1f}M params" for s in sections]
  )
  axes.set_yscale("log")
  label = "fraction of the bandwidth limit" if have_reference else "speed-up over optax.adadelta"
  axes.set_ylabel(f"{label} (higher is better)")
  axes.set_title(
    f"One Adadelta step (median, whiskers = IQR); (a) one leaf, (b) transformer-like tree, "
    f"(c) 1,000 small leaves\n{machine['cpu']}, {machine['cores']} cores, {machine['backend']}",
    fontsize=9,
  )
  # Below the axes, where it hides no bar.
  axes.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14))
  axes.grid(axis="y", alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="every case ~1000x smaller")
  parser.add_argument("--repeats", type=int, help="timed steps per contender (15; smoke 3)")
  parser.add_argument("--cases", default="a,b,c,d", help="a: 16M leaf, b: transformer, c, d: 1,000")
  parser.add_argument("--dtypes", default="f32,bf16", help="f32 and/or bf16 (f32 state)")
  parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
  args = parser.parse_args(argv)
  args.repeats = args.repeats or (3 if args.smoke else 15)
  cases, dtypes = args.cases.split(","), args.dtypes.split(",")
  if not set(cases) <= set(CASES) or not set(dtypes) <= set(contenders_lib.JAX_DTYPES):
    parser.error(
      f"--cases takes a,b,c,d and --dtypes f32,bf16; got {args.cases!r}, {args.dtypes!r}"
    )
  notes: set[str] = set()
  if contenders_lib.optax_adadelta_implementations() == ["auto"]:
    notes.add("optax_adadelta (pure JAX) skipped: adadelta() has no `implementation` keyword")
  library, native_description = None, "not used on an accelerator"
  if jax.default_backend() != "cpu":
    notes.add(f"on {jax.default_backend()}: torch (CPU) and the native references are skipped")
  else:
    library, native_description = contenders_lib.load_native()
    if library is None:
      notes.add(f"native references unavailable: {native_description}")
    else:
      for dtype in dtypes:
        contenders_lib.check_native(library, dtype)
    if torch is None:
      notes.add("torch contenders skipped: torch is not installed")
    else:
      torch.set_num_threads(os.cpu_count() or 1)
  for note in sorted(notes):
    print(f"note: {note}", file=sys.stderr)
  machine = describe_machine(native_description)
  sections = [run_case(case, dtype, args, library, notes) for case in cases for dtype in dtypes]
  args.out.mkdir(parents=True, exist_ok=True)
  report = markdown(machine, sections, args, notes)
  (args.out / "step.md").write_text(report)
  record = {"machine": machine, "repeats": args.repeats, "smoke": args.smoke}
  record.update(notes=sorted(notes), sections=sections)
  (args.out / "step.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
  bar_chart(machine, sections, args.out / "step.png")
  print(report)
  print(f"wrote {args.out}/step.md, step.json, step.png", file=sys.stderr)


if __name__ == "__main__":
  main()
