"""Design experiments for the native path, one at a time, each with its prediction first.

  python -m benchmarks.explore [--repeats N] [--size LOG2]

E1  Δx written over the gradient buffer (input 0 aliased to output 0) or into a new buffer,
    with the gradients passed into the step and with the gradients computed inside it.
E2  1,000 small leaves: one kernel call per leaf, one call taking every leaf (the grouped
    handler), or all leaves packed into one contiguous buffer (concatenate, one call, split),
    with the state kept per leaf or stored packed.
E3  bfloat16 parameters: float32 or bfloat16 accumulators.
E4  1,000 small leaves: the whole training step beside a step that only passes the same
    buffers through (the floor that any optimizer pays in JAX's dispatch).

Interleaved repeats, medians and min in ms; compare rows within one run only.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_adadelta
from optax_adadelta import _native

HYPER = (0.95, 1 - 0.95, 1e-6)


def _interleaved(contenders: dict, repeats: int) -> dict[str, list[float]]:
  """contenders: name -> (step, carry); step(carry) -> carry. One timed call per round."""
  carries = {name: carry for name, (_, carry) in contenders.items()}
  for name, (step, _) in contenders.items():  # compile and warm up
    carries[name] = jax.block_until_ready(step(carries[name]))
  times: dict[str, list[float]] = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, (step, _) in contenders.items():
      start = time.perf_counter()
      carries[name] = jax.block_until_ready(step(carries[name]))
      times[name].append(time.perf_counter() - start)
  return times


def _report(title: str, prediction: str, times: dict[str, list[float]]) -> None:
  print(f"\n{title}\n  prediction: {prediction}")
  for name, t in times.items():
    print(f"  {name:<44} median {1e3 * np.median(t):8.2f} ms   min {1e3 * np.min(t):8.2f} ms")


def _train_step(tx, gradients_in_step: bool):
  def step(params, state, batch):
    grads = jax.tree.map(lambda b: b * 1.0001, batch) if gradients_in_step else batch
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, donate_argnums=(0, 1))
  return lambda batch: lambda carry: jitted(*carry, batch)


def experiment_alias(size: int, repeats: int) -> None:
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=size), jnp.float32)}
  batch = {"w": jnp.asarray(rng.normal(size=size), jnp.float32)}
  contenders = {}
  for in_step in (False, True):
    for alias in (True, False):
      _native.LARGE_LEAF = 0 if alias else 1 << 62
      tx = optax_adadelta.adadelta(implementation="native")
      step = _train_step(tx, in_step)(batch)
      carry = (jax.tree.map(jnp.copy, params), tx.init(params))
      jax.block_until_ready(step(carry))  # traced now, with this aliasing
      where = "over g" if alias else "new"
      name = f"{'grads in step' if in_step else 'grads argument'}, Δx {where}"
      contenders[name] = (step, (jax.tree.map(jnp.copy, params), tx.init(params)))
  _native.LARGE_LEAF = 1 << 18
  _report(
    f"E1: where Δx goes ({size:,} float32 parameters)",
    "grads argument: 'new' faster (no copy of g: 36 instead of 44 bytes per parameter); "
    "grads in step: 'over g' faster (no second gradient-sized buffer to allocate and fault in)",
    _interleaved(contenders, repeats),
  )


def _small_leaf_sizes(rng) -> np.ndarray:
  """1,000 leaf sizes, log-uniform in 256-4,096: the shape of case (c) in benchmarks/step.py."""
  return np.exp(rng.uniform(np.log(256), np.log(4096), size=1000)).astype(int)


def experiment_packing(repeats: int) -> None:
  rng = np.random.default_rng(1)
  sizes = _small_leaf_sizes(rng)
  grads = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes]
  params = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes]
  offsets = np.cumsum(sizes)[:-1]

  def per_leaf(carry):
    params, e_g2, e_dx2 = carry
    out = [_native._ffi(g, a, b, HYPER) for g, a, b in zip(grads, e_g2, e_dx2, strict=True)]
    new_params = [p - s for p, (s, _, _) in zip(params, out, strict=True)]
    return new_params, [o[1] for o in out], [o[2] for o in out]

  def one_call(carry):
    params, e_g2, e_dx2 = carry
    flat = [x for leaf in zip(grads, e_g2, e_dx2, strict=True) for x in leaf]
    out = _native._ffi_group(*flat, hyper=HYPER)
    new_params = [p - s for p, s in zip(params, out[0::3], strict=True)]
    return new_params, list(out[1::3]), list(out[2::3])

  def packed_state_per_leaf(carry):
    params, e_g2, e_dx2 = carry
    step, a, b = _native._ffi(*(jnp.concatenate(x) for x in (grads, e_g2, e_dx2)), HYPER)
    steps, e_g2, e_dx2 = (jnp.split(x, offsets) for x in (step, a, b))
    return [p - s for p, s in zip(params, steps, strict=True)], e_g2, e_dx2

  def packed_state_packed(carry):
    params, e_g2, e_dx2 = carry
    step, e_g2, e_dx2 = _native._ffi(jnp.concatenate(grads), e_g2, e_dx2, HYPER)
    steps = jnp.split(step, offsets)
    return [p - s for p, s in zip(params, steps, strict=True)], e_g2, e_dx2

  def zeros():
    return [jnp.zeros_like(p) for p in params]

  flat = jnp.zeros(int(sizes.sum()))
  contenders = {
    "one kernel call per leaf": (
      jax.jit(per_leaf, donate_argnums=0),
      ([p + 0 for p in params], zeros(), zeros()),
    ),
    "one call for all leaves, state per leaf": (
      jax.jit(one_call, donate_argnums=0),
      ([p + 0 for p in params], zeros(), zeros()),
    ),
    "packed, state per leaf (pack + split)": (
      jax.jit(packed_state_per_leaf, donate_argnums=0),
      ([p + 0 for p in params], zeros(), zeros()),
    ),
    "packed, state stored packed": (
      jax.jit(packed_state_packed, donate_argnums=0),
      ([p + 0 for p in params], flat, flat + 0),
    ),
  }
  _report(
    f"E2: 1,000 small leaves ({int(sizes.sum()):,} parameters), kernel + parameter update",
    "per-call cost ~2-4 µs × 1,000 ≈ 3 ms dominates the ~1.4M-parameter traffic (~1 ms): "
    "packing with packed state ~2x faster; packing a per-leaf state each step adds 4 copies "
    "and about cancels the gain; one call taking every leaf: the packed speed without packing",
    _interleaved(contenders, repeats),
  )


def experiment_accumulators(size: int, repeats: int) -> None:
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=size), jnp.bfloat16)}
  batch = {"w": jnp.asarray(rng.normal(size=size), jnp.bfloat16)}
  contenders = {}
  for accumulator in (jnp.float32, jnp.bfloat16):
    tx = optax_adadelta.adadelta(accumulator_dtype=accumulator, implementation="native")
    step = _train_step(tx, gradients_in_step=True)(batch)
    name = f"bf16 parameters, {jnp.dtype(accumulator).name} accumulators"
    contenders[name] = (step, (jax.tree.map(jnp.copy, params), tx.init(params)))
  _report(
    f"E3: accumulator dtype ({size:,} bfloat16 parameters, gradients in step)",
    "bytes per parameter 2+8+8+2+2+2 (f32) vs 2+4+4+2+2+2 (bf16): bf16 ~1.4x faster, but "
    "bf16 averages stall (see README, Pitfalls): kept float32 as the recommendation",
    _interleaved(contenders, repeats),
  )


def experiment_dispatch_floor(repeats: int) -> None:
  rng = np.random.default_rng(1)
  sizes = _small_leaf_sizes(rng)
  params = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in sizes]
  ours, theirs = optax_adadelta.adadelta(), optax.adadelta(1.0, rho=0.95, eps=1e-6)

  def full(tx):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  steps = {
    "pass-through (params, state) unchanged": (lambda p, s, g: (p, s), ours),
    "params + grads, state unchanged": (lambda p, s, g: (jax.tree.map(jnp.add, p, g), s), ours),
    "optax_adadelta.adadelta() step": (full(ours), ours),
    "optax.adadelta step": (full(theirs), theirs),
  }
  copy = jax.jit(lambda tree: jax.tree.map(lambda x: x + 0, tree))
  # The gradients are donated as in benchmarks/step.py; JAX warns that it cannot use them.
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  jitted = {name: jax.jit(step, donate_argnums=(0, 1, 2)) for name, (step, _) in steps.items()}
  states = {name: tx.init(params) for name, (_, tx) in steps.items()}

  def fresh(name):  # donated buffers are consumed: new copies before every (untimed) call
    return jax.block_until_ready((copy(params), copy(states[name]), copy(params)))

  for name in steps:
    jax.block_until_ready(jitted[name](*fresh(name)))  # compile and warm up
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(repeats):
    for name in steps:
      args = fresh(name)
      start = time.perf_counter()
      jax.block_until_ready(jitted[name](*args))
      times[name].append(time.perf_counter() - start)
  _report(
    "E4: 1,000 small leaves, the step beside the same buffers passed through",
    "passing ~4,000 buffers in and ~3,000 out costs most of the step; the update itself little",
    times,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--size", type=int, default=24, help="log2 of the one-leaf size")
  args = parser.parse_args()
  if not _native.is_available():
    raise SystemExit(f"the native kernel is not available: {_native.unavailable_reason()}")
  print(f"jax {jax.__version__} on {jax.default_backend()}, {args.repeats} interleaved repeats")
  experiment_alias(1 << args.size, args.repeats)
  experiment_packing(args.repeats)
  experiment_accumulators(1 << args.size, args.repeats)
  experiment_dispatch_floor(args.repeats)


if __name__ == "__main__":
  main()
