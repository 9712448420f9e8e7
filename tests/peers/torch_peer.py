"""torch.optim.Adadelta on a parity case (CPU, float32 or complex64)."""

from __future__ import annotations

import torch

from tests import parity_cases


def run(case: parity_cases.Case) -> dict[str, list]:
  params0, grads = parity_cases.inputs(case)
  kwargs = dict(case["kwargs"])
  lr_spec = kwargs.pop("lr", 1.0)
  params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params0]
  optimizer = torch.optim.Adadelta(params, lr=parity_cases.schedule_value(lr_spec, 0), **kwargs)
  scheduler = None
  if isinstance(lr_spec, dict):
    _, gamma = lr_spec["exponential"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: gamma**t)
  record: dict[str, list] = {"params": [], "e_g2": [], "e_dx2": []}
  for step_grads in grads:
    for p, g in zip(params, step_grads, strict=True):
      p.grad = torch.from_numpy(g.copy())
    optimizer.step()
    if scheduler is not None:
      scheduler.step()
    record["params"].append([p.detach().numpy().copy() for p in params])
    record["e_g2"].append([optimizer.state[p]["square_avg"].numpy().copy() for p in params])
    record["e_dx2"].append([optimizer.state[p]["acc_delta"].numpy().copy() for p in params])
  return record


def version() -> str:
  return f"torch {torch.__version__}"
