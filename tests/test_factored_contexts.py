"""The factored state (#26) where the combination matrix does not look.

tests/test_combinations.py trains the factored state in every context, on a 4 × 256 matrix
whose 4 row means no split of 8 divides. Here: (a) on meshes of 4 × 2 devices, the row means
of a factored matrix take the sharding of its row axis and the column means that of its
column axis, after init and after every step, and a scan over steps keeps the state's type;
(b) ZeRO-1 splits the means as their parameter is split; (c) a checkpoint resumes bit for bit,
and one of another state format is refused, naming the leaves; (d) interop exports each
factored average as its rank-1 estimate and loads a peer's dense averages as their row and
column means. References: by hand (layouts, bytes), NumPy (tests/reference.py's `rank_one`,
row and column means) and the real PyTorch, Keras and TF.js.
"""

from __future__ import annotations

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_adadelta
import optax_adadelta.sharding as zero
from optax_adadelta import interop
from tests import parity, parity_cases, reference
from tests.sharding_checks import needs_eight_devices

RHO, EPS = 0.9, 1e-6
AXIS_TYPES = [AxisType.Auto, AxisType.Explicit]


def _factored(min_dim):
  return optax_adadelta.adadelta(
    1.0, rho=RHO, eps=EPS, factored=True, min_dim_size_to_factor=min_dim
  )


def _loss(params, y):
  return 0.5 * sum(jnp.sum((params[k] - y[k]) ** 2) for k in params)


def _draw(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _step(tx, prepare=lambda g: g, finish=lambda u: u):
  def step(params, state, y):
    updates, state = tx.update(prepare(jax.grad(_loss)(params, y)), state, params)
    return optax.apply_updates(params, finish(updates)), state

  return step


def _train(tx, params, state, targets):
  """Jitted steps on ½ Σ (p − y)², one per target; from tx.init(params) if state is None."""
  params = jax.tree.map(jnp.asarray, params)
  state, step = tx.init(params) if state is None else state, jax.jit(_step(tx))
  for y in targets:
    params, state = step(params, state, y)
  return params, state


def _averages(state):  # E[g²] and E[Δx²]
  return {name: optax.tree.get(state, name) for name in ("e_g2", "e_dx2")}


def _padded(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))


# (a) The means follow their axes' sharding ------------------------------------------------

SHAPES = {"w": (16, 256), "t": (256, 16), "k": (4, 16, 32), "b": (16,)}
FACTORED_AXES = {"w": (0, 1), "t": (0, 1), "k": (1, 2)}  # the two largest, both >= 16; b: full
LAYOUTS = {  # parameter -> spec on a ("data", "model") mesh of 4 x 2 devices
  "2d": {"w": P("data", "model"), "t": P("model", "data"), "k": P("data", None, "model"),
         "b": P("data")},
  "swapped": {"w": P("model", "data"), "t": P("data", "model"), "k": P("model", "data"),
              "b": P("model")},
}  # fmt: skip


def _mesh_4x2(axis_type):
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))


def _expected_specs(layout):
  """Each average's specs, by hand: a factored leaf's row means (over axis d1) keep every
  axis of the parameter's spec but d1's, its column means (over d0) every axis but d0's."""
  out = {}
  for name, shape in SHAPES.items():
    spec = _padded(LAYOUTS[layout][name], len(shape))
    without = lambda d, spec=spec: spec[:d] + spec[d + 1 :]
    axes = FACTORED_AXES.get(name)
    out[name] = spec if axes is None else optax_adadelta.FactoredAverage(*map(without, axes[::-1]))
  return out


def _spec_of(x):
  """`x.sharding.spec`; under Explicit axes also the spec of its type, which must agree."""
  spec = _padded(x.sharding.spec, x.ndim)
  if not isinstance(x, jax.ShapeDtypeStruct) and AxisType.Explicit in x.sharding.mesh.axis_types:
    assert _padded(jax.typeof(x).sharding.spec, x.ndim) == spec, f"{jax.typeof(x)}: not {spec}"
  return spec


