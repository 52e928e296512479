"""The guests the snapshot tests run, and a run loop with a watchdog.

:func:`build_counter` makes a VM (in-kernel irqchip and PIT, two memory
regions) whose vCPU runs the *counter* at CPL3 in 64-bit mode: per line it
mixes a 64-bit hash for ``r14`` rounds (native speed at CPL3), adds a salt
read through the FS base, adds 3 to ``xmm0``, and prints
``"<line> <hash in hex> <xmm0>\n"`` on port 0x3f8 through ``out`` (IOPL 3);
the line number lives in guest memory at 0x7000.  After ``r13`` lines it
writes its exit code to port 0xf4.  Its output therefore depends on the
general registers, RFLAGS, the SSE state, the FS base, the stack and guest
memory: a snapshot that loses any of them changes the output.

Long mode at CPL3 by :func:`tests.support.guests.user_mode` (the core
tests' one set-up), with the FS base at the salt.  The machine code was assembled with GNU as (Intel syntax) and is listed
instruction by instruction below.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pykvm
from tests.support.guests import CODE, RAM, build_long_mode_memory, user_mode

SALT_ADDR = 0x6000                 # FS base
COUNTER_ADDR = 0x7000              # the line counter
STACK_TOP = 0x8000
EXTRA_GPA, EXTRA_SIZE = 0x40000000, 0x100000   # a second region (host-written pattern)
PORT_OUT, PORT_EXIT = 0x3F8, 0xF4
SALT = 0x0123456789ABCDEF

_LISTING = [
    ("49bc157c4a7fb979379e", "0x10000: movabs r12,0x9e3779b97f4a7c15"),
    ("660fefc0", "0x1000a: pxor xmm0,xmm0"),
    ("b803000000", "0x1000e: mov eax,0x3"),
    ("66480f6ec8", "0x10013: movq xmm1,rax"),
    ("4c89f1", "0x10018: mov rcx,r14"),
    ("4c89e0", "0x1001b: mov rax,r12"),
    ("48c1e00d", "0x1001e: shl rax,0xd"),
    ("4931c4", "0x10022: xor r12,rax"),
    ("4c89e0", "0x10025: mov rax,r12"),
    ("48c1e807", "0x10028: shr rax,0x7"),
    ("4931c4", "0x1002c: xor r12,rax"),
    ("4c89e0", "0x1002f: mov rax,r12"),
    ("48c1e011", "0x10032: shl rax,0x11"),
    ("4931c4", "0x10036: xor r12,rax"),
    ("4901cc", "0x10039: add r12,rcx"),
    ("48ffc9", "0x1003c: dec rcx"),
    ("75da", "0x1003f: jne 0x1001b"),
    ("644c03242500000000", "0x10041: add r12,QWORD PTR fs:0x0"),
    ("660fd4c1", "0x1004a: paddq xmm0,xmm1"),
    ("488b042500700000", "0x1004e: mov rax,QWORD PTR ds:0x7000"),
    ("e848000000", "0x10056: call 0x100a3"),
    ("b020", "0x1005b: mov al,0x20"),
    ("e83b000000", "0x1005d: call 0x1009d"),
    ("4c89e0", "0x10062: mov rax,r12"),
    ("e870000000", "0x10065: call 0x100da"),
    ("b020", "0x1006a: mov al,0x20"),
    ("e82c000000", "0x1006c: call 0x1009d"),
    ("66480f7ec0", "0x10071: movq rax,xmm0"),
    ("e828000000", "0x10076: call 0x100a3"),
    ("b00a", "0x1007b: mov al,0xa"),
    ("e81b000000", "0x1007d: call 0x1009d"),
    ("48ff042500700000", "0x10082: inc QWORD PTR ds:0x7000"),
    ("4c392c2500700000", "0x1008a: cmp QWORD PTR ds:0x7000,r13"),
    ("7284", "0x10092: jb 0x10018"),
    ("66baf400", "0x10094: mov dx,0xf4"),
    ("31c0", "0x10098: xor eax,eax"),
    ("ee", "0x1009a: out dx,al"),
    ("ebfe", "0x1009b: jmp 0x1009b"),
    ("66baf803", "0x1009d: mov dx,0x3f8"),
    ("ee", "0x100a1: out dx,al"),
    ("c3", "0x100a2: ret"),
    ("4889e7", "0x100a3: mov rdi,rsp"),
    ("4883ec20", "0x100a6: sub rsp,0x20"),
    ("b90a000000", "0x100aa: mov ecx,0xa"),
    ("31d2", "0x100af: xor edx,edx"),
    ("48f7f1", "0x100b1: div rcx"),
    ("80c230", "0x100b4: add dl,0x30"),
    ("48ffcf", "0x100b7: dec rdi"),
    ("8817", "0x100ba: mov BYTE PTR [rdi],dl"),
    ("4885c0", "0x100bc: test rax,rax"),
    ("75ee", "0x100bf: jne 0x100af"),
    ("488d742420", "0x100c1: lea rsi,[rsp+0x20]"),
    ("8a07", "0x100c6: mov al,BYTE PTR [rdi]"),
    ("e8d0ffffff", "0x100c8: call 0x1009d"),
    ("48ffc7", "0x100cd: inc rdi"),
    ("4839f7", "0x100d0: cmp rdi,rsi"),
    ("75f1", "0x100d3: jne 0x100c6"),
    ("4883c420", "0x100d5: add rsp,0x20"),
    ("c3", "0x100d9: ret"),
    ("4889c6", "0x100da: mov rsi,rax"),
    ("b910000000", "0x100dd: mov ecx,0x10"),
    ("48c1c604", "0x100e2: rol rsi,0x4"),
    ("89f0", "0x100e6: mov eax,esi"),
    ("83e00f", "0x100e8: and eax,0xf"),
    ("3c0a", "0x100eb: cmp al,0xa"),
    ("7202", "0x100ed: jb 0x100f1"),
    ("0427", "0x100ef: add al,0x27"),
    ("0430", "0x100f1: add al,0x30"),
    ("e8a5ffffff", "0x100f3: call 0x1009d"),
    ("ffc9", "0x100f8: dec ecx"),
    ("75e6", "0x100fa: jne 0x100e2"),
    ("c3", "0x100fc: ret"),
]
COUNTER_CODE = bytes.fromhex("".join(h for h, _ in _LISTING))


def build_counter(kvm: pykvm.Kvm, *, lines: int = 40, iters: int = 20000,
                  irqchip: bool = True) -> pykvm.Vm:
    """A VM whose vCPU 0 runs the counter for *lines* lines of *iters* rounds each."""
    vm = kvm.create_vm()
    try:
        if irqchip:
            vm.create_irq_chip()
            vm.create_pit2()
        mem = vm.add_memory(0, RAM)
        mem.write(SALT_ADDR, struct.pack("<Q", SALT))
        extra = vm.add_memory(EXTRA_GPA, EXTRA_SIZE)
        extra.write(0x1000, bytes(range(256)) * 16)           # one page of pattern, rest zero
        extra.write(EXTRA_SIZE - 8, b"LASTPAGE")
        build_long_mode_memory(mem)
        mem.write(CODE, COUNTER_CODE)
        vcpu = user_mode(vm, COUNTER_CODE, mem=mem, cpuid=kvm.supported_cpuid())
        s = vcpu.get_sregs()
        s.fs.base = SALT_ADDR
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rsp = STACK_TOP
        r.r13, r.r14 = lines, iters
        vcpu.set_regs(r)
    except BaseException:
        vm.close()
        raise
    return vm


class GuestTimeout(AssertionError):
    """The guest did not finish in time (the watchdog kicked it)."""


def run_guest(vcpu: pykvm.Vcpu, out: bytearray, *, stop: Callable[[bytearray], bool] | None = None,
              timeout: float = 20.0, stop_on_interrupt: bool = False) -> int | None:
    """Run until the guest's exit port (return its code) or until *stop(out)* is true.

    Bytes written to port 0x3f8 are appended to *out*.  Returns None when
    *stop* ended the run, or when *stop_on_interrupt* is set and a kick from
    another thread interrupted it.  A watchdog kicks the vCPU after
    *timeout* seconds and :class:`GuestTimeout` is raised.
    """
    dog = vcpu.kick_after(timeout)
    try:
        while True:
            ex = vcpu.run()
            if isinstance(ex, pykvm.IoOut) and ex.port == PORT_OUT:
                out += ex.data
                if stop is not None and stop(out):
                    return None
            elif isinstance(ex, pykvm.IoOut) and ex.port == PORT_EXIT:
                return ex.data[0]
            elif isinstance(ex, pykvm.Interrupted):
                # Without stop_on_interrupt only the watchdog kicks (its ``fired`` is
                # set just after the kick, so it may still read False here).
                if dog.fired or not stop_on_interrupt:
                    raise GuestTimeout(f"guest still running after {timeout} s; output so far: "
                                       f"{bytes(out[-200:])!r}")
                if stop_on_interrupt:
                    return None
            else:
                raise AssertionError(f"unexpected exit {ex!r} at rip {vcpu.get_regs().rip:#x}")
    finally:
        dog.cancel()
