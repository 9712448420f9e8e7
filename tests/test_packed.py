"""adadelta(packed_state=True): the state as two flat arrays, the same numbers as the default.

Compared with the float64 reference (independent) and bit for bit with the per-leaf state,
whose own correctness the rest of the suite establishes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adadelta
from tests import reference
from tests.sharding_checks import needs_eight_devices

DTYPES = {  # parameter dtype, accumulator dtype
  "f32": (jnp.float32, None),
  "bf16_f32": (jnp.bfloat16, jnp.float32),
  "bf16": (jnp.bfloat16, None),
}
SHAPES = {"w": (33, 5), "b": (7,), "s": (), "big": (300_007,), "e": (0,)}


def _tree(rng, dtype):
  return {k: jnp.asarray(rng.normal(size=shape), dtype) for k, shape in SHAPES.items()}


def _run(params, grads_per_step, **options):
  """The trajectory of a jitted step compiled without XLA's excess precision.

  By default (`xla_allow_excess_precision`) XLA may keep a fused bfloat16 intermediate, such
  as g + λ·x or the rounded average, in float32, so the XLA path's bfloat16 bits depend on how
  the step is fused, and concatenating the gradients fuses it differently. The native kernel
  rounds at every bfloat16 array either way; with the option off XLA does too.
  """
  tx = optax_adadelta.adadelta(weight_decay=1e-3, **options)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  lowered = jax.jit(step).lower(params, state, grads_per_step[0])
  step = lowered.compile({"xla_allow_excess_precision": False})
  trajectory = []
  for grads in grads_per_step:
    params, state, updates = step(params, state, grads)
    trajectory.append((params, updates))
  return trajectory, state


def _packed_layout(state, field):
  """The per-leaf state's average `field`, laid out as the packed state lays it out."""
  leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(getattr(state[1], field))]
  small = [x.ravel() for x in leaves if x.size < 2**18]
  return [np.concatenate(small), *(x for x in leaves if x.size >= 2**18)]


@pytest.mark.parametrize("implementation", ["auto", "jax"])
@pytest.mark.parametrize("dtype_case", sorted(DTYPES))
def test_packed_state_gives_the_same_bits_as_the_per_leaf_state(implementation, dtype_case):
  dtype, accumulator = DTYPES[dtype_case]
  rng = np.random.default_rng(0)
  params = _tree(rng, dtype)
  grads = [_tree(rng, dtype) for _ in range(4)]
  options = {"accumulator_dtype": accumulator, "implementation": implementation}
  packed, packed_state = _run(params, grads, packed_state=True, **options)
  per_leaf, per_leaf_state = _run(params, grads, **options)
  for got, want in zip(jax.tree.leaves(packed), jax.tree.leaves(per_leaf), strict=True):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  assert isinstance(packed_state[1], optax_adadelta.PackedAdadeltaState)
  for field in ("e_g2", "e_dx2"):
    arrays = [
      getattr(packed_state[1], f"{field}_packed"),
      *getattr(packed_state[1], f"{field}_large"),
    ]
    assert [x.shape for x in arrays] == [(33 * 5 + 7 + 1 + 0,), (300_007,)]
    assert all(x.dtype == (accumulator or dtype) for x in arrays)
    for got, want in zip(arrays, _packed_layout(per_leaf_state, field), strict=True):
      np.testing.assert_array_equal(np.asarray(got, np.float32), want)


BUILDERS = {  # the flag of adadelta, and the packed format's own transformation
  "adadelta": lambda: optax_adadelta.adadelta(0.5, rho=0.9, eps=1e-6, packed_state=True),
  "scale_by_adadelta_packed": lambda: optax.chain(
    optax_adadelta.scale_by_adadelta_packed(rho=0.9, eps=1e-6), optax.scale(-0.5)
  ),
}


