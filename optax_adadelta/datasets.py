"""Moved to `optax_adadelta.demo.datasets`; this alias keeps `from optax_adadelta import datasets`.

To be removed once tests/test_mlp.py, tests/test_flax.py and notebooks/paper_reproduction_lib.py
import from `optax_adadelta.demo`.
"""

import sys

from optax_adadelta.demo import datasets as _datasets

sys.modules[__name__] = _datasets
