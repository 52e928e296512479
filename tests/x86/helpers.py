"""Shared helpers for the pykvm.x86 tests."""

from __future__ import annotations

import shutil

import pytest

from pykvm import x86

needs_binutils = pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                                    reason="GNU binutils (as, ld) are not installed")

CODE = 0x10000
STACK = 0x80000


def long_mode_guest(kvm, vm, source: str, *, ram: int = 2 * x86.MiB, build=None, **load):
    """Assemble *source* at CODE, build LongMode tables at 0x1000 and load vCPU 0."""
    vm.add_memory(0, ram)
    prog = x86.assemble(source, base=CODE)
    prog.load(vm)
    lm = x86.LongMode.build(x86.Arena(vm, 0x1000, 0xF000), **(build or {}))
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    lm.load(vcpu, entry=prog.entry, stack=STACK, **load)
    return vcpu, prog, lm


def collect_out(loop: x86.RunLoop, port: int = 0xF0) -> list:
    """Record every value written to *port* (as little-endian ints)."""
    got: list = []
    loop.on_out(port, lambda p, d: got.append(int.from_bytes(d, "little")))
    return got
