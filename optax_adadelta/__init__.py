"""Adadelta (Zeiler 2012) for JAX, as optax gradient transformations."""

from optax_adadelta import interop, presets, sharding
from optax_adadelta._adadelta import adadelta, scale_by_adadelta
from optax_adadelta.formats.codes_8bit import QuantizedAverage
from optax_adadelta.formats.eight_bit import scale_by_adadelta_8bit
from optax_adadelta.formats.factored import (
  FactoredAdadeltaState,
  FactoredAverage,
  scale_by_adadelta_factored,
)
from optax_adadelta.formats.full import ScaleByAdadeltaState
from optax_adadelta.formats.low_memory import LowMemoryAdadeltaState
from optax_adadelta.formats.packed import (
  PackedAdadeltaState,
  PackedLayout,
  scale_by_adadelta_packed,
)
from optax_adadelta.formats.ratio_code import RatioCode
from optax_adadelta.formats.rounded16 import Rounded16AdadeltaState, scale_by_adadelta_16bit
from optax_adadelta.native import is_available as native_available
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
  "FactoredAdadeltaState",
  "FactoredAverage",
  "LowMemoryAdadeltaState",
  "PackedAdadeltaState",
  "PackedLayout",
  "ParamsEmaState",
  "QuantizedAverage",
  "RatioCode",
  "Rounded16AdadeltaState",
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
  "scale_by_adadelta_8bit",
  "scale_by_adadelta_16bit",
  "scale_by_adadelta_factored",
  "scale_by_adadelta_packed",
  "sharding",
]
