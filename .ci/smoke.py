"""Smoke test of the installed wheel, run by .ci/run from a folder outside the source tree.

Imports the package (without the demo's extras), takes one jitted Adadelta step through the
native CPU kernel (compiled from the shipped native/kernel.cc on first use) and checks it against
the pure-JAX path, then runs `optax-adadelta --help`.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_adadelta
from optax_adadelta import native

where = Path(optax_adadelta.__file__).resolve()
assert "site-packages" in where.parts, f"imported from {where}, not from the installed wheel"
for source in ("kernel.cc", "kernel_8bit.cc", "adadelta.h"):
  assert (where.parent / "native" / source).is_file(), f"the wheel lacks native/{source}"
loaded = [name for name in ("tqdm", "matplotlib") if name in sys.modules]
assert not loaded, f"import optax_adadelta loaded the demo's extras {loaded}"

reason = native.unavailable_reason()
assert optax_adadelta.native_available(), f"native kernel not available: {reason}"

params = {"w": jnp.linspace(-1.0, 1.0, 1000), "b": jnp.zeros(3)}
grads = jax.tree.map(lambda p: p + 0.5, params)


def step(implementation):
  tx = optax.chain(
    optax.clip_by_global_norm(1.0), optax_adadelta.adadelta(implementation=implementation)
  )

  @jax.jit
  def run(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  hlo = run.lower(params, tx.init(params), grads).as_text()
  return run(params, tx.init(params), grads), hlo


(native_params, _), hlo = step("native")
assert "optax_adadelta" in hlo, "the jitted step does not call the native kernel"
(jax_params, _), _ = step("jax")
for name in params:
  np.testing.assert_allclose(native_params[name], jax_params[name], rtol=1e-6, atol=1e-7)

# The 8-bit state's kernel, from the same shipped sources: the same codes as XLA's.
eight_bit = {"w": jnp.zeros((8, 512))}
g8 = {"w": jnp.linspace(-1.0, 1.0, 4096).reshape(8, 512)}
for_8bit = {
  i: optax_adadelta.scale_by_adadelta(state_bits=8, implementation=i) for i in ("native", "jax")
}
hlo = jax.jit(for_8bit["native"].update).lower(g8, for_8bit["native"].init(eight_bit)).as_text()
assert "optax_adadelta_update_8bit" in hlo, "the 8-bit step does not call its native kernel"
got, want = (jax.jit(for_8bit[i].update)(g8, for_8bit[i].init(eight_bit)) for i in for_8bit)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)

script = shutil.which("optax-adadelta")
assert script, "the optax-adadelta console script is not on PATH"
usage = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
assert usage.startswith("usage: optax-adadelta"), usage
print(f"wheel smoke test passed: optax_adadelta {optax_adadelta.__version__} from {where.parent}")
print(f"jax {jax.__version__}, native kernel used, optax-adadelta --help works")
