"""optax's conventions: the state's structure, params-free updates, and `jax.export`."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta

# optax's empty state, for serializing the exported step's pytrees (the user's job).
with contextlib.suppress(ValueError):  # registered already
  jax.export.register_namedtuple_serialization(optax.EmptyState, serialized_name="optax.EmptyState")

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}


@pytest.mark.parametrize(
  "hyper",
  [{"learning_rate": 0.1}, {"learning_rate": 0.1, "weight_decay": 1e-2, "rho": 0.9}],
  ids=["learning_rate", "weight_decay_and_rho"],
)
def test_inject_hyperparams_keeps_the_unwrapped_state_structure(hyper):
  injected = optax.inject_hyperparams(optax_adadelta.adadelta)(**hyper).init(PARAMS)
  plain = optax_adadelta.adadelta(**hyper).init(PARAMS)
  assert jax.tree.structure(injected.inner_state) == jax.tree.structure(plain)
  as_arrays = optax_adadelta.adadelta(**{k: jnp.asarray(v) for k, v in hyper.items()})
  assert jax.tree.structure(as_arrays.init(PARAMS)) == jax.tree.structure(plain)


def test_inject_hyperparams_gives_the_numbers_of_the_plain_transform():
  grads = jax.tree.map(lambda p: jnp.cos(p).astype(p.dtype), PARAMS)
  injected = optax.inject_hyperparams(optax_adadelta.adadelta)(learning_rate=0.5, rho=0.9)
  plain = optax_adadelta.adadelta(learning_rate=0.5, rho=0.9, implementation="jax")
  got, _ = jax.jit(injected.update)(grads, injected.init(PARAMS), PARAMS)
  want, _ = jax.jit(plain.update)(grads, plain.init(PARAMS), PARAMS)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6)


def test_update_needs_params_only_with_weight_decay():
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  tx = optax_adadelta.adadelta()
  tx.update(grads, tx.init(PARAMS))  # no params: fine
  decayed = optax_adadelta.adadelta(weight_decay=1e-2)
  with pytest.raises(ValueError, match="params"):
    decayed.update(grads, decayed.init(PARAMS))


def _train_step(tx):
  def step(params, opt_state, x):
    grads = jax.grad(lambda p: jnp.sum((x @ p["w"] + p["b"].astype(jnp.float32)) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


@pytest.mark.parametrize(
  "platforms", [["cpu"], ["cuda"], ["tpu"], ["cpu", "cuda", "tpu"]], ids="-".join
)
def test_a_training_step_with_default_arguments_exports(platforms):
  tx = optax_adadelta.adadelta()
  x = jnp.ones((2, 3))
  exported = jax.export.export(jax.jit(_train_step(tx)), platforms=platforms)(
    PARAMS, tx.init(PARAMS), x
  )
  assert exported.platforms == tuple(platforms)
  assert "custom_call @optax_adadelta_update" not in exported.mlir_module()
  jax.export.deserialize(exported.serialize())  # a stable artifact


def test_the_exported_cpu_step_equals_the_jitted_one():
  """Bit for bit with the pure-JAX step it serializes; within 1 ulp of the native one."""
  with jax.default_device(jax.devices("cpu")[0]):  # a CPU export runs on a CPU device
    _check_exported_cpu_step()


def _check_exported_cpu_step():
  tx = optax_adadelta.adadelta()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)
  state = tx.init(PARAMS)
  exported = jax.export.export(jax.jit(_train_step(tx)), platforms=["cpu"])(PARAMS, state, x)
  restored = jax.export.deserialize(exported.serialize())
  got = restored.call(PARAMS, state, x)
  by_xla = optax_adadelta.adadelta(implementation="jax")
  want = jax.jit(_train_step(by_xla))(PARAMS, by_xla.init(PARAMS), x)
  native = jax.jit(_train_step(tx))(PARAMS, state, x)
  for a, b, c in zip(*(jax.tree.leaves(t) for t in (got, want, native)), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    spacing = np.spacing(np.abs(np.asarray(c)).astype(c.dtype)).astype(np.float32)
    assert np.all(np.abs(np.asarray(a, np.float32) - np.asarray(c, np.float32)) <= spacing)
