"""Checkpoints of (params, opt_state, step): exact round trips, exact resumption, clear
refusals of a checkpoint that does not fit, and no pickle.

Orbax (through `optax_adadelta.checkpoint`) and flax's msgpack serialization are tested.
The resumed runs are compared with uninterrupted ones bit for bit.
"""

import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("orbax.checkpoint", reason="needs orbax-checkpoint (the [checkpoint] extra)")
pytest.importorskip("flax", reason="needs flax (the [notebooks] extra)")
import flax.serialization
import orbax.checkpoint as ocp

import optax_adadelta
from optax_adadelta import checkpoint
from tests import linear_model
from tests.sharding_checks import assert_state_follows_params, needs_eight_devices

NUM_STEPS = 6
BATCH_SIZE = 16
LAYOUTS = {  # ndim -> spec on a ("data", "model") mesh of 4 x 2 devices
  "one_device": None,
  "replicated": {0: P(), 1: P(), 2: P()},
  "rows": {0: P(), 1: P("data"), 2: P("data")},
  "2d": {0: P(), 1: P(("data", "model")), 2: P("data", "model")},
}


def _optimizer(name):
  if name == "paper":
    return optax_adadelta.adadelta()
  # State with an int32 step count that a resumed run must restore for the schedule.
  schedule = optax.exponential_decay(1.0, transition_steps=2, decay_rate=0.5)
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax_adadelta.adadelta(learning_rate=schedule, rho=0.9, weight_decay=1e-2),
  )


def _mesh():
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def _put(tree, mesh, layout):
  if LAYOUTS[layout] is None:
    return jax.device_put(tree, jax.devices()[0])
  return jax.tree.map(
    lambda a: jax.device_put(a, NamedSharding(mesh, LAYOUTS[layout][np.ndim(a)])), tree
  )


def _assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _train(tx, params, opt_state, steps, mesh):
  xs, ys = linear_model.batches(NUM_STEPS, BATCH_SIZE)

  def gathered_loss(params, x, y):  # sharded parameters are gathered for the forward pass
    return linear_model.loss(jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params), x, y)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(gathered_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for t in steps:
    x, y = jax.device_put((xs[t], ys[t]), NamedSharding(mesh, P("data")))
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


@needs_eight_devices
@pytest.mark.parametrize(
  ("saved_layout", "restored_layout"),
  [("one_device", "2d"), ("replicated", "rows"), ("2d", "rows"), ("rows", "one_device")],
)
def test_orbax_round_trip_is_bit_exact_and_takes_the_template_shardings(
  saved_layout, restored_layout, tmp_path
):
  mesh = _mesh()
  tx = _optimizer("decayed")
  with jax.set_mesh(mesh):
    params = _put(linear_model.init_params(), mesh, "2d")
    params, opt_state = _train(tx, params, tx.init(params), range(3), mesh)
    params, opt_state = _put((params, opt_state), mesh, saved_layout)
    checkpoint.save(tmp_path / "ckpt", params, opt_state, step=3)

    template = _put(linear_model.init_params(), mesh, restored_layout)
    restored = checkpoint.restore(tmp_path / "ckpt", template, tx.init(template))
  assert restored.step == 3
  _assert_bitwise_equal(restored.params, params)
  _assert_bitwise_equal(restored.opt_state, opt_state)
  assert_state_follows_params(restored.opt_state, template)
  assert_state_follows_params(restored.opt_state, restored.params)


@needs_eight_devices
@pytest.mark.parametrize("optimizer", ["paper", "decayed"])
def test_run_interrupted_and_resumed_from_a_sharded_checkpoint_is_bit_identical(
  optimizer, tmp_path
):
  interrupt_at = 2
  mesh = _mesh()
  tx = _optimizer(optimizer)
  with jax.set_mesh(mesh):
    params = _put(linear_model.init_params(), mesh, "rows")
    uninterrupted = _train(tx, params, tx.init(params), range(NUM_STEPS), mesh)

    params, opt_state = _train(tx, params, tx.init(params), range(interrupt_at), mesh)
    checkpoint.save(tmp_path / "ckpt", params, opt_state, step=interrupt_at)
    del params, opt_state  # the "crash"

    # A new process would only know the shapes: restore into abstract templates.
    abstract_params = jax.eval_shape(lambda: _put(linear_model.init_params(), mesh, "rows"))
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    params, opt_state, step = checkpoint.restore(tmp_path / "ckpt", abstract_params, abstract_state)
    resumed = _train(tx, params, opt_state, range(step, NUM_STEPS), mesh)
  _assert_bitwise_equal(resumed, uninterrupted)
  assert_state_follows_params(resumed[1], resumed[0])


def _save_small(directory, tx, config=None):
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  opt_state = tx.init(params)
  checkpoint.save(directory, params, opt_state, step=7, config=config)
  return params, opt_state


OTHER_OPTIMIZERS = {
  "maximize": optax_adadelta.adadelta(maximize=True),
  "bfloat16_state": optax_adadelta.adadelta(accumulator_dtype=jnp.bfloat16),
  "inject_hyperparams": optax.inject_hyperparams(optax_adadelta.adadelta)(),
  "optax_adadelta": optax.adadelta(1.0),
  "adam": optax.adam(1e-3),
}


@pytest.mark.parametrize("other", sorted(OTHER_OPTIMIZERS))
def test_restore_into_another_optimizer_configuration_fails_listing_the_differences(
  other, tmp_path
):
  params, _ = _save_small(tmp_path / "ckpt", optax_adadelta.adadelta())
  with pytest.raises(ValueError, match=r"does not fit the params and opt_state") as error:
    checkpoint.restore(tmp_path / "ckpt", params, OTHER_OPTIMIZERS[other].init(params))
  assert "['opt_state']" in str(error.value)


def test_restore_of_a_float32_state_into_bfloat16_names_both_dtypes(tmp_path):
  """Orbax alone would cast silently; the signature check refuses."""
  params, _ = _save_small(tmp_path / "ckpt", optax_adadelta.adadelta())
  bf16_state = optax_adadelta.adadelta(accumulator_dtype=jnp.bfloat16).init(params)
  with pytest.raises(ValueError) as error:
    checkpoint.restore(tmp_path / "ckpt", params, bf16_state)
  assert re.search(
    r"\['opt_state'\]\[\d\]\.e_g2\['w'\]: "
    r"float32\[3,2\] in the checkpoint, bfloat16\[3,2\] in the target",
    str(error.value),
  ), str(error.value)


@pytest.mark.parametrize(
  ("params", "expected"),
  [
    (
      {"w": jnp.ones((3, 2))},
      "['params']['b']: float32[2] in the checkpoint, absent from the target",
    ),
    (
      {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "c": jnp.zeros(1)},
      "['params']['c']: float32[1] in the target, absent from the checkpoint",
    ),
    (
      {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)},
      "['params']['w']: float32[3,2] in the checkpoint, float32[2,3] in the target",
    ),
    ([jnp.ones((3, 2)), jnp.zeros(2)], "['params'][0]: float32[3,2] in the target, absent"),
  ],
  ids=["missing_leaf", "extra_leaf", "transposed", "list_not_dict"],
)
def test_restore_into_another_tree_structure_fails_naming_the_leaf(params, expected, tmp_path):
  tx = optax_adadelta.adadelta()
  _save_small(tmp_path / "ckpt", tx)
  with pytest.raises(ValueError) as error:
    checkpoint.restore(tmp_path / "ckpt", params, tx.init(params))
  assert expected in str(error.value)


