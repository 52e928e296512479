"""Sphinx configuration: the API reference generated from pykvm's docstrings.

The hand-written guides (tutorial.md, vmm.md, ...) stay Markdown files read on
the forge; Sphinx builds only ``docs/api/`` from the docstrings::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The module list is not written by hand: every public module of the package
(no ``_``-prefixed part, no ``__main__``) is found at build time and appended
to ``api/index.rst``, so a module that moves shows up where it went.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pykvm  # noqa: E402

project = "pykvm"
author = "The pykvm authors"
copyright = "2026, The pykvm authors"
release = version = pykvm.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
root_doc = "api/index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"pykvm {release} API reference"

# Each object is documented once, in the module that defines it (not again
# where a façade such as `pykvm` or `pykvm.uapi` re-exports it).
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# ctypes structures and re-exported names resolve to many targets; a docstring
# that names a missing target is not an error of the build itself.
nitpicky = False
suppress_warnings = ["ref.python"]


def public_modules() -> list[str]:
    """Every importable public module of pykvm, sorted."""
    names = ["pykvm"]
    for info in pkgutil.walk_packages(pykvm.__path__, "pykvm."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts[1:]):
            continue
        names.append(info.name)
    return sorted(names)


def _append_modules(app: object, docname: str, source: list[str]) -> None:
    if docname != "api/index":
        return
    blocks = []
    for name in public_modules():
        importlib.import_module(name)
        blocks.append(f"\n``{name}``\n{'-' * (len(name) + 4)}\n\n.. automodule:: {name}\n")
    source[0] += "".join(blocks)


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("source-read", _append_modules)
