"""The paper's MNIST network (784-500-300-10 MLP) in pure JAX, and a scan-based training loop.

Everything here is a pure function of arrays, so a whole training run can be `jax.vmap`-ed
over seeds and optimizer hyper-parameters (the notebooks train the 12 (ρ, ε) cells of the
paper's Table 2 at once this way).

Choices the paper (Zeiler 2012, §4.1) leaves open, made here: weights drawn from Glorot &
Bengio's (2010) uniform distribution U(±√(6/(fan_in+fan_out))), biases zero; pixels scaled to
[0, 1]; softmax cross-entropy averaged over the batch; the training set reshuffled every epoch,
dropping a last incomplete batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

Params = list[dict[str, jax.Array]]

HIDDEN = (500, 300)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def layer_sizes(num_inputs: int, num_classes: int = 10) -> tuple[int, ...]:
  """The paper's layer sizes for inputs of `num_inputs` pixels.

  Examples:
    >>> from optax_adadelta.demo import mlp
    >>> mlp.layer_sizes(28 * 28)
    (784, 500, 300, 10)
  """
  return (num_inputs, *HIDDEN, num_classes)


def init(key: jax.Array, sizes: Sequence[int]) -> Params:
  """Glorot-uniform weights and zero biases for a fully connected net of these `sizes`."""
  params = []
  for key_layer, fan_in, fan_out in zip(
    jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:], strict=True
  ):
    limit = (6.0 / (fan_in + fan_out)) ** 0.5
    w = jax.random.uniform(key_layer, (fan_in, fan_out), minval=-limit, maxval=limit)
    params.append({"w": w, "b": jnp.zeros(fan_out)})
  return params


def apply(params: Params, x: jax.Array, activation: str = "tanh") -> jax.Array:
  """Logits of the net for a batch `x` of shape (batch, inputs)."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
  act = ACTIVATIONS[activation]
  for layer in params[:-1]:
    x = act(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss(params: Params, x: jax.Array, y: jax.Array, activation: str = "tanh") -> jax.Array:
  """Mean softmax cross-entropy for integer labels `y`."""
  logits = apply(params, x, activation)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def error_rate(params: Params, x: jax.Array, y: jax.Array, activation: str = "tanh") -> jax.Array:
  """The fraction of `x` misclassified."""
  return jnp.mean(jnp.argmax(apply(params, x, activation), axis=-1) != y)


def batch_order(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """A shuffled epoch as indices of shape (num_batches, batch_size); the remainder is dropped."""
  num_batches = num_examples // batch_size
  if num_batches == 0:
    raise ValueError(f"batch_size {batch_size} is larger than the {num_examples} examples")
  order = jax.random.permutation(key, num_examples)[: num_batches * batch_size]
  return order.reshape(num_batches, batch_size)


def make_steps(
  tx: optax.GradientTransformation, activation: str = "tanh"
) -> Callable[..., tuple[Params, optax.OptState, jax.Array]]:
  """A function `steps(params, opt_state, x, y, batches)` that takes one step per batch.

  `batches` is an integer array (num_steps, batch_size) of indices into `x` and `y`; the
  steps run in a `lax.scan`, and the per-step training losses come back with the state.
  """

  def step(carry, batch, x, y):
    params, opt_state = carry
    value, grads = jax.value_and_grad(loss)(params, x[batch], y[batch], activation)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), value

  def steps(params, opt_state, x, y, batches):
    (params, opt_state), losses = jax.lax.scan(
      lambda carry, batch: step(carry, batch, x, y), (params, opt_state), batches
    )
    return params, opt_state, losses

  return steps


def effective_learning_rates(
  opt_state: optax.OptState,
  eps: float | jax.Array,
  quantiles: Sequence[float] = (0.1, 0.5, 0.9),
) -> list[jax.Array]:
  """Per layer, quantiles over its weights of Adadelta's √(E[Δx²]+ε) / √(E[g²]+ε).

  This is the paper's Figure 2 quantity (its step per unit gradient), read from the state
  of `optax_adadelta.adadelta` applied to `Params`. Weights whose gradient has always been
  exactly zero (E[g²] = 0, e.g. the first layer's weights from MNIST's always-blank border
  pixels) are left out: their ratio is √ε/√ε = 1 by construction and says nothing about
  training. Returns one array of `len(quantiles)` values per layer (NaN if no weight of the
  layer has seen a gradient).
  """
  e_g2 = optax.tree.get(opt_state, "e_g2")
  e_dx2 = optax.tree.get(opt_state, "e_dx2")
  q = jnp.asarray(quantiles)
  rates = []
  for g, dx in zip(e_g2, e_dx2, strict=True):
    ratio = jnp.sqrt(dx["w"] + eps) / jnp.sqrt(g["w"] + eps)
    rates.append(jnp.nanquantile(jnp.where(g["w"] > 0, ratio, jnp.nan), q))
  return rates
