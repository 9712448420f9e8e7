"""Adadelta against SGD, momentum and Adagrad on the paper's MNIST network, from the shell.

  python -m optax_adadelta                      # the embedded 8x8 digits, well under a minute
  python -m optax_adadelta --data DIR --epochs 6 --plot /tmp/mnist.png  # MNIST, as in the paper

Adadelta runs with the paper's η = 1, ρ = 0.95, ε = 1e-6; the others at `--lr`. Progress bars
need tqdm and `--plot` needs matplotlib: `pip install "optax-adadelta[demo]"`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path

import jax
import numpy as np
import optax

import optax_adadelta
from optax_adadelta.demo import datasets, mlp

_DEMO_EXTRA = 'pip install "optax-adadelta[demo]"'

OPTIMIZERS: dict[str, Callable[[float, argparse.Namespace], optax.GradientTransformation]] = {
  "adadelta": lambda lr, a: optax_adadelta.adadelta(a.adadelta_lr, rho=a.rho, eps=a.eps),
  "sgd": lambda lr, a: optax.sgd(lr),
  "momentum": lambda lr, a: optax.sgd(lr, momentum=0.9),
  "adagrad": lambda lr, a: optax.adagrad(lr),
}


def _positive(kind: type) -> Callable[[str], float]:
  def parse(text: str):
    value = kind(text)
    if not value > 0:
      raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value

  return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  # Each help says its default once, in its own words (ArgumentDefaultsHelpFormatter would
  # add "(default: None)" to the options whose default depends on the data).
  parser = argparse.ArgumentParser(
    prog="optax-adadelta", description=(__doc__ or "").splitlines()[0]
  )
  parser.add_argument(
    "--data",
    type=Path,
    metavar="DIR",
    help="folder with MNIST (IDX files, gzipped or not, or npz) "
    "(default: the 8x8 digits embedded in the package)",
  )
  parser.add_argument(
    "--epochs",
    type=_positive(int),
    help="passes over the training set (default: 20 on the embedded digits, 6 on MNIST)",
  )
  parser.add_argument(
    "--lr",
    type=_positive(float),
    default=0.1,
    help="learning rate of SGD, momentum and Adagrad (default: %(default)s)",
  )
  parser.add_argument(
    "--adadelta-lr", type=_positive(float), default=1.0, help="Adadelta's η (default: %(default)s)"
  )
  parser.add_argument("--rho", type=float, default=0.95, help="Adadelta's ρ (default: %(default)s)")
  parser.add_argument("--eps", type=float, default=1e-6, help="Adadelta's ε (default: %(default)s)")
  parser.add_argument(
    "--batch-size",
    type=_positive(int),
    default=100,
    help="training examples per step (default: %(default)s)",
  )
  parser.add_argument(
    "--activation",
    choices=sorted(mlp.ACTIVATIONS),
    default="tanh",
    help="the hidden layers' nonlinearity (default: %(default)s)",
  )
  parser.add_argument(
    "--optimizers",
    default=",".join(OPTIMIZERS),
    help=f"comma-separated names from {', '.join(OPTIMIZERS)} (default: all {len(OPTIMIZERS)})",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seeds the initial weights and the batch order, the same for every optimizer "
    "(default: %(default)s)",
  )
  parser.add_argument(
    "--plot",
    type=Path,
    metavar="PNG",
    help="write a PNG of the training loss and the test error per epoch of each optimizer "
    "(default: no plot)",
  )
  parser.add_argument(
    "--no-progress", action="store_true", help="no progress bars (they need tqdm)"
  )
  args = parser.parse_args(argv)
  names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
  unknown = [name for name in names if name not in OPTIMIZERS]
  if unknown or not names:
    parser.error(f"--optimizers {args.optimizers!r}: unknown {unknown}; allowed {list(OPTIMIZERS)}")
  args.optimizers = names
  return args


class _NoBar:
  """What `train` calls on a tqdm bar, doing nothing (--no-progress, or no tqdm needed)."""

  def __enter__(self) -> _NoBar:
    return self

  def __exit__(self, *exc_info: object) -> None:
    pass

  def update(self, n: int) -> None:
    pass

  def set_postfix(self, **values: object) -> None:
    pass


def _progress_bar(args: argparse.Namespace, total: int, label: str, leave: bool):
  if args.no_progress:
    return _NoBar()
  from tqdm.auto import tqdm  # the [demo] extra; checked by `_missing_extra`

  return tqdm(total=total, desc=label, unit="batch", leave=leave)


def _missing_extra(args: argparse.Namespace) -> str | None:
  """What the requested output needs from the [demo] extra and is not installed, if anything."""
  needs = {"tqdm": "progress bars (or pass --no-progress)"} if not args.no_progress else {}
  if args.plot:
    needs["matplotlib"] = "--plot"
  missing = [f"{what} needs {module}" for module, what in needs.items() if not find_spec(module)]
  return f"{'; '.join(missing)}: {_DEMO_EXTRA}" if missing else None


def _chunk(num_batches: int, most: int = 50) -> int:
  """The largest divisor of `num_batches` up to `most`: one compiled scan length per run."""
  return max(d for d in range(1, min(num_batches, most) + 1) if num_batches % d == 0)


def train(
  name: str, tx: optax.GradientTransformation, data: datasets.Images, args: argparse.Namespace
) -> dict:
  """Trains one optimizer from the seed's initialisation; returns its history and time."""
  key_init, key_order = jax.random.split(jax.random.key(args.seed))
  params = mlp.init(key_init, mlp.layer_sizes(data.x_train.shape[1]))
  opt_state = tx.init(params)
  steps = jax.jit(mlp.make_steps(tx, args.activation))
  error = jax.jit(mlp.error_rate, static_argnames="activation")
  x, y = jax.device_put(data.x_train), jax.device_put(data.y_train)
  num_batches = len(x) // args.batch_size
  chunk = _chunk(num_batches)
  history: dict[str, list[float]] = {"train_loss": [], "test_error": []}
  start = time.perf_counter()
  for epoch, key in enumerate(jax.random.split(key_order, args.epochs), start=1):
    batches = mlp.batch_order(key, len(x), args.batch_size).reshape(-1, chunk, args.batch_size)
    label = f"{name:>8} epoch {epoch}/{args.epochs}"
    losses = []
    with _progress_bar(args, num_batches, label, leave=epoch == args.epochs) as bar:
      for part in batches:
        params, opt_state, part_losses = steps(params, opt_state, x, y, part)
        losses.append(part_losses)
        bar.update(chunk)
      history["train_loss"].append(float(np.mean(np.concatenate(losses))))
      history["test_error"].append(float(error(params, data.x_test, data.y_test, args.activation)))
      bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", test_error=history["test_error"][-1])
  return {**history, "seconds": time.perf_counter() - start}