@pytest.mark.parametrize("builder", BUILDERS)
def test_packed_trajectory_follows_the_float64_reference(builder):
  rng = np.random.default_rng(1)
  shapes = [(20, 3), (5,), (1,), (40,)]
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(25)]
  want = reference.run(params, grads, rho=0.9, eps=1e-6, learning_rate=0.5)
  tx = BUILDERS[builder]()
  x, state = [jnp.asarray(p) for p in params], tx.init(params)
  step = jax.jit(lambda x, s, g: (lambda u, s: (optax.apply_updates(x, u), s))(*tx.update(g, s)))
  for g in grads:
    x, state = step(x, state, [jnp.asarray(gi) for gi in g])
  for got, expected in zip(x, want.params, strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
  flat_e_dx2 = np.concatenate([e.ravel() for e in want.e_dx2])
  (packed,) = [s for s in state if isinstance(s, optax_adadelta.PackedAdadeltaState)]
  np.testing.assert_allclose(packed.e_dx2_packed, flat_e_dx2, rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize(
  ("keywords", "message"),
  [
    ({"rho": 1.5}, r"rho must be finite and in \[0, 1\].*got 1.5"),
    ({"update_rule": "adam"}, r"update_rule must be one of .*got 'adam'"),
    ({"accumulator_dtype": jnp.int32}, r"accumulator_dtype must be None or a real floating"),
  ],
)
def test_scale_by_adadelta_packed_checks_its_keywords(keywords, message):
  with pytest.raises((ValueError, TypeError), match=message):
    optax_adadelta.scale_by_adadelta_packed(**keywords)


def test_a_thousand_leaves_pass_two_state_arrays_through_the_step():
  params = [jnp.ones(3 + i % 5) for i in range(1000)]
  tx = optax_adadelta.adadelta(packed_state=True)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  assert [x.shape for x in jax.tree.leaves(state)] == [(5000,), (5000,)]
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
  assert len(jax.tree.leaves(lowered.args_info)) == 2 * 1000 + 2


def test_vmap_over_a_population_equals_each_member():
  rng = np.random.default_rng(2)
  tx = optax_adadelta.adadelta(packed_state=True)
  params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros(3)}
  grads = {
    "w": jnp.asarray(rng.normal(size=(5, 4, 6)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
  }
  one_state = tx.init(params)
  state = jax.tree.map(lambda x: jnp.stack([x + 0.1 * i for i in range(5)]), one_state)
  got = jax.jit(jax.vmap(tx.update))(grads, state)
  for i in range(5):
    member = lambda tree, i=i: jax.tree.map(lambda leaf: leaf[i], tree)
    want = jax.jit(tx.update)(member(grads), member(state))
    for a, b in zip(jax.tree.leaves(member(got)), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip_resumes_exactly(tmp_path, checkpoint):
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), "b": jnp.zeros(3)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)]
  grads *= 4
  tx = optax_adadelta.adadelta(packed_state=True)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s)))
  p, s = params, tx.init(params)
  for g in grads[:2]:
    p, s = step(p, s, g)
  checkpoint.save(tmp_path / "ckpt", p, s, step=2)
  restored = checkpoint.restore(tmp_path / "ckpt", params, tx.init(params))
  p2, s2 = restored.params, restored.opt_state
  for g in grads[2:]:
    p, s = step(p, s, g)
    p2, s2 = step(p2, s2, g)
  for x, y in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2)), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
  ("tree", "error", "message"),
  [
    (
      {"a": jnp.ones(3), "b": jnp.ones(2, jnp.bfloat16)},
      TypeError,
      r"one dtype, got bfloat16, float32",
    ),
    (
      {"c": jnp.ones(3, jnp.complex64)},
      TypeError,
      r"real floating parameters; the leaf at \['c'\]",
    ),
    ({"i": jnp.ones(3, jnp.int32)}, TypeError, r"the leaf at \['i'\] has dtype int32"),
    ({"n": None, "a": jnp.ones(2)}, ValueError, r"the one at \['n'\] is None"),
  ],
  ids=["mixed-dtypes", "complex", "integer", "none"],
)
def test_init_refuses_what_a_packed_state_cannot_hold(tree, error, message):
  with pytest.raises(error, match=message):
    optax_adadelta.adadelta(packed_state=True).init(tree)


