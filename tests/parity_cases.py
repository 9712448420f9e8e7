"""Problems on which each preset is run side by side with its peer library.

A case names a peer, the peer's own keyword arguments (JSON: a learning-rate schedule is
written {"exponential": [base, gamma]}, meaning base·gammaᵗ at step t), leaf shapes, a step
count and a seed. Gradients are drawn in advance, so every library sees the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Case = dict[str, Any]

SHAPES = [[4], [2, 3]]


def _case(name: str, peer: str, kwargs: dict | None = None, **problem) -> Case:
  return {
    "name": name,
    "peer": peer,
    "kwargs": kwargs or {},
    "shapes": problem.get("shapes", SHAPES),
    "complex": problem.get("complex", False),
    "steps": problem.get("steps", 40),
    "seed": problem.get("seed", 0),
    "grad_scale": problem.get("grad_scale", 1.0),
  }


CASES: list[Case] = [
  # torch.optim.Adadelta
  _case("torch-defaults", "torch"),
  _case("torch-paper-hyper", "torch", {"lr": 1.0, "rho": 0.95, "eps": 1e-6}, seed=1),
  _case("torch-weight-decay", "torch", {"weight_decay": 0.1, "lr": 0.5}, seed=2),
  _case("torch-maximize-decay", "torch", {"maximize": True, "weight_decay": 0.05}, seed=3),
  _case("torch-complex", "torch", {"rho": 0.95}, complex=True, seed=4),
  _case("torch-complex-decay", "torch", {"weight_decay": 0.1, "maximize": True}, complex=True),
  _case("torch-schedule", "torch", {"lr": {"exponential": [1.0, 0.95]}}, seed=5),
  _case("torch-small-grads", "torch", {"eps": 1e-8}, grad_scale=1e-4, seed=6),
  # keras.optimizers.Adadelta (Keras 3, JAX backend)
  _case("keras-defaults", "keras"),
  _case("keras-paper-lr", "keras", {"learning_rate": 1.0}, seed=1),
  _case("keras-weight-decay", "keras", {"learning_rate": 0.5, "weight_decay": 0.1}, seed=2),
  _case("keras-clipnorm", "keras", {"learning_rate": 1.0, "clipnorm": 0.5}, grad_scale=3.0),
  _case(
    "keras-global-clipnorm", "keras", {"learning_rate": 1.0, "global_clipnorm": 1.0}, grad_scale=3.0
  ),
  _case("keras-clipvalue", "keras", {"learning_rate": 1.0, "clipvalue": 0.3}),
  _case("keras-ema", "keras", {"learning_rate": 1.0, "use_ema": True, "ema_momentum": 0.9}),
  _case(
    "keras-ema-overwrite",
    "keras",
    {"learning_rate": 1.0, "use_ema": True, "ema_momentum": 0.8, "ema_overwrite_frequency": 5},
  ),
  _case("keras-accumulation", "keras", {"learning_rate": 1.0, "gradient_accumulation_steps": 3}),
  _case(
    "keras-loss-scale",
    "keras",
    {"learning_rate": 1.0, "loss_scale_factor": 128.0},
    grad_scale=128.0,
  ),
  _case("keras-schedule", "keras", {"learning_rate": {"exponential": [1.0, 0.95]}}),
  _case(
    "keras-everything",
    "keras",
    {
      "learning_rate": {"exponential": [0.8, 0.97]},
      "weight_decay": 0.05,
      "global_clipnorm": 2.0,
      "use_ema": True,
      "ema_momentum": 0.9,
      "ema_overwrite_frequency": 3,
      "loss_scale_factor": 64.0,
      "gradient_accumulation_steps": 2,
    },
    grad_scale=64.0,
    steps=48,
  ),
  # tf.train.adadelta (TensorFlow.js, CPU backend)
  _case("tfjs-defaults", "tfjs"),
  _case("tfjs-paper-hyper", "tfjs", {"learning_rate": 1.0, "rho": 0.95, "epsilon": 1e-6}, seed=1),
  _case("tfjs-rho", "tfjs", {"learning_rate": 0.5, "rho": 0.8}, seed=2),
  # tf.compat.v1.train.AdadeltaOptimizer
  _case("tf1-defaults", "tf1"),
  _case("tf1-paper-hyper", "tf1", {"learning_rate": 1.0, "rho": 0.95, "epsilon": 1e-6}, seed=1),
  # Dive into Deep Learning §12.9
  _case("d2l-defaults", "d2l"),
  _case("d2l-rho", "d2l", {"rho": 0.95, "eps": 1e-6}, seed=1),
]


def inputs(case: Case) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
  """The initial parameters and every step's gradients (float32 or complex64)."""
  rng = np.random.default_rng(case["seed"])

  def draw(shape, scale=1.0):
    x = rng.normal(size=shape) * scale
    if case["complex"]:
      return np.asarray(x + 1j * rng.normal(size=shape) * scale, np.complex64)
    return np.asarray(x, np.float32)

  params = [draw(s) for s in case["shapes"]]
  grads = [[draw(s, case["grad_scale"]) for s in case["shapes"]] for _ in range(case["steps"])]
  return params, grads


def schedule_value(spec: Any, step: int) -> float:
  """A learning rate as a number at `step`, from a number or an {"exponential": ...} spec."""
  if isinstance(spec, dict):
    base, gamma = spec["exponential"]
    return base * gamma**step
  return spec
