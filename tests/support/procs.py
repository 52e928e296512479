"""Child processes: a fresh interpreter with the checkout importable, and an unprivileged user.

The unprivileged runs use Debian's ``/usr/bin/python3`` as ``nobody`` (via
``runuser``) on a world-readable copy of the checkout and of ``ioctl_opt``:
the default python3 lives under /root (mode 0700), which ``nobody`` cannot read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ioctl_opt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_PYTHON = "/usr/bin/python3"
UNPRIVILEGED_USER = "nobody"


def child_fds(**kw: Any) -> dict[int, str]:
    """Exec a fresh interpreter that inherits every inheritable fd; return its fd table."""
    code = ("import os\n"
            "for fd in sorted(os.listdir('/proc/self/fd'), key=int):\n"
            "    try: print(fd, os.readlink('/proc/self/fd/' + fd))\n"
            "    except OSError: pass\n")
    out = subprocess.run([sys.executable, "-c", code], close_fds=False, capture_output=True,
                         text=True, check=True, timeout=60, **kw).stdout
    return {int(a): b for a, b in (line.split(" ", 1) for line in out.splitlines())}


def run_python(code: str, *, timeout: float = 120, env: Mapping[str, str] | None = None,
               **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run *code* (dedented) in a child interpreter with the checkout importable."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=REPO, **kw)


def why_no_unprivileged_user() -> str:
    """Why this machine cannot run a program as ``nobody`` here ('' when it can)."""
    if os.geteuid() != 0:
        return "switching to another user needs root"
    if not shutil.which("runuser"):
        return "runuser is not installed"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing"
    return ""


@contextlib.contextmanager
def world_readable_checkout(names: Sequence[str] = ("pykvm",)) -> Iterator[str]:
    """A temporary world-readable copy of the checkout's *names* and of ``ioctl_opt``; yields its path."""
    d = tempfile.mkdtemp(prefix="pykvm-nobody-", dir="/tmp")
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in names:
            src = os.path.join(REPO, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(d, name), ignore=ignore)
        src = ioctl_opt.__file__
        if os.path.basename(src) == "__init__.py":
            shutil.copytree(os.path.dirname(src), os.path.join(d, "ioctl_opt"), ignore=ignore)
        else:
            shutil.copy(src, d)
        for root, _dirs, files in os.walk(d):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_unprivileged(tree: str, *args: str, timeout: float = 120, cwd: str | None = None,
                     ) -> subprocess.CompletedProcess[str]:
    """``/usr/bin/python3 *args`` as ``nobody`` with only *tree* importable and a minimal environment."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": tree, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([shutil.which("runuser") or "runuser", "-u", UNPRIVILEGED_USER, "--",
                           "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()],
                           SYSTEM_PYTHON, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or tree)
