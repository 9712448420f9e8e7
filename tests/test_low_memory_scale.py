"""The low-memory states (#14) across devices and processes: shard_map streams, 2 processes.

Inside ``shard_map`` each shard of a sharded leaf draws its own random stream (the shard's
position along the mesh axes over which the leaf varies is hashed in), and a replicated leaf
draws the same stream on every device. Two processes joined by ``jax.distributed``, each with
2 CPU devices, train an 8-bit state sharded like the parameters and end bit for bit where one
process with the same 4-device mesh ends. This file is also the workers' script
(``python tests/test_low_memory_scale.py --process-id ...``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

if __name__ == "__main__":  # a worker: jax's devices must wait for jax.distributed
  needs_eight_devices = pytest.mark.skipif(False, reason="")
else:
  from tests.helpers import free_port, run_workers
  from tests.sharding_checks import needs_eight_devices

import optax_adadelta
from optax_adadelta.formats import eight_bit
from optax_adadelta.formats.random_bits import shard_position

SHAPE = (16, 1024)  # split 4 ways along the last axis: 256 per shard, one block each
STEPS = 6


# shard_map ---------------------------------------------------------------------------


def _sharded_step(fmt):
  """One update inside shard_map on a 4 x 2 mesh: "w" split 2 ways along its last axis
  ("model"), "r" replicated; both get the same gradient on every shard."""
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  tx = optax_adadelta.scale_by_adadelta(**fmt)
  half = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
  grads = {"w": np.concatenate([half, half], axis=1), "r": half}  # shard 0 == shard 1
  specs = {"w": P(None, "model"), "r": P()}
  put = lambda tree: jax.tree.map(
    lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs
  )
  params = put({"w": jnp.zeros((8, 1024)), "r": jnp.zeros((8, 512))})
  state_specs = jax.tree.map(lambda x: getattr(x.sharding, "spec", P()), tx.init(params))
  state = jax.device_put(
    tx.init(params), jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs)
  )
  step = jax.shard_map(
    tx.update, mesh=mesh, in_specs=(specs, state_specs), out_specs=(specs, state_specs)
  )  # check_vma (the default): out_specs P() would refuse a state that varied
  return jax.jit(step)(put(grads), state), jax.jit(tx.update)(grads, tx.init(grads))


@needs_eight_devices
@pytest.mark.parametrize(
  "fmt",
  [{"state_bits": 8}, {"accumulator_dtype": jnp.bfloat16, "stochastic_rounding": True}],
  ids=["8bit", "bf16_sr"],
)
def test_shard_map_shards_draw_different_streams_and_a_replicated_leaf_the_same(fmt):
  """The two shards of "w" see identical gradients and states: with one stream they would
  store identical averages. Independent draws disagree with probability 2p(1 − p) for a
  value at position p between its neighbours, 1/3 on average over uniform p (E[g²]; after
  one step E[Δx²] ≈ (1 − ρ)ε everywhere, mostly its block's maximum, exact)."""
  (_, state), (_, alone) = _sharded_step(fmt)
  w = np.asarray(eight_bit.average_values(state.e_g2)["w"], np.float64)
  differ = np.mean(w[:, :512] != w[:, 512:])
  assert differ > 0.2, f"shards drew the same stream: {differ:.3f} of values differ"
  # The replicated leaf: the same on every device, and the unsharded step's numbers.
  for average, want in ((state.e_g2, alone.e_g2), (state.e_dx2, alone.e_dx2)):
    shards = [np.asarray(s.data) for s in jax.tree.leaves(average["r"])[0].addressable_shards]
    assert all(np.array_equal(s, shards[0]) for s in shards)
    for got, expected in zip(
      jax.tree.leaves(average["r"]), jax.tree.leaves(want["r"]), strict=True
    ):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_shard_position_is_none_outside_shard_map():
  assert shard_position(jnp.zeros(3)) is None
  assert jax.jit(lambda x: shard_position(x) is None)(jnp.zeros(3))


# Two processes -----------------------------------------------------------------------


def _batch(step):
  rng = np.random.default_rng([7, step])
  return rng.standard_normal((32, SHAPE[0])).astype(np.float32)


def train(mesh, steps=STEPS):
  """A layer tanh(x @ w + b) pulled toward a fixed target, w (16 x 1024) and b (1024) split
  along their last axis over the 4 devices; the batch is replicated, so each device's
  columns need no sum over devices. Returns (params, state) gathered as NumPy."""
  from jax.experimental import multihost_utils

  tx = optax_adadelta.adadelta(state_bits=8, min_8bit_size=1024)
  split = NamedSharding(mesh, P(None, "data"))
  rng = np.random.default_rng(0)
  w0 = (rng.standard_normal(SHAPE) / 4).astype(np.float32)
  target = np.sin(np.arange(SHAPE[1], dtype=np.float32))
  column = NamedSharding(mesh, P("data"))
  b0 = np.zeros(SHAPE[1], np.float32)
  params = {
    "w": jax.make_array_from_callback(SHAPE, split, lambda i: w0[i]),
    "b": jax.make_array_from_callback(b0.shape, column, lambda i: b0[i]),
  }
  state = tx.init(params)

  @jax.jit
  def step(params, state, x):
    def loss(p):
      return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - target) ** 2)

    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    x = jax.make_array_from_callback(
      (32, SHAPE[0]), NamedSharding(mesh, P()), lambda i, t=t: _batch(t)[i]
    )
    params, state = step(params, state, x)
  gathered = multihost_utils.process_allgather((params, state), tiled=True)
  return jax.tree.map(np.asarray, gathered)


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@needs_eight_devices
@pytest.mark.slow
def test_two_processes_train_the_8bit_state_as_one_process_does(tmp_path):
  port = free_port()
  out = tmp_path / "p.npz"
  run_workers(
    [
      [sys.executable, __file__, f"--port={port}", f"--process-id={i}", f"--out={out}"]
      for i in range(2)
    ],
    tmp_path / "logs",
  )
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  want = _flat(train(mesh))
  with np.load(out) as saved:
    got = dict(saved)
  assert sorted(got) == sorted(want)
  assert want["[1][1].e_g2['w'].codes"].dtype == np.uint8
  assert want["[1][1].e_g2['w'].scale"].shape == (16, 4)  # blocks of 256 = one per shard
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def _worker() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--out", type=Path, required=True)
  args = parser.parse_args()
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{args.port}",
    num_processes=2,
    process_id=args.process_id,
    initialization_timeout=120,
  )
  result = _flat(train(jax.make_mesh((4,), ("data",))))
  if jax.process_index() == 0:
    np.savez(args.out, **result)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker()
