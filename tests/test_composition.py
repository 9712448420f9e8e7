"""Composition with optax's own transforms, each checked against the float64 reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta
from tests import reference


def _params():
  return {
    "dense": {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)},
    "norm": jnp.full(3, 0.5),
  }


def _grads(num_steps=10, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), _params())
    for _ in range(num_steps)
  ]


def _run(tx, grads, params=None):
  params = _params() if params is None else params
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _reference(grads_fn_or_list, num_steps=None, **hyper):
  leaves, treedef = jax.tree.flatten(_params())
  run = reference.run(leaves, grads_fn_or_list, num_steps, **hyper)
  return jax.tree.unflatten(treedef, run.params)


def _leaves(grads):
  return [jax.tree.leaves(g) for g in grads]


def test_clip_by_global_norm_then_adadelta():
  grads = _grads(scale=5.0)
  ours, _ = _run(optax.chain(optax.clip_by_global_norm(1.0), optax_adadelta.adadelta()), grads)

  def clipped(g):
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in g))
    return [np.asarray(x, np.float64) * min(1.0, 1.0 / norm) for x in g]

  chex.assert_trees_all_close(ours, _reference([clipped(g) for g in _leaves(grads)]), rtol=2e-5)


def test_clip_by_value_then_adadelta():
  grads = _grads(scale=3.0)
  ours, _ = _run(optax.chain(optax.clip(0.5), optax_adadelta.adadelta()), grads)
  want = _reference([[np.clip(x, -0.5, 0.5) for x in g] for g in _leaves(grads)])
  chex.assert_trees_all_close(ours, want, rtol=2e-5)


def test_add_decayed_weights_with_a_mask_equals_built_in_coupled_decay():
  grads = _grads()
  mask = {"dense": {"w": True, "b": False}, "norm": False}
  chained = optax.chain(optax.add_decayed_weights(0.01, mask), optax_adadelta.adadelta())
  ours, _ = _run(chained, grads)
  want = _reference(_leaves(grads), weight_decay=0.01, decay_mask=jax.tree.leaves(mask))
  chex.assert_trees_all_close(ours, want, rtol=2e-5)


def test_inject_hyperparams_changes_rho_eps_and_learning_rate_mid_training():
  grads = _grads(num_steps=10)
  tx = optax.inject_hyperparams(optax_adadelta.adadelta, static_args=("weight_decay",))(
    learning_rate=1.0, rho=0.95, eps=1e-6
  )
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t, g in enumerate(grads):
    if t == 5:
      state.hyperparams.update(
        learning_rate=jnp.asarray(0.5), rho=jnp.asarray(0.8), eps=jnp.asarray(1e-3)
      )
    updates, state = update(g, state)
    params = optax.apply_updates(params, updates)

  # Reference: the same Algorithm 1 with the hyper-parameters switched after step 5.
  leaves, treedef = jax.tree.flatten(_params())
  first = reference.run(leaves, _leaves(grads[:5]))
  x, e_g2, e_dx2 = first.params, first.e_g2, first.e_dx2
  for g in _leaves(grads[5:]):
    for i, gi in enumerate(g):
      gi = np.asarray(gi, np.float64)
      e_g2[i] = 0.8 * e_g2[i] + 0.2 * gi**2
      dx = -np.sqrt(e_dx2[i] + 1e-3) / np.sqrt(e_g2[i] + 1e-3) * gi
      e_dx2[i] = 0.8 * e_dx2[i] + 0.2 * dx**2
      x[i] = x[i] + 0.5 * dx
  chex.assert_trees_all_close(params, jax.tree.unflatten(treedef, x), rtol=2e-5)


def test_inject_hyperparams_without_static_args_needs_params():
  # weight_decay becomes an array there, so the decay stage (which reads params) is kept.
  tx = optax.inject_hyperparams(optax_adadelta.adadelta)(rho=0.9)
  params = _params()
  state = tx.init(params)
  updates, _ = tx.update(_grads(1)[0], state, params)
  chex.assert_trees_all_equal_structs(updates, params)


def test_multisteps_averages_k_gradients_per_adadelta_step():
  grads = _grads(num_steps=12)
  ours, _ = _run(optax.MultiSteps(optax_adadelta.adadelta(), every_k_schedule=3), grads)
  g = _leaves(grads)
  means = [
    [
      np.mean([np.asarray(g[t + j][i], np.float64) for j in range(3)], axis=0)
      for i in range(len(g[0]))
    ]
    for t in range(0, 12, 3)
  ]
  chex.assert_trees_all_close(ours, _reference(means), rtol=2e-5)


def test_masked_trains_only_the_selected_leaves():
  grads = _grads()
  mask = {"dense": {"w": True, "b": True}, "norm": False}
  ours, _ = _run(optax.masked(optax_adadelta.adadelta(), mask), grads)
  want = _reference(_leaves(grads))
  chex.assert_trees_all_close(ours["dense"], want["dense"], rtol=2e-5)
  # Masked leaves receive the raw gradient sum as optax.masked documents (updates pass through).
  np.testing.assert_allclose(
    ours["norm"], _params()["norm"] + sum(np.asarray(g["norm"]) for g in grads), rtol=1e-5
  )


def test_flatten_gives_the_same_trajectory():
  grads = _grads()
  ours, _ = _run(optax.flatten(optax_adadelta.adadelta()), grads)
  chex.assert_trees_all_close(ours, _reference(_leaves(grads)), rtol=2e-5)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_apply_if_finite_skips_a_bad_batch_and_keeps_the_state(bad):
  grads = _grads(num_steps=8)
  poisoned = list(grads)
  poisoned[4] = jax.tree.map(lambda g: g.at[0].set(bad), grads[4])
  tx = optax.apply_if_finite(optax_adadelta.adadelta(), max_consecutive_errors=3)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t, g in enumerate(poisoned):
    before = state
    updates, state = update(g, state)
    params = optax.apply_updates(params, updates)
    if t == 4:
      chex.assert_trees_all_equal(state.inner_state, before.inner_state)
      assert int(state.notfinite_count) == 1
  want = _reference(_leaves(grads[:4] + grads[5:]))
  chex.assert_trees_all_close(params, want, rtol=2e-5)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.inner_state))


def test_without_a_guard_one_nan_poisons_the_state_forever():
  # Documents why the guard above exists.
  grads = _grads(num_steps=4)
  grads[1] = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[1])
  _, state = _run(optax_adadelta.adadelta(), grads)
  assert np.isnan(np.asarray(optax.tree.get(state, "e_g2")["norm"][0]))
