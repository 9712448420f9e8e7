"""Experiment E5: what a donated jitted step costs per buffer it passes, without arithmetic.

    python -m benchmarks.dispatch_floor

1,000 leaves of one element (so the arithmetic is negligible), the step
`p ← p − 0.1·g` plus k arrays per leaf updated as `s ← 0.9·s + g` (k = 0, 1, 2: no state, one
average, Adadelta's two). Prints the median of 30 steps for each, and again for leaves of 4,096.
The difference between the rows is what passing the state's buffers costs.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

LEAVES, STEPS = 1000, 30


def median_step_ms(size: int, arrays_per_leaf: int) -> float:
  params = {f"leaf_{i:04d}": jnp.ones((size,), jnp.float32) for i in range(LEAVES)}
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  state = [jax.tree.map(jnp.zeros_like, params) for _ in range(arrays_per_leaf)]

  def step(params, state, grads):
    state = [jax.tree.map(lambda s, g: 0.9 * s + g, s, grads) for s in state]
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), state

  step = jax.jit(step, donate_argnums=(0, 1))
  for _ in range(3):  # compile and warm up
    params, state = jax.block_until_ready(step(params, state, grads))
  times = []
  for _ in range(STEPS):
    start = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, grads))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main() -> None:
  print(f"load average at start: {os.getloadavg()}; jax {jax.__version__}")
  print("| leaf size | buffers in / out | no state | 1 array per leaf | 2 arrays per leaf |")
  print("|---|---|---|---|---|")
  for size in (1, 4096):
    row = [f"{median_step_ms(size, k):.1f} ms" for k in (0, 1, 2)]
    print(f"| {size} | 2,000/1,000 → 4,000/3,000 | " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
