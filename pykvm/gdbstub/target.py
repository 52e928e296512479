"""What the debugger acts on: one vCPU's memory, breakpoints and debug controls.

Memory is addressed by guest *virtual* address and translated through the
guest's own page tables with the project's one page walker,
:func:`pykvm.x86.paging.translate` (32-bit, PAE, 4- and 5-level long mode).

Software breakpoints are keyed by guest-**physical** address: two virtual
addresses that map the same physical byte share one planted ``int3`` and one
saved original byte, which is put back when the last of them is removed (and
only if the byte still holds the ``int3``: a guest that rewrote it keeps its
own byte).  Reads through the stub show the original byte wherever an
``int3`` is planted; writes through the stub update the saved byte and keep
the ``int3``.  So guest memory, as gdb and as the guest see it after the
session, is exactly what it was.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping

from ..errors import KvmError
from ..uapi import structs
from ..uapi.enums import Cap
from ..vcpu import Vcpu
from ..x86.paging import translate as walk_translate
from .registers import RegisterFile, TargetError

__all__ = ["INT3", "MAX_SW_BREAKPOINTS", "Target"]

#: Most software breakpoints at once (each costs a saved byte; gdb rarely needs more than tens).
MAX_SW_BREAKPOINTS = 4096
INT3 = 0xCC

_DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_DR7_RW = {1: 0b00, 2: 0b01, 4: 0b11}         # Z type -> R/W bits: exec, write, read/write


class Target:
    """Registers, memory, breakpoints and guest-debug state of *vcpu*, for one stub."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.registers = RegisterFile(vcpu)
        self._orig: dict[int, int] = {}        # gpa -> original byte under our int3
        self._by_va: dict[int, int] = {}       # virtual address gdb named -> gpa
        self._refs: dict[int, int] = {}        # gpa -> how many virtual addresses use it
        self.hw: list[tuple[int, int, int] | None] = [None] * 4   # slot -> (addr, type, len)
        self._debug_flags: int | None = None

    # -- address translation ----------------------------------------------------------------
    def translate(self, vaddr: int, sregs: structs.kvm_sregs | None = None) -> int | None:
        """Guest physical address of *vaddr* under the vCPU's current paging mode, or None."""
        s = sregs if sregs is not None else self.vcpu.get_sregs()
        return walk_translate(self.vcpu.vm, s, vaddr)

    def _pages(self, addr: int, length: int) -> Iterator[tuple[int, int | None, int]]:
        """(vaddr, gpa or None, n) per page of [addr, addr+length)."""
        sregs = self.vcpu.get_sregs()
        end = addr + length
        while addr < end:
            n = min(end, (addr | 0xFFF) + 1) - addr
            yield addr, self.translate(addr, sregs), n
            addr += n

    def _in_ram(self, gpa: int, n: int) -> bool:
        return any(m.contains(gpa, n) for m in self.vcpu.vm.memory)

    # -- memory -------------------------------------------------------------------------------
    def read_memory(self, addr: int, length: int) -> bytes:
        """Bytes at virtual [addr, addr+length); may stop early at the first unmapped page.

        Raises :class:`TargetError` (EFAULT) when not even the first byte is mapped.
        Planted ``int3`` bytes read as the bytes they replaced.
        """
        out = bytearray()
        for _, gpa, n in self._pages(addr, length):
            if gpa is None or not self._in_ram(gpa, n):
                break
            chunk = bytearray(self.vcpu.vm.read(gpa, n))
            for bp_gpa, orig in self._orig.items():
                if gpa <= bp_gpa < gpa + n:
                    chunk[bp_gpa - gpa] = orig
            out += chunk
        if not out and length:
            raise TargetError(errno.EFAULT)
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write *data* at virtual *addr*: all of it or, if any page is unmapped, nothing (EFAULT).

        A byte that falls on a planted ``int3`` becomes the new original byte;
        the ``int3`` stays until its breakpoint is removed.
        """
        pages = list(self._pages(addr, len(data)))
        for _, gpa, n in pages:
            if gpa is None or not self._in_ram(gpa, n):
                raise TargetError(errno.EFAULT)
        pos = 0
        for _, gpa, n in pages:
            assert gpa is not None
            chunk = bytearray(data[pos:pos + n])
            for bp_gpa in self._orig:
                if gpa <= bp_gpa < gpa + n:
                    self._orig[bp_gpa] = chunk[bp_gpa - gpa]
                    chunk[bp_gpa - gpa] = INT3
            self.vcpu.vm.write(gpa, bytes(chunk))
            pos += n

    # -- breakpoints ------------------------------------------------------------------------------
    @property
    def planted(self) -> Mapping[int, int]:
        """``{guest physical address: original byte}`` of every planted ``int3`` (a copy)."""
        return dict(self._orig)

    @property
    def has_sw_breakpoints(self) -> bool:
        return bool(self._orig)

    def breakpoint(self, insert: bool, typ: int, addr: int, kind: int) -> bool:
        """``Z``/``z``: insert or remove; False for a type x86 cannot do (``Z3``)."""
        if typ == 0:
            if insert:
                self._insert_sw(addr)
            else:
                self._remove_sw(addr)
            return True
        if typ in (1, 2, 4):
            length = 1 if typ == 1 else kind
            if length not in _DR7_LEN or addr % length:
                raise TargetError(errno.EINVAL)
            key = (addr, typ, length)
            if insert:
                if key in self.hw:
                    return True
                try:
                    slot = self.hw.index(None)
                except ValueError:
                    raise TargetError(errno.ENOSPC) from None     # 4 debug registers
                self.hw[slot] = key
            elif key in self.hw:
                self.hw[self.hw.index(key)] = None
            return True
        return False

    def _insert_sw(self, addr: int) -> None:
        if addr in self._by_va:
            return
        if len(self._by_va) >= MAX_SW_BREAKPOINTS:
            raise TargetError(errno.ENOSPC, f"more than {MAX_SW_BREAKPOINTS} software breakpoints")
        gpa = self.translate(addr)
        if gpa is None or not self._in_ram(gpa, 1):
            raise TargetError(errno.EFAULT)
        if gpa not in self._orig:
            self._orig[gpa] = self.vcpu.vm.read(gpa, 1)[0]
            self.vcpu.vm.write(gpa, bytes((INT3,)))
        self._by_va[addr] = gpa
        self._refs[gpa] = self._refs.get(gpa, 0) + 1

    def _remove_sw(self, addr: int) -> None:
        gpa = self._by_va.pop(addr, None)
        if gpa is None:
            return                                          # not ours: gdb tolerates OK
        self._refs[gpa] -= 1
        if self._refs[gpa] == 0:
            del self._refs[gpa]
            self._restore(gpa, self._orig.pop(gpa))

    def _restore(self, gpa: int, orig: int) -> None:
        vm = self.vcpu.vm
        if self._in_ram(gpa, 1) and vm.read(gpa, 1)[0] == INT3:   # the guest may have rewritten it
            vm.write(gpa, bytes((orig,)))

    def remove_all(self) -> None:
        """Take every breakpoint out (software ones restored in guest memory)."""
        for gpa, orig in list(self._orig.items()):
            self._restore(gpa, orig)
        self._orig.clear()
        self._by_va.clear()
        self._refs.clear()
        self.hw = [None] * 4

    def at_sw_breakpoint(self, linear_pc: int) -> bool:
        """Is *linear_pc* (a virtual address) one of our ``int3`` breakpoints, by name or by physical byte?"""
        if linear_pc in self._by_va:
            return True
        if not self._orig:
            return False
        gpa = self.translate(linear_pc)
        return gpa is not None and gpa in self._orig

    # -- guest debugging ---------------------------------------------------------------------------
    def set_guest_debug(self, step: bool, inject_bp: bool = False) -> None:
        """``KVM_SET_GUEST_DEBUG`` for the breakpoints held and a step if *step*."""
        dbg = structs.kvm_guest_debug()
        control = structs.KVM_GUESTDBG_ENABLE
        if self._orig:                                     # else a guest int3 stays the guest's
            control |= structs.KVM_GUESTDBG_USE_SW_BP
        dr7 = 0x400
        for slot, hw in enumerate(self.hw):
            if hw is not None:
                addr, typ, length = hw
                dbg.arch.debugreg[slot] = addr
                dr7 |= (1 << (2 * slot)) | (_DR7_RW[typ] << (16 + 4 * slot)) \
                    | (_DR7_LEN[length] << (18 + 4 * slot))
        if dr7 != 0x400:
            control |= structs.KVM_GUESTDBG_USE_HW_BP
            dbg.arch.debugreg[7] = dr7
        if step:
            control |= structs.KVM_GUESTDBG_SINGLESTEP
            if self._debug_flags is None:
                try:
                    self._debug_flags = self.vcpu.vm.check_extension(Cap.SET_GUEST_DEBUG2)
                except KvmError:
                    self._debug_flags = 0
            if self._debug_flags & structs.KVM_GUESTDBG_BLOCKIRQ:
                control |= structs.KVM_GUESTDBG_BLOCKIRQ   # no stepping into IRQ handlers
        if inject_bp:
            control |= structs.KVM_GUESTDBG_INJECT_BP
        dbg.control = control
        self.vcpu.set_guest_debug(dbg)

    def cleanup(self) -> None:
        """End of a session: breakpoints out, guest debugging off, no pending immediate exit."""
        if self.vcpu.closed:
            return
        self.remove_all()
        try:
            self.vcpu.set_guest_debug(enable=False)
        except KvmError:
            pass
        self.vcpu.immediate_exit = False
