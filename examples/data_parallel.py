"""Data-parallel Adadelta over every device of every process, with `jax.distributed`.

A small MLP regression trained on synthetic data. The parameters and the Adadelta state are
replicated on every device; each process feeds only its own rows of every global batch
(`jax.make_array_from_process_local_data`), and XLA averages the gradients over all devices
of all processes. The same script runs on CPU, GPU and TPU; only the launch differs.

One process, whatever devices it has:

  python examples/data_parallel.py

N processes on one machine, D CPU devices each (what tests/test_multiprocess.py does):

  python examples/data_parallel.py --coordinator 127.0.0.1:12355 --num-processes 2 \
    --process-id 0 --cpu-devices 2 &
  python examples/data_parallel.py --coordinator 127.0.0.1:12355 --num-processes 2 \
    --process-id 1 --cpu-devices 2

Multi-host GPU or TPU: start one process per host (or one per GPU) with the same
arguments; on Cloud TPU, SLURM, Open MPI or Kubernetes `--distributed` lets
`jax.distributed.initialize()` find the coordinator and process ids by itself:

  python examples/data_parallel.py --distributed

Process 0 prints the loss and, with --out, saves the final parameters as .npz. With
--save DIR every process writes its part of an orbax checkpoint of (params, opt_state, step);
a later run with --resume DIR continues from it exactly (the [checkpoint] extra):

  python examples/data_parallel.py --steps 8 --save /tmp/ckpt      # "interrupted" at step 8
  python examples/data_parallel.py --steps 20 --resume /tmp/ckpt   # same result as --steps 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_adadelta

NUM_FEATURES = 8
HIDDEN = 16
HYPER_PARAMETERS = {"learning_rate": 1.0, "rho": 0.95, "eps": 1e-6}  # the paper's


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "w1": (rng.normal(size=(NUM_FEATURES, HIDDEN)) / np.sqrt(NUM_FEATURES)).astype(np.float32),
    "b1": np.zeros(HIDDEN, np.float32),
    "w2": (rng.normal(size=(HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32),
    "b2": np.zeros(1, np.float32),
  }


def global_batch(step: int, batch_size: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """The whole batch of one step; every process can make it, and keeps only its rows."""
  rng = np.random.default_rng([seed, step])
  x = rng.normal(size=(batch_size, NUM_FEATURES)).astype(np.float32)
  y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]).astype(np.float32)
  return x, y


def loss_fn(params, x, y):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def _process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
  """The contiguous rows of a batch that this process's devices hold."""
  rows = [index[0] for index in sharding.addressable_devices_indices_map(global_shape).values()]
  start = min(r.start or 0 for r in rows)
  stop = max(global_shape[0] if r.stop is None else r.stop for r in rows)
  return slice(start, stop)


def train(
  mesh: Mesh,
  num_steps: int,
  batch_size: int,
  *,
  save: Path | None = None,
  resume: Path | None = None,
) -> tuple[dict[str, jax.Array], list[float]]:
  """Trains up to step `num_steps` over the "data" axis of `mesh`, optionally resuming
  from a checkpoint and saving one at the end; returns the replicated parameters and the
  losses of the steps run."""
  tx = optax_adadelta.adadelta(**HYPER_PARAMETERS)
  config = {**HYPER_PARAMETERS, "batch_size": batch_size}  # checked again on resume
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  with jax.set_mesh(mesh):
    if resume is None:
      params = jax.device_put(init_params(), replicated)
      opt_state, start = tx.init(params), 0
    else:
      from optax_adadelta import checkpoint  # needs the [checkpoint] extra

      abstract_params = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
        for k, v in init_params().items()
      }
      abstract_state = jax.eval_shape(tx.init, abstract_params)
      params, opt_state, start = checkpoint.restore(
        resume, abstract_params, abstract_state, config=config
      )
    losses = []
    for t in range(start, num_steps):
      x, y = global_batch(t, batch_size)
      rows = _process_rows(batch, x.shape)
      x, y = (jax.make_array_from_process_local_data(batch, a[rows], a.shape) for a in (x, y))
      params, opt_state, loss = step(params, opt_state, x, y)
      losses.append(float(loss))
    if save is not None:
      from optax_adadelta import checkpoint

      checkpoint.save(save, params, opt_state, step=max(start, num_steps), config=config)
  return params, losses


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--coordinator", help="host:port of process 0, e.g. 127.0.0.1:12355")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--distributed", action="store_true", help="initialize from the cluster")
  parser.add_argument("--cpu-devices", type=int, help="CPU only: devices per process (gloo)")
  parser.add_argument("--init-timeout", type=int, default=60, help="seconds to wait for peers")
  parser.add_argument("--steps", type=int, default=20, help="train up to this step")
  parser.add_argument("--batch-size", type=int, default=32, help="global, over all devices")
  parser.add_argument("--out", type=Path, help="process 0 saves the final parameters here")
  parser.add_argument("--save", type=Path, help="checkpoint directory to write at the end")
  parser.add_argument("--resume", type=Path, help="checkpoint directory to start from")
  args = parser.parse_args()

  if args.cpu_devices is not None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.coordinator is not None:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=args.init_timeout,
    )
  elif args.distributed:
    jax.distributed.initialize(initialization_timeout=args.init_timeout)

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  params, losses = train(mesh, args.steps, args.batch_size, save=args.save, resume=args.resume)
  if jax.process_index() == 0:
    print(
      f"{jax.process_count()} processes x {jax.local_device_count()} {jax.default_backend()} "
      f"devices: {len(losses)} steps to step {args.steps}, loss "
      + (f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "not computed")
    )
    if args.out is not None:
      np.savez(args.out, **{k: np.asarray(v.addressable_data(0)) for k, v in params.items()})
  if jax.process_count() > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
