"""ZeRO-1: replicated parameters, Adadelta state split over the data axis of 8 devices.

The split-state step is compared with the same data-parallel step whose state is
replicated (the layout the package uses by default), step by step from identical inputs,
to 1 ulp; whole runs are also checked against the float64 transcription of Algorithm 1.
Per-device bytes are read from the arrays' shards and from the compiled step's memory
analysis, and compared with numbers worked out by hand from the shapes.
"""

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_adadelta
import optax_adadelta.sharding as zero
from tests import linear_model, reference
from tests.helpers import worst_ulps
from tests.sharding_checks import needs_eight_devices

pytestmark = needs_eight_devices

NUM_STEPS = 6
BATCH_SIZE = 32
AXIS_TYPES = [AxisType.Auto, AxisType.Explicit]
CONFIGS = {
  "paper": {},
  "decayed": {"learning_rate": 0.5, "rho": 0.9, "eps": 1e-5, "weight_decay": 1e-2},
  "bfloat16_state": {"accumulator_dtype": jnp.bfloat16},  # the low-memory state
  "xla_only": {"implementation": "jax"},
}
# An MLP whose last bias (3) no split of 8 divides: it stays replicated.
MLP_SHAPES = {"w1": (16, 64), "b1": (64,), "w2": (64, 3), "b2": (3,)}
ALL_GATHER = re.compile(r"= \S+ all-gather(?:-start)?\(")
OTHER_COLLECTIVES = re.compile(r"all-reduce|collective-permute|all-to-all|reduce-scatter")


def _mesh(axis_type=AxisType.Explicit):
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


def _mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32) for k, s in MLP_SHAPES.items()}


def _mlp_loss(params, x, y):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def _mlp_batch(t):
  rng = np.random.default_rng([1, t])
  x = rng.normal(size=(BATCH_SIZE, 16)).astype(np.float32)
  return x, np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2], np.cos(x[:, 3])], 1).astype(np.float32)


def _step(tx, mesh, loss, split):
  """The data-parallel step; with `split`, the gradients and state are split (ZeRO-1)."""

  def step(params, opt_state, x, y):
    grads = jax.grad(loss)(params, x, y)
    if split:
      grads = zero.shard_gradients(grads, mesh)
    updates, opt_state = tx.update(grads, opt_state, params)
    if split:
      updates = zero.replicate_updates(updates, mesh)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step)


def _is_split(leaf):
  return any(
    index != slice(None)
    for index in leaf.sharding.devices_indices_map(leaf.shape)[leaf.sharding.mesh.devices.flat[1]]
  )


