"""Adadelta (Zeiler 2012) for JAX, as optax gradient transformations."""

from optax_adadelta._adadelta import ScaleByAdadeltaState, adadelta, scale_by_adadelta

__version__ = "0.1.0"

__all__ = ["ScaleByAdadeltaState", "adadelta", "scale_by_adadelta"]
