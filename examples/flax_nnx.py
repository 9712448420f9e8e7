"""Adadelta in a Flax NNX training loop: the paper's MLP on the embedded 8x8 digits.

The optimizer is `optax.chain(optax.clip_by_global_norm(1.0), optax_adadelta.adadelta())`
inside `nnx.Optimizer(model, tx, wrt=nnx.Param)`. Run:  python examples/flax_nnx.py
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_adadelta
from optax_adadelta.demo import datasets, mlp


class MLP(nnx.Module):
  """Fully connected layers of `sizes`, Glorot-uniform weights, zero biases (as `mlp.init`)."""

  def __init__(self, sizes: Sequence[int], activation: str = "tanh", *, rngs: nnx.Rngs):
    self.activation = activation
    self.layers = nnx.List(
      [
        nnx.Linear(n_in, n_out, kernel_init=nnx.initializers.glorot_uniform(), rngs=rngs)
        for n_in, n_out in itertools.pairwise(sizes)
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    act = mlp.ACTIVATIONS[self.activation]
    for layer in self.layers[:-1]:
      x = act(layer(x))
    return self.layers[-1](x)


def make_tx(clip: float = 1.0) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(clip), optax_adadelta.adadelta())


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def error_rate(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(model(x), axis=-1) != y)


def as_params(model: MLP) -> mlp.Params:
  """The model's weights in `optax_adadelta.demo.mlp`'s layout, for the pure-JAX loop."""
  return [{"w": layer.kernel[...], "b": layer.bias[...]} for layer in model.layers]


def main(epochs: int = 10, seed: int = 0) -> None:
  data = datasets.load_digits()
  model = MLP(mlp.layer_sizes(data.x_train.shape[1]), rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  for epoch, key in enumerate(jax.random.split(jax.random.key(seed), epochs), start=1):
    for batch in mlp.batch_order(key, len(data.x_train), 100):
      loss = train_step(model, optimizer, data.x_train[batch], data.y_train[batch])
    error = float(error_rate(model, data.x_test, data.y_test))
    print(f"epoch {epoch}: last batch loss {float(loss):.4f}, test error {100 * error:.2f}%")


if __name__ == "__main__":
  main()