def _assert_laid_out(state, layout, when):
  want = _expected_specs(layout)
  for name, average in _averages(state).items():
    got = jax.tree.map(_spec_of, average)
    assert got == want, f"{when}: {name} is laid out as {got}, expected {want}"


@needs_eight_devices
@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_row_and_column_means_follow_their_axes_sharding(layout, axis_type):
  mesh, tx = _mesh_4x2(axis_type), _factored(16)
  with jax.set_mesh(mesh):
    place = lambda tree: {
      k: jax.device_put(v, NamedSharding(mesh, LAYOUTS[layout][k])) for k, v in tree.items()
    }
    params = place(_draw(SHAPES, 0))
    state = tx.init(params)
    _assert_laid_out(state, layout, "after an eager init")
    if axis_type == AxisType.Explicit:  # under Auto a traced parameter carries no sharding
      _assert_laid_out(jax.jit(tx.init)(params), layout, "after a jitted init")
      _assert_laid_out(jax.eval_shape(tx.init, params), layout, "abstract (eval_shape)")
    step = jax.jit(_step(tx))
    for t in range(3):
      params, state = step(params, state, place(_draw(SHAPES, t + 1)))
      _assert_laid_out(state, layout, f"after step {t + 1}")
    for name, p in params.items():
      assert _spec_of(p) == _padded(LAYOUTS[layout][name], p.ndim), f"parameter {name} moved"


@needs_eight_devices
def test_a_scan_over_steps_under_explicit_axes_keeps_the_states_type():
  """lax.scan needs the carry's type, shardings included, to be the same after each step."""
  mesh, tx, num_steps = _mesh_4x2(AxisType.Explicit), _factored(16), 4
  with jax.set_mesh(mesh):
    shardings = {k: NamedSharding(mesh, s) for k, s in LAYOUTS["2d"].items()}
    params = jax.device_put(_draw(SHAPES, 0), shardings)
    steps = [_draw(SHAPES, t + 1) for t in range(num_steps)]
    stacked = {
      k: jax.device_put(np.stack([y[k] for y in steps]), NamedSharding(mesh, P(None, *s.spec)))
      for k, s in shardings.items()
    }
    state = tx.init(params)
    step = _step(tx)
    scan = jax.jit(lambda carry, ys: jax.lax.scan(lambda c, y: (step(*c, y), None), carry, ys)[0])
    scanned_params, scanned_state = scan((params, state), stacked)
    assert jax.tree.map(jax.typeof, scanned_state) == jax.tree.map(jax.typeof, state)
    _assert_laid_out(scanned_state, "2d", "after the scan")
    looped = _train(tx, params, state, [jax.device_put(y, shardings) for y in steps])
  for a, b in zip(jax.tree.leaves((scanned_params, scanned_state)), jax.tree.leaves(looped),
                  strict=True):  # fmt: skip
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


# (b) ZeRO-1 -------------------------------------------------------------------------------

ZERO_SHAPES = {"w": (16, 256), "v": (64, 24), "b": (8,)}
# By hand, on 8 devices: ZeRO splits w along 256 and v along 64 (the largest dimension 8
# divides), b along its 8. The row means (over the columns) of w then stay whole and its
# column means split; v's row means split and its column means stay whole.
ZERO_SPECS = {
  "w": optax_adadelta.FactoredAverage((None,), ("data",)),
  "v": optax_adadelta.FactoredAverage(("data",), (None,)),
  "b": ("data",),
}
# Bytes on each device: per average w 16·4 + 256/8·4, v 64/8·4 + 24·4, b 8/8·4; the count 4.
ZERO_BYTES_PER_DEVICE = 2 * ((16 + 32) * 4 + (8 + 24) * 4 + 1 * 4) + 4