@pytest.mark.parametrize("other", [{"rho": 0.9}, {"weight_decay": 0.1}])
def test_restore_with_other_hyper_parameters_fails_although_the_states_look_alike(other, tmp_path):
  saved = {"rho": 0.95, "eps": 1e-6, "weight_decay": 0.0}
  params, opt_state = _save_small(tmp_path / "ckpt", optax_adadelta.adadelta(), config=saved)
  look_alike = optax_adadelta.adadelta(**other).init(params)
  assert jax.tree.structure(look_alike) == jax.tree.structure(opt_state)
  # Without a config, nothing could tell them apart.
  checkpoint.restore(tmp_path / "ckpt", params, look_alike)
  other = {**saved, **other}
  with pytest.raises(ValueError, match=r"saved with config .*0\.95.* given config "):
    checkpoint.restore(tmp_path / "ckpt", params, opt_state, config=other)
  restored = checkpoint.restore(tmp_path / "ckpt", params, opt_state, config=saved)
  assert restored.step == 7


def test_restore_refuses_a_checkpoint_without_a_signature(tmp_path):
  params = {"w": jnp.ones((3, 2))}
  opt_state = optax_adadelta.adadelta().init(params)
  with ocp.StandardCheckpointer() as plain:
    plain.save(tmp_path / "plain", {"params": params, "opt_state": opt_state, "step": 1})
  with pytest.raises(ValueError, match=r"not written by optax_adadelta\.checkpoint\.save"):
    checkpoint.restore(tmp_path / "plain", params, opt_state)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"step": 1.5}, "step must be a Python int, got 1.5"),
    ({"step": True}, "step must be a Python int, got True"),
    ({"step": 1, "config": {"dtype": jnp.float32}}, "config must map names to JSON values"),
  ],
)
def test_save_rejects_a_bad_step_or_config_naming_it(kwargs, match, tmp_path):
  params = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match=match):
    checkpoint.save(tmp_path / "ckpt", params, optax_adadelta.adadelta().init(params), **kwargs)


def test_save_and_restore_never_pickle(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("pickle was used")

  for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  tx = _optimizer("decayed")
  params, opt_state = _save_small(tmp_path / "ckpt", tx)
  restored = checkpoint.restore(tmp_path / "ckpt", params, opt_state)
  _assert_bitwise_equal(restored.opt_state, opt_state)


@pytest.mark.parametrize("optimizer", ["paper", "decayed"])
def test_state_round_trips_through_flax_msgpack_bit_for_bit(optimizer):
  tx = _optimizer(optimizer)
  params = jax.tree.map(jnp.asarray, linear_model.init_params())
  xs, ys = linear_model.batches(3, BATCH_SIZE)
  opt_state = tx.init(params)
  for t in range(3):  # a state that is not all zeros, with a step count of 3
    updates, opt_state = tx.update(
      jax.grad(linear_model.loss)(params, xs[t], ys[t]), opt_state, params
    )
    params = optax.apply_updates(params, updates)
  blob = flax.serialization.to_bytes(opt_state)
  restored = flax.serialization.from_bytes(tx.init(params), blob)
  _assert_bitwise_equal(restored, opt_state)
  assert jax.tree.structure(restored) == jax.tree.structure(opt_state)  # NamedTuples kept
