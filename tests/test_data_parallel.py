"""Data-parallel Adadelta over every device equals one device on the full batch.

Every parallel form (pmap + pmean, jit over a sharded batch with replicated or FSDP-sharded
parameters, shard_map, and a vmapped population of models on a 2-D mesh) is run for a few
steps and compared with a single-device run of the same steps on the whole batch, to a few
float32 ulps (only the order of the gradient sums differs), and with the float64
transcription of Algorithm 1. The latter is what the test proves on a machine with one
device (one GPU), where "every device" is that one device.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_adadelta
from tests import linear_model, reference
from tests.sharding_checks import assert_state_follows_params, needs_eight_devices

NUM_STEPS = 8
BATCH_SIZE = 32
CONFIGS = {
  "paper": {},
  "decayed": {"learning_rate": 0.5, "rho": 0.9, "eps": 1e-5, "weight_decay": 1e-2},
}
# A sum over 8 shards instead of one: a few ulps in each gradient, not amplified by Adadelta.
PARALLEL_TOLERANCE = {"rtol": 2e-6, "atol": 1e-7}
# float32 against float64 after NUM_STEPS steps.
REFERENCE_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
# The batch (32 rows) and, with FSDP, the parameters (8 rows) are split over every device.
splits_the_batch = pytest.mark.skipif(
  8 % jax.device_count() != 0,
  reason=f"splits 8 parameter rows over every device; jax has {jax.device_count()} devices",
)


@pytest.fixture(scope="module", autouse=True)
def float32_matmuls():
  """On GPUs (TF32) and TPUs (bfloat16 passes) the default precision of float32 matmuls is
  lower than float32's, far from the float64 reference; CPUs compute in float32 anyway."""
  with jax.default_matmul_precision("highest"):
    yield


def _train_step(tx, params, opt_state, x, y):
  grads = jax.grad(linear_model.loss)(params, x, y)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _single_device_run(config):
  tx = optax_adadelta.adadelta(**config)
  device = jax.devices()[0]
  params = jax.device_put(linear_model.init_params(), device)
  xs, ys = jax.device_put(linear_model.batches(NUM_STEPS, BATCH_SIZE), device)
  opt_state = tx.init(params)
  step = jax.jit(lambda p, s, x, y: _train_step(tx, p, s, x, y))
  for t in range(NUM_STEPS):
    params, opt_state = step(params, opt_state, xs[t], ys[t])
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config_and_expected(request):
  """(config, (single-device parameters, float64 reference parameters)); the first checked
  against the second."""
  config = CONFIGS[request.param]
  expected = _single_device_run(config)
  params = linear_model.init_params()
  xs, ys = linear_model.batches(NUM_STEPS, BATCH_SIZE)
  oracle = reference.run(
    [params["w"], params["b"]],
    lambda x, t: linear_model.numpy_gradients(*x, xs[t], ys[t]),
    NUM_STEPS,
    learning_rate=config.get("learning_rate", 1.0),
    rho=config.get("rho", 0.95),
    eps=config.get("eps", 1e-6),
    weight_decay=config.get("weight_decay", 0.0),
  )
  oracle = {"w": oracle.params[0], "b": oracle.params[1]}
  for name in oracle:
    np.testing.assert_allclose(expected[name], oracle[name], **REFERENCE_TOLERANCE, err_msg=name)
  return config, (expected, oracle)


def _assert_matches(params, expected):
  """Equal to the single-device run (a few ulps) and to the float64 reference."""
  single, oracle = expected
  got = jax.tree.map(np.asarray, params)
  worst = max(float(np.max(np.abs(got[k] - single[k]))) for k in single)
  print(f"max |parallel - single device| = {worst:.3g}")  # shown by pytest -rP
  for name in single:
    np.testing.assert_allclose(got[name], single[name], **PARALLEL_TOLERANCE, err_msg=name)
    np.testing.assert_allclose(got[name], oracle[name], **REFERENCE_TOLERANCE, err_msg=name)


