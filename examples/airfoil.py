"""Adadelta on the airfoil self-noise data, as in "Dive into Deep Learning" §12.9.

Linear regression on the standardised data (first 1500 rows), minibatches of 10,
ρ = 0.9, ε = 1e-5, learning rate 1, two epochs; loss = mean((ŷ − y)²) / 2 over all rows.
The book reports a final loss of about 0.243.

Data: $OPTAX_ADADELTA_DATA/airfoil/airfoil_self_noise.dat, else ../shared/data beside the
repository. Run:  python examples/airfoil.py [--epochs 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import optax_adadelta
from optax_adadelta.demo import datasets

BATCH_SIZE = 10
NUM_ROWS = 1500


def load_airfoil() -> tuple[jax.Array, jax.Array]:
  try:
    directory = datasets.data_dir(Path(__file__).resolve().parents[1])
    x, y = datasets.load_airfoil(directory, rows=NUM_ROWS)
  except datasets.DataError as error:
    sys.exit(str(error))
  return jnp.asarray(x), jnp.asarray(y)


def loss_fn(params, x, y):
  prediction = x @ params["w"] + params["b"]
  return jnp.mean((prediction - y) ** 2) / 2


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  x, y = load_airfoil()
  key_init, key_shuffle = jax.random.split(jax.random.key(args.seed))
  params = {"w": 0.01 * jax.random.normal(key_init, (x.shape[1],)), "b": jnp.zeros(())}
  tx = optax_adadelta.adadelta(rho=0.9, eps=1e-5)

  @jax.jit
  def epoch(params, state, key):
    order = jax.random.permutation(key, NUM_ROWS).reshape(-1, BATCH_SIZE)

    def step(carry, batch):
      params, state = carry
      grads = jax.grad(loss_fn)(params, x[batch], y[batch])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), order)
    return params, state

  state = tx.init(params)
  print(f"epoch 0: loss {float(loss_fn(params, x, y)):.4f}")
  start = time.perf_counter()
  for i, key in enumerate(jax.random.split(key_shuffle, args.epochs), start=1):
    params, state = epoch(params, state, key)
    print(f"epoch {i}: loss {float(loss_fn(params, x, y)):.4f}")
  print(
    f"final loss {float(loss_fn(params, x, y)):.3f} (the book: about 0.243), "
    f"{time.perf_counter() - start:.2f} s"
  )


if __name__ == "__main__":
  main()
