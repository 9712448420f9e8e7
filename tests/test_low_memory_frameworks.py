"""The low-memory states (#14) with Flax NNX, `jax.export`, PyTorch and Keras.

`nnx.Optimizer` carries the 8-bit and bfloat16 states (uint8 codes, int32 counter) and
trains as the functional optax loop on the same parameters; an exported training step
serializes the new state types and equals the jitted one bit for bit; `interop` exports the
averages dequantized to float32 (the conversion error is the quantization's, at most
2^(γ/2) − 1 = 3.3 % of each E) and refuses to load into a low-memory state.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta

FORMATS = {
  "8bit": {"state_bits": 8},
  "bf16_sr": {"accumulator_dtype": jnp.bfloat16, "stochastic_rounding": True},
}
GAMMA = 24 / 254

with contextlib.suppress(ValueError):  # optax's empty state, for the exported step's trees
  jax.export.register_namedtuple_serialization(optax.EmptyState, serialized_name="optax.EmptyState")


def _grads(seed, num, shape=(4, 1024)):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)} for _ in range(num)]


# Flax NNX ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_nnx_optimizer_trains_as_the_functional_loop_and_keeps_the_narrow_state(fmt):
  nnx = pytest.importorskip("flax.nnx")
  from optax_adadelta.demo import datasets

  data = datasets.load_digits()
  x, y = jnp.asarray(data.x_train[:400]), jnp.asarray(data.y_train[:400])

  class Net(nnx.Module):
    def __init__(self, rngs):  # 64 x 256 = 16,384 weights: 8-bit; 256 x 10: kept full
      self.hidden, self.out = nnx.Linear(64, 256, rngs=rngs), nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  def loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  tx = optax_adadelta.adadelta(**FORMATS[fmt])
  model = Net(nnx.Rngs(0))
  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)  # a twin: split shares Variables
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    value, grads = nnx.value_and_grad(loss)(model, x, y)
    optimizer.update(model, grads)
    return value

  @jax.jit
  def step(params, state, x, y):
    value, grads = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), x, y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  state = tx.init(params)
  losses = []
  for t in range(8):
    batch = slice(50 * t, 50 * (t + 1))
    losses.append(float(nnx_step(model, optimizer, x[batch], y[batch])))
    params, state, _ = step(params, state, x[batch], y[batch])
  assert losses[-1] < losses[0]
  got = jax.tree.leaves(nnx.state(model, nnx.Param))
  for a, b in zip(got, jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  opt_leaves = jax.tree.leaves(nnx.state(optimizer))
  want_dtypes = {jnp.dtype(a.dtype) for a in jax.tree.leaves(state)}
  assert {jnp.dtype(a.dtype) for a in opt_leaves} >= want_dtypes - {jnp.dtype(jnp.float32)}
  assert (jnp.dtype(jnp.uint8) if fmt == "8bit" else jnp.dtype(jnp.bfloat16)) in want_dtypes


@pytest.mark.slow
def test_an_nnx_functional_loop_trains_with_the_8bit_state():
  """nnx.split / nnx.merge and tx.update on trees of nnx.Param, as optax is used."""
  nnx = pytest.importorskip("flax.nnx")
  from optax_adadelta.demo import datasets

  data = datasets.load_digits()
  x, y = jnp.asarray(data.x_train[:400]), jnp.asarray(data.y_train[:400])
  graphdef, params = nnx.split(nnx.Linear(64, 256, rngs=nnx.Rngs(0)), nnx.Param)
  head = jax.random.normal(jax.random.key(1), (256, 10)) / 16
  tx = optax_adadelta.adadelta(state_bits=8)

  def loss(params, x, y):
    logits = jnp.tanh(nnx.merge(graphdef, params)(x)) @ head
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  state = tx.init(params)
  losses = []
  for t in range(8):
    params, state, value = step(params, state, x[50 * t : 50 * (t + 1)], y[50 * t : 50 * (t + 1)])
    losses.append(float(value))
  assert float(loss(params, x, y)) < losses[0]
  assert state[1].count == 8
  assert {a.dtype for a in jax.tree.leaves(state[1].e_g2)} == {
    jnp.dtype(jnp.uint8),
    jnp.dtype(jnp.float32),
  }


# jax.export ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_an_exported_training_step_serializes_the_state_and_equals_the_jitted_one(fmt):
  """Bit for bit against the jitted step lowered by XLA (export lowers the pure-JAX update).

  Against the native 8-bit kernel (the jitted step on CPU) the codes are equal or one apart
  and the floats within 2 ulp (the parameters: of the step): XLA, fusing the update into
  the parameter update, contracts multiply-adds differently from the update compiled
  alone, which the kernel matches to the bit (tests/test_native_8bit.py).
  """
  txs = {i: optax_adadelta.adadelta(**FORMATS[fmt], implementation=i) for i in ("auto", "jax")}
  params = {"w": jnp.zeros((4, 1024))}

  def train_step(params, state, g, implementation="jax"):
    updates, state = txs[implementation].update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = txs["jax"].init(params)
  for g in _grads(0, 2):
    params, state = jax.jit(train_step)(params, state, g)
  g = _grads(1, 1)[0]
  exported = jax.export.export(jax.jit(train_step), platforms=["cpu", "cuda"])(params, state, g)
  restored = jax.export.deserialize(exported.serialize())
  assert exported.in_tree == restored.in_tree
  got = restored.call(params, state, g)
  want = jax.jit(train_step)(params, state, g)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  native = jax.jit(functools.partial(train_step, implementation="auto"))(params, state, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(native), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.uint8:
      assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    else:
      np.testing.assert_allclose(a, b, rtol=2.5e-7, atol=1e-9)  # an ulp of the steps, ~1e-2


# PyTorch and Keras --------------------------------------------------------------------


def _np_dequantize(q):
  codes = np.asarray(q.codes, np.float64)
  level = np.where(codes == 0, 0.0, 2.0 ** (GAMMA * (codes - 255.0)))
  blocks = q.scale.shape[-1]
  grouped = level.reshape(*codes.shape[:-1], blocks, -1) * np.asarray(q.scale)[..., None]
  return grouped.reshape(codes.shape)


@pytest.fixture(scope="module")
def trained_8bit():
  tx = optax_adadelta.adadelta(state_bits=8)
  params = {"w": jnp.zeros((4, 1024))}
  state = tx.init(params)
  for g in _grads(5, 3):
    updates, state = jax.jit(tx.update)(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_to_torch_exports_the_dequantized_state_and_from_torch_refuses_it(trained_8bit):
  torch = pytest.importorskip("torch")
  from optax_adadelta import interop

  _, state = trained_8bit
  weight = torch.nn.Parameter(torch.zeros(4, 1024))
  exported = interop.to_torch(state, torch.optim.Adadelta([weight]).state_dict(), step=3)
  for key, q in (("square_avg", state[1].e_g2["w"]), ("acc_delta", state[1].e_dx2["w"])):
    np.testing.assert_allclose(exported["state"][0][key].numpy(), _np_dequantize(q), rtol=1e-6)
  with pytest.raises(ValueError, match="cannot load into a low-memory state"):
    interop.from_torch(state, exported)


def test_to_keras_writes_the_dequantized_state_and_from_keras_refuses_it(trained_8bit):
  keras = pytest.importorskip("keras")
  from optax_adadelta import interop

  params, state = trained_8bit
  variables = [keras.Variable(np.asarray(params["w"]))]
  optimizer = keras.optimizers.Adadelta(learning_rate=1.0, rho=0.95, epsilon=1e-6)
  optimizer.build(variables)
  interop.to_keras(state, optimizer, step=3)
  for slots, q in (
    (optimizer._accumulated_grads, state[1].e_g2["w"]),
    (optimizer._accumulated_delta_vars, state[1].e_dx2["w"]),
  ):
    np.testing.assert_allclose(np.asarray(slots[0].value), _np_dequantize(q), rtol=1e-6)
  with pytest.raises(ValueError, match="cannot load into a low-memory state"):
    interop.from_keras(state, optimizer)
