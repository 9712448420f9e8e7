"""tf.compat.v1.train.AdadeltaOptimizer (TensorFlow, eager, CPU) on a parity case."""

from __future__ import annotations

import tensorflow as tf

from tests import parity_cases


def run(case: parity_cases.Case) -> dict[str, list]:
  params0, grads = parity_cases.inputs(case)
  variables = [tf.Variable(p.copy()) for p in params0]
  optimizer = tf.compat.v1.train.AdadeltaOptimizer(**case["kwargs"])
  record: dict[str, list] = {"params": [], "e_g2": [], "e_dx2": []}
  for step_grads in grads:
    optimizer.apply_gradients(
      [(tf.constant(g), v) for g, v in zip(step_grads, variables, strict=True)]
    )
    record["params"].append([v.numpy().copy() for v in variables])
    record["e_g2"].append([optimizer.get_slot(v, "accum").numpy().copy() for v in variables])
    record["e_dx2"].append(
      [optimizer.get_slot(v, "accum_update").numpy().copy() for v in variables]
    )
  return record


def version() -> str:
  return f"tensorflow {tf.__version__}"