@splits_the_batch
def test_pmap_with_pmean_of_gradients_matches_single_device(config_and_expected):
  config, expected = config_and_expected
  tx = optax_adadelta.adadelta(**config)
  n = jax.local_device_count()
  xs, ys = linear_model.batches(NUM_STEPS, BATCH_SIZE)
  xs = xs.reshape(NUM_STEPS, n, BATCH_SIZE // n, -1)
  ys = ys.reshape(NUM_STEPS, n, BATCH_SIZE // n, -1)

  def step(params, opt_state, x, y):
    grads = jax.lax.pmean(jax.grad(linear_model.loss)(params, x, y), "batch")
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(lambda p: np.stack([p] * n), linear_model.init_params())
  opt_state = jax.pmap(tx.init)(params)
  pstep = jax.pmap(step, axis_name="batch")
  for t in range(NUM_STEPS):
    params, opt_state = pstep(params, opt_state, xs[t], ys[t])
  for replica in range(n):
    _assert_matches(jax.tree.map(lambda p, r=replica: p[r], params), expected)


@splits_the_batch
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_jit_over_sharded_batch_matches_single_device(config_and_expected, layout, axis_type):
  config, expected = config_and_expected
  tx = optax_adadelta.adadelta(**config)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
  batch = NamedSharding(mesh, P("data"))
  gathered = NamedSharding(mesh, P())
  stored = NamedSharding(mesh, P("data") if layout == "fsdp" else P())
  params = jax.device_put(linear_model.init_params(), stored)
  xs, ys = linear_model.batches(NUM_STEPS, BATCH_SIZE)

  def step(params, opt_state, x, y):
    # FSDP: gather the parameters for the forward pass; their gradients come back sharded.
    gather = (
      jax.sharding.reshard if axis_type == AxisType.Explicit else jax.lax.with_sharding_constraint
    )
    grads = jax.grad(
      lambda p: linear_model.loss(jax.tree.map(lambda q: gather(q, gathered), p), x, y)
    )(params)
    grads = jax.tree.map(lambda g: jax.lax.with_sharding_constraint(g, stored), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with jax.set_mesh(mesh):
    opt_state = tx.init(params)
    assert_state_follows_params(opt_state, params)
    jstep = jax.jit(step, donate_argnums=(0, 1))
    for t in range(NUM_STEPS):
      x, y = jax.device_put((xs[t], ys[t]), batch)
      params, opt_state = jstep(params, opt_state, x, y)
      assert params["w"].sharding.is_equivalent_to(stored, 2)
      assert_state_follows_params(opt_state, params)
  _assert_matches(params, expected)


@splits_the_batch
@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_shard_map_step_with_optimizer_inside_matches_single_device(config_and_expected, layout):
  config, expected = config_and_expected
  tx = optax_adadelta.adadelta(**config)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  spec = P("data") if layout == "fsdp" else P()

  def local_step(params, opt_state, x, y):
    # Differentiate the global mean loss: shard_map's autodiff then sums the gradients of
    # replicated parameters (or reduce-scatters those of sharded ones). A pmean of local
    # gradients would be wrong here: they already arrive summed over the devices.
    def global_loss(params):
      if layout == "fsdp":  # each device keeps a slice of every parameter and of the state
        params = jax.tree.map(lambda p: jax.lax.all_gather(p, "data", tiled=True), params)
      return jax.lax.pmean(linear_model.loss(params, x, y), "data")

    grads = jax.grad(global_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(
    jax.shard_map(
      local_step, mesh=mesh, in_specs=(spec, spec, P("data"), P("data")), out_specs=(spec, spec)
    )
  )
  params = jax.device_put(linear_model.init_params(), NamedSharding(mesh, spec))
  opt_state = tx.init(params)
  xs, ys = linear_model.batches(NUM_STEPS, BATCH_SIZE)
  for t in range(NUM_STEPS):
    x, y = jax.device_put((xs[t], ys[t]), NamedSharding(mesh, P("data")))
    params, opt_state = step(params, opt_state, x, y)
  assert_state_follows_params(opt_state, params)
  _assert_matches(params, expected)


@needs_eight_devices
def test_vmapped_population_on_a_2d_mesh_matches_the_reference_per_member():
  """One model per ρ: members sharded over "population", each member's batch over "data"."""
  rhos = np.array([0.5, 0.8, 0.9, 0.95], np.float32)
  mesh = jax.make_mesh((len(rhos), jax.device_count() // len(rhos)), ("population", "data"))
  members = NamedSharding(mesh, P("population"))
  params = jax.device_put(
    jax.tree.map(lambda p: np.stack([p] * len(rhos)), linear_model.init_params()), members
  )
  rhos_on_mesh = jax.device_put(rhos, members)
  xs, ys = linear_model.batches(NUM_STEPS, BATCH_SIZE)

  def member_step(rho, params, opt_state, x, y):
    return _train_step(optax_adadelta.adadelta(rho=rho), params, opt_state, x, y)

  with jax.set_mesh(mesh):
    opt_state = jax.vmap(lambda rho, p: optax_adadelta.adadelta(rho=rho).init(p))(
      rhos_on_mesh, params
    )
    assert_state_follows_params(opt_state, params)
    step = jax.jit(jax.vmap(member_step, in_axes=(0, 0, 0, None, None)))
    for t in range(NUM_STEPS):
      x, y = jax.device_put((xs[t], ys[t]), NamedSharding(mesh, P("data")))
      params, opt_state = step(rhos_on_mesh, params, opt_state, x, y)
      assert_state_follows_params(opt_state, params)

  final = jax.tree.map(np.asarray, params)
  start = linear_model.init_params()
  for i, rho in enumerate(rhos):
    oracle = reference.run(
      [start["w"], start["b"]],
      lambda x, t: linear_model.numpy_gradients(*x, xs[t], ys[t]),
      NUM_STEPS,
      rho=float(rho),
    )
    np.testing.assert_allclose(final["w"][i], oracle.params[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(final["b"][i], oracle.params[1], rtol=1e-4, atol=1e-6)
