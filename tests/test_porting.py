"""The PyTorch MNIST port (examples/pytorch_mnist_port.py) follows live torch step for step.

From torch's own initial weights, on the same batches, dropout off: in float64 the port and
torch agree to rounding (so the network, the layouts, the loss and the optimizer are the
same); in float32 they differ by no more than torch differs from itself in float64. The
one-epoch run (both frameworks, dropout on) is slow.
"""

from __future__ import annotations

import numpy as np
import optax
import pytest

from optax_adadelta.demo import datasets
from tests import parity
from tests.conftest import _load_example


@pytest.fixture(scope="module")
def port():
  parity.live_peer("torch")
  pytest.importorskip("flax")
  return _load_example("pytorch_mnist_port")


@pytest.fixture(scope="module")
def mnist(port):
  try:
    return port.load_data()
  except datasets.DataError as error:
    pytest.skip(f"MNIST not found ({error}); set {datasets.ENV_VAR}")


def _gaps(a, b) -> float:
  pa, pb = a.params(), b.params()
  assert set(pa) == set(pb)
  return max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)


def test_the_port_follows_torch_step_for_step_from_torchs_initial_weights(port, mnist):
  x, y = mnist[0][:48], mnist[1][:48]
  initial = port.torch_net().state_dict()
  torch32, torch64 = port.TorchRun(initial), port.TorchRun(initial, "float64")
  flax32, flax64 = port.FlaxRun(initial), port.FlaxRun(initial, "float64")
  for batch in port.batches(len(x), 16):  # 3 steps
    losses = [run.step(x[batch], y[batch]) for run in (torch32, torch64, flax32, flax64)]
    assert abs(losses[3] - losses[1]) <= 1e-12  # float64: the same function of the weights
    assert abs(losses[2] - losses[0]) <= 1e-5
    assert _gaps(flax64, torch64) <= 1e-12
    # float32: no further from torch than torch's own float64 run (Adadelta's first steps
    # are ±√(ε/(1−ρ)) ≈ 3e-3 a coordinate, so a wrong layout would be off by that much).
    assert _gaps(flax32, torch32) <= 2 * _gaps(torch64, torch32) + 1e-7


def test_step_lr_per_epoch_is_a_staircase_schedule_of_the_batch_count(port):
  schedule = port.step_lr(batches_per_epoch=938, lr=1.0, gamma=0.7)
  for step, epoch in [(0, 0), (937, 0), (938, 1), (1875, 1), (1876, 2)]:
    np.testing.assert_allclose(float(schedule(step)), 0.7**epoch, rtol=1e-6)


# The guide's table of torch schedulers and their optax schedules -------------------------

B, EPOCHS = 3, 10  # batches per epoch; torch's scheduler.step() per epoch or per batch
TOTAL = B * EPOCHS
SCHEDULERS = {
  # name: (torch scheduler, stepped per, the optax schedule of the update count)
  "StepLR/epoch": (
    lambda s, o: s.StepLR(o, step_size=2, gamma=0.7),
    "epoch",
    optax.exponential_decay(1.0, transition_steps=2 * B, decay_rate=0.7, staircase=True),
  ),
  "StepLR/batch": (
    lambda s, o: s.StepLR(o, step_size=2, gamma=0.7),
    "batch",
    optax.exponential_decay(1.0, transition_steps=2, decay_rate=0.7, staircase=True),
  ),
  "MultiStepLR/epoch": (
    lambda s, o: s.MultiStepLR(o, milestones=[3, 7], gamma=0.1),
    "epoch",
    optax.piecewise_constant_schedule(1.0, {3 * B: 0.1, 7 * B: 0.1}),
  ),
  "ExponentialLR/epoch": (
    lambda s, o: s.ExponentialLR(o, gamma=0.9),
    "epoch",
    optax.exponential_decay(1.0, transition_steps=B, decay_rate=0.9, staircase=True),
  ),
  "ExponentialLR/batch": (
    lambda s, o: s.ExponentialLR(o, gamma=0.9),
    "batch",
    optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.9),
  ),
  "CosineAnnealingLR/epoch": (
    lambda s, o: s.CosineAnnealingLR(o, T_max=EPOCHS, eta_min=0.01),
    "epoch",
    lambda count: optax.cosine_decay_schedule(1.0, EPOCHS, alpha=0.01)(count // B),
  ),
  "CosineAnnealingLR/batch": (
    lambda s, o: s.CosineAnnealingLR(o, T_max=TOTAL, eta_min=0.01),
    "batch",
    optax.cosine_decay_schedule(1.0, decay_steps=TOTAL, alpha=0.01),
  ),
  "LinearLR/epoch": (
    lambda s, o: s.LinearLR(o, start_factor=1 / 3, end_factor=1.0, total_iters=5),
    "epoch",
    lambda count: optax.linear_schedule(1 / 3, 1.0, transition_steps=5)(count // B),
  ),
  "OneCycleLR/batch": (
    lambda s, o: s.OneCycleLR(o, max_lr=1.0, total_steps=TOTAL, cycle_momentum=False),
    "batch",
    optax.piecewise_interpolate_schedule(
      "cosine", 1.0 / 25, {0.3 * TOTAL - 1: 25.0, TOTAL - 1: 1 / (25 * 1e4)}
    ),
  ),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_guides_optax_schedule_gives_torchs_learning_rate_at_every_update(name):
  parity.live_peer("torch")
  import torch

  make, per, schedule = SCHEDULERS[name]
  parameter = torch.nn.Parameter(torch.zeros(1))
  optimizer = torch.optim.Adadelta([parameter], lr=1.0)
  scheduler = make(torch.optim.lr_scheduler, optimizer)
  theirs = []
  for _ in range(EPOCHS):
    for _ in range(B):
      theirs.append(optimizer.param_groups[0]["lr"])
      parameter.grad = torch.ones(1)
      optimizer.step()
      if per == "batch":
        scheduler.step()
    if per == "epoch":
      scheduler.step()
  ours = [float(schedule(count)) for count in range(TOTAL)]
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)  # float32 vs float64
  assert len(set(np.round(theirs, 6))) > 1  # the rate changed during the run


@pytest.mark.slow
def test_one_epoch_reaches_torchs_test_accuracy(port, mnist):
  """Both frameworks, dropout on (different masks), from the same initial weights: the test
  accuracy after one epoch, as main.py prints it. Takes minutes on a loaded 2-core CPU."""
  import torch
  from flax import nnx

  x_train, y_train, x_test, y_test = mnist
  reference = port.torch_net(seed=1)
  model = port.Net(rngs=nnx.Rngs(params=0, dropout=1))
  port.load_torch_state_dict(model, reference.state_dict())
  optimizer = port.make_optimizer(model, len(port.batches(len(x_train), 64)))
  port.train_epoch(model, optimizer, x_train, y_train, log_every=0)
  _, ours = port.evaluate(model, x_test, y_test)
  torch_optimizer = torch.optim.Adadelta(reference.parameters(), lr=1.0)
  port.torch_train_epoch(reference, torch_optimizer, x_train, y_train)
  _, theirs = port.torch_evaluate(reference, x_test, y_test)
  print(f"test accuracy after one epoch: ours {ours / 100:.2f} %, torch {theirs / 100:.2f} %")
  assert ours >= 9750 and theirs >= 9750
  assert abs(ours - theirs) <= 70  # 0.7 percentage points: dropout masks differ
