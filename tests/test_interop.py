"""State conversion to and from the real PyTorch and Keras optimizers.

Each test trains k steps in one library, converts the state, continues in the other, and
compares with continuing in the first library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_adadelta import interop, presets
from tests import parity, parity_cases

K, M = 12, 12  # steps before and after the hand-over
CASE = parity_cases._case("interop", "torch", steps=K + M, seed=11)
COMPLEX_CASE = parity_cases._case("interop-complex", "torch", steps=K + M, seed=12, complex=True)


def _ours_continue(tx, opt_state, params, grads):
  trajectory = []
  for g in grads:
    updates, opt_state = tx.update([jnp.asarray(x) for x in g], opt_state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append([np.asarray(p) for p in params])
  return trajectory, opt_state


def _assert_close(ours, theirs):
  error, where = parity.worst_relative_error({"params": ours}, {"params": theirs})
  assert error <= 2e-6, f"relative error {error:.2e} in {where}"


@pytest.fixture
def torch():
  parity.live_peer("torch")
  import torch

  return torch


def _torch_run(torch, params0, grads, optimizer_state=None, **kwargs):
  params = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in params0]
  optimizer = torch.optim.Adadelta(params, **kwargs)
  if optimizer_state is not None:
    optimizer.load_state_dict(optimizer_state)
  trajectory = []
  for g in grads:
    for p, gi in zip(params, g, strict=True):
      p.grad = torch.from_numpy(np.array(gi))
    optimizer.step()
    trajectory.append([p.detach().numpy().copy() for p in params])
  return trajectory, optimizer


@pytest.mark.parametrize("case", [CASE, COMPLEX_CASE], ids=["real", "complex"])
def test_a_pytorch_run_continues_here(torch, case):
  params0, grads = parity_cases.inputs(case)
  full, _ = _torch_run(torch, params0, grads, rho=0.95, weight_decay=0.01)
  first, optimizer = _torch_run(torch, params0, grads[:K], rho=0.95, weight_decay=0.01)

  tx = presets.pytorch(rho=0.95, weight_decay=0.01)
  params = [jnp.asarray(p) for p in first[-1]]
  opt_state = interop.from_torch(tx.init(params), optimizer.state_dict())
  rest, _ = _ours_continue(tx, opt_state, params, grads[K:])
  _assert_close(rest, full[K:])


def test_a_run_here_continues_in_pytorch_with_a_schedule(torch):
  params0, grads = parity_cases.inputs(CASE)
  schedule = lambda count: 0.9 * jnp.asarray(0.97, jnp.float32) ** count
  tx = presets.pytorch(lr=schedule)
  params = [jnp.asarray(p) for p in params0]
  first, opt_state = _ours_continue(tx, tx.init(params), params, grads[:K])
  rest_here, _ = _ours_continue(tx, opt_state, [jnp.asarray(p) for p in first[-1]], grads[K:])

  torch_params = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in first[-1]]
  optimizer = torch.optim.Adadelta(torch_params, lr=0.9)
  optimizer.load_state_dict(interop.to_torch(opt_state, optimizer.state_dict()))
  assert int(optimizer.state_dict()["state"][0]["step"]) == K
  rest_there = []
  for t, g in enumerate(grads[K:]):
    for group in optimizer.param_groups:
      group["lr"] = 0.9 * 0.97 ** (K + t)
    for p, gi in zip(torch_params, g, strict=True):
      p.grad = torch.from_numpy(np.array(gi))
    optimizer.step()
    rest_there.append([p.detach().numpy().copy() for p in torch_params])
  _assert_close(rest_here, rest_there)


@pytest.fixture
def keras():
  parity.live_peer("keras")
  import keras

  return keras


def _keras_run(keras, variables, grads, optimizer):
  trajectory = []
  for g in grads:
    optimizer.apply([np.array(x) for x in g], variables)
    trajectory.append([np.asarray(v.value) for v in variables])
  return trajectory


KERAS_SETTINGS = {"learning_rate": 1.0, "weight_decay": 0.02, "use_ema": True, "ema_momentum": 0.9}


def test_a_keras_run_continues_here_with_its_ema(keras):
  params0, grads = parity_cases.inputs(CASE)
  variables = [keras.Variable(np.array(p)) for p in params0]
  optimizer = keras.optimizers.Adadelta(**KERAS_SETTINGS)
  first = _keras_run(keras, variables, grads[:K], optimizer)
  clone, clone_variables = _copy_keras(keras, optimizer, first[-1])
  rest_there = _keras_run(keras, clone_variables, grads[K:], clone)

  tx = presets.keras(**KERAS_SETTINGS)
  params = [jnp.asarray(p) for p in first[-1]]
  opt_state = interop.from_keras(tx.init(params), optimizer)
  rest_here, opt_state = _ours_continue(tx, opt_state, params, grads[K:])
  _assert_close(rest_here, rest_there)
  ema_there = [np.asarray(v.value) for v in clone._model_variables_moving_average]
  _assert_close([np.asarray(x) for x in optax.tree.get(opt_state, "ema")], ema_there)


def _copy_keras(keras, optimizer, values):
  """A second Keras optimizer in the same state, on fresh variables holding `values`.

  Continuing the original optimizer would move its state on; the test continues this one and
  converts the untouched original.
  """
  variables = [keras.Variable(np.array(v)) for v in values]
  clone = keras.optimizers.Adadelta(**KERAS_SETTINGS)
  clone.build(variables)
  clone.set_weights([np.asarray(v.value) for v in optimizer.variables])
  return clone, variables


def test_a_run_here_continues_in_keras(keras):
  params0, grads = parity_cases.inputs(CASE)
  tx = presets.keras(**KERAS_SETTINGS)
  params = [jnp.asarray(p) for p in params0]
  first, opt_state = _ours_continue(tx, tx.init(params), params, grads[:K])
  rest_here, _ = _ours_continue(tx, opt_state, [jnp.asarray(p) for p in first[-1]], grads[K:])

  variables = [keras.Variable(np.array(p)) for p in first[-1]]
  optimizer = keras.optimizers.Adadelta(**KERAS_SETTINGS)
  optimizer.build(variables)
  interop.to_keras(opt_state, optimizer)
  assert int(optimizer.iterations) == K
  _assert_close(rest_here, _keras_run(keras, variables, grads[K:], optimizer))


# TensorFlow.js: the accumulators and the iteration count of getWeights() ----------------

TFJS_KWARGS = {"learning_rate": 0.5}
TFJS_CASE = parity_cases._case("interop-tfjs", "tfjs", TFJS_KWARGS, steps=K + M, seed=13)


@pytest.fixture
def tfjs():
  return parity.live_peer("tfjs")


def _flat(trajectory):
  return [[np.asarray(x).ravel() for x in step] for step in trajectory]


def test_the_tfjs_preset_counts_steps_and_exports_them_as_iter():
  tx = presets.tfjs()
  params = [jnp.ones((2, 3)), jnp.ones(4)]
  opt_state = tx.init(params)
  for _ in range(3):
    _, opt_state = tx.update([jnp.full((2, 3), 0.5), jnp.full(4, -1.0)], opt_state)
  weights = interop.to_tfjs(opt_state, ["w", "b"])
  assert [name for name, _ in weights] == [
    "iter", "w/accum_grad", "b/accum_grad", "w/accum_var", "b/accum_var",
  ]  # fmt: skip
  assert weights[0][1].dtype == np.int32 and int(weights[0][1]) == 3
  back = interop.from_tfjs(tx.init(params), weights)
  assert int(optax.tree.get(back, "count")) == 3
  for field in ("e_g2", "e_dx2"):
    for a, b in zip(jax.tree.leaves(optax.tree.get(back, field)),
                    jax.tree.leaves(optax.tree.get(opt_state, field)), strict=True):  # fmt: skip
      np.testing.assert_array_equal(a, b)


def test_a_tfjs_run_continues_here_with_its_iteration_count(tfjs):
  params0, grads = parity_cases.inputs(TFJS_CASE)
  full, _, _ = tfjs.run_with_weights(TFJS_CASE, params0, grads)
  first, iterations, weights = tfjs.run_with_weights(TFJS_CASE, params0, grads[:K])
  assert iterations == K and weights[0][0] == "iter" and int(weights[0][1]) == K

  tx = presets.tfjs(**TFJS_KWARGS)
  params = [jnp.asarray(p.reshape(p0.shape)) for p, p0 in zip(first[-1], params0, strict=True)]
  opt_state = interop.from_tfjs(tx.init(params), weights)
  assert int(optax.tree.get(opt_state, "count")) == K
  rest, opt_state = _ours_continue(tx, opt_state, params, grads[K:])
  _assert_close(_flat(rest), full[K:])
  assert int(optax.tree.get(opt_state, "count")) == K + M


def test_a_run_here_continues_in_tfjs_with_its_iteration_count(tfjs):
  params0, grads = parity_cases.inputs(TFJS_CASE)
  tx = presets.tfjs(**TFJS_KWARGS)
  params = [jnp.asarray(p) for p in params0]
  first, opt_state = _ours_continue(tx, tx.init(params), params, grads[:K])
  rest_here, final_state = _ours_continue(
    tx, opt_state, [jnp.asarray(p) for p in first[-1]], grads[K:]
  )
  names = [f"leaf{i}" for i in range(len(params0))]
  rest_there, iterations, saved = tfjs.run_with_weights(
    TFJS_CASE, first[-1], grads[K:], interop.to_tfjs(opt_state, names)
  )
  _assert_close(rest_there, _flat(rest_here))
  assert iterations == K + M  # TF.js restored the count and went on counting
  back = interop.from_tfjs(tx.init(params), saved)  # and its saved state loads here again
  assert int(optax.tree.get(back, "count")) == K + M
  for field in ("e_g2", "e_dx2"):
    got = jax.tree.leaves(optax.tree.get(back, field))
    want = jax.tree.leaves(optax.tree.get(final_state, field))
    _assert_close([[np.asarray(x) for x in got]], [[np.asarray(x) for x in want]])


def _tfjs_weights(iteration=2, suffixes=("accum_grad", "accum_var"), count=1):
  weights = [("iter", np.asarray(iteration, np.int32))]
  for suffix in suffixes:
    weights += [(f"v{i}/{suffix}", np.ones(2, np.float32)) for i in range(count)]
  return weights


@pytest.mark.parametrize(
  ("weights", "pattern"),
  [
    (_tfjs_weights()[1:], "must start with TF.js's iteration count 'iter'"),
    (_tfjs_weights(count=2), "TF.js saved 4 accumulators, but the optax state has 1 leaves"),
    (
      _tfjs_weights(suffixes=("m", "v")),
      r"'v0/m' is where tf.train.adadelta keeps a '\*/accum_grad'",
    ),
    (_tfjs_weights(iteration=-1), "iteration count 'iter' must be a whole number >= 0"),
    ({"iter": 1}, "weights must be the list TF.js's optimizer.getWeights"),
  ],
  ids=["no-iter", "too-many", "not-adadelta", "negative-iter", "a-dict"],
)
def test_from_tfjs_names_what_does_not_fit(weights, pattern):
  with pytest.raises(ValueError, match=pattern):
    interop.from_tfjs(presets.tfjs().init([jnp.ones(2)]), weights)


def test_from_tfjs_refuses_a_shape_that_is_neither_flat_nor_equal():
  weights = _tfjs_weights()
  weights[1] = ("v0/accum_grad", np.ones((3, 2), np.float32))
  with pytest.raises(ValueError, match=r"parameter 0: TF.js.s saved state has shape \(3, 2\)"):
    interop.from_tfjs(presets.tfjs().init([jnp.ones((2, 3))]), weights)


def test_to_tfjs_needs_a_step_when_the_state_counts_none():
  with pytest.raises(ValueError, match="pass step="):
    interop.to_tfjs(presets.pytorch().init([jnp.ones(2)]))
  assert int(interop.to_tfjs(presets.pytorch().init([jnp.ones(2)]), step=7)[0][1]) == 7


# Errors -------------------------------------------------------------------------------


def test_from_torch_rejects_a_different_number_of_parameters(torch):
  params0, grads = parity_cases.inputs(CASE)
  _, optimizer = _torch_run(torch, params0[:1], [g[:1] for g in grads[:2]])
  tx = presets.pytorch()
  with pytest.raises(ValueError, match="1 parameters but the optax state has 2 leaves"):
    interop.from_torch(tx.init([jnp.asarray(p) for p in params0]), optimizer.state_dict())


def test_from_torch_rejects_a_shape_mismatch(torch):
  params0, grads = parity_cases.inputs(CASE)
  _, optimizer = _torch_run(torch, params0, grads[:2])
  transposed = [jnp.asarray(params0[0]), jnp.asarray(params0[1]).T]
  with pytest.raises(ValueError, match=r"parameter 1: the PyTorch state_dict has shape \(2, 3\)"):
    interop.from_torch(presets.pytorch().init(transposed), optimizer.state_dict())


def test_to_torch_needs_a_step_when_the_state_counts_none(torch):
  params = [torch.nn.Parameter(torch.ones(2))]
  optimizer = torch.optim.Adadelta(params)
  opt_state = presets.pytorch().init([jnp.ones(2)])
  with pytest.raises(ValueError, match="pass step="):
    interop.to_torch(opt_state, optimizer.state_dict())


def test_conversion_needs_an_adadelta_state():
  with pytest.raises(ValueError, match="exactly one ScaleByAdadeltaState, found 0"):
    interop.from_torch(optax.adam(1e-3).init([jnp.ones(2)]), {"state": {}, "param_groups": []})


def test_from_keras_needs_a_built_optimizer(keras):
  with pytest.raises(ValueError, match="build the Keras optimizer first"):
    interop.from_keras(presets.keras().init([jnp.ones(2)]), keras.optimizers.Adadelta())


@pytest.mark.parametrize(
  ("state_dict", "got"),
  [
    ([1, 2], "got list"),
    ({"param_groups": []}, r"got \['param_groups'\]"),
    ({"state": {}}, r"got \['state'\]"),
  ],
  ids=["not_a_dict", "no_state", "no_param_groups"],
)
def test_from_torch_rejects_what_is_not_a_state_dict_naming_it(state_dict, got):
  opt_state = presets.pytorch().init([jnp.ones(2)])
  with pytest.raises(ValueError, match=r"state_dict must be torch.optim.Adadelta.*" + got):
    interop.from_torch(opt_state, state_dict)


def _state_dict(**per_parameter):
  """A state_dict as torch.optim.Adadelta writes it, for two parameters of shape (2,)."""
  state = {
    i: {"step": np.float32(s), "square_avg": np.ones(2, np.float32), "acc_delta": np.ones(2)}
    for i, s in per_parameter["steps"].items()
  }
  for i, missing in per_parameter.get("missing", {}).items():
    del state[i][missing]
  return {"state": state, "param_groups": [{"params": [0, 1], "lr": 1.0}]}


def test_from_torch_rejects_a_state_missing_a_key_naming_it():
  opt_state = presets.pytorch().init([jnp.ones(2), jnp.ones(2)])
  with pytest.raises(ValueError, match=r"PyTorch parameter 1 has no \['acc_delta'\]"):
    interop.from_torch(opt_state, _state_dict(steps={0: 3, 1: 3}, missing={1: "acc_delta"}))


def test_from_torch_rejects_parameters_with_different_step_counts():
  opt_state = presets.pytorch().init([jnp.ones(2), jnp.ones(2)])
  with pytest.raises(ValueError, match=r"different step counts \[3, 4\]"):
    interop.from_torch(opt_state, _state_dict(steps={0: 3, 1: 4}))


def test_from_torch_rejects_a_real_state_for_complex_parameters():
  opt_state = presets.pytorch().init([jnp.ones(2, jnp.complex64), jnp.ones(2)])
  with pytest.raises(TypeError, match=r"parameter 0: .* has dtype float32, the optax state "):
    interop.from_torch(opt_state, _state_dict(steps={0: 3, 1: 3}))


def test_keras_gradient_accumulation_is_refused_naming_the_setting(keras):
  variables = [keras.Variable(np.ones(2, np.float32))]
  optimizer = keras.optimizers.Adadelta(gradient_accumulation_steps=2)
  optimizer.build(variables)
  opt_state = presets.keras().init([jnp.ones(2)])
  with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2"):
    interop.from_keras(opt_state, optimizer)
  with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2"):
    interop.to_keras(opt_state, optimizer)
