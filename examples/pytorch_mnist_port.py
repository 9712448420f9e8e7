"""PyTorch's MNIST example (pytorch/examples, mnist/main.py) ported to Flax NNX.

The same CNN, data pipeline, loss, Adadelta(lr=1.0) and StepLR(step_size=1, gamma=0.7)
stepped once per epoch, with `presets.pytorch` and an epoch-wise staircase schedule.
Guide: docs/guides/porting_pytorch_mnist.md. Data: MNIST from $OPTAX_ADADELTA_DATA, else
../shared/data. Run:

  python examples/pytorch_mnist_port.py --epochs 1                # train and test here
  python examples/pytorch_mnist_port.py --compare-steps 100      # step for step against torch
  python examples/pytorch_mnist_port.py --epochs 1 --torch       # also train torch, side by side
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optax_adadelta import presets
from optax_adadelta.demo import datasets

MEAN, STD = 0.1307, 0.3081  # transforms.Normalize((0.1307,), (0.3081,))


def load_data(root=None) -> tuple[np.ndarray, ...]:
  """(x_train, y_train, x_test, y_test): float32 NHWC images, as ToTensor() then Normalize."""
  images = datasets.load_mnist(datasets.data_dir(root))
  normalize = lambda x: ((x - np.float32(MEAN)) / np.float32(STD)).reshape(-1, 28, 28, 1)
  return normalize(images.x_train), images.y_train, normalize(images.x_test), images.y_test


# The network ---------------------------------------------------------------------------


def _torch_kernel_init():
  # torch.nn.Conv2d / Linear: kaiming_uniform_(a=√5), i.e. U(±1/√fan_in).
  return nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
  bound = 1 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Net(nnx.Module):
  """conv(1→32, 3) → relu → conv(32→64, 3) → relu → maxpool 2 → dropout 0.25 → flatten →
  fc(9216→128) → relu → dropout 0.5 → fc(128→10) → log_softmax; PyTorch's default init."""

  def __init__(self, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    def conv(n_in, n_out):
      return nnx.Conv(
        n_in, n_out, (3, 3), padding="VALID", kernel_init=_torch_kernel_init(),
        bias_init=_torch_bias_init(n_in * 9), param_dtype=param_dtype, dtype=param_dtype,
        rngs=rngs,
      )  # fmt: skip

    def linear(n_in, n_out):
      return nnx.Linear(
        n_in, n_out, kernel_init=_torch_kernel_init(), bias_init=_torch_bias_init(n_in),
        param_dtype=param_dtype, dtype=param_dtype, rngs=rngs,
      )  # fmt: skip

    self.conv1, self.conv2 = conv(1, 32), conv(32, 64)
    self.dropout1, self.dropout2 = nnx.Dropout(0.25, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)
    self.fc1, self.fc2 = linear(9216, 128), linear(128, 10)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    x = self.dropout1(nnx.max_pool(x, (2, 2), strides=(2, 2)))
    # torch.flatten of NCHW: channel-major, so fc1's weights load with a plain transpose.
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
    x = self.dropout2(nnx.relu(self.fc1(x)))
    return nnx.log_softmax(self.fc2(x))


def nll_loss(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
  """F.nll_loss: the mean of −log p(label)."""
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


# torch's layouts: Conv2d weight (out, in, kh, kw), Linear weight (out, in). Flax: kernels
# (kh, kw, in, out) and (in, out). Both maps are their own inverse's transpose.
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}
LAYERS = ("conv1", "conv2", "fc1", "fc2")


def load_torch_state_dict(model: Net, state_dict: dict) -> None:
  """Copies torch's `Net().state_dict()` (tensors or arrays) into `model`, in place."""
  as_numpy = lambda t: t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
  for name in LAYERS:
    layer = getattr(model, name)
    weight = as_numpy(state_dict[f"{name}.weight"])
    layer.kernel[...] = jnp.asarray(weight.transpose(_TO_FLAX[weight.ndim]), layer.kernel.dtype)
    layer.bias[...] = jnp.asarray(as_numpy(state_dict[f"{name}.bias"]), layer.bias.dtype)


def torch_layout(model: Net) -> dict[str, np.ndarray]:
  """The model's parameters under torch's names and layouts, for comparing with torch."""
  out = {}
  for name in LAYERS:
    kernel = np.asarray(getattr(model, name).kernel[...])
    out[f"{name}.weight"] = kernel.transpose(_TO_TORCH[kernel.ndim])
    out[f"{name}.bias"] = np.asarray(getattr(model, name).bias[...])
  return out


# Training ------------------------------------------------------------------------------


def step_lr(batches_per_epoch: int, lr: float = 1.0, gamma: float = 0.7) -> optax.Schedule:
  """StepLR(step_size=1, gamma) stepped once per epoch, as a schedule of the batch count."""
  return optax.exponential_decay(
    lr, transition_steps=batches_per_epoch, decay_rate=gamma, staircase=True
  )


def make_optimizer(model: Net, batches_per_epoch: int, lr=1.0, gamma=0.7) -> nnx.Optimizer:
  """optim.Adadelta(model.parameters(), lr=lr) with StepLR(optimizer, 1, gamma)."""
  tx = presets.pytorch(lr=step_lr(batches_per_epoch, lr, gamma))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model: Net, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(lambda m: nll_loss(m(x), y))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _eval_batch(model: Net, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  log_probs = model(x)
  loss = -jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=1))
  return loss, jnp.sum(jnp.argmax(log_probs, axis=1) == y)


