"""Hostile guests: run thousands of random guest programs and random register states.

Run as a program (the tests do it in a subprocess, so a crash of the
interpreter is a test failure, not the death of the test runner)::

    python -m tests.reliability.fuzz_guests --count 5000 --seed 1

``--count`` defaults to ``$PYKVM_FUZZ_COUNT`` (else 300).  Every case gets a fresh
VM whose memory holds random bytes at the entry point, a random mode (real
mode, long mode at CPL0, long mode at CPL3 with or without IOPL 3), random
general-purpose registers and RFLAGS and, for some cases, randomly corrupted
segment / control registers.  The case ends at the first exit that is not
I/O or MMIO (answered with random data), after ``--max-exits`` exits, or when
the watchdog kicks the vCPU after ``--timeout-ms``.  Every 50 cases (and at
the end) a known-good guest must still run in a fresh VM.

Prints one JSON line: {"cases": n, "outcomes": {...}, "modes": {...}, "seconds": t}.
The process exits 0 only if every case ended in an exit, a KvmError or a
timeout; any other exception is a failure (exit 1).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import random
import sys
import time

import pykvm
from pykvm import KvmError
from pykvm.x86.report import describe_vcpu
from tests.support import guests

MODES = ("real", "long0", "long3", "long3-iopl3")


class Kicks:
    """How many cases the watchdog (:meth:`pykvm.Vcpu.kick_after`) had to end."""

    def __init__(self) -> None:
        self.fired = 0


def _rand_u64(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.3:
        return rng.getrandbits(64)
    if pick < 0.6:
        return rng.randrange(0, guests.RAM)
    return rng.choice((0, 1, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x8000000000000000, guests.CODE, guests.DATA))


def _corrupt_sregs(rng: random.Random, s) -> None:
    """Flip a few random bits in segment, descriptor-table and control registers."""
    for _ in range(rng.randint(1, 4)):
        what = rng.choice(("cr0", "cr4", "efer", "cr3", "seg", "dt", "cr8"))
        if what in ("cr0", "cr4", "efer", "cr3"):
            setattr(s, what, getattr(s, what) ^ (1 << rng.randrange(64 if what == "cr3" else 32)))
        elif what == "cr8":
            s.cr8 = rng.randrange(16)
        elif what == "dt":
            dt = getattr(s, rng.choice(("gdt", "idt")))
            dt.base, dt.limit = _rand_u64(rng), rng.getrandbits(16)
        else:
            sg = getattr(s, rng.choice(("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")))
            field = rng.choice(("base", "limit", "selector", "type", "present", "dpl", "db", "s",
                                "l", "g", "avl", "unusable"))
            width = {"base": 64, "limit": 32, "selector": 16, "type": 4, "dpl": 2}.get(field, 1)
            setattr(sg, field, rng.getrandbits(width))


def run_case(kvm: pykvm.Kvm, kicks: Kicks, rng: random.Random, args, msr_list=()) -> tuple:
    """Build and run one random guest; return (mode, outcome)."""
    mode = rng.choice(MODES)
    with kvm.create_vm() as vm:
        mem = vm.add_memory(0, guests.RAM)
        if mode == "real":
            entry = 0x1000
        else:
            guests.build_long_mode_memory(mem)
            entry = guests.CODE
        code = rng.randbytes(rng.choice((1, 4, 16, 64, 256, 4096)))
        mem.write(entry, code)
        chaos = rng.random()
        if chaos < 0.05:  # random bytes everywhere: page tables, GDT, stack, code
            mem.write(0, rng.randbytes(0x20000))
        elif chaos < 0.35:  # random bytes around the code (page tables and GDT survive)
            mem.write(guests.CODE + 0x1000, rng.randbytes(0x1000))
            mem.write(guests.DATA, rng.randbytes(0x1000))
        vcpu = vm.create_vcpu()
        try:
            if mode == "real":
                guests.set_real_mode(vcpu, entry)
            else:
                guests.set_long_mode(vcpu, cpl=0 if mode == "long0" else 3,
                                rflags=2 | (guests.RFLAGS_IOPL3 if mode == "long3-iopl3" else 0))
            r = vcpu.get_regs()
            for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10",
                         "r11", "r12", "r13", "r14", "r15"):
                if rng.random() < 0.5:
                    setattr(r, name, _rand_u64(rng))
            if rng.random() < 0.3:
                r.rsp = _rand_u64(rng)
            if rng.random() < 0.3:
                r.rflags = (rng.getrandbits(22) | 2) & ~(1 << 8)  # no TF: keep cases short
            if rng.random() < 0.05:
                r.rip = _rand_u64(rng)
            vcpu.set_regs(r)
            if rng.random() < 0.05:  # random x87/SSE state
                vcpu.set_fpu(type(vcpu.get_fpu()).from_buffer_copy(
                    rng.randbytes(ctypes.sizeof(vcpu.get_fpu()))))
            if rng.random() < 0.05:  # random values in MSRs KVM saves/restores
                for idx in rng.sample(msr_list, min(3, len(msr_list))):
                    try:
                        vcpu.set_msrs({idx: _rand_u64(rng)})
                    except KvmError:
                        pass  # refused: fine, the point is that nothing breaks
            if rng.random() < args.sregs_fraction:
                s = vcpu.get_sregs()
                _corrupt_sregs(rng, s)
                vcpu.set_sregs(s)
        except KvmError as e:
            return mode, f"setup:{_errname(e)}"
        dog = vcpu.kick_after(args.timeout_ms / 1000)
        try:
            for _ in range(args.max_exits):
                try:
                    e = vcpu.run()
                except KvmError as err:
                    return mode, f"run:{_errname(err)}"
                if isinstance(e, (pykvm.IoOut, pykvm.MmioWrite)):
                    continue
                if isinstance(e, pykvm.IoIn):
                    e.data[:] = rng.randbytes(len(e.data))
                    continue
                if isinstance(e, pykvm.MmioRead):
                    e.data[:] = rng.randbytes(len(e.data))
                    continue
                if isinstance(e, pykvm.Interrupted):
                    return mode, "timeout"
                if isinstance(e, (pykvm.Shutdown, pykvm.InternalError, pykvm.FailEntry)):
                    # the state stays readable after a fault, and the report of it
                    # (what RunLoop raises as GuestError) copes with any garbage state
                    report = describe_vcpu(vcpu, e)
                    assert "rip=" in report and type(e).__name__ in report, report
                return mode, type(e).__name__
            return mode, "exit-budget"
        finally:
            dog.cancel()
            kicks.fired += dog.fired


def _errname(e: OSError) -> str:
    import errno

    return errno.errorcode.get(e.errno, str(e.errno))


def sanity(kvm: pykvm.Kvm) -> None:
    """A known-good guest in a fresh VM must still work."""
    with kvm.create_vm() as vm:
        v, = guests.long_mode_vm(vm, guests.HELLO_OUT)
        e = v.run()
        assert e == pykvm.IoOut(0x10, 1, 1, b"A"), e
        assert isinstance(v.run(), pykvm.Hlt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=int(os.environ.get("PYKVM_FUZZ_COUNT", "300")))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout-ms", type=float, default=20.0)
    p.add_argument("--max-exits", type=int, default=64)
    p.add_argument("--sregs-fraction", type=float, default=0.25)
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    kicks = Kicks()
    outcomes: collections.Counter = collections.Counter()
    modes: collections.Counter = collections.Counter()
    t0 = time.monotonic()
    with pykvm.Kvm() as kvm:
        msr_list = kvm.msr_index_list()
        for i in range(args.count):
            rng = random.Random(f"{seed}:{i}")
            print(f"case {seed}:{i}", file=sys.stderr, flush=True) if os.environ.get("PYKVM_FUZZ_TRACE") else None
            try:
                mode, outcome = run_case(kvm, kicks, rng, args, msr_list)
            except Exception as e:  # anything but KvmError is a bug in pykvm
                print(f"case {seed}:{i} failed: {e!r}", file=sys.stderr, flush=True)
                raise
            outcomes[outcome] += 1
            modes[mode] += 1
            if i % 50 == 49:
                sanity(kvm)
        sanity(kvm)
    print(json.dumps({"seed": seed, "cases": args.count, "outcomes": dict(outcomes.most_common()),
                      "modes": dict(modes), "kicks": kicks.fired,
                      "seconds": round(time.monotonic() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
