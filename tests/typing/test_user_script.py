"""A user's typed script passes ``mypy --strict`` and keeps every type.

``hello_typed.py`` is the README's first guest as a user who runs
``mypy --strict`` writes it; it is type-checked and then run on the real
/dev/kvm.  ``reveal_idiom.py`` holds ``reveal_type`` lines for the documented
idiom (``with pykvm.Kvm() as kvm, kvm.create_vm() as vm:``, vCPU, memory,
registers, ``kvm_run``, exits narrowed by ``isinstance``, the probe); each is
compared with the type written after ``# ->`` on its line.

mypy runs as a user's would: pykvm is imported, not checked itself
(``--follow-imports=silent``: pykvm's own errors are the package's CI gate,
not the user's), with no project configuration (``--config-file=``).
Skipped only when mypy is not installed (it is in the ``test`` extra).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")


def _mypy(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--config-file=",
         "--no-error-summary", "--hide-error-context", "--cache-dir", str(tmp_path / "cache"),
         *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)


def _short(type_text: str) -> str:
    # mypy before 2.0 writes builtins with their module ("builtins.int")
    return re.sub(r"\bbuiltins\.", "", type_text)


def test_hello_typed_passes_mypy_strict(tmp_path: Path) -> None:
    r = _mypy(tmp_path, HERE / "hello_typed.py")
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_hello_typed_runs(kvm: object) -> None:
    r = subprocess.run([sys.executable, str(HERE / "hello_typed.py")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["A", "0x1005"]  # the byte written to port 0xe9; rip after hlt


def test_documented_idiom_keeps_every_type(tmp_path: Path) -> None:
    source = (HERE / "reveal_idiom.py").read_text().splitlines()
    expected = {n: line.split("# ->", 1)[1].strip()
                for n, line in enumerate(source, 1) if "reveal_type(" in line}
    assert len(expected) >= 15
    r = _mypy(tmp_path, HERE / "reveal_idiom.py")
    revealed = {int(m.group(1)): _short(m.group(2))
                for m in re.finditer(r'reveal_idiom\.py:(\d+): note: Revealed type is "([^"]*)"', r.stdout)}
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert errors == [], r.stdout
    assert revealed == expected, r.stdout
