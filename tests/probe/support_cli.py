"""Running the ``pykvm`` command as a child process, as a user would."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pykvm *args`` in a child interpreter; its output as text."""
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True,
                          text=True, timeout=120)
