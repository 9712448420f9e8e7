"""The private JAX API of the native layer (optax_adadelta/native/jax_private.py).

When a JAX release moves a private name these tests fail naming it, while the package keeps
running on its fallback (sharded steps then lower the pure-JAX update, never a kernel that
would see part of an array). They need no kernel: a probe primitive records what its lowering
rule is told.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_adadelta.native import jax_private
from tests.sharding_checks import needs_eight_devices

PRIVATE_NAMES = [jax_private.DEVICES_DURING_LOWERING, jax_private.SHARDING_CONTEXT]


@pytest.mark.parametrize("name", PRIVATE_NAMES)
def test_each_private_name_is_where_the_native_layer_looks(name):
  module, _, attribute = name.rpartition(".")
  try:
    found = getattr(importlib.import_module(module), attribute)
  except (ImportError, AttributeError) as error:
    pytest.fail(
      f"jax {jax.__version__} has no {name} ({error}): optax_adadelta/native/jax_private.py "
      "falls back (sharded steps lower the pure-JAX update); find where JAX moved it"
    )
  assert found is not None, name
  assert not jax_private.private_api().missing, jax_private.private_api().missing


def _probe():
  """A primitive whose CPU lowering records the Site it is given, and lowers to identity."""
  probe = Primitive("optax_adadelta_probe")
  probe.def_abstract_eval(lambda x: x)
  seen: list = []

  def lowering(ctx, x):
    seen.append(jax_private.private_api().site(ctx))
    return mlir.lower_fun(lambda x: [x * 1], multiple_results=True)(ctx, x)

  mlir.register_lowering(probe, lowering, platform="cpu")
  assert jax_private.private_api().lower_with_devices(probe)
  return probe, seen


def test_one_device_and_export_are_told_apart():
  probe, seen = _probe()
  x = jnp.ones(8)
  jax.jit(probe.bind).lower(x)
  jax.export.export(jax.jit(probe.bind), platforms=["cpu"])(x)
  assert seen == [jax_private.Site(False, False, False), jax_private.Site(True, False, False)]


@needs_eight_devices
def test_a_sharded_step_is_seen_with_its_devices_and_a_shard_map_shard_is_not_sharded():
  probe, seen = _probe()
  mesh = jax.make_mesh((8,), ("data",))
  x = jax.device_put(jnp.ones(16), NamedSharding(mesh, P("data")))
  jax.jit(probe.bind).lower(x)
  spec = P("data")
  jax.jit(jax.shard_map(probe.bind, mesh=mesh, in_specs=spec, out_specs=spec)).lower(x)
  assert seen == [jax_private.Site(False, True, True), jax_private.Site(False, False, False)]


@needs_eight_devices
def test_without_the_private_names_sharded_steps_are_still_seen_as_sharded(monkeypatch):
  """The fallback: a release that moved both names still gets sharded=True, devices unknown
  (so the pure-JAX update), and `missing` names both."""
  monkeypatch.setattr(jax_private, "DEVICES_DURING_LOWERING", "jax._src.dispatch.moved_away")
  monkeypatch.setattr(jax_private, "SHARDING_CONTEXT", "jax._src.moved_away.ShardingContext")
  api = jax_private.private_api.__wrapped__()
  assert [m.split(" ")[0] for m in api.missing] == [
    "jax._src.dispatch.moved_away",
    "jax._src.moved_away.ShardingContext",
  ]
  probe = Primitive("optax_adadelta_probe_fallback")
  probe.def_abstract_eval(lambda x: x)
  seen: list = []

  def lowering(ctx, x):
    seen.append(api.site(ctx))
    return mlir.lower_fun(lambda x: [x * 1], multiple_results=True)(ctx, x)

  mlir.register_lowering(probe, lowering, platform="cpu")
  assert not api.lower_with_devices(probe)
  mesh = jax.make_mesh((8,), ("data",))
  x = jax.device_put(jnp.ones(16), NamedSharding(mesh, P("data")))
  jax.jit(probe.bind).lower(x)
  assert seen == [jax_private.Site(False, True, False)]
