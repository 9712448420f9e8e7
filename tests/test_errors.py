"""Bad input gets a clear error naming the argument and the value; odd trees work."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta

BAD_VALUES = [
  # (argument, value, exception, message pattern)
  ("rho", -0.1, ValueError, r"rho must be finite and in \[0, 1\] .*got -0.1"),
  ("rho", 1.5, ValueError, r"rho must be finite and in \[0, 1\] .*got 1.5"),
  ("rho", float("nan"), ValueError, r"rho must be .*got nan"),
  ("rho", jnp.array([0.9, 1.2]), ValueError, r"rho must be finite and in \[0, 1\]"),
  ("rho", "0.9", TypeError, r"rho must be a real number or array, got '0.9'"),
  ("rho", True, TypeError, r"rho must be a real number or array, got True"),
  ("eps", 0.0, ValueError, r"eps must be finite and in \(0, inf\) .*never moves.*got 0.0"),
  ("eps", -1e-6, ValueError, r"eps must be finite and in \(0, inf\).*got -1e-06"),
  ("eps", float("inf"), ValueError, r"eps must be finite .*got inf"),
  ("eps", 1j, TypeError, r"eps must be a real number or array, got 1j"),
  ("learning_rate", -1.0, ValueError, r"learning_rate must be finite and in \[0, inf\).*got -1.0"),
  ("learning_rate", float("inf"), ValueError, r"learning_rate must be finite .*got inf"),
  ("learning_rate", None, TypeError, r"learning_rate must be a number, array or optax schedule"),
  ("weight_decay", -0.01, ValueError, r"weight_decay must be finite and in \[0, inf\).*-0.01"),
  ("maximize", "yes", TypeError, r"maximize must be True or False, got 'yes'"),
  ("decoupled_weight_decay", 1, TypeError, r"decoupled_weight_decay must be True or False"),
  ("accumulator_dtype", jnp.int32, TypeError, r"accumulator_dtype must be None or a real float"),
  ("accumulator_dtype", "complex64", TypeError, r"accumulator_dtype must be None or a real float"),
  ("accumulator_dtype", "nonsense", TypeError, r"accumulator_dtype must be None or a floating"),
]


@pytest.mark.parametrize(("argument", "value", "error", "pattern"), BAD_VALUES)
def test_adadelta_rejects_bad_arguments_with_a_clear_message(argument, value, error, pattern):
  with pytest.raises(error, match=pattern):
    optax_adadelta.adadelta(**{argument: value})


@pytest.mark.parametrize(
  ("argument", "value", "error", "pattern"),
  [b for b in BAD_VALUES if b[0] in ("rho", "eps", "accumulator_dtype")],
)
def test_scale_by_adadelta_rejects_bad_arguments_too(argument, value, error, pattern):
  with pytest.raises(error, match=pattern):
    optax_adadelta.scale_by_adadelta(**{argument: value})


@pytest.mark.parametrize(
  "kwargs",
  [
    {"rho": 0.0},
    {"rho": 1.0},
    {"eps": 1e-30},
    {"learning_rate": 0.0},
    {"learning_rate": optax.linear_schedule(1.0, 0.0, 10)},
    {"learning_rate": jnp.asarray(0.5)},
    {"weight_decay": optax.constant_schedule(0.1)},
    {"accumulator_dtype": "bfloat16"},
  ],
)
def test_boundary_values_and_schedules_are_accepted(kwargs):
  tx = optax_adadelta.adadelta(**kwargs)
  params = jnp.ones(3)
  updates, _ = tx.update(jnp.ones(3), tx.init(params), params)
  assert np.isfinite(np.asarray(updates)).all()


def test_rho_of_one_reduces_to_sgd_with_the_learning_rate():
  # E[g²] stays 0 and E[Δx²] stays 0, so each step is exactly √ε/√ε · g = g.
  tx = optax_adadelta.adadelta(learning_rate=0.1, rho=1.0)
  state = tx.init(jnp.zeros(2))
  for g in (jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5])):
    updates, state = tx.update(g, state)
    np.testing.assert_allclose(updates, -0.1 * g, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_boolean_parameters_get_a_type_error_naming_the_leaf(dtype):
  params = {"layer": {"w": jnp.ones(2), "step": jnp.zeros((), dtype)}}
  with pytest.raises(TypeError, match=re.escape("['layer']['step'] has dtype")):
    optax_adadelta.adadelta().init(params)


def test_integer_gradients_get_a_type_error_naming_the_leaf():
  tx = optax_adadelta.adadelta()
  state = tx.init({"w": jnp.ones(2)})
  with pytest.raises(TypeError, match=re.escape("gradient at ['w'] has dtype int32")):
    tx.update({"w": jnp.ones(2, jnp.int32)}, state)


def test_a_mismatched_tree_shows_both_structures():
  tx = optax_adadelta.adadelta()
  state = tx.init({"w": jnp.ones(2), "b": jnp.ones(1)})
  with pytest.raises(ValueError, match="do not have the structure") as info:
    tx.update({"w": jnp.ones(2), "bias": jnp.ones(1)}, state)
  assert "'bias'" in str(info.value) and "'b'" in str(info.value)


def test_a_mismatched_tree_is_reported_under_jit_too():
  tx = optax_adadelta.adadelta()
  state = tx.init([jnp.ones(2), jnp.ones(1)])
  with pytest.raises(ValueError, match="gradients:"):
    jax.jit(tx.update)([jnp.ones(2)], state)


def test_a_mismatched_shape_names_the_leaf_and_both_shapes():
  tx = optax_adadelta.adadelta()
  state = tx.init({"w": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match=re.escape("['w'] has shape (3, 2) but its parameter had")):
    tx.update({"w": jnp.ones((3, 2))}, state)


def test_complex_gradient_for_a_real_parameter_is_a_type_error():
  tx = optax_adadelta.adadelta()
  state = tx.init(jnp.ones(2))
  with pytest.raises(TypeError, match="complex parameter needs complex gradients"):
    tx.update(jnp.ones(2, jnp.complex64), state)


def test_complex_parameters_reject_a_low_precision_accumulator():
  tx = optax_adadelta.adadelta(accumulator_dtype=jnp.bfloat16)
  with pytest.raises(TypeError, match="no complex counterpart"):
    tx.init({"z": jnp.ones(2, jnp.complex64)})


def test_none_leaves_pass_through_and_frozen_leaves_keep_their_state():
  tx = optax_adadelta.adadelta()
  params = {"w": jnp.ones(2), "frozen": None, "b": jnp.ones(1)}
  state = tx.init(params)
  assert optax.tree.get(state, "e_g2")["frozen"] is None
  updates, state = tx.update({"w": jnp.ones(2), "frozen": None, "b": jnp.ones(1)}, state)
  assert updates["frozen"] is None
  # A parameter with state whose gradient is None this step: skipped, state untouched.
  before = optax.tree.get(state, "e_g2")["b"]
  updates, state = tx.update({"w": jnp.ones(2), "frozen": None, "b": None}, state)
  assert updates["b"] is None
  np.testing.assert_array_equal(optax.tree.get(state, "e_g2")["b"], before)


def test_a_gradient_for_a_parameter_that_was_none_at_init_is_an_error():
  tx = optax_adadelta.adadelta()
  state = tx.init({"w": None})
  with pytest.raises(ValueError, match=re.escape("gradient at ['w'] is an array")):
    tx.update({"w": jnp.ones(2)}, state)


@pytest.mark.parametrize("params", [{}, [], (), {"a": []}, None])
def test_empty_trees_work(params):
  tx = optax_adadelta.adadelta()
  updates, _ = jax.jit(tx.update)(params, tx.init(params))
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_zero_size_arrays_work():
  tx = optax_adadelta.adadelta()
  params = {"empty": jnp.zeros((0, 3)), "w": jnp.ones(2)}
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params))
  assert updates["empty"].shape == (0, 3)
  assert optax.tree.get(state, "e_g2")["empty"].shape == (0, 3)


def test_update_without_params_works_when_nothing_needs_them():
  tx = optax_adadelta.adadelta(learning_rate=0.5, maximize=True)
  updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
  assert updates.shape == (2,)


def test_weight_decay_without_params_gets_optax_error():
  tx = optax_adadelta.adadelta(weight_decay=0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
