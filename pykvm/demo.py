"""``pykvm demo``: a hello-world guest and a short capability summary.

The guest is 16 bytes of real-mode code that prints "Hello from a KVM
guest!" one byte at a time through port 0x3f8 (each ``out`` is a KVM exit
that pykvm hands to Python), then halts.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import Cap, Hlt, IoOut, Kvm, KvmUnavailable
from .command import EXIT_NO, EXIT_OK, error, run_command

MESSAGE = b"Hello from a KVM guest!\n"

# Real mode, code at 0x1000, message at 0x1100:
GUEST = bytes([
    0xBE, 0x00, 0x11,  # mov si, 0x1100
    0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    0xAC,              # next: lodsb          ; al = [si++]
    0x84, 0xC0,        #       test al, al
    0x74, 0x03,        #       jz done
    0xEE,              #       out dx, al     ; -> IoOut exit
    0xEB, 0xF8,        #       jmp next
    0xF4,              # done: hlt            ; -> Hlt exit
])


def hello(kvm: Kvm) -> tuple[bytes, int, float]:
    """Run the guest; return (printed bytes, number of exits, seconds)."""
    with kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0x10000)
        mem.write(0x1000, GUEST)
        mem.write(0x1100, MESSAGE + b"\0")
        vcpu = vm.create_vcpu()
        sregs = vcpu.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = 0x1000, 0x2
        vcpu.set_regs(regs)
        out, exits = bytearray(), 0
        t0 = time.perf_counter()
        while True:
            e = vcpu.run()
            exits += 1
            if isinstance(e, IoOut) and e.port == 0x3F8:
                out += e.data
            elif isinstance(e, Hlt):
                break
            else:
                raise RuntimeError(f"unexpected exit {e!r}")
        return bytes(out), exits, time.perf_counter() - t0


def summary(kvm: Kvm) -> list[str]:
    """A few lines on what this host's KVM offers."""
    caps = [c for c in Cap if kvm.check_extension(c)]
    lines = [
        f"KVM API version {kvm.api_version}, vCPU mmap size {kvm.vcpu_mmap_size} bytes",
        f"vCPUs: {kvm.nr_vcpus} recommended, {kvm.max_vcpus} max; memory slots: {kvm.nr_memslots}",
        f"capabilities present: {len(caps)} of {len(Cap)} known",
        f"supported CPUID leaves: {len(kvm.supported_cpuid())}, MSRs to save: {len(kvm.msr_index_list())}",
    ]
    for c in (Cap.IRQCHIP, Cap.USER_MEMORY2, Cap.GUEST_MEMFD, Cap.DIRTY_LOG_RING,
              Cap.BINARY_STATS_FD, Cap.NESTED_STATE, Cap.XSAVE2):
        lines.append(f"  KVM_CAP_{c.name:<20} {kvm.check_extension(c)}")
    return lines


def _demo(argv: list[str] | None) -> int:
    argparse.ArgumentParser(
        prog="pykvm demo", description="Run a hello-world guest and print a short capability summary.",
        epilog="Exit status: 0 done, 1 KVM not usable here, 2 usage error, 3 internal error.",
    ).parse_args(argv)
    try:
        kvm = Kvm()
    except KvmUnavailable as e:
        error("demo", f"KVM is not usable here: {e}")
        return EXIT_NO
    with kvm:
        out, exits, secs = hello(kvm)
        sys.stdout.write(out.decode())
        print(f"({exits} exits in {secs * 1e3:.2f} ms, {secs / exits * 1e6:.1f} us per exit)\n")
        print("\n".join(summary(kvm)))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``pykvm demo`` with *argv* (default ``sys.argv[1:]``); return the exit status."""
    return run_command("demo", lambda: _demo(argv))


if __name__ == "__main__":
    raise SystemExit(main())
