"""What the built distributions carry.

The sdist must be enough to run the test suite (conftest, guests, the VMM
test kernels' sources, the docs and examples the tests read); the wheel
carries the package, its type marker and the licence, and no tests.  Building
takes most of a minute, so the suite does not build: ``.ci/run`` builds into
``dist/`` and runs this file with ``PYKVM_DIST=dist``.
"""

from __future__ import annotations

import glob
import os
import pathlib
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.no_kvm_needed


def _one(pattern: str) -> str:
    d = os.environ.get("PYKVM_DIST")
    if not d:
        pytest.skip("set PYKVM_DIST to a directory built by 'python -m build' (.ci/run does)")
    found = glob.glob(os.path.join(d, pattern))
    assert len(found) == 1, f"{pattern} in {d}: {found}"
    return found[0]


def _tracked(*tops: str) -> set[str]:
    """Files under *tops* in the checkout (no caches, no build output)."""
    out = set()
    for top in tops:
        for p in (ROOT / top).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" \
                    and "_build" not in p.parts and ".hypothesis" not in p.parts:
                out.add(str(p.relative_to(ROOT)))
    return out


def test_sdist_carries_what_the_tests_need() -> None:
    with tarfile.open(_one("kvmbind-*.tar.gz")) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for must in ("LICENSE", "README.md", "Makefile", "pyproject.toml", "tests/conftest.py"):
        assert must in names, must
    missing = _tracked("tests", "docs", "examples", "pykvm") - names
    assert not missing, sorted(missing)[:20]


def test_wheel_has_package_typing_marker_and_licence_not_tests() -> None:
    with zipfile.ZipFile(_one("kvmbind-*.whl")) as whl:
        names = set(whl.namelist())
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "pykvm/py.typed" in names and "pykvm/kvm_stat/cli.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    assert "License-Expression: MIT" in meta
    for v in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Classifier: Programming Language :: Python :: {v}" in meta
    assert "Provides-Extra: docs" in meta and "Provides-Extra: dev" in meta
