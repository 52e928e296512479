"""Guests for the pykvm.x86 tests, set up by pykvm.x86 itself (the toolkit under test)."""

from __future__ import annotations

from pykvm import x86
from tests.support.host import needs_binutils

__all__ = ["CODE", "STACK", "collect_out", "long_mode_guest", "needs_binutils"]

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
