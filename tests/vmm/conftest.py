"""Fixtures for the VMM tests: test kernels assembled at test time, and a runner.

The kernels are GNU assembler sources in ``kernels/`` (no binaries are
committed); they are built once per session with ``as --32`` and
``ld -m elf_i386``.  Without binutils the tests that need them are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).parent / "kernels"
SOURCES = ["hello", "tiny", "smp", "timer", "triple", "flood"]

# Every VMM run has the VMM's own --timeout and, around the process, this one.
VMM_TIMEOUT = 20
PROCESS_TIMEOUT = 60


def _tools_missing() -> str:
    missing = [t for t in ("as", "ld", "objcopy", "nm") if shutil.which(t) is None]
    return ", ".join(missing)


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")


def _build(out: Path, name: str, source: str, defsyms: dict[str, int] = {}) -> Path:
    obj, elf = out / f"{name}.o", out / f"{name}.elf"
    cmd = ["as", "--32", "-I", str(KERNELS), "-o", str(obj)]
    for k, v in defsyms.items():
        cmd += ["--defsym", f"{k}={v}"]
    _run(cmd + [str(KERNELS / f"{source}.S")])
    _run(["ld", "-m", "elf_i386", "-T", str(KERNELS / "kernel.ld"), "-o", str(elf), str(obj)])
    return elf


class Kernels:
    """Paths of the built kernels, by name; ``symbol(kernel, name)`` from ``nm``."""

    def __init__(self, out: Path) -> None:
        self.dir = out
        self.paths: dict[str, Path] = {}
        for name in SOURCES:
            self.paths[name] = _build(out, name, name)
        # hello with the a.out kludge, as a flat binary followed by junk that
        # must not be loaded (it would land in the bss)
        aout_elf = _build(out, "hello_aout", "hello", {"AOUT": 1})
        flat = out / "hello_aout.flat"
        _run(["objcopy", "-O", "binary", str(aout_elf), str(flat)])
        self.paths["hello_aout"] = out / "hello_aout.bin"
        self.paths["hello_aout"].write_bytes(flat.read_bytes() + b"\xaa" * 8192)

    def __getitem__(self, name: str) -> str:
        return str(self.paths[name])

    def symbol(self, kernel: str, name: str) -> int:
        p = subprocess.run(["nm", str(self.dir / f"{kernel}.elf")], capture_output=True,
                           text=True, check=True)
        for line in p.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == name:
                return int(parts[0], 16)
        raise KeyError(name)


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> Kernels:
    missing = _tools_missing()
    if missing:
        pytest.skip(f"binutils missing ({missing}): cannot build the test kernels")
    return Kernels(tmp_path_factory.mktemp("kernels"))


class Result:
    def __init__(self, p: subprocess.CompletedProcess) -> None:
        self.status = p.returncode
        self.out = p.stdout.decode("utf-8", "replace")
        self.err = p.stderr.decode("utf-8", "replace")
        self.lines = self.out.splitlines()

    def __repr__(self) -> str:
        return f"<status {self.status}\nstdout:\n{self.out}\nstderr:\n{self.err}>"


def run_vmm(kernel: str, *args: str, input: bytes | None = b"",
            timeout: float = VMM_TIMEOUT) -> Result:
    """``python -m pykvm.vmm KERNEL ARGS --timeout T`` in a subprocess."""
    cmd = [sys.executable, "-m", "pykvm.vmm", kernel, *args, "--timeout", str(timeout)]
    env = dict(os.environ)
    p = subprocess.run(cmd, input=input, capture_output=True, timeout=PROCESS_TIMEOUT, env=env)
    return Result(p)


@pytest.fixture
def vmm():
    return run_vmm