def evaluate(model: Net, x, y, batch_size: int = 1000) -> tuple[float, int]:
  """(average test loss, number correct), as main.py's test()."""
  model.eval()
  loss, correct = 0.0, 0
  for i in range(0, len(x), batch_size):
    batch_loss, batch_correct = _eval_batch(model, x[i : i + batch_size], y[i : i + batch_size])
    loss, correct = loss + float(batch_loss), correct + int(batch_correct)
  return loss / len(x), correct


def batches(n: int, batch_size: int):
  """Slices of a DataLoader without shuffle: main.py shuffles only on an accelerator."""
  return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def train_epoch(model, optimizer, x, y, batch_size=64, log_every=100) -> list[float]:
  model.train()
  losses = []
  for b, batch in enumerate(batches(len(x), batch_size)):
    losses.append(float(train_step(model, optimizer, x[batch], y[batch])))
    if log_every and b % log_every == 0:
      print(f"  batch {b:4d}  loss {losses[-1]:.6f}", flush=True)
  return losses


# The torch side (for the comparison only) ------------------------------------------------


def torch_net(seed: int = 1):
  """main.py's Net, built after torch.manual_seed(seed) as main.py does."""
  import torch
  from torch.nn import functional

  class TorchNet(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1, self.conv2 = torch.nn.Conv2d(1, 32, 3, 1), torch.nn.Conv2d(32, 64, 3, 1)
      self.dropout1, self.dropout2 = torch.nn.Dropout(0.25), torch.nn.Dropout(0.5)
      self.fc1, self.fc2 = torch.nn.Linear(9216, 128), torch.nn.Linear(128, 10)

    def forward(self, x):
      x = functional.max_pool2d(functional.relu(self.conv2(functional.relu(self.conv1(x)))), 2)
      x = torch.flatten(self.dropout1(x), 1)
      x = self.dropout2(functional.relu(self.fc1(x)))
      return functional.log_softmax(self.fc2(x), dim=1)

  torch.manual_seed(seed)
  return TorchNet()


class TorchRun:
  """torch training from a state_dict, dropout off, in `dtype`, with `threads` threads and
  oneDNN (mkldnn) convolutions on or off."""

  def __init__(self, state_dict, dtype="float32", threads=None, mkldnn=True):
    import torch

    self.torch, self.threads, self.mkldnn = torch, threads, mkldnn
    self.dtype = getattr(torch, dtype)
    self.net = torch_net().to(self.dtype)
    self.net.load_state_dict(state_dict)
    self.net.eval()
    self.optimizer = torch.optim.Adadelta(self.net.parameters(), lr=1.0)

  def step(self, x, y) -> float:
    torch = self.torch
    before = torch.get_num_threads()
    torch.set_num_threads(self.threads or before)
    try:
      # Only entered to switch oneDNN off: entering it at all makes torch warn about TF32.
      flags = contextlib.nullcontext() if self.mkldnn else torch.backends.mkldnn.flags(False)
      with flags:
        data = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.dtype)
        self.optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(self.net(data), torch.from_numpy(y).long())
        loss.backward()
        self.optimizer.step()
    finally:
      torch.set_num_threads(before)
    return loss.item()

  def params(self) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float64) for k, v in self.net.state_dict().items()}


class FlaxRun:
  """Our port from the same state_dict, dropout off, in float32 or float64."""

  def __init__(self, state_dict, dtype="float32", batches_per_epoch=938):
    self.x64 = dtype == "float64"
    with jax.enable_x64(self.x64):
      self.model = Net(rngs=nnx.Rngs(0), param_dtype=jnp.dtype(dtype))
      load_torch_state_dict(self.model, state_dict)
      self.model.eval()
      self.optimizer = make_optimizer(self.model, batches_per_epoch)
    self.dtype = dtype

  def step(self, x, y) -> float:
    with jax.enable_x64(self.x64):
      return float(train_step(self.model, self.optimizer, x.astype(self.dtype), y))

  def params(self) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in torch_layout(self.model).items()}


