"""Assertions that an optimizer state is laid out over devices exactly like the parameters."""

from __future__ import annotations

import jax
import optax
import pytest

# Meshes of 4 x 2 or 8 devices: they take every device, so exactly 8 of the default backend
# (8 CPU devices from tests/conftest.py; an 8-GPU or 8-chip TPU host).
needs_eight_devices = pytest.mark.skipif(
  jax.device_count() != 8,
  reason=f"builds a mesh of 8 devices; jax has {jax.device_count()} "
  f"{jax.default_backend()} devices (tests/conftest.py gives 8 only on CPU)",
)


def _placement(leaf) -> object:
  """What decides where a leaf lives: device -> index map, or abstract mesh and spec."""
  sharding = leaf.sharding
  if isinstance(leaf, jax.Array):
    return {
      device.id: str(index) for device, index in sharding.devices_indices_map(leaf.shape).items()
    }
  spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
  return (sharding.mesh.abstract_mesh, spec)


def assert_state_follows_params(opt_state, params) -> None:
  """E[g²] and E[Δx²] each have the parameters' tree, shapes and shardings."""
  want = jax.tree.map(_placement, params)
  for name in ("e_g2", "e_dx2"):
    got = jax.tree.map(_placement, optax.tree.get(opt_state, name))
    assert got == want, f"{name} is laid out as {got}, the parameters as {want}"