@needs_eight_devices
@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
def test_zero_splits_the_means_as_their_parameter_and_trains_as_unsplit(axis_type):
  """Split on their own, w's row and column means (16 and 256) would both take the data
  axis, and their rank-1 estimate could not be laid out (Explicit axes raised)."""
  mesh, tx, num_steps = jax.make_mesh((8,), ("data",), axis_types=(axis_type,)), _factored(8), 6
  start = _draw(ZERO_SHAPES, 0)
  targets = [_draw(ZERO_SHAPES, t + 1) for t in range(num_steps)]
  plain, _ = _train(tx, start, None, targets)
  with jax.set_mesh(mesh):
    params = jax.device_put(start, NamedSharding(mesh, P()))
    shardings = zero.state_shardings(jax.eval_shape(tx.init, params), mesh)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.jit(
      _step(tx, lambda g: zero.shard_gradients(g, mesh), lambda u: zero.replicate_updates(u, mesh)),
      out_shardings=(NamedSharding(mesh, P()), shardings),
    )
    for y in targets:
      params, state = step(params, state, y)
  for name, want in ZERO_SPECS.items():
    got = jax.tree.map(lambda s: _padded(s.spec, 1), optax.tree.get(shardings, "e_g2")[name])
    assert got == want, f"state_shardings lays out {name}'s means as {got}, not {want}"
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
    assert a.sharding.is_equivalent_to(b, a.ndim)
  assert zero.per_device_bytes(state) == dict.fromkeys(range(8), ZERO_BYTES_PER_DEVICE)
  for name in ZERO_SHAPES:
    moved = np.abs(np.asarray(plain[name]) - start[name]).max()
    worst = np.abs(np.asarray(params[name]) - np.asarray(plain[name])).max()
    assert worst <= 3e-5 * moved, f"{name}: off by {worst:.3g} of {moved:.3g}"


# (c) Checkpoints --------------------------------------------------------------------------

CKPT_SHAPES = {"w": (6, 40), "b": (8,)}


def _one_factored(**which):  # one average factored, the other per entry
  factored = optax_adadelta.scale_by_adadelta_factored(RHO, EPS, min_dim_size_to_factor=4, **which)
  return optax.chain(factored, optax.scale(-1.0))


OPTIMIZERS = {
  "factored": _factored(4),
  "hybrid": _one_factored(factor_e_dx2=False),
  "dx2_only": _one_factored(factor_e_g2=False),
  "full": optax_adadelta.adadelta(1.0, rho=RHO, eps=EPS),
  "factored_none": _factored(128),  # no leaf this large: every average full, in a factored state
}


@pytest.mark.parametrize("name", ["factored", "hybrid", "dx2_only"])
def test_a_factored_checkpoint_resumes_bit_for_bit(name, checkpoint, tmp_path):
  tx = OPTIMIZERS[name]
  start, targets = _draw(CKPT_SHAPES, 0), [_draw(CKPT_SHAPES, t) for t in range(1, 9)]
  whole = _train(tx, start, None, targets)
  params, state = _train(tx, start, None, targets[:4])
  checkpoint.save(tmp_path / "ckpt", params, state, step=4)
  params, state, step = checkpoint.restore(tmp_path / "ckpt", start, jax.eval_shape(tx.init, start))
  assert step == 4
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(start))  # FactoredAverages
  resumed = _train(tx, params, state, targets[4:])
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
  ("saved", "target", "differences"),
  [
    ("full", "factored", [r"e_g2\['w'\]: float32\[6,40\] in the checkpoint, absent",
                          r"e_g2\['w'\]\.rows: float32\[6\] in the target, absent"]),
    ("factored", "full", [r"e_dx2\['w'\]\.cols: float32\[40\] in the checkpoint, absent",
                          r"e_dx2\['w'\]: float32\[6,40\] in the target, absent"]),
    ("factored", "hybrid", [r"e_dx2\['w'\]\.rows: float32\[6\] in the checkpoint, absent"]),
    ("factored_none", "factored", [r"e_g2\['w'\]\.cols: float32\[40\] in the target, absent"]),
  ],
  ids=lambda x: x if isinstance(x, str) else None,
)  # fmt: skip
def test_a_checkpoint_of_another_state_format_is_refused_naming_the_leaves(
  saved, target, differences, checkpoint, tmp_path
):
  params = jax.tree.map(jnp.asarray, _draw(CKPT_SHAPES, 0))
  trained = _train(OPTIMIZERS[saved], params, None, [_draw(CKPT_SHAPES, 1)])
  checkpoint.save(tmp_path / "ckpt", *trained, step=1)
  template = jax.eval_shape(OPTIMIZERS[target].init, params)
  with pytest.raises(ValueError, match="does not fit the params and opt_state") as error:
    checkpoint.restore(tmp_path / "ckpt", params, template)
  for difference in differences:
    assert re.search(difference, str(error.value)), str(error.value)


