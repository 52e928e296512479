"""Run every example as a subprocess and check what its guest computed.

Each example is started as ``sys.executable examples/NN_name.py`` with a
timeout; the assertions are on the guest's own output (numbers it computed,
strings it built) and on the host's cross-checks, not just on exit status.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
needs_binutils = pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                                    reason="GNU binutils (as, ld) are not installed")


def run_example(name: str, *args: str, timeout: float = 60) -> str:
    path = next(EXAMPLES.glob(f"{name}_*.py"))
    p = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{path.name} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_every_example_has_a_test() -> None:
    names = sorted(p.name[:2] for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert names == [f"{i:02d}" for i in range(1, 9)]


def test_01_real_mode_hello() -> None:
    out = run_example("01")
    assert "guest says: Hello from real mode!" in out
    assert "guest computed 1+2+...+10 = 55" in out


@needs_binutils
@pytest.mark.no_kvm_needed
def test_01_machine_code_matches_its_assembly(tmp_path) -> None:
    """The annotated bytes of example 01 are what GNU as makes of the annotation."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import importlib

        ex = importlib.import_module("01_real_mode_hello")
    finally:
        sys.path.pop(0)
    from pykvm import x86

    pairs = re.findall(r"# ([0-9a-f]{4}): ([^;\n]+)", Path(ex.__file__).read_text())
    labels = {addr: f"L{addr}" for addr, _ in pairs}
    # jump targets in the annotation are addresses: turn them into labels
    src = "\n".join(f"{labels[addr]}: " + re.sub(r"\b(jz|jmp|loop)\s+([0-9a-f]{4})\b",
                                                 lambda m: f"{m.group(1)} {labels[m.group(2)]}", text)
                    for addr, text in pairs)
    prog = x86.assemble(src, base=ex.CODE_ADDR, bits=16)
    assert prog.code == ex.CODE


@needs_binutils
def test_02_serial_console(kvm) -> None:
    vendor_leaf = next(e for e in kvm.supported_cpuid() if e.function == 0)
    vendor = b"".join(v.to_bytes(4, "little") for v in (vendor_leaf.ebx, vendor_leaf.edx, vendor_leaf.ecx))
    out = run_example("02", "Ada")
    assert "What is your name? " in out
    assert "Hello, Ada! Your name has 3 letters." in out
    assert f"My CPU vendor (cpuid leaf 0) is {vendor.decode()}" in out
    assert "[host] guest stopped: hlt" in out


@needs_binutils
def test_03_mmio_device() -> None:
    out = run_example("03")
    assert "guest: device id 0x564b5950, version 1" in out
    assert "guest: gcd(1071, 462) = 21" in out
    assert f"guest: 123456789 * 987654321 = {123456789 * 987654321}" in out
    assert "guest: tickets 1 2 3" in out
    assert "the device served 13 MMIO accesses" in out


@needs_binutils
def test_04_interrupts() -> None:
    out = run_example("04")
    assert "guest: 10 LAPIC timer ticks received" in out
    for k in (1, 2, 3):
        assert f"guest: irqfd interrupt {k}\n" in out
    ticks = int(re.search(r"guest done after [0-9.]+ s: (\d+) ticks", out).group(1))
    assert ticks >= 10


@needs_binutils
def test_05_smp() -> None:
    out = run_example("05")
    assert "cpu 0: online in long mode" in out
    assert "cpu 1: online in long mode" in out
    chunks = {int(c): int(n) for c, n in re.findall(r"cpu (\d): took (\d+) chunks", out)}
    assert set(chunks) == {0, 1} and sum(chunks.values()) == 64
    expected = sum(i * i for i in range(1, 6401))
    assert f"sum of squares 1..6400 = {expected}\n" in out
    assert f"total in guest memory = {expected}, equal to Python's" in out


@needs_binutils
def test_06_user_mode() -> None:
    out = run_example("06")
    assert "kernel: booted at CPL0" in out
    assert "user: hello from CPL3" in out
    assert f"user: sum 1..100000000 = {100000000 * 100000001 // 2}" in out
    assert re.search(r"user: CPL3 loop: \d+\.\d\d TSC cycles per iteration", out)
    assert "user: write(kernel address) refused with -14" in out
    assert "user program exited with code 42" in out


@needs_binutils
def test_07_single_step() -> None:
    out = run_example("07")
    steps = re.findall(r"^\s+(\d+)\s+0x([0-9a-f]+)\s+(\S+)", out, re.M)
    addrs = [int(a, 16) for _, a, _ in steps]
    # mov, mov, then three rounds of the 6-instruction loop, then out
    loop = [0x1000A, 0x1000C, 0x1000E, 0x10010, 0x10012, 0x10014]
    assert addrs == [0x10000, 0x10005] + loop * 3 + [0x10016]
    assert [int(n) for n, _, _ in steps] == list(range(1, 22))
    assert steps[2][2] == "euclid" and steps[3][2] == "euclid+0x2"
    assert "traced 21 instructions; the guest computed gcd(1071, 462) = 21" in out
    assert "rax=0000000000000015" in out


@needs_binutils
def test_08_dirty_pages() -> None:
    out = run_example("08")
    assert "round 0: copied all 1024 pages" in out
    last = int(re.search(r"stop-and-copy: vCPU paused \(stopped\), (\d+) dirty pages", out).group(1))
    assert last <= 64   # the hot set (16 pages) plus a few, never the whole memory again
    assert "destination memory identical to the source: True" in out
    m = re.search(r"counter went on from (\d+) to (\d+) \(continues\)", out)
    assert m and int(m.group(2)) > int(m.group(1))


def test_examples_import_only_public_api() -> None:
    """Examples are tutorials: they should not reach into private modules."""
    for path in EXAMPLES.glob("*.py"):
        assert "pykvm._" not in path.read_text(), path.name