def _update(tx, mesh, split):
  """tx.update as the step calls it; with `split`, on split gradients and state (ZeRO-1)."""

  def update(params, opt_state, grads):
    if split:
      grads = zero.shard_gradients(grads, mesh)
    updates, opt_state = tx.update(grads, opt_state, params)
    if split:
      updates = zero.replicate_updates(updates, mesh)
    return updates, opt_state

  return jax.jit(update)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_split_state_update_equals_the_replicated_state_update_within_one_ulp(config, axis_type):
  """Each step from the same parameters, gradients and state values, laid out two ways."""
  mesh = _mesh(axis_type)
  tx = optax_adadelta.adadelta(**CONFIGS[config])
  with jax.set_mesh(mesh):
    params = jax.device_put(_mlp_params(), NamedSharding(mesh, P()))
    shardings = zero.state_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = tx.init(params)
    gradient = jax.jit(jax.grad(_mlp_loss))
    plain_update, zero_update = _update(tx, mesh, False), _update(tx, mesh, True)
    worst = 0.0
    for t in range(NUM_STEPS):
      x, y = jax.device_put(_mlp_batch(t), NamedSharding(mesh, P("data")))
      grads = gradient(params, x, y)
      want_updates, want_state = plain_update(params, opt_state, grads)
      got_updates, got_state = zero_update(params, jax.device_put(opt_state, shardings), grads)
      worst = max(worst, worst_ulps((got_updates, got_state), (want_updates, want_state)))
      assert all(not _is_split(u) for u in jax.tree.leaves(got_updates)), "updates must be whole"
      for leaf, sharding in zip(
        jax.tree.leaves(got_state), jax.tree.leaves(shardings), strict=True
      ):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
      params, opt_state = optax.apply_updates(params, want_updates), want_state
  print(f"{config}, {axis_type}: worst difference {worst} ulp")  # pytest -rP
  assert worst <= 1.0


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
def test_split_state_training_run_equals_the_replicated_state_run(axis_type):
  """Whole jitted steps, gradients included: XLA fuses them differently, so a few float32
  ulps of the gradients (as in test_data_parallel) but no growth over the run."""
  mesh = _mesh(axis_type)
  tx = optax_adadelta.adadelta(**CONFIGS["decayed"])
  with jax.set_mesh(mesh):
    start = jax.device_put(_mlp_params(), NamedSharding(mesh, P()))
    shardings = zero.state_shardings(jax.eval_shape(tx.init, start), mesh)
    runs = {}
    for split in (False, True):
      params = start
      opt_state = jax.jit(tx.init, out_shardings=shardings)(params) if split else tx.init(params)
      step = _step(tx, mesh, _mlp_loss, split)
      for t in range(NUM_STEPS):
        x, y = jax.device_put(_mlp_batch(t), NamedSharding(mesh, P("data")))
        params, opt_state = step(params, opt_state, x, y)
      runs[split] = jax.tree.map(np.asarray, (params, opt_state))
  worst = max(
    float(np.max(np.abs(a - b))) for a, b in zip(*map(jax.tree.leaves, runs.values()), strict=True)
  )
  print(f"{axis_type}: max |split - replicated| = {worst:.3g}")
  for got, want in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False]), strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  assert not np.allclose(runs[True][0]["w1"], _mlp_params()["w1"], atol=1e-3)  # it moved


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
def test_split_state_run_matches_the_float64_reference(axis_type):
  mesh = _mesh(axis_type)
  config = CONFIGS["decayed"]
  tx = optax_adadelta.adadelta(**config)
  xs, ys = linear_model.batches(NUM_STEPS, BATCH_SIZE)
  # float32 matmuls, also on GPUs (TF32 by default) and TPUs (bfloat16 passes by default)
  with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
    params = jax.device_put(linear_model.init_params(), NamedSharding(mesh, P()))
    shardings = zero.state_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = _step(tx, mesh, linear_model.loss, split=True)
    for t in range(NUM_STEPS):
      x, y = jax.device_put((xs[t], ys[t]), NamedSharding(mesh, P("data")))
      params, opt_state = step(params, opt_state, x, y)
  start = linear_model.init_params()
  oracle = reference.run(
    [start["w"], start["b"]],
    lambda p, t: linear_model.numpy_gradients(*p, xs[t], ys[t]),
    NUM_STEPS,
    learning_rate=config["learning_rate"],
    rho=config["rho"],
    eps=config["eps"],
    weight_decay=config["weight_decay"],
  )
  np.testing.assert_allclose(params["w"], oracle.params[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(params["b"], oracle.params[1], rtol=1e-4, atol=1e-6)
  e_g2 = optax.tree.get(opt_state, "e_g2")
  np.testing.assert_allclose(e_g2["w"], oracle.e_g2[0], rtol=1e-4, atol=1e-9)


def _state_bytes(tx, params, mesh, split):
  with jax.set_mesh(mesh):
    if split:
      shardings = zero.state_shardings(jax.eval_shape(tx.init, params), mesh)
      state = jax.jit(tx.init, out_shardings=shardings)(params)
    else:
      state = tx.init(params)
  held = zero.per_device_bytes(state)
  assert sorted(held) == sorted(d.id for d in mesh.devices.flat)
  assert len(set(held.values())) == 1, held  # every device holds the same amount
  return held[mesh.devices.flat[0].id]


@pytest.mark.parametrize(
  ("config", "replicated_bytes", "split_bytes"),
  [
    # linear model: w (8, 8), b (8,), two float32 averages each: 2 x 72 x 4 bytes
    ("float32", 576, 72),
    ("bfloat16", 288, 36),
  ],
)
def test_split_state_holds_one_eighth_of_the_bytes_per_device(
  config, replicated_bytes, split_bytes
):
  mesh = _mesh()
  dtype = jnp.bfloat16 if config == "bfloat16" else None
  tx = optax_adadelta.adadelta(accumulator_dtype=dtype)
  params = jax.device_put(linear_model.init_params(), NamedSharding(mesh, P()))
  assert _state_bytes(tx, params, mesh, split=False) == replicated_bytes
  assert _state_bytes(tx, params, mesh, split=True) == split_bytes == replicated_bytes // 8


def test_leaves_no_split_divides_stay_replicated_and_are_counted_whole():
  mesh = _mesh()
  tx = optax_adadelta.adadelta()
  params = jax.device_put(_mlp_params(), NamedSharding(mesh, P()))
  # 1,024 + 64 + 192 split eight ways, b2's 3 kept whole; two float32 averages.
  assert _state_bytes(tx, params, mesh, split=False) == 2 * 4 * (1024 + 64 + 192 + 3)
  assert _state_bytes(tx, params, mesh, split=True) == 2 * 4 * ((1024 + 64 + 192) // 8 + 3)


def test_compiled_step_takes_seven_eighths_less_state_per_device():
  """The compiled step's own memory analysis: its arguments shrink by 7/8 of the split state."""
  mesh = _mesh()
  tx = optax_adadelta.adadelta()
  sizes = {}
  with jax.set_mesh(mesh):
    params = jax.device_put(_mlp_params(), NamedSharding(mesh, P()))
    x, y = jax.device_put(_mlp_batch(0), NamedSharding(mesh, P("data")))
    for split in (False, True):
      shardings = zero.state_shardings(jax.eval_shape(tx.init, params), mesh) if split else None
      state = jax.jit(tx.init, out_shardings=shardings)(params) if split else tx.init(params)
      compiled = _step(tx, mesh, _mlp_loss, split).lower(params, state, x, y).compile()
      sizes[split] = compiled.memory_analysis().argument_size_in_bytes
  assert sizes[False] - sizes[True] == 2 * 4 * (1024 + 64 + 192) * 7 // 8


def _update_hlo(tx, mesh, split):
  """The compiled update alone: gradients in, updates out (no gradient all-reduce)."""
  params = jax.device_put(_mlp_params(), NamedSharding(mesh, P()))
  shardings = zero.state_shardings(jax.eval_shape(tx.init, params), mesh)
  state = jax.jit(tx.init, out_shardings=shardings)(params) if split else tx.init(params)
  return _update(tx, mesh, split).lower(params, state, params).compile().as_text()


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
@pytest.mark.parametrize("implementation", ["auto", "jax"])
def test_split_update_communicates_only_one_all_gather_per_split_leaf(implementation, axis_type):
  mesh = _mesh(axis_type)
  tx = optax_adadelta.adadelta(implementation=implementation, weight_decay=1e-2)
  with jax.set_mesh(mesh):
    hlo = _update_hlo(tx, mesh, split=True)
    unsplit = _update_hlo(tx, mesh, split=False)
  assert not OTHER_COLLECTIVES.findall(hlo), OTHER_COLLECTIVES.findall(hlo)
  # w1, b1, w2 are split; b2 (3 elements) is not.
  assert len(ALL_GATHER.findall(hlo)) == 3, [ln for ln in hlo.splitlines() if "all-gather" in ln]
  assert not ALL_GATHER.findall(unsplit)  # the count above is the split's own


@pytest.mark.parametrize(
  ("shape", "spec"),
  [
    ((16, 24), P(None, "data")),  # the larger of two divisible dimensions
    ((24, 16), P("data", None)),
    ((16, 16), P("data", None)),  # the first of equals
    ((3, 40), P(None, "data")),
    ((8,), P("data")),
    ((3,), P()),
    ((4, 4), P()),  # smaller than the axis
    ((), P()),
    ((0, 8), P(None, "data")),
  ],
)
def test_each_leaf_is_split_along_its_largest_divisible_dimension(shape, spec):
  mesh = _mesh()
  got = zero.state_shardings({"leaf": jax.ShapeDtypeStruct(shape, jnp.float32)}, mesh)["leaf"]
  assert got.spec == spec


def test_a_tuple_of_axes_splits_over_their_product_on_a_2d_mesh():
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
  state = {"a": jax.ShapeDtypeStruct((8, 4), jnp.float32), "b": jax.ShapeDtypeStruct((4,), "f4")}
  got = zero.state_shardings(state, mesh, axis=("data", "fsdp"))
  assert got["a"].spec == P(("data", "fsdp"), None)
  assert got["b"].spec == P()
  assert zero.state_shardings(state, mesh, axis="data")["b"].spec == P("data")


def test_every_state_of_a_chain_is_split_and_the_run_moves():
  """EMA of the parameters, a schedule's int32 count and the accumulators together."""
  mesh = _mesh()
  schedule = optax.exponential_decay(1.0, transition_steps=2, decay_rate=0.5)
  tx = optax.chain(
    optax_adadelta.adadelta(learning_rate=schedule), optax_adadelta.params_ema(momentum=0.9)
  )
  with jax.set_mesh(mesh):
    params = jax.device_put(_mlp_params(), NamedSharding(mesh, P()))
    shardings = zero.state_shardings(jax.eval_shape(tx.init, params), mesh)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    plain = tx.init(params)
    x, y = jax.device_put(_mlp_batch(0), NamedSharding(mesh, P("data")))
    got = _step(tx, mesh, _mlp_loss, split=True)(params, state, x, y)
    want = _step(tx, mesh, _mlp_loss, split=False)(params, plain, x, y)
  ema = optax.tree.get(got[1], "ema")
  assert ema["w1"].sharding.spec == P(None, "data") and ema["b2"].sharding.is_fully_replicated
  counts = [leaf for leaf in jax.tree.leaves(got[1]) if leaf.ndim == 0]
  assert counts and all(c.sharding.is_fully_replicated for c in counts)
  assert worst_ulps(got, want) <= 1.0
  assert not np.allclose(got[0]["w1"], params["w1"])


def test_packed_state_is_refused_naming_the_alternative():
  mesh = _mesh()
  tx = optax_adadelta.adadelta(packed_state=True)
  abstract = jax.eval_shape(tx.init, _mlp_params())
  with pytest.raises(TypeError, match=r"PackedAdadeltaState.*packed_state=False"):
    zero.state_shardings(abstract, mesh)
  with pytest.raises(TypeError, match=r"PackedAdadeltaState"):  # inside a chain too
    zero.state_shardings(
      jax.eval_shape(optax.chain(optax.identity(), tx).init, _mlp_params()), mesh
    )


@pytest.mark.parametrize(
  ("mesh", "axis", "error", "match"),
  [
    ("mesh", "batch", ValueError, r"axis='batch' names \['batch'\].*its axes are \('data',\)"),
    ("mesh", ("data", "data"), TypeError, r"axis must be a mesh axis name.*\('data', 'data'\)"),
    ("mesh", 0, TypeError, r"axis must be a mesh axis name or a tuple of distinct names, got 0"),
    ("mesh", (), TypeError, r"got \(\)"),
    ("device", "data", TypeError, r"mesh must be a jax.sharding.Mesh .*got Device: \w+Device"),
  ],
)
def test_bad_mesh_or_axis_is_refused_naming_it(mesh, axis, error, match):
  mesh = _mesh() if mesh == "mesh" else jax.devices()[0]
  state = {"a": jax.ShapeDtypeStruct((8,), jnp.float32)}
  with pytest.raises(error, match=match):
    zero.state_shardings(state, mesh, axis)
  with pytest.raises(error, match=match):
    zero.shard_gradients(state, mesh, axis)


def test_the_example_splits_its_state_eight_ways_and_trains_like_the_replicated_run():
  path = Path(__file__).resolve().parents[1] / "examples" / "zero_data_parallel.py"
  spec = importlib.util.spec_from_file_location("zero_data_parallel_example", path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  mesh = _mesh(AxisType.Auto)
  with jax.set_mesh(mesh):
    plain, split = (example.train(mesh, 3, 64, zero) for zero in (False, True))
  # w1, b1, w2: 19,200 float32 per average, split; b2: 10, whole.
  assert max(zero.per_device_bytes(plain[1]).values()) == 2 * 4 * (19_200 + 10)
  assert max(zero.per_device_bytes(split[1]).values()) == 2 * 4 * (19_200 // 8 + 10)
  for got, want in zip(jax.tree.leaves(split[0]), jax.tree.leaves(plain[0]), strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  assert split[2][-1] < split[2][0]


@pytest.mark.parametrize(
  ("saved", "restored"), [("replicated", "split"), ("split", "replicated"), ("split", "split")]
)
def test_checkpoint_restores_between_replicated_and_split_state_and_training_continues(
  saved, restored, tmp_path, checkpoint
):
  """Saved in one layout, restored into templates carrying the other, continued: the
  parameters and state equal the uninterrupted run's."""
  mesh = _mesh(AxisType.Explicit)
  tx = optax_adadelta.adadelta(**CONFIGS["decayed"])
  replicated = NamedSharding(mesh, P())
  split_at = NUM_STEPS // 2

  def run(params, opt_state, steps, split):
    step = _step(tx, mesh, _mlp_loss, split)
    for t in steps:
      x, y = jax.device_put(_mlp_batch(t), NamedSharding(mesh, P("data")))
      params, opt_state = step(params, opt_state, x, y)
    return params, opt_state

  with jax.set_mesh(mesh):
    start = jax.device_put(_mlp_params(), replicated)
    shardings = zero.state_shardings(jax.eval_shape(tx.init, start), mesh)
    initial = {"replicated": tx.init(start), "split": jax.device_put(tx.init(start), shardings)}
    want = run(start, initial[saved], range(NUM_STEPS), saved == "split")

    params, opt_state = run(start, initial[saved], range(split_at), saved == "split")
    checkpoint.save(tmp_path / "ckpt", params, opt_state, step=split_at)
    abstract_params = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), _mlp_params()
    )
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    if restored == "split":
      abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
      )
    params, opt_state, step = checkpoint.restore(tmp_path / "ckpt", abstract_params, abstract_state)
    layout = zero.per_device_bytes(opt_state)[0]
    assert layout == (_state_bytes(tx, start, mesh, split=restored == "split"))
    got = run(params, opt_state, range(step, NUM_STEPS), restored == "split")
  worst = worst_ulps(got, want)
  print(f"{saved} -> {restored}: largest difference {worst} ulp")  # 0 measured
  assert worst <= 1.0
