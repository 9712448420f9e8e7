"""Checks that only mean something on a GPU or TPU; skipped (with the reason) on CPU.

Run them on an accelerator machine with `python -m pytest -m accelerator`. The rest of the
suite is device-agnostic and runs there too.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import optax_adadelta
from tests import reference

pytestmark = pytest.mark.accelerator

STEPS = 5
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"


def _gradients(shape, seed=0):
  return np.random.default_rng(seed).normal(size=(STEPS, *shape)).astype(np.float32)


def test_state_lives_on_the_accelerator_and_steps_follow_the_reference():
  device = jax.devices()[0]
  params = jax.device_put(jnp.linspace(-1.0, 1.0, 4096, dtype=jnp.float32), device)
  grads = _gradients(params.shape)
  tx = optax_adadelta.adadelta(rho=0.9, eps=1e-6)
  opt_state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s)))
  for t in range(STEPS):
    params, opt_state = step(params, opt_state, jax.device_put(grads[t], device))
  for leaf in jax.tree.leaves(opt_state):
    assert leaf.devices() == {device}, leaf.devices()
  oracle = reference.run([np.linspace(-1.0, 1.0, 4096)], [[g] for g in grads], rho=0.9)
  np.testing.assert_allclose(np.asarray(params), oracle.params[0], rtol=2e-6, atol=1e-7)


def test_data_parallel_example_over_all_accelerators_matches_one_accelerator():
  spec = importlib.util.spec_from_file_location("data_parallel_example", EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  devices = jax.devices()
  batch_size = 8 * len(devices)
  with jax.default_matmul_precision("highest"):  # no TF32 rounding in either run
    one, _ = example.train(Mesh(np.array(devices[:1]), ("data",)), 10, batch_size)
    every, _ = example.train(jax.make_mesh((len(devices),), ("data",)), 10, batch_size)
  for name in one:
    np.testing.assert_allclose(np.asarray(every[name]), np.asarray(one[name]), rtol=1e-5, atol=1e-6)
