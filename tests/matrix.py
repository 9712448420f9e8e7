"""The contexts of the combination matrix (#22): each trains a tiny model a few steps.

Every context is a pair of functions of a state format's keywords:

``run(fmt)``
  trains through the context (nnx.Optimizer, pmap, a checkpoint in the middle, ...) and
  returns the parameters' displacement, a list of float64 arrays (one per run when the
  context trains several, e.g. under vmap).
``plain(fmt)``
  the same numbers without the context, with the same format: a jitted loop of
  ``tx.update`` whose pre-processing (clipping, decay, averaging) is written out in jnp.
  The tests compare the float32 and factored cells with it (the factored state is another
  algorithm, not a rounding of float32's), the other formats with float32's run.

The loss is ½ Σ (p − yₜ)² with a random target yₜ per step, so every gradient is p − yₜ.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_adadelta

FORMATS: dict[str, dict[str, Any]] = {  # the state formats, as users choose them
  "float32": {},
  "bf16_sr": {"accumulator_dtype": jnp.bfloat16, "stochastic_rounding": True},
  "8bit": {"state_bits": 8, "min_8bit_size": 0},
  "packed": {"packed_state": True},
  # min_dim_size_to_factor=4: w (4 × 256) keeps row and column means, b (8,) full averages
  "factored": {"factored": True, "min_dim_size_to_factor": 4},
}
RHO, EPS = 0.9, 1e-6
NUM_STEPS = 6
SHAPES = {"w": (4, 256), "b": (8,)}  # w: 4 blocks of 256 in 8-bit; both split 8 ways by ZeRO

with contextlib.suppress(ValueError):  # optax's empty state, for exported steps of a chain
  jax.export.register_namedtuple_serialization(optax.EmptyState, serialized_name="optax.EmptyState")


def start() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def targets(seed: int = 1, num_steps: int = NUM_STEPS) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  return [
    {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(num_steps)
  ]


def loss(params, y):
  return 0.5 * sum(jnp.sum((params[k] - y[k]) ** 2) for k in SHAPES)


def adadelta(fmt: dict[str, Any], **hyper) -> optax.GradientTransformation:
  return optax_adadelta.adadelta(1.0, **{"rho": RHO, "eps": EPS, **hyper}, **fmt)


def displacement(params) -> list[np.ndarray]:
  return [np.asarray(params[k], np.float64) - start()[k] for k in SHAPES]


def _loop(tx, ys, grad_of=None, params=None, state=None):
  """The jitted per-step loop every context is compared with; grad_of(g, p) pre-processes."""
  grad_of = grad_of or (lambda g, p: g)

  @jax.jit
  def step(params, state, y):
    grads = grad_of(jax.grad(loss)(params, y), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, start()) if params is None else params
  state = tx.init(params) if state is None else state
  for y in ys:
    params, state = step(params, state, y)
  return params, state


def _plain_loop(fmt, grad_of=None, ys=None, **hyper):
  return displacement(_loop(adadelta(fmt, **hyper), targets() if ys is None else ys, grad_of)[0])


# The contexts -----------------------------------------------------------------------------


def _clip_and_decay(g, p):
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
  return jax.tree.map(lambda gi, pi: gi * jnp.minimum(1.0, 1.0 / norm) + 1e-2 * pi, g, p)


def chain_run(fmt):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-2), adadelta(fmt))
  return displacement(_loop(tx, targets())[0])


def nnx_run(fmt):
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self):
      self.w, self.b = (nnx.Param(jnp.asarray(start()[k])) for k in ("w", "b"))

  model = Model()
  optimizer = nnx.Optimizer(model, adadelta(fmt), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, y):
    grads = nnx.grad(lambda m: loss({"w": m.w[...], "b": m.b[...]}, y))(model)
    optimizer.update(model, grads)

  for y in targets():
    step(model, optimizer, y)
  return displacement({"w": model.w[...], "b": model.b[...]})


def linen_run(fmt):
  train_state = pytest.importorskip("flax.training.train_state")

  state = train_state.TrainState.create(
    apply_fn=None, params=jax.tree.map(jnp.asarray, start()), tx=adadelta(fmt)
  )

  @jax.jit
  def step(state, y):
    return state.apply_gradients(grads=jax.grad(loss)(state.params, y))

  for y in targets():
    state = step(state, y)
  return displacement(state.params)


def inject_run(fmt):
  """ρ, ε and the learning rate as arrays in the state; ρ changed after 3 steps."""
  factory = optax.inject_hyperparams(optax_adadelta.adadelta, static_args=tuple(fmt))
  tx = factory(learning_rate=1.0, rho=RHO, eps=EPS, **fmt)
  params = jax.tree.map(jnp.asarray, start())
  state = tx.init(params)

  @jax.jit
  def step(params, state, y):
    updates, state = tx.update(jax.grad(loss)(params, y), state, params)
    return optax.apply_updates(params, updates), state

  for t, y in enumerate(targets()):
    if t == 3:
      state.hyperparams["rho"] = jnp.asarray(0.8)
    params, state = step(params, state, y)
  return displacement(params)


def inject_plain(fmt):
  ys = targets()
  params, state = _loop(adadelta(fmt), ys[:3])
  return displacement(_loop(adadelta(fmt, rho=0.8), ys[3:], params=params, state=state)[0])


def multisteps_run(fmt):
  return displacement(_loop(optax.MultiSteps(adadelta(fmt), every_k_schedule=2), targets())[0])


def multisteps_plain(fmt):
  ys = targets()  # the parameters stay put within a pair, so the mean gradient is p − mean(y)
  means = [jax.tree.map(lambda a, b: (a + b) / 2, ys[t], ys[t + 1]) for t in range(0, len(ys), 2)]
  return _plain_loop(fmt, ys=means)


def donate_run(fmt):
  tx = adadelta(fmt)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, y):
    updates, state = tx.update(jax.grad(loss)(params, y), state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, start())
  state = tx.init(params)
  for y in targets():
    old = jax.tree.leaves(state)
    params, state = step(params, state, y)
    assert all(leaf.is_deleted() for leaf in old), "the state was not donated"
  return displacement(params)


SEEDS = (1, 2, 3)
RHOS = (0.8, 0.9, 0.95)


def _batched_run(fmt, rhos, seeds):
  """One jitted vmap over runs: run i has ρ = rhos[i] and the targets of seeds[i]."""
  ys = [targets(s) for s in seeds]
  stacked = {k: np.stack([[y[k] for y in run] for run in ys]) for k in SHAPES}  # (run, t, ...)

  def one(rho, ys):
    tx = adadelta(fmt, rho=rho)

    def step(carry, y):
      params, state = carry
      updates, state = tx.update(jax.grad(loss)(params, y), state, params)
      return (optax.apply_updates(params, updates), state), None

    params = jax.tree.map(jnp.asarray, start())
    return jax.lax.scan(step, (params, tx.init(params)), ys)[0][0]

  rho = RHO if rhos is None else jnp.asarray(rhos)
  out = jax.jit(jax.vmap(one, in_axes=(None if rhos is None else 0, 0)))(rho, stacked)
  runs = [jax.tree.map(lambda a, i=i: a[i], out) for i in range(len(seeds))]
  return [d for params in runs for d in displacement(params)]


def vmap_seeds_run(fmt):
  return _batched_run(fmt, None, SEEDS)


def vmap_seeds_plain(fmt):
  return [d for s in SEEDS for d in _plain_loop(fmt, ys=targets(s))]


def vmap_rho_run(fmt):
  return _batched_run(fmt, RHOS, SEEDS)


def vmap_rho_plain(fmt):
  runs = zip(RHOS, SEEDS, strict=True)
  return [d for r, s in runs for d in _plain_loop(fmt, ys=targets(s), rho=r)]


def pmap_run(fmt):
  """Data parallel over 2 devices: each sees its own targets, gradients averaged."""
  tx = adadelta(fmt)
  devices = jax.devices()[:2]
  ys = [targets(1), targets(2)]

  def step(params, state, y):
    grads = jax.lax.pmean(jax.grad(loss)(params, y), "devices")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(lambda a: np.stack([a] * len(devices)), start())
  state = jax.pmap(tx.init, devices=devices)(params)
  pstep = jax.pmap(step, axis_name="devices", devices=devices)
  for t in range(NUM_STEPS):
    y = jax.tree.map(lambda *a: jnp.stack(a), ys[0][t], ys[1][t])
    params, state = pstep(params, state, y)
  return displacement(jax.tree.map(lambda a: a[0], params))


def pmap_plain(fmt):
  ys = [
    jax.tree.map(lambda a, b: (a + b) / 2, *pair)
    for pair in zip(targets(1), targets(2), strict=True)
  ]
  return _plain_loop(fmt, ys=ys)


LAYOUT = {"w": P("data", "model"), "b": P("data")}


def _sharded_run(fmt, axis_type):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))
  with jax.set_mesh(mesh):
    params = {k: jax.device_put(v, NamedSharding(mesh, LAYOUT[k])) for k, v in start().items()}
    ys = [
      {k: jax.device_put(v, NamedSharding(mesh, LAYOUT[k])) for k, v in y.items()}
      for y in targets()
    ]
    params, _ = _loop(adadelta(fmt), ys, params=params)
  return displacement(params)


def auto_run(fmt):
  return _sharded_run(fmt, AxisType.Auto)


def explicit_run(fmt):
  return _sharded_run(fmt, AxisType.Explicit)


def zero_run(fmt):
  """ZeRO-1: replicated parameters, the state split over 8 devices (optax_adadelta.sharding)."""
  from optax_adadelta import sharding as zero

  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  tx = adadelta(fmt)
  with jax.set_mesh(mesh):
    params = jax.device_put(jax.tree.map(jnp.asarray, start()), NamedSharding(mesh, P()))
    if fmt.get("state_bits") == 8 or fmt.get("stochastic_rounding"):  # block codes: whole
      # blocks per device only if init sees the split (state_shardings' error says so)
      state = tx.init(jax.device_put(params, zero.state_shardings(params, mesh)))
    else:
      shardings = zero.state_shardings(jax.eval_shape(tx.init, params), mesh)
      state = jax.jit(tx.init, out_shardings=shardings)(params)

    @jax.jit
    def step(params, state, y):
      grads = zero.shard_gradients(jax.grad(loss)(params, y), mesh)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, zero.replicate_updates(updates, mesh)), state

    for y in targets():
      params, state = step(params, state, y)
  return displacement(params)


def checkpoint_run(fmt):
  """Three steps, a save and a restore into a template, three more: as an unbroken run."""
  pytest.importorskip("orbax.checkpoint")
  from optax_adadelta import checkpoint

  tx, ys = adadelta(fmt), targets()
  whole, _ = _loop(tx, ys)
  params, state = _loop(tx, ys[:3])
  with tempfile.TemporaryDirectory() as directory:
    checkpoint.save(f"{directory}/ckpt", params, state, step=3)
    template = jax.tree.map(jnp.asarray, start())
    restored = checkpoint.restore(f"{directory}/ckpt", template, jax.eval_shape(tx.init, template))
  params, state, step = restored
  assert step == 3
  resumed, _ = _loop(tx, ys[3:], params=params, state=state)  # the same jitted step
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # a resumed run is the same run
  return displacement(resumed)


def export_run(fmt):
  """The training step through jax.export, serialized and deserialized, for every step."""
  tx = adadelta(fmt)

  def step(params, state, y):
    updates, state = tx.update(jax.grad(loss)(params, y), state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, start())
  state = tx.init(params)
  ys = targets()
  exported = jax.export.export(jax.jit(step), platforms=["cpu", "cuda"])(params, state, ys[0])
  restored = jax.export.deserialize(exported.serialize())
  for y in ys:
    params, state = restored.call(params, state, y)
  return displacement(params)


class Context(NamedTuple):
  title: str  # as the guide's table names it
  run: Callable[..., list[np.ndarray]]
  plain: Callable[[dict[str, Any]], list[np.ndarray]]


CONTEXTS: dict[str, Context] = {
  "chain": Context(
    "`optax.chain(clip_by_global_norm, add_decayed_weights, adadelta)`",
    chain_run,
    lambda fmt: _plain_loop(fmt, _clip_and_decay),
  ),
  "nnx": Context("flax `nnx.Optimizer`", nnx_run, _plain_loop),
  "linen": Context("flax linen `TrainState`", linen_run, _plain_loop),
  "inject_hyperparams": Context(
    "`optax.inject_hyperparams` (ρ changed mid-run)", inject_run, inject_plain
  ),
  "multisteps": Context("`optax.MultiSteps` (k = 2)", multisteps_run, multisteps_plain),
  "jit_donate": Context("`jax.jit(donate_argnums=...)`", donate_run, _plain_loop),
  "vmap_seeds": Context("`jax.vmap` over seeds", vmap_seeds_run, vmap_seeds_plain),
  "vmap_rho": Context("`jax.vmap` over seeds and ρ", vmap_rho_run, vmap_rho_plain),
  "pmap": Context("`jax.pmap` (gradients averaged)", pmap_run, pmap_plain),
  "auto_sharded": Context("parameters sharded on an `Auto` mesh", auto_run, _plain_loop),
  "explicit_sharded": Context(
    "parameters sharded on an `Explicit` mesh", explicit_run, _plain_loop
  ),
  "zero": Context("ZeRO-1 (`optax_adadelta.sharding`)", zero_run, _plain_loop),
  "checkpoint": Context(
    "`optax_adadelta.checkpoint` save / restore (orbax)", checkpoint_run, _plain_loop
  ),
  "export": Context("`jax.export` (serialized step)", export_run, _plain_loop),
}
