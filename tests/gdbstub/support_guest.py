"""The guest the gdb tests debug, and a helper that serves it from a thread.

The guest runs in 64-bit mode at CPL0 (the test debugs code that KVM's
instruction emulator runs on PVM hosts, where CPL3 code cannot be stepped).
It prints ``"hello gdb: "`` (a string at guest *virtual* 0x400000, which the
page tables map to guest physical 0x100000; virtual 0x401000 maps to
physical 0x180000; virtual 0x402000 is a second name of physical 0x100000),
then the digit ``'0' + rbx``
(rbx = 5), then ``" and bye\\n"`` (virtual 0x400010), and writes 0 to port
0xf4.  A debugger that sets ``rbx`` at ``BP_HERE`` changes the digit; one that
writes guest memory at 0x400011 changes the second string.  ``SPIN`` is an
endless ``inc rcx; jmp`` loop for Ctrl-C tests.

Machine code assembled with GNU as (Intel syntax), listed instruction by
instruction.
"""

from __future__ import annotations

import threading
from typing import Any

import pykvm
from pykvm import x86
from pykvm.gdbstub import Exited, GdbStub, SessionEnd

CODE = 0x10000
ARENA, ARENA_SIZE = 0x1000, 0xD000     # GDT, TSS, page tables (pykvm.x86.setup_long_mode)
DATA_VA, DATA_PA = 0x400000, 0x100000
DATA_PA2 = 0x180000           # physical page behind virtual 0x401000
ALIAS_VA = 0x402000           # a second virtual address of the DATA_PA page
CODE_ALIAS = 0x403000         # a second virtual address of the code page
STACK_TOP = 0xF000
PORT_OUT, PORT_EXIT = 0x3F8, 0xF4

_LISTING = [
    ("bb05000000", "0x10000: mov ebx,0x5"),
    ("48c7c600004000", "0x10005: mov rsi,0x400000"),
    ("e81c000000", "0x1000c: call 0x1002d <puts>"),
    ("8d4330", "0x10011: lea eax,[rbx+0x30]          <- BP_HERE"),
    ("66baf803", "0x10014: mov dx,0x3f8"),
    ("ee", "0x10018: out dx,al"),
    ("48c7c610004000", "0x10019: mov rsi,0x400010"),
    ("e808000000", "0x10020: call 0x1002d <puts>"),
    ("66baf400", "0x10025: mov dx,0xf4"),
    ("31c0", "0x10029: xor eax,eax"),
    ("ee", "0x1002b: out dx,al"),
    ("f4", "0x1002c: hlt"),
    ("66baf803", "0x1002d: puts: mov dx,0x3f8"),
    ("8a06", "0x10031: mov al,BYTE PTR [rsi]"),
    ("84c0", "0x10033: test al,al"),
    ("7406", "0x10035: je 0x1003d"),
    ("ee", "0x10037: out dx,al"),
    ("48ffc6", "0x10038: inc rsi"),
    ("ebf4", "0x1003b: jmp 0x10031"),
    ("c3", "0x1003d: ret"),
    ("48ffc1", "0x1003e: SPIN: inc rcx"),
    ("ebfb", "0x10041: jmp 0x1003e"),
]
GUEST_CODE = bytes.fromhex("".join(h for h, _ in _LISTING))
BP_HERE = 0x10011          # lea eax,[rbx+0x30]
AFTER_BP = 0x10014         # the next instruction
OUT_DIGIT = 0x10018        # out dx,al (prints the digit)
PUTS = 0x1002D
SPIN = 0x1003E
EXPECTED = b"hello gdb: 5 and bye\n"