def results_table(results: dict[str, dict], args: argparse.Namespace) -> str:
  rows = [f"{'optimizer':<10} {'lr':>8} {'train loss':>11} {'test error':>11} {'time':>8}"]
  for name, result in results.items():
    lr = args.adadelta_lr if name == "adadelta" else args.lr
    rows.append(
      f"{name:<10} {lr:>8g} {result['train_loss'][-1]:>11.4f} "
      f"{100 * result['test_error'][-1]:>10.2f}% {result['seconds']:>7.1f}s"
    )
  return "\n".join(rows)


def plot(results: dict[str, dict], data_name: str, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
  for name, result in results.items():
    epochs = range(1, len(result["test_error"]) + 1)
    ax_loss.plot(epochs, result["train_loss"], marker=".", label=name)
    ax_err.plot(epochs, [100 * e for e in result["test_error"]], marker=".", label=name)
  ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title=data_name)
  ax_err.set(xlabel="epoch", ylabel="test error (%)", title="test error")
  ax_err.legend()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if missing := _missing_extra(args):
    print(f"optax-adadelta: error: {missing}", file=sys.stderr)
    return 2
  try:
    # Invalid ρ or ε fail here, before any data is read.
    transforms = {name: OPTIMIZERS[name](args.lr, args) for name in args.optimizers}
    data = datasets.load_mnist(args.data) if args.data else datasets.load_digits()
  except (datasets.DataError, ValueError) as error:
    print(f"optax-adadelta: error: {error}", file=sys.stderr)
    return 2
  if args.epochs is None:
    args.epochs = 6 if args.data else 20
  if args.batch_size > len(data.x_train):
    print(
      f"optax-adadelta: error: --batch-size {args.batch_size} is larger than the "
      f"{len(data.x_train)} training images",
      file=sys.stderr,
    )
    return 2
  print(
    f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} test images; "
    f"MLP {'-'.join(map(str, mlp.layer_sizes(data.x_train.shape[1])))} ({args.activation}), "
    f"batch {args.batch_size}, {args.epochs} epochs, on {jax.devices()[0].platform}"
  )
  results = {name: train(name, tx, data, args) for name, tx in transforms.items()}
  print(results_table(results, args))
  if args.plot:
    plot(results, data.name, args.plot)
    print(f"plot written to {args.plot}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