# (d) Interop ------------------------------------------------------------------------------

INTEROP_SHAPES = [(6, 5), (5,)]  # the matrix factored (min_dim_size_to_factor=4), the vector not
NUM_STEPS = 3


def _factored_run():
  """The factored optimizer, its parameters and its state after a few steps."""
  tx = _factored(4)
  rng = np.random.default_rng(5)
  params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in INTEROP_SHAPES]
  state = tx.init(params)
  row_scales = 1.0 + np.arange(INTEROP_SHAPES[0][0])[:, None]  # rows of different sizes
  for _ in range(NUM_STEPS):
    g = [rng.normal(size=INTEROP_SHAPES[0]) * row_scales, rng.normal(size=INTEROP_SHAPES[1])]
    _, state = tx.update([jnp.asarray(x, jnp.float32) for x in g], state, params)
  return tx, params, state


def _dense(state):
  """Both averages per entry, in float64 NumPy from the state's own arrays."""
  out = []
  for name in ("e_g2", "e_dx2"):
    matrix, vector = optax.tree.get(state, name)
    rows, cols = (np.asarray(x, np.float64) for x in matrix)
    out.append([reference.rank_one(rows, cols), np.asarray(vector, np.float64)])
  return out


def _assert_exported(e_g2, e_dx2, state):
  for got, want in zip((e_g2, e_dx2), _dense(state), strict=True):
    np.testing.assert_allclose(np.asarray(got[0], np.float64), want[0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1], np.float64), want[1])  # b: unfactored


def _assert_loaded(state, dense_g2, dense_dx2):
  """The loaded state keeps the row and column means of the dense averages (NumPy). (Its
  count, which the factored update does not read, is not a step counter interop sets.)"""
  for name, dense in (("e_g2", dense_g2), ("e_dx2", dense_dx2)):
    matrix, vector = optax.tree.get(state, name)
    whole = np.asarray(dense[0], np.float64)
    np.testing.assert_allclose(matrix.rows, whole.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(matrix.cols, whole.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(vector, np.asarray(dense[1], np.float32))


def _library(name):
  """The real peer library, or a skip where it is not installed (tests/parity.py)."""
  parity.live_peer(name)
  return importlib.import_module(name)


def test_to_torch_exports_the_rank_one_estimates_and_torch_steps_from_them():
  torch = _library("torch")
  _, params, state = _factored_run()
  weights = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in params]
  optimizer = torch.optim.Adadelta(weights, lr=1.0, rho=RHO, eps=EPS)
  optimizer.load_state_dict(interop.to_torch(state, optimizer.state_dict(), step=NUM_STEPS))
  slots = [optimizer.state[w] for w in weights]
  _assert_exported([s["square_avg"] for s in slots], [s["acc_delta"] for s in slots], state)
  grads = [np.random.default_rng(9).normal(size=s).astype(np.float32) for s in INTEROP_SHAPES]
  for w, g in zip(weights, grads, strict=True):
    w.grad = torch.from_numpy(g)
  optimizer.step()  # torch's own step from the exported averages: Algorithm 1 in float64
  (e_g2, e_dx2) = _dense(state)
  for w, p, g, a, b in zip(weights, params, grads, e_g2, e_dx2, strict=True):
    dx = reference.step(g.astype(np.float64), a, b, RHO, EPS)[0]
    np.testing.assert_allclose(w.detach().numpy(), np.asarray(p, np.float64) - dx, rtol=1e-5)


def test_from_torch_loads_the_row_and_column_means_of_its_averages():
  torch = _library("torch")
  tx, params, _ = _factored_run()
  weights = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in params]
  optimizer = torch.optim.Adadelta(weights, rho=RHO, eps=EPS)
  rng = np.random.default_rng(3)
  for _ in range(4):
    for w in weights:
      w.grad = torch.from_numpy(rng.normal(size=tuple(w.shape)).astype(np.float32))
    optimizer.step()
  state = interop.from_torch(tx.init(params), optimizer.state_dict())
  slots = [optimizer.state[w] for w in weights]
  dense = lambda key: [s[key].numpy() for s in slots]
  _assert_loaded(state, dense("square_avg"), dense("acc_delta"))


