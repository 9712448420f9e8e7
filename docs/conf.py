"""Sphinx: the API from the docstrings (autodoc + napoleon), guides in Markdown (MyST).

Built in CI with warnings as errors: sphinx-build -W --keep-going -b html docs <out>.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree, not an install
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import optax_adadelta

project = "optax-adadelta"
author = "optax-adadelta developers"
copyright = "optax-adadelta developers; Apache-2.0"
release = optax_adadelta.__version__
version = release

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

# Google-style docstrings (Args:, Returns:, Examples:), as optax writes them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # a NamedTuple's fields: documented once, in its docstring
autodoc_member_order = "bysource"
autodoc_typehints = "description"

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"optax-adadelta {release}"
