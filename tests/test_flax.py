"""Adadelta in Flax NNX and Linen loops: loss goes down and the weights equal a pure-JAX loop's."""

import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

pytest.importorskip("flax", reason="needs flax (the [notebooks] extra)")
from flax import nnx

import optax_adadelta
from optax_adadelta.demo import datasets, mlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import flax_linen
import flax_nnx

EPOCHS = 3


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits()


def epochs_of_batches(num_examples):
  keys = jax.random.split(jax.random.key(1), EPOCHS)
  return np.concatenate([mlp.batch_order(key, num_examples, 100) for key in keys])


def tx():
  return optax.chain(optax.clip_by_global_norm(1.0), optax_adadelta.adadelta(rho=0.9, eps=1e-6))


def train_nnx(data, batches):
  model = flax_nnx.MLP(mlp.layer_sizes(data.x_train.shape[1]), rngs=nnx.Rngs(0))
  start = flax_nnx.as_params(model)
  optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)
  losses = [
    flax_nnx.train_step(model, optimizer, data.x_train[b], data.y_train[b]) for b in batches
  ]
  return start, flax_nnx.as_params(model), losses


def train_linen(data, batches):
  state = flax_linen.create_state(jax.random.key(0), mlp.layer_sizes(data.x_train.shape[1]), tx())
  start = flax_linen.as_params(state.params)
  losses = []
  for b in batches:
    state, loss = flax_linen.train_step(state, data.x_train[b], data.y_train[b])
    losses.append(loss)
  return start, flax_linen.as_params(state.params), losses


@pytest.mark.parametrize("train", [train_nnx, train_linen], ids=["nnx", "linen"])
def test_flax_loop_equals_pure_jax_loop_and_lowers_the_loss(digits, train):
  batches = epochs_of_batches(len(digits.x_train))
  start, final, losses = train(digits, batches)

  transform = tx()
  steps = jax.jit(mlp.make_steps(transform))
  want, _, want_losses = steps(
    start, transform.init(start), digits.x_train, digits.y_train, jax.numpy.asarray(batches)
  )
  np.testing.assert_allclose(np.asarray(losses), want_losses, rtol=2e-4, atol=1e-5)
  for got_layer, want_layer in zip(final, want, strict=True):
    for name in ("w", "b"):
      np.testing.assert_allclose(got_layer[name], want_layer[name], rtol=2e-4, atol=2e-5)
  per_epoch = np.asarray(losses).reshape(EPOCHS, -1).mean(axis=1)
  assert per_epoch[-1] < 0.5 * per_epoch[0], per_epoch
  assert float(mlp.error_rate(final, digits.x_test, digits.y_test)) < 0.2
