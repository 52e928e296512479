"""The test suite's own house rules: one fixtures package, one naming pattern for helpers,
and a core guest set-up that stays independent of the x86 toolkit it helps to test."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.no_kvm_needed

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
#: Programs the tests (or a person, see docs/) run as ``python -m tests.<area>.<name>``.
PROGRAMS = {"reliability/fuzz_guests.py", "reliability/sweep_inputs.py", "snapshot/runner.py",
            "snapshot/saver.py", "snapshot/bench_snapshot.py", "snapshot/fuzz_atheris.py"}
#: Areas other helpers own and reshape on their own branches.
ELSEWHERE = ("vmm/", "bench/", "typing/")


def test_every_helper_is_in_the_fixtures_package_or_named_support():
    odd = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS).as_posix()
        if rel.startswith(ELSEWHERE) or rel.startswith("support/") or rel in PROGRAMS:
            continue
        name = path.name
        if name.startswith(("test_", "support_")) or name in ("__init__.py", "conftest.py"):
            continue
        odd.append(rel)
    assert not odd, f"helpers go in tests/support/ or tests/<area>/support_<what>.py: {odd}"


def test_core_guest_set_up_does_not_use_the_x86_toolkit():
    code = ("import sys, tests.support.guests, tests.support.runs\n"
            "print(sorted(m for m in sys.modules if m == 'pykvm.x86' or m.startswith('pykvm.x86.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]", out