def compare(steps: int, x, y, batch_size: int = 64, print_every=None) -> dict[str, list]:
  """Trains torch (several ways) and the port side by side from torch's initial weights on
  the same batches, dropout off. Returns, per pair and step, (max |Δparam|, |Δloss|)."""
  initial = torch_net().state_dict()
  runs = {
    "torch": TorchRun(initial),
    "torch float64": TorchRun(initial, "float64"),
    "torch 1 thread": TorchRun(initial, threads=1),
    "torch no oneDNN": TorchRun(initial, mkldnn=False),
    "flax": FlaxRun(initial),
    "flax float64": FlaxRun(initial, "float64"),
  }
  pairs = [
    ("flax", "torch"),
    ("torch float64", "torch"),
    ("torch 1 thread", "torch"),
    ("torch no oneDNN", "torch"),
    ("flax float64", "torch float64"),
  ]
  out: dict[str, list] = {f"{a} vs {b}": [] for a, b in pairs}
  for t, batch in enumerate(batches(len(x), batch_size)[:steps], start=1):
    losses = {name: run.step(x[batch], y[batch]) for name, run in runs.items()}
    params = {name: run.params() for name, run in runs.items()}
    for a, b in pairs:
      gap = max(float(np.max(np.abs(params[a][k] - params[b][k]))) for k in params[a])
      out[f"{a} vs {b}"].append((gap, abs(losses[a] - losses[b])))
    if print_every and (t % print_every == 0 or t <= 3):
      cells = "  ".join(f"{k}: {v[-1][0]:.1e} / {v[-1][1]:.1e}" for k, v in out.items())
      print(f"step {t:4d}  max|dparam| / |dloss|  {cells}", flush=True)
  return out


def torch_train_epoch(net, optimizer, x, y, batch_size=64) -> None:
  """main.py's train(): dropout on, the same unshuffled batches."""
  import torch

  net.train()
  for batch in batches(len(x), batch_size):
    data = torch.from_numpy(np.ascontiguousarray(x[batch].transpose(0, 3, 1, 2)))
    optimizer.zero_grad()
    torch.nn.functional.nll_loss(net(data), torch.from_numpy(y[batch]).long()).backward()
    optimizer.step()


def torch_evaluate(net, x, y, batch_size=1000) -> tuple[float, int]:
  import torch

  net.eval()
  loss, correct = 0.0, 0
  with torch.no_grad():
    for i in range(0, len(x), batch_size):
      data = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size].transpose(0, 3, 1, 2)))
      target = torch.from_numpy(y[i : i + batch_size]).long()
      out = net(data)
      loss += float(torch.nn.functional.nll_loss(out, target, reduction="sum"))
      correct += int((out.argmax(dim=1) == target).sum())
  return loss / len(x), correct


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=1, help="epochs to train (main.py: 14)")
  parser.add_argument("--seed", type=int, default=1, help="torch.manual_seed and dropout seed")
  parser.add_argument("--torch", action="store_true", help="also train torch, side by side")
  parser.add_argument(
    "--compare-steps", type=int, default=0, help="print the step-for-step comparison and exit"
  )
  args = parser.parse_args(argv)
  x_train, y_train, x_test, y_test = load_data()
  per_epoch = len(batches(len(x_train), 64))
  if args.compare_steps:
    compare(args.compare_steps, x_train, y_train, print_every=10)
    return
  reference = torch_net(args.seed)  # torch's initial weights, so both runs start equal
  model = Net(rngs=nnx.Rngs(params=0, dropout=args.seed))
  load_torch_state_dict(model, reference.state_dict())
  optimizer = make_optimizer(model, per_epoch)
  if args.torch:
    import torch

    torch_optimizer = torch.optim.Adadelta(reference.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(torch_optimizer, step_size=1, gamma=0.7)
  for epoch in range(1, args.epochs + 1):
    start = time.perf_counter()
    train_epoch(model, optimizer, x_train, y_train, log_every=0)
    loss, correct = evaluate(model, x_test, y_test)
    seconds = time.perf_counter() - start
    print(f"epoch {epoch}: Flax  test loss {loss:.4f}, accuracy {correct}/10000 ({seconds:.0f} s)")
    if args.torch:
      start = time.perf_counter()
      torch_train_epoch(reference, torch_optimizer, x_train, y_train)
      loss, correct = torch_evaluate(reference, x_test, y_test)
      scheduler.step()
      seconds = time.perf_counter() - start
      print(
        f"epoch {epoch}: torch test loss {loss:.4f}, accuracy {correct}/10000 ({seconds:.0f} s)"
      )


if __name__ == "__main__":
  main()