def build_guest(kvm: pykvm.Kvm, *, entry: int = CODE, cpl: int = 0) -> pykvm.Vm:
    """A VM (2 MiB RAM, no irqchip) whose vCPU 0 starts at *entry* at privilege level *cpl*.

    Long mode by :func:`pykvm.x86.setup_long_mode`: the low 2 MiB identity
    mapped, plus four 4 KiB pages: DATA_VA -> DATA_PA, DATA_VA + 0x1000 ->
    DATA_PA2, ALIAS_VA -> DATA_PA again and CODE_ALIAS -> CODE.
    """
    vm = kvm.create_vm()
    try:
        vm.add_memory(0, 0x200000)
        vm.write(CODE, GUEST_CODE)
        vm.write(DATA_PA, b"hello gdb: \0")
        vm.write(DATA_PA + 0x10, b" and bye\n\0")
        vcpu = vm.create_vcpu()
        x86.setup_cpuid(kvm, vcpu)
        user = cpl == 3
        lm = x86.setup_long_mode(vcpu, x86.Arena(vm, ARENA, ARENA_SIZE), entry=entry,
                                 stack=STACK_TOP, cpl=cpl, identity=(0, 0x200000), user=user)
        for va, pa in ((DATA_VA, DATA_PA), (DATA_VA + 0x1000, DATA_PA2), (ALIAS_VA, DATA_PA),
                       (CODE_ALIAS, CODE)):
            lm.page_tables.map(va, pa, 0x1000, page_size=x86.PAGE_4K, user=user)
    except BaseException:
        vm.close()
        raise
    return vm


class ServedGuest:
    """Serve *vm*'s vCPU 0 with a :class:`GdbStub` from a background thread.

    ``output`` collects what the guest prints; ``results`` the
    :class:`SessionEnd` of each session (``join()`` waits for the last one).
    The thread serves up to *sessions* sessions, one after the other.
    *stub_args* go to :class:`GdbStub` (``port=``, ``token=``, ``path=``);
    ``address`` is where to connect.  A watchdog closes the stub (which ends
    a session and kicks a running vCPU) after *timeout* seconds.
    """

    def __init__(self, vm: pykvm.Vm, timeout: float = 30.0, log: list[str] | None = None,
                 sessions: int = 1, **stub_args: Any) -> None:
        self.vm = vm
        self.output = bytearray()
        self.results: list[SessionEnd] = []
        self.error: BaseException | None = None
        self.sessions = sessions
        self.stub = GdbStub(vm.vcpus[0], on_exit=self._on_exit,
                            log=(log.append if log is not None else None), **stub_args)
        self.address = self.stub.address
        self._thread = threading.Thread(target=self._serve, daemon=True)
        # Not a vCPU watchdog (those are vcpu.kick_after): this one ends the gdb
        # session, and GdbStub.close() kicks a running vCPU itself.
        self._watchdog = threading.Timer(timeout, self.stub.close)
        self._watchdog.daemon = True

    @property
    def result(self) -> SessionEnd | None:
        return self.results[-1] if self.results else None

    def _on_exit(self, ex: pykvm.Exit) -> Exited | None:
        if isinstance(ex, pykvm.IoOut) and ex.port == PORT_OUT:
            self.output += ex.data
            return None
        if isinstance(ex, pykvm.IoOut) and ex.port == PORT_EXIT:
            return Exited(ex.data[0])
        raise AssertionError(f"unexpected exit {ex!r}")

    def _serve(self) -> None:
        try:
            for _ in range(self.sessions):
                end = self.stub.serve(accept_timeout=30)
                self.results.append(end)
                if end.reason == "closed":
                    break
        except BaseException as e:  # reported by join()
            self.error = e

    def __enter__(self) -> ServedGuest:
        self._thread.start()
        self._watchdog.start()
        return self

    def join(self, timeout: float = 30.0) -> SessionEnd:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the stub did not finish")
        if self.error is not None:
            raise self.error
        assert self.results
        return self.results[-1]

    @property
    def alive(self) -> bool:
        """The serving thread still runs (no exception escaped the stub)."""
        return self._thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self._watchdog.cancel()
        self.stub.close()
        self._thread.join(10)
