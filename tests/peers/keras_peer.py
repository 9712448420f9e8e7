"""keras.optimizers.Adadelta (Keras 3, JAX backend) on a parity case."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np

from tests import parity_cases


def _learning_rate(spec):
  if isinstance(spec, dict):
    base, gamma = spec["exponential"]
    return keras.optimizers.schedules.ExponentialDecay(base, decay_steps=1, decay_rate=gamma)
  return spec


def run(case: parity_cases.Case) -> dict[str, list]:
  if keras.backend.backend() != "jax":
    raise RuntimeError(
      f"the Keras parity runs need KERAS_BACKEND=jax, not {keras.backend.backend()}"
    )
  params0, grads = parity_cases.inputs(case)
  kwargs = dict(case["kwargs"])
  if "learning_rate" in kwargs:
    kwargs["learning_rate"] = _learning_rate(kwargs["learning_rate"])
  variables = [keras.Variable(p.copy()) for p in params0]
  optimizer = keras.optimizers.Adadelta(**kwargs)
  record: dict[str, list] = {"params": [], "e_g2": [], "e_dx2": []}
  if kwargs.get("use_ema"):
    record["ema"] = []
  for step_grads in grads:
    optimizer.apply([g.copy() for g in step_grads], variables)
    record["params"].append([np.asarray(v.value) for v in variables])
    record["e_g2"].append([np.asarray(v.value) for v in optimizer._accumulated_grads])
    record["e_dx2"].append([np.asarray(v.value) for v in optimizer._accumulated_delta_vars])
    if "ema" in record:
      record["ema"].append([np.asarray(v.value) for v in optimizer._model_variables_moving_average])
  return record


def version() -> str:
  return f"keras {keras.__version__} (jax backend)"
