"""`python -m optax_adadelta`: the command-line demo (optax_adadelta/demo/cli.py)."""

import sys

from optax_adadelta.demo.cli import main

if __name__ == "__main__":
  sys.exit(main())
