"""RunLoop dispatch, stops and reports, and the UART, against real KVM."""

from __future__ import annotations

import threading

import pytest

from pykvm import x86
from pykvm.uapi.enums import ExitReason

from .support_guest import collect_out, long_mode_guest, needs_binutils

pytestmark = needs_binutils


def test_port_in_and_out(kvm, vm) -> None:
    vcpu, _, _ = long_mode_guest(kvm, vm, """
        in   al, 0x60
        out  0xf0, al
        mov  dx, 0x1234
        in   ax, dx
        out  0xf0, ax
        in   eax, dx
        out  0xf0, eax
        hlt
    """)
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    seen = []
    loop.on_in(0x60, lambda port, size: 0x1C)
    loop.on_in(0x1234, lambda port, size: seen.append(size) or (b"\x11\x22\x33\x44"[:size]))
    stop = loop.run(timeout=10)
    assert (stop.reason, stop.ok) == ("hlt", True)
    assert got == [0x1C, 0x2211, 0x44332211]
    assert seen == [2, 4]
    assert stop.exits == loop.exits == 7


def test_mmio_read_write_widths(kvm, vm) -> None:
    vcpu, _, _ = long_mode_guest(kvm, vm, """
        mov  rbx, 0xd0000000
        mov  byte ptr [rbx], 0x5a
        mov  word ptr [rbx + 2], 0x1234
        mov  rax, 0x1122334455667788
        mov  [rbx + 8], rax
        mov  eax, [rbx + 0x10]
        out  0xf0, eax
        mov  rax, [rbx + 0x18]
        out  0xf0, eax
        hlt
    """)
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    writes, reads = [], []
    loop.on_mmio(0xD000_0000, 0x1000, write=lambda a, d: writes.append((a, bytes(d))),
                 read=lambda a, n: reads.append((a, n)) or 0xCAFEBABE_DEADBEEF)
    loop.run(timeout=10)
    assert writes == [(0xD000_0000, b"\x5a"), (0xD000_0002, b"\x34\x12"),
                      (0xD000_0008, (0x1122334455667788).to_bytes(8, "little"))]
    assert reads == [(0xD000_0010, 4), (0xD000_0018, 8)]
    assert got == [0xDEADBEEF, 0xDEADBEEF]
    with pytest.raises(ValueError, match="overlaps"):
        loop.on_mmio(0xD000_0800, 0x1000)


def test_unhandled_io_is_a_readable_error(kvm, vm) -> None:
    vcpu, _, _ = long_mode_guest(kvm, vm, "mov al, 7\nout 0x99, al\nhlt")
    with pytest.raises(x86.GuestError) as ei:
        x86.RunLoop(vcpu).run(timeout=10)
    text = str(ei.value)
    assert "unhandled-io" in text and "IoOut(port=0x99" in text
    assert "mode long 64-bit, CPL 0" in text and "rax=0000000000000007" in text
    assert "code at 0x10004" in text and "f4" in text     # the hlt after the out


def test_lenient_mode_reads_all_ones(kvm, vm) -> None:
    vcpu, _, _ = long_mode_guest(kvm, vm, "in al, 0x99\nout 0x98, al\nmov rbx, 0xd0000000\n"
                                          "mov eax, [rbx]\nout 0xf0, eax\nhlt")
    loop = x86.RunLoop(vcpu, strict=False)
    got = collect_out(loop)
    assert loop.run(timeout=10).reason == "hlt"
    assert got == [0xFFFFFFFF]


def test_triple_fault_report_and_declining_handler(kvm, vm) -> None:
    vcpu, _, _ = long_mode_guest(kvm, vm, "nop\nud2")
    loop = x86.RunLoop(vcpu)
    calls = []
    loop.on_exit(ExitReason.SHUTDOWN, lambda e: calls.append(e) or False)
    stop = loop.run(timeout=10, check=False)
    assert stop.reason == "shutdown" and len(calls) == 1 and not stop.ok
    assert "Shutdown()" in stop.report and "0f 0b" in stop.report


def test_timeout_and_stop_from_another_thread(kvm, vm) -> None:
    vcpu, _, _ = long_mode_guest(kvm, vm, "1: jmp 1b")
    loop = x86.RunLoop(vcpu)
    stop = loop.run(timeout=0.2, check=False)
    assert stop.reason == "timeout"
    with pytest.raises(x86.GuestError, match="timeout"):
        loop.run(timeout=0.2)
    threading.Timer(0.2, loop.stop, args=("bye",)).start()
    stop = loop.run(timeout=10)
    assert (stop.reason, stop.value) == ("stopped", "bye")


def test_stop_from_a_handler_and_shared_bus(kvm, vm) -> None:
    vcpu, _, _ = long_mode_guest(kvm, vm, "out 0xf4, al\nhlt")
    bus = x86.Bus()
    loop = x86.RunLoop(vcpu, bus)

    @loop.on_out(0xF4)
    def done(port, data):
        loop.stop(port)

    assert 0xF4 in bus.outs
    assert loop.run(timeout=10).value == 0xF4


def test_uart_registers(kvm, vm) -> None:
    vcpu, _, _ = long_mode_guest(kvm, vm, """
        mov  dx, 0x3fb
        mov  al, 0x80            # DLAB: divisor latch
        out  dx, al
        mov  dx, 0x3f8
        mov  al, 3
        out  dx, al              # DLL = 3 (38400 baud), not a character
        mov  dx, 0x3fb
        mov  al, 0x03
        out  dx, al              # 8N1, DLAB off
        mov  dx, 0x3f8
        mov  al, 'K'
        out  dx, al
        mov  dx, 0x3fd
        in   al, dx              # LSR: data ready?
        out  0xf0, al
        mov  dx, 0x3f8
        in   al, dx              # RBR
        out  0xf0, al
        mov  dx, 0x3fd
        in   al, dx
        out  0xf0, al
        hlt
    """)
    loop = x86.RunLoop(vcpu)
    uart = loop.add(x86.Uart16550())
    uart.feed(b"z")
    got = collect_out(loop)
    loop.run(timeout=10)
    assert uart.text == "K" and uart.dll == 3
    assert got == [0x61, ord("z"), 0x60]


def test_describe_vcpu_real_mode(kvm, vm) -> None:
    vm.add_memory(0, 0x10000)
    vm.write(0x7C00, b"\xf4")
    vcpu = vm.create_vcpu()
    x86.setup_real_mode(vcpu, cs=0x7C0, ip=0)
    text = x86.describe_vcpu(vcpu)
    assert "mode real" in text and "code at 0x7c00 (gpa 0x7c00): f4" in text
