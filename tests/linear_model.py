"""A least-squares problem for the scale-out tests, with a NumPy float64 gradient.

loss(w, b) = mean((x @ w + b − y)²) over the rows of a batch. The JAX loss is what the
code under test differentiates; `numpy_gradients` is the same gradient written out by
hand, so `reference.run` can train the problem without JAX.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

NUM_FEATURES = 8
NUM_OUTPUTS = 8


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "w": rng.normal(size=(NUM_FEATURES, NUM_OUTPUTS)).astype(np.float32),
    "b": rng.normal(size=(NUM_OUTPUTS,)).astype(np.float32),
  }


def batches(num_steps: int, batch_size: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Inputs (num_steps, batch_size, F) and targets (num_steps, batch_size, O), float32."""
  rng = np.random.default_rng(seed)
  true_w = rng.normal(size=(NUM_FEATURES, NUM_OUTPUTS))
  x = rng.normal(size=(num_steps, batch_size, NUM_FEATURES))
  y = x @ true_w + 0.1 * rng.normal(size=(num_steps, batch_size, NUM_OUTPUTS))
  return x.astype(np.float32), y.astype(np.float32)


def loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def numpy_gradients(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
  """[∂loss/∂w, ∂loss/∂b] in float64."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  residual = 2.0 * (x @ w + b - y) / y.size
  return [x.T @ residual, residual.sum(axis=0)]
