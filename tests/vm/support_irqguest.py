"""Guests for the VM-fd tests: an interrupt-counting real-mode guest and code builders.

Built on :mod:`tests.support.guests` (the core tests' one guest set-up).

Guest code is hand-assembled; each byte group carries its assembly.  Real
mode keeps the code short (the host emulates CPL0 code, ~1 µs/instruction)
and its interrupt table (IVT: 4-byte ``offset:segment`` entries at 0) is the
simplest way to catch interrupts.
"""

from __future__ import annotations

import struct

import pykvm
from pykvm.fd import ioctl
from pykvm.uapi import ioctls as I
from pykvm.uapi import structs as S
from tests.support.guests import OUT_E9, real_mode

# --- the interrupt-counting guest ------------------------------------------------------
MAIN = 0x1000        # main loop
COUNTS = 0x600       # one counter byte per vector: [0x600 + vector]
STUBS = 0x2000       # 8-byte stub per vector
COMMON = 0x2800      # shared tail of the stubs

# top: sti / hlt / cli / out 0xe9,al / jmp top
#   sti;hlt: the interrupt shadow of sti covers hlt, so an interrupt that is
#   already pending wakes the hlt instead of being taken before it.
MAIN_CODE = bytes([
    0xFB,              # sti
    0xF4,              # hlt           (in-kernel irqchip: blocks in KVM until an interrupt)
    0xFA,              # cli
    0xE6, 0xE9,        # out 0xe9, al  (exit: "an interrupt woke me")
    0xEB, 0xF9,        # jmp top
])

# Stub tails: EOI to both PICs (a no-op on a PIC with nothing in service), or none.
COMMON_PIC_EOI = bytes([
    0x50,              # push ax
    0xB0, 0x20,        # mov al, 0x20   (non-specific EOI)
    0xE6, 0xA0,        # out 0xa0, al   (slave PIC)
    0xE6, 0x20,        # out 0x20, al   (master PIC)
    0x58,              # pop ax
    0xCF,              # iret
])
COMMON_IRET = bytes([0xCF])  # iret   (split irqchip: a PIC access would exit to user space)


def _stub(vector: int) -> bytes:
    here = STUBS + 8 * vector
    rel = COMMON - (here + 7)
    return (bytes([0xFE, 0x06]) + struct.pack("<H", COUNTS + vector)   # inc byte [COUNTS+vector]
            + bytes([0xE9]) + struct.pack("<h", rel)                   # jmp COMMON
            + bytes([0x90]))                                           # nop (pad to 8)


def enable_lapic(vcpu: pykvm.Vcpu, svr: int = 0x1FF) -> None:
    """Software-enable the vCPU's in-kernel LAPIC (SVR = *svr*), so it accepts fixed interrupts.

    Raw KVM_GET/SET_LAPIC: these tests do not depend on the Vcpu wrapper.
    """
    la = S.kvm_lapic_state()
    ioctl(vcpu.fileno(), I.KVM_GET_LAPIC, la)
    raw = bytearray(bytes(la))
    struct.pack_into("<I", raw, 0xF0, svr)
    ioctl(vcpu.fileno(), I.KVM_SET_LAPIC, S.kvm_lapic_state.from_buffer_copy(bytes(raw)))


class IrqGuest:
    """A real-mode guest that counts each interrupt vector it takes.

    Create after the irqchip (it creates the vCPU).  :meth:`wait` runs it
    until an interrupt has woken its ``hlt`` (an ``out 0xe9`` exit) and
    returns the counters that changed.
    """

    def __init__(self, vm: pykvm.Vm, *, pic_eoi: bool = True, lapic: bool = False) -> None:
        self.vm = vm
        self.vcpu = real_mode(vm, MAIN_CODE, addr=MAIN, rsp=0x8000)
        self.mem = vm.memory[0]
        ivt = b"".join(struct.pack("<HH", STUBS + 8 * v, 0) for v in range(256))
        self.mem.write(0, ivt)
        self.mem.write(STUBS, b"".join(_stub(v) for v in range(256)))
        self.mem.write(COMMON, COMMON_PIC_EOI if pic_eoi else COMMON_IRET)
        if lapic:
            enable_lapic(self.vcpu)

    def counts(self) -> dict[int, int]:
        """{vector: times taken} for every vector taken so far."""
        raw = self.mem.read(COUNTS, 256)
        return {v: n for v, n in enumerate(raw) if n}

    def wait(self, seconds: float = 5.0) -> dict[int, int]:
        """Run until the guest reports a wake-up; return :meth:`counts`.

        Fails (instead of hanging) if no interrupt arrives: the watchdog
        kicks the vCPU out of its ``hlt``.
        """
        with self.vcpu.kick_after(seconds) as dog:
            exit_ = self.vcpu.run()
        assert not dog.fired, f"no interrupt reached the guest within {seconds} s"
        assert exit_ == pykvm.IoOut(0xE9, 1, 1, exit_.data), exit_
        return self.counts()


# --- code builders ----------------------------------------------------------------------
def pio_write(port: int, value: int, width: int) -> bytes:
    """Real mode: ``mov dx, port; mov eax, value; out dx, al|ax|eax``."""
    code = bytes([0xBA]) + struct.pack("<H", port)                # mov dx, port
    code += bytes([0x66, 0xB8]) + struct.pack("<I", value)        # mov eax, value
    code += {1: bytes([0xEE]),                                     # out dx, al
             2: bytes([0xEF]),                                     # out dx, ax
             4: bytes([0x66, 0xEF])}[width]                        # out dx, eax
    return code


def mmio_write64(addr: int, value: int, width: int) -> bytes:
    """Long mode: ``mov rax, value; mov [addr], al|ax|eax|rax`` (addr < 2 GiB)."""
    code = bytes([0x48, 0xB8]) + struct.pack("<Q", value)         # mov rax, value
    disp = bytes([0x04, 0x25]) + struct.pack("<I", addr)           # [disp32] (SIB, no base)
    code += {1: bytes([0x88]),                                     # mov [addr], al
             2: bytes([0x66, 0x89]),                               # mov [addr], ax
             4: bytes([0x89]),                                     # mov [addr], eax
             8: bytes([0x48, 0x89])}[width] + disp                 # mov [addr], rax
    return code


def es_segment(segment: int) -> bytes:
    """Real mode: ``mov ax, segment; mov es, ax``."""
    return bytes([0xB8]) + struct.pack("<H", segment) + bytes([0x8E, 0xC0])


def es_write_byte(offset: int, value: int) -> bytes:
    """Real mode: ``mov byte es:[offset], value``."""
    return bytes([0x26, 0xC6, 0x06]) + struct.pack("<HB", offset, value)


def es_write_word(offset: int, value: int) -> bytes:
    """Real mode: ``mov word es:[offset], value``."""
    return bytes([0x26, 0xC7, 0x06]) + struct.pack("<HH", offset, value)


def es_read_byte_out(offset: int) -> bytes:
    """Real mode: ``mov al, es:[offset]; out 0xe9, al``."""
    return bytes([0x26, 0xA0]) + struct.pack("<H", offset) + OUT_E9


def rdmsr_out(index: int) -> bytes:
    """Real mode: ``mov ecx, index; rdmsr; out 0xe9, eax``."""
    return (bytes([0x66, 0xB9]) + struct.pack("<I", index)          # mov ecx, index
            + bytes([0x0F, 0x32])                                    # rdmsr
            + bytes([0x66, 0xE7, 0xE9]))                             # out 0xe9, eax
