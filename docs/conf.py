"""Sphinx configuration: the guides (Markdown, via MyST) and the API reference (autodoc).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (the test suite does,
warnings as errors: tests/test_docs.py)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "mmload"
author = "mmload developers"
copyright = "2026, mmload developers"
release = "0.1.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]  # links to repository files outside docs/

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_mock_imports = ["cudf", "cupy", "nvidia", "ray", "pyflink"]
napoleon_google_docstring = False
nitpicky = False
html_theme = "alabaster"
html_title = "mmload"
