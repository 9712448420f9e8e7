"""The transform under jit, pmap, device placement, vmap and lax.scan."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

import optax_adadelta
from tests import reference

_GRID_RHO = (0.9, 0.95, 0.99)
_GRID_EPS = (1e-2, 1e-6)


def _problem(seed: int = 0, num_steps: int = 8):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)}
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    for _ in range(num_steps)
  ]
  return params, grads


def _reference_final(params, grads, **hyper):
  leaves, treedef = jax.tree.flatten(params)
  run = reference.run(leaves, [jax.tree.leaves(g) for g in grads], **hyper)
  return jax.tree.unflatten(treedef, run.params)


def _member(stacked, i):
  """The i-th problem of a tree stacked along axis 0."""
  return jax.tree.map(lambda x: x[i], stacked)


def _quadratic_grads(params):
  # Gradient of 0.5·Σ k·x² with a different curvature k per coordinate.
  return jax.tree.map(lambda x: jnp.linspace(0.5, 3.0, x.size).reshape(x.shape) * x, params)


class VariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True, with_pmap=True, with_device=True)
  def test_every_variant_follows_the_reference(self):
    params, grads = _problem()
    tx = optax_adadelta.adadelta(learning_rate=0.5, rho=0.9, eps=1e-4)
    state = tx.init(params)
    update = self.variant(tx.update)
    for g in grads:
      updates, state = update(g, state)
      params = optax.apply_updates(params, updates)
    want = _reference_final(_problem()[0], grads, learning_rate=0.5, rho=0.9, eps=1e-4)
    chex.assert_trees_all_close(params, want, rtol=2e-5)


def test_vmap_over_independent_problems_equals_separate_runs():
  problems = [_problem(seed) for seed in range(4)]
  stacked_params = jax.tree.map(lambda *x: jnp.stack(x), *[p for p, _ in problems])
  tx = optax_adadelta.adadelta(learning_rate=0.3)
  state = jax.vmap(tx.init)(stacked_params)
  params = stacked_params
  for t in range(8):
    grads = jax.tree.map(lambda *x: jnp.stack(x), *[g[t] for _, g in problems])
    updates, state = jax.vmap(tx.update)(grads, state)
    params = optax.apply_updates(params, updates)
  for i, (p0, grads) in enumerate(problems):
    separate = _member(params, i)
    chex.assert_trees_all_close(separate, _reference_final(p0, grads, learning_rate=0.3), rtol=2e-5)


def _train(rho, eps, learning_rate, num_steps=50):
  """A jit-able loop on a quadratic; hyper-parameters may be traced."""
  tx = optax_adadelta.adadelta(learning_rate, rho, eps)
  params = {"w": jnp.ones((3, 2)), "b": jnp.full(2, -2.0)}

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(_quadratic_grads(params), state)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=num_steps)
  return params


def test_vmap_over_a_grid_of_rho_and_eps_inside_one_jit_equals_separate_runs():
  rho, eps = (jnp.asarray(v, jnp.float32).ravel() for v in np.meshgrid(_GRID_RHO, _GRID_EPS))
  lr = jnp.linspace(0.5, 1.0, rho.size)
  grid = jax.jit(jax.vmap(_train))(rho, eps, lr)
  for i in range(rho.size):
    separate = jax.jit(_train)(rho[i], eps[i], lr[i])  # same hyper-parameters, same dtypes
    chex.assert_trees_all_equal(_member(grid, i), separate)
    with_floats = _train(float(rho[i]), float(eps[i]), float(lr[i]))
    chex.assert_trees_all_close(_member(grid, i), with_floats, rtol=1e-5)


def test_scan_training_loop_follows_the_reference():
  final = jax.jit(_train, static_argnums=(0, 1, 2))(0.95, 1e-6, 1.0)
  leaves, treedef = jax.tree.flatten({"w": jnp.ones((3, 2)), "b": jnp.full(2, -2.0)})
  curvature = [np.linspace(0.5, 3.0, x.size).reshape(x.shape) for x in leaves]
  run = reference.run(
    leaves, lambda x, t: [k * xi for k, xi in zip(curvature, x, strict=True)], num_steps=50
  )
  chex.assert_trees_all_close(final, jax.tree.unflatten(treedef, run.params), rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
