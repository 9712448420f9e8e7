"""Data-parallel Adadelta with the optimizer state split over the devices (ZeRO stage 1).

The parameters are replicated on every device, as in `data_parallel.py`; the Adadelta
state (E[g²] and E[Δx²]) is split over the "data" axis with
`optax_adadelta.sharding.state_shardings`, so each device keeps 1/N of it. Each step, every
device updates its slice of the state with its slice of the averaged gradients, and one
all-gather per parameter gives every device the whole update. The script trains the same
MLP both ways and prints the state bytes each device holds and the largest difference
between the two runs' parameters.

  python examples/zero_data_parallel.py                  # 8 CPU devices by default
  python examples/zero_data_parallel.py --cpu-devices 4 --steps 50

On GPUs or TPUs leave out --cpu-devices: the mesh takes every device jax sees.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_adadelta
from optax_adadelta import sharding

SHAPES = {"w1": (64, 256), "b1": (256,), "w2": (256, 10), "b2": (10,)}


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    name: (
      rng.normal(size=shape) / np.sqrt(shape[0]) if name[0] == "w" else np.zeros(shape)
    ).astype(np.float32)
    for name, shape in SHAPES.items()
  }


def batch(step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng([1, step])
  x = rng.normal(size=(batch_size, 64)).astype(np.float32)
  return x, np.tanh(x[:, :10] * x[:, 10:20]).astype(np.float32)


def loss_fn(params, x, y):
  hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def train(mesh, steps: int, batch_size: int, zero: bool):
  """Returns (final parameters, final state, losses); `zero` splits the state."""
  tx = optax_adadelta.adadelta()
  params = jax.device_put(init_params(), NamedSharding(mesh, P()))  # replicated

  if zero:
    state_shardings = sharding.state_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  else:
    opt_state = tx.init(params)  # follows the parameters: replicated

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)  # averaged over the devices
    if zero:
      grads = sharding.shard_gradients(grads, mesh)  # each device keeps its slice
    updates, opt_state = tx.update(grads, opt_state, params)
    if zero:
      updates = sharding.replicate_updates(updates, mesh)  # the all-gather
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for t in range(steps):
    x, y = jax.device_put(batch(t, batch_size), NamedSharding(mesh, P("data")))
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
  return params, opt_state, losses


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--cpu-devices", type=int, default=8, help="CPU only: virtual devices")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=64, help="global, over all devices")
  args = parser.parse_args()
  if args.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  with jax.set_mesh(mesh):
    runs = {zero: train(mesh, args.steps, args.batch_size, zero) for zero in (False, True)}
  for zero, (_, opt_state, losses) in runs.items():
    held = sharding.per_device_bytes(opt_state)
    print(
      f"{'ZeRO-1 (split)' if zero else 'replicated'} state: {max(held.values()):,} bytes per "
      f"device on {len(held)} devices; loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
  difference = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(runs[True][0]), jax.tree.leaves(runs[False][0]), strict=True)
  )
  print(f"largest |split - replicated| parameter difference: {difference:.3g}")


if __name__ == "__main__":
  main()
