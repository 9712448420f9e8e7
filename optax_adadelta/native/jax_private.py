"""The private JAX API the native layer relies on, every use of it inside `private_api`.

JAX gives no public way to (1) make ``jit`` lower a primitive with the device assignment that
``custom_partitioning`` needs, nor (2) tell, inside a lowering rule, a step sharded over several
devices from one device, a ``pmap`` replica or a ``shard_map`` shard. A JAX release may move
either: then `private_api` still answers, with the safe fallback (the pure-JAX rule for
sharded steps, never a kernel that sees only part of an array), and lists what it missed in
``missing``; tests/test_jax_private.py fails naming it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

# The private names looked up, for the test's message and the reader's grep.
DEVICES_DURING_LOWERING = "jax._src.dispatch.prim_requires_devices_during_lowering"
SHARDING_CONTEXT = "jax._src.sharding_impls.ShardingContext"


class Site(NamedTuple):
  """Where a lowering rule is lowering its primitive."""

  for_export: bool  # under jax.export, which serializes only custom calls JAX guarantees
  sharded: bool  # a jit step sharded over several devices (the partitioner splits it later)
  devices_known: bool  # ... and lowered with its device assignment (custom_partitioning needs it)


class PrivateApi(NamedTuple):
  lower_with_devices: Callable[[Any], bool]  # primitive -> whether jit will lower it so
  site: Callable[[Any], Site]  # a lowering rule's ctx -> where it lowers
  missing: tuple[str, ...]  # "private name (error)" for each one this JAX lacks


def _lookup(name: str, missing: list[str]) -> Any:
  module, _, attribute = name.rpartition(".")
  try:
    return getattr(importlib.import_module(module), attribute)
  except (ImportError, AttributeError) as error:
    missing.append(f"{name} ({type(error).__name__}: {error})")
    return None


@functools.cache
def private_api() -> PrivateApi:
  """The private JAX API of the native layer, looked up once."""
  missing: list[str] = []
  needs_devices = _lookup(DEVICES_DURING_LOWERING, missing)
  sharding_context = _lookup(SHARDING_CONTEXT, missing)

  def lower_with_devices(primitive) -> bool:
    if needs_devices is None:
      return False  # then sharded steps lower the pure-JAX rule (Site.devices_known is False)
    needs_devices.add(primitive)
    return True

  def site(ctx) -> Site:
    context = ctx.module_context
    axes = context.axis_context
    if sharding_context is not None:
      sharded = isinstance(axes, sharding_context) and axes.num_devices > 1
    else:  # the attribute that marks it, read defensively: sharded if in doubt
      sharded = getattr(axes, "num_devices", 1) > 1
    devices_known = sharded and getattr(axes, "device_assignment", None) is not None
    return Site(context.lowering_parameters.for_export, sharded, devices_known)

  return PrivateApi(lower_with_devices, site, tuple(missing))