def test_to_and_from_keras_convert_the_estimates_and_the_means():
  keras = _library("keras")
  tx, params, state = _factored_run()
  variables = [keras.Variable(np.array(p)) for p in params]
  optimizer = keras.optimizers.Adadelta(learning_rate=1.0, rho=RHO, epsilon=EPS)
  optimizer.build(variables)
  interop.to_keras(state, optimizer, step=NUM_STEPS)
  slots = lambda name: [np.asarray(v.value) for v in getattr(optimizer, name)]
  _assert_exported(slots("_accumulated_grads"), slots("_accumulated_delta_vars"), state)
  rng = np.random.default_rng(4)
  for _ in range(2):  # Keras's own steps: its averages are no longer rank-1
    optimizer.apply([rng.normal(size=s).astype(np.float32) for s in INTEROP_SHAPES], variables)
  loaded = interop.from_keras(tx.init(params), optimizer)
  _assert_loaded(loaded, slots("_accumulated_grads"), slots("_accumulated_delta_vars"))


def test_to_tfjs_exports_the_estimates_and_from_tfjs_takes_back_the_means():
  tx, params, state = _factored_run()
  weights = interop.to_tfjs(state, ["w", "b"], step=NUM_STEPS)
  assert [name for name, _ in weights] == [
    "iter", "w/accum_grad", "b/accum_grad", "w/accum_var", "b/accum_var",
  ]  # fmt: skip
  _assert_exported([w for _, w in weights[1:3]], [w for _, w in weights[3:]], state)
  back = interop.from_tfjs(tx.init(params), weights)  # the means of a rank-1 estimate: its own
  for a, b in zip(jax.tree.leaves(_averages(back)), jax.tree.leaves(_averages(state)),
                  strict=True):  # fmt: skip
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_from_tfjs_loads_the_row_and_column_means_of_a_tfjs_run():
  tfjs = parity.live_peer("tfjs")  # the TF.js runner (node)
  case = parity_cases._case("factored-tfjs", "tfjs", {"learning_rate": 0.5},
                            shapes=INTEROP_SHAPES, steps=4, seed=14)  # fmt: skip
  params0, grads = parity_cases.inputs(case)
  _, _, weights = tfjs.run_with_weights(case, params0, grads)
  tx, params, _ = _factored_run()
  state = interop.from_tfjs(tx.init(params), weights)
  arrays = [np.asarray(w).reshape(s) for (_, w), s in zip(weights[1:], INTEROP_SHAPES * 2,
                                                          strict=True)]  # fmt: skip
  _assert_loaded(state, arrays[:2], arrays[2:])
