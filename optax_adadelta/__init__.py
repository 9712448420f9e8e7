"""Adadelta (Zeiler 2012) for JAX, as optax gradient transformations."""

from optax_adadelta import interop, presets, sharding
from optax_adadelta._adadelta import ScaleByAdadeltaState, adadelta, scale_by_adadelta
from optax_adadelta._codes_8bit import QuantizedAverage
from optax_adadelta._low_memory import LowMemoryAdadeltaState
from optax_adadelta._native import is_available as native_available
from optax_adadelta._packed import PackedAdadeltaState, PackedLayout
from optax_adadelta.transforms import (
  AccumulateGradientsState,
  ParamsEmaState,
  accumulate_gradients,
  clip_by_leaf_norm,
  finalize,
  params_ema,
)

__version__ = "0.2.0.dev0"

__all__ = [
  "AccumulateGradientsState",
  "LowMemoryAdadeltaState",
  "PackedAdadeltaState",
  "PackedLayout",
  "ParamsEmaState",
  "QuantizedAverage",
  "ScaleByAdadeltaState",
  "accumulate_gradients",
  "adadelta",
  "clip_by_leaf_norm",
  "finalize",
  "interop",
  "native_available",
  "params_ema",
  "presets",
  "scale_by_adadelta",
  "sharding",
]
