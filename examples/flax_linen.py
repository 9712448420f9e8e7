"""Adadelta with Flax Linen and `flax.training.train_state.TrainState` on the embedded digits.

Run:  python examples/flax_linen.py
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

import optax_adadelta
from optax_adadelta.demo import datasets, mlp


class MLP(nn.Module):
  sizes: Sequence[int]
  activation: str = "tanh"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = mlp.ACTIVATIONS[self.activation]
    for n_out in self.sizes[1:-1]:
      x = act(nn.Dense(n_out, kernel_init=nn.initializers.glorot_uniform())(x))
    return nn.Dense(self.sizes[-1], kernel_init=nn.initializers.glorot_uniform())(x)


def create_state(key: jax.Array, sizes: Sequence[int], tx: optax.GradientTransformation):
  model = MLP(tuple(sizes))
  params = model.init(key, jnp.zeros((1, sizes[0])))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@jax.jit
def train_step(state: train_state.TrainState, x: jax.Array, y: jax.Array):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def as_params(params) -> mlp.Params:
  """Linen's `Dense_i` kernels and biases in `optax_adadelta.demo.mlp`'s layout."""
  return [
    {"w": params[f"Dense_{i}"]["kernel"], "b": params[f"Dense_{i}"]["bias"]}
    for i in range(len(params))
  ]


def main(epochs: int = 10, seed: int = 0) -> None:
  data = datasets.load_digits()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax_adadelta.adadelta())
  state = create_state(jax.random.key(seed), mlp.layer_sizes(data.x_train.shape[1]), tx)
  for epoch, key in enumerate(jax.random.split(jax.random.key(seed), epochs), start=1):
    for batch in mlp.batch_order(key, len(data.x_train), 100):
      state, loss = train_step(state, data.x_train[batch], data.y_train[batch])
    error = mlp.error_rate(as_params(state.params), data.x_test, data.y_test)
    print(f"epoch {epoch}: last batch loss {float(loss):.4f}, test error {100 * float(error):.2f}%")


if __name__ == "__main__":
  main()
