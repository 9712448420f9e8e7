"""`mlp.effective_learning_rates` against a NumPy computation of the same quantiles."""

import jax
import jax.numpy as jnp
import numpy as np

import optax_adadelta
from optax_adadelta.demo import mlp


def test_effective_learning_rates_skip_weights_that_never_saw_a_gradient():
  eps = 1e-6
  params = mlp.init(jax.random.key(0), (6, 5, 4, 3))
  tx = optax_adadelta.adadelta(rho=0.9, eps=eps)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    grads[0]["w"] = grads[0]["w"].at[:2].set(0.0)  # two always-blank inputs
    _, state = tx.update(grads, state)
  rates = mlp.effective_learning_rates(state, eps, quantiles=(0.1, 0.5, 0.9))

  (inner,) = [s for s in state if hasattr(s, "e_g2")]
  for layer, got in enumerate(rates):
    e_g2 = np.asarray(inner.e_g2[layer]["w"], np.float64)
    e_dx2 = np.asarray(inner.e_dx2[layer]["w"], np.float64)
    ratio = np.sqrt(e_dx2 + eps) / np.sqrt(e_g2 + eps)
    active = ratio[e_g2 > 0]
    assert active.size == (e_g2.size - 2 * e_g2.shape[1] if layer == 0 else e_g2.size)
    np.testing.assert_allclose(got, np.quantile(active, [0.1, 0.5, 0.9]), rtol=1e-5)
