"""`python -m optax_adadelta.demo`: the same as `python -m optax_adadelta`."""

import sys

from optax_adadelta.demo.cli import main

if __name__ == "__main__":
  sys.exit(main())
