"""The README's example runs and prints what it says."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_example_prints_hi():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hi\n"


def test_demo_runs_guest_and_summarises():
    r = subprocess.run([sys.executable, "-m", "pykvm.demo"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello from a KVM guest!\n")
    assert "KVM API version 12" in r.stdout and "KVM_CAP_IRQCHIP" in r.stdout
