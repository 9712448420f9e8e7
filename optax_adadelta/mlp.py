"""Moved to `optax_adadelta.demo.mlp`; this alias keeps `from optax_adadelta import mlp`.

To be removed once tests/test_mlp.py, tests/test_flax.py and notebooks/paper_reproduction_lib.py
import from `optax_adadelta.demo`.
"""

import sys

from optax_adadelta.demo import mlp as _mlp

sys.modules[__name__] = _mlp
