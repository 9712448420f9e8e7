"""Adadelta on the default backend's devices, against the float64 reference.

Written for a GPU or TPU host, and run on CPU too, where they must pass as well: each result
is compared with the float64 transcription of Algorithm 1 (tests/reference.py), never only
with another run on the same hardware, so a one-GPU machine proves as much as eight. Tests
marked `accelerator` only mean something on a GPU or TPU and skip, with the reason, on
CPU-only machines. On an accelerator host `.ci/device` runs these with the rest of the suite
(docs/guides/accelerators.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import optax_adadelta
from tests import reference

STEPS = 5


def _gradients(shape, seed=0):
  return np.random.default_rng(seed).normal(size=(STEPS, *shape)).astype(np.float32)


def _step(tx):
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step)


def test_state_stays_on_the_default_device_and_steps_follow_the_float64_reference():
  device = jax.devices()[0]
  params = jax.device_put(jnp.linspace(-1.0, 1.0, 4096, dtype=jnp.float32), device)
  grads = _gradients(params.shape)
  tx = optax_adadelta.adadelta(rho=0.9, eps=1e-6)
  opt_state = tx.init(params)
  step = _step(tx)
  for t in range(STEPS):
    params, opt_state = step(params, opt_state, jax.device_put(grads[t], device))
  for leaf in jax.tree.leaves(opt_state):
    assert leaf.devices() == {device}, leaf.devices()
  oracle = reference.run([np.linspace(-1.0, 1.0, 4096)], [[g] for g in grads], rho=0.9)
  np.testing.assert_allclose(np.asarray(params), oracle.params[0], rtol=2e-6, atol=1e-7)


def _mlp_gradients(names, example, batch_size):
  """∂loss/∂params of the example's MLP in float64, written out by hand, per step t."""

  def gradients(leaves, t):
    p = dict(zip(names, leaves, strict=True))
    x, y = (v.astype(np.float64) for v in example.global_batch(t, batch_size))
    hidden = np.tanh(x @ p["w1"] + p["b1"])
    residual = 2.0 * (hidden @ p["w2"] + p["b2"] - y) / y.size
    back = (residual @ p["w2"].T) * (1.0 - hidden**2)
    grads = {"w1": x.T @ back, "b1": back.sum(0), "w2": hidden.T @ residual, "b2": residual.sum(0)}
    return [grads[name] for name in names]

  return gradients


@pytest.mark.parametrize("devices", ["one", "all"])
def test_data_parallel_example_follows_the_float64_reference(example, devices):
  """On one device and over every device (the same single device on a one-GPU machine)."""
  every = jax.devices()
  batch_size = 8 * len(every)
  mesh = Mesh(np.array(every[:1] if devices == "one" else every), ("data",))
  steps = 10
  with jax.default_matmul_precision("highest"):  # float32 matmuls: no TF32 or bfloat16 passes
    got, _ = example.train(mesh, steps, batch_size)
  start = example.init_params()
  names = sorted(start)
  oracle = reference.run(
    [start[k] for k in names],
    _mlp_gradients(names, example, batch_size),
    steps,
    **example.HYPER_PARAMETERS,
  )
  for name, want in zip(names, oracle.params, strict=True):
    np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.max(np.abs(oracle.params[names.index("w1")] - start["w1"])) > 1e-2  # it moved


@pytest.mark.accelerator
def test_on_an_accelerator_the_update_is_xlas_without_the_cpu_kernel():
  """The native kernel lowers on CPU only; a GPU or TPU step must not contain its call."""
  device = jax.devices()[0]
  assert device.platform in ("gpu", "tpu"), device
  params = jax.device_put(jnp.ones(1024, jnp.float32), device)
  tx = optax_adadelta.adadelta()
  hlo = _step(tx).lower(params, tx.init(params), params).compile().as_text()
  assert "optax_adadelta_update" not in hlo
  assert "sqrt" in hlo  # the update itself was compiled