@pytest.mark.parametrize(
  ("grads", "message"),
  [
    ({"a": jnp.ones(3), "b": jnp.ones(4)}, r"\['a'\] has shape \(3,\) .* built for shape \(4,\)"),
    (
      {"a": jnp.ones(4), "b": jnp.ones(3), "z": jnp.ones(0)},
      r"first difference is leaf 2, \['z'\] in the gradients but \(no more leaves\)",
    ),
    ({"a": jnp.ones((2, 2)), "b": jnp.ones(3)}, r"\['a'\] has shape \(2, 2\) .* shape \(4,\)"),
    ({"a": jnp.ones(4, jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}, r"dtype bfloat16, but"),
    ({"b": jnp.ones(3), "c": jnp.ones(4)}, r"leaf 0, \['b'\] in the gradients but \['a'\]"),
    ([jnp.ones(4), jnp.ones(3)], r"first difference is leaf 0, \[0\] in the gradients but \['a'\]"),
  ],
  ids=["sizes-swapped", "extra-empty-leaf", "reshaped", "dtype", "renamed", "list-not-dict"],
)
def test_update_refuses_gradients_unlike_the_parameters_naming_the_first_difference(grads, message):
  """Same total size is not enough: structure, shapes and dtype must be those of init."""
  tx = optax_adadelta.adadelta(packed_state=True)
  state = tx.init({"a": jnp.ones(4), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match=message):
    tx.update(grads, state)


def test_exported_step_serializes_and_resumes_the_same_trajectory():
  """jax.export could not serialize a step taking the packed state (an unregistered node)."""
  rng = np.random.default_rng(8)
  params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "b": jnp.zeros(5)}
  grads = [jax.tree.map(lambda p: p + rng.normal(), params) for _ in range(3)]
  # scale_by_adadelta: no optax.EmptyState to register; "jax": what an exported step runs
  tx = optax_adadelta.scale_by_adadelta(packed_state=True, implementation="jax")

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(jnp.subtract, params, updates), state

  exported = jax.export.export(jax.jit(step))(params, tx.init(params), grads[0])
  restored = jax.export.deserialize(exported.serialize())
  got = want = (params, tx.init(params))
  for g in grads:
    got, want = restored.call(*got, g), jax.jit(step)(*want, g)
  assert got[1].layout == tx.init(params).layout
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def _quickstart_tx(packed_state):
  """The README quickstart's optimizer."""
  return optax.chain(
    optax.clip_by_global_norm(1.0), optax_adadelta.adadelta(packed_state=packed_state)
  )


_X = np.random.default_rng(5).normal(size=(64, 8)).astype(np.float32)
_Y = _X.sum(axis=1, keepdims=True)


def _flax():
  """flax's nnx, linen and train_state; the test skips where flax is not installed."""
  nnx = pytest.importorskip("flax.nnx")
  from flax import linen
  from flax.training import train_state

  return nnx, linen, train_state


def _nnx_loop(packed_state, steps):
  """The README quickstart's loop (nnx.Optimizer, wrt=nnx.Param) on a two-layer network."""
  nnx, _, _ = _flax()
  model = nnx.Sequential(
    nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 1, rngs=nnx.Rngs(1))
  )
  optimizer = nnx.Optimizer(model, _quickstart_tx(packed_state), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [train_step(model, optimizer, _X, _Y) for _ in range(steps)]
  return losses, nnx.state(model, nnx.Param), optimizer.opt_state


def _linen_loop(packed_state, steps):
  """A linen TrainState loop: init on the params of model.init, apply_gradients each step."""
  _, nn, train_state = _flax()

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.relu(nn.Dense(16)(x)))

  model = MLP()
  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=model.init(jax.random.key(0), _X)["params"],
    tx=_quickstart_tx(packed_state),
  )

  @jax.jit
  def train_step(state):
    loss_fn = lambda p: jnp.mean((state.apply_fn({"params": p}, _X) - _Y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(steps):
    state, loss = train_step(state)
    losses.append(loss)
  return losses, state.params, state.opt_state


@pytest.mark.parametrize(
  "loop", [_nnx_loop, _linen_loop], ids=["nnx_optimizer", "linen_trainstate"]
)
def test_flax_loops_with_the_packed_state_equal_the_per_leaf_state(loop):
  """nnx.Optimizer inits on nnx.Param Variables and updates with plain arrays: the packed
  state, which recorded the Variables, refused every step. Both loops now take the per-leaf
  state's steps exactly (400 steps measured: max difference 0 in loss and weights)."""
  losses, params, opt_state = loop(True, steps=40)
  want_losses, want_params, _ = loop(False, steps=40)
  is_packed = lambda node: isinstance(node, optax_adadelta.PackedAdadeltaState)
  assert any(is_packed(n) for n in jax.tree.leaves(opt_state, is_leaf=is_packed))
  np.testing.assert_array_equal(np.asarray(losses), np.asarray(want_losses))
  assert float(losses[-1]) < 0.5 * float(losses[0])  # and the loop trains
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
    np.testing.assert_array_equal(got, want)


def _boxed(tree, box):
  """`tree` with each array in a box a framework adds: nnx.Param, linen's nn.Partitioned."""
  nnx, nn, _ = _flax()
  if box == "nnx_param":
    return nnx.State({k: nnx.Param(v) for k, v in tree.items()})
  return {k: nn.Partitioned(v, names=(None,) * v.ndim) for k, v in tree.items()}


@pytest.mark.parametrize("box", ["nnx_param", "linen_partitioned"])
@pytest.mark.parametrize("boxed_at", ["init", "update"])
def test_boxes_added_or_stripped_between_init_and_update_do_not_change_the_steps(box, boxed_at):
  rng = np.random.default_rng(6)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
  grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
  tx = optax_adadelta.adadelta(packed_state=True)
  want, _ = tx.update(grads, tx.init(params))
  init_on, grads_as = (
    (_boxed(params, box), grads) if boxed_at == "init" else (params, _boxed(grads, box))
  )
  state = tx.init(init_on)
  assert state[1].layout == tx.init(params)[1].layout  # the state does not record the boxes
  got, _ = jax.jit(tx.update)(grads_as, state)
  assert jax.tree.structure(got) == jax.tree.structure(grads_as)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_boxed_gradients_of_other_parameters_are_refused_naming_both_structures():
  nnx, _, _ = _flax()
  tx = optax_adadelta.adadelta(packed_state=True)
  state = tx.init(nnx.State({"bias": nnx.Param(jnp.ones(3)), "kernel": nnx.Param(jnp.ones(3))}))
  grads = nnx.State({"bias": jnp.ones(3), "scale": jnp.ones(3)})
  message = (
    r"first difference is leaf 1, \['scale'\] in the gradients but \['kernel'\] in the state"
    r"\.\n  gradients: PyTreeDef\(CustomNode\(State.*\n  state:     leaves \['bias'\], \['kernel'\]"
  )
  with pytest.raises(ValueError, match=message):
    tx.update(grads, state)


def test_update_refuses_a_per_leaf_state_and_the_layout_is_stored_in_the_state():
  tx = optax_adadelta.adadelta(packed_state=True)
  per_leaf = optax_adadelta.adadelta().init({"a": jnp.ones(3)})
  with pytest.raises(TypeError, match=r"expects a PackedAdadeltaState, got ScaleByAdadeltaState"):
    tx.update({"a": jnp.ones(3)}, per_leaf)
  layout = tx.init({"a": jnp.ones(3), "big": jnp.ones((512, 513))})[1].layout
  assert layout.leaf_names == ("['a']", "['big']")
  assert layout.shapes == ((3,), (512, 513)) and layout.dtype == "float32"
  assert layout.packed_below == 2**18 and layout.packed == (True, False)


def test_packed_state_must_be_a_bool():
  with pytest.raises(TypeError, match=r"packed_state must be True or False, got 'yes'"):
    optax_adadelta.adadelta(packed_state="yes")


@needs_eight_devices
def test_sharded_parameters_give_the_single_device_result():
  """Large leaves keep their own state, sharded like the parameter; the numbers do not change."""
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(4)
  shapes = {"w": (64, 3), "b": (16,), "big": (8 * 32_800,)}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params) for _ in range(3)
  ]
  tx = optax_adadelta.adadelta(packed_state=True)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s)))
  p, s = params, tx.init(params)
  p_sharded = jax.device_put(params, sharded)
  s_sharded = tx.init(p_sharded)
  for g in grads:
    p, s = step(p, s, g)
    p_sharded, s_sharded = step(p_sharded, s_sharded, jax.device_put(g, sharded))
  assert p_sharded["big"].sharding.is_equivalent_to(sharded, 1)
  for average in (s_sharded[1].e_g2_large[0], s_sharded[1].e_dx2_large[0]):
    assert average.shape == shapes["big"]
    assert average.sharding.is_equivalent_to(sharded, 1)
  for x, y in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p_sharded, s_sharded)), strict=True):
    np.testing.assert_array_equal(x, y)
