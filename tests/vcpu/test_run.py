"""Running guests: typed exits, immediate_exit, kick, registers."""

from __future__ import annotations

import errno
import threading
import time

import pytest

import pykvm
from pykvm import uapi
from tests.support.guests import REAL_MODE_HELLO, SPIN, long_mode, real_mode


def test_real_mode_hello_prints_4(vm, watchdog):
    vcpu = real_mode(vm, REAL_MODE_HELLO, rax=2, rbx=2)
    out = bytearray()
    with watchdog(vcpu):
        while True:
            e = vcpu.run()
            if isinstance(e, pykvm.IoOut):
                assert (e.port, e.size, e.count) == (0x3F8, 1, 1)
                assert e.reason == pykvm.ExitReason.IO
                out += e.data
            else:
                break
    assert out == b"4\n"
    assert isinstance(e, pykvm.Hlt) and e.reason == pykvm.ExitReason.HLT
    assert vcpu.get_regs().rip == 0x1000 + len(REAL_MODE_HELLO)


# 64-bit guest: out, in (stored to memory), MMIO write, MMIO read checked by the guest.
LONG_MODE_IO = bytes.fromhex(
    "66ba1000"        # mov dx, 0x10
    "b041"            # mov al, 0x41
    "ee"              # out dx, al
    "ec"              # in al, dx
    "88042500800000"  # mov [0x8000], al
    "bb00003000"      # mov ebx, 0x300000      (mapped by the page tables, no memory: MMIO)
    "c70378563412"    # mov dword [rbx], 0x12345678
    "8b4308"          # mov eax, [rbx+8]
    "3d0df0feca"      # cmp eax, 0xcafef00d
    "7509"            # jne fail
    "c6042501800000" "01"  # mov byte [0x8001], 1
    "f4"              # hlt
    "c6042501800000" "02"  # fail: mov byte [0x8001], 2
    "f4"              # hlt
)


def test_long_mode_pio_and_mmio(vm, watchdog):
    vcpu = long_mode(vm, LONG_MODE_IO)
    mem = vm.memory[0]
    with watchdog(vcpu):
        e = vcpu.run()
        assert e == pykvm.IoOut(0x10, 1, 1, b"A")
        e = vcpu.run()
        assert isinstance(e, pykvm.IoIn) and (e.port, e.size, e.count) == (0x10, 1, 1)
        e.set_data(0x5A)
        e = vcpu.run()
        assert isinstance(e, pykvm.MmioWrite)
        assert e.address == 0x300000 and e.data == (0x12345678).to_bytes(4, "little")
        e = vcpu.run()
        assert isinstance(e, pykvm.MmioRead) and (e.address, e.length) == (0x300008, 4)
        e.data[:] = (0xCAFEF00D).to_bytes(4, "little")
        e = vcpu.run()
    assert isinstance(e, pykvm.Hlt)
    assert mem.read(0x8000, 2) == b"\x5a\x01"  # the guest stored our IN value, and its check passed
    assert vm.read(0x8000, 2) == b"\x5a\x01"


def test_wrong_mmio_answer_is_seen_by_guest(vm, watchdog):
    vcpu = long_mode(vm, LONG_MODE_IO)
    with watchdog(vcpu):
        vcpu.run()
        vcpu.run().set_data(b"\x01")
        vcpu.run()
        vcpu.run().set_data(0x1234)
        assert isinstance(vcpu.run(), pykvm.Hlt)
    assert vm.read(0x8001, 1) == b"\x02"


def test_io_in_rejects_wrong_length(vm, watchdog):
    vcpu = long_mode(vm, LONG_MODE_IO)
    with watchdog(vcpu):
        vcpu.run()
        e = vcpu.run()
    with pytest.raises(ValueError, match="wants 1 bytes"):
        e.set_data(b"xy")


def test_immediate_exit_returns_interrupted(vm):
    vcpu = real_mode(vm, SPIN)
    vcpu.immediate_exit = True
    assert vcpu.immediate_exit
    e = vcpu.run()
    assert isinstance(e, pykvm.Interrupted) and e.reason == pykvm.ExitReason.INTR
    assert not vcpu.immediate_exit  # cleared after serving
    assert vcpu.kvm_run.immediate_exit == 0


def test_kick_from_another_thread_stops_spinning_guest(vm):
    vcpu = real_mode(vm, SPIN)
    results = []

    def runner():
        results.append(vcpu.run())

    t = threading.Thread(target=runner)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # really spinning
    vcpu.kick()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(results[0], pykvm.Interrupted)
    assert vcpu.get_regs().rip == 0x1000  # still on the jmp $


def test_kick_before_run_makes_next_run_return(vm):
    vcpu = real_mode(vm, SPIN)
    vcpu.kick()
    assert isinstance(vcpu.run(), pykvm.Interrupted)


def test_second_thread_run_is_refused(vm):
    vcpu = real_mode(vm, SPIN)
    t = threading.Thread(target=vcpu.run)
    t.start()
    deadline = time.monotonic() + 10
    while not vcpu._lock.locked() and time.monotonic() < deadline:  # the other thread is in run()
        time.sleep(0.001)
    assert vcpu._lock.locked()
    try:
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.run()
        assert "another thread" in str(ei.value)
    finally:
        vcpu.kick()
        t.join(5)


def test_regs_roundtrip_and_run_page_size(kvm, vm):
    vcpu = vm.create_vcpu()
    r = vcpu.get_regs()
    r.rax, r.r15, r.rip = 0x1122334455667788, 0xFFFFFFFFFFFFFFFF, 0xFFF0
    vcpu.set_regs(r)
    back = vcpu.get_regs()
    assert (back.rax, back.r15, back.rip) == (0x1122334455667788, 0xFFFFFFFFFFFFFFFF, 0xFFF0)
    assert len(vcpu.run_mmap) == kvm.vcpu_mmap_size
    s = vcpu.get_sregs()
    s.cr8 = 0
    s.efer = 0
    vcpu.set_sregs(s)
    f = vcpu.get_fpu()
    assert f.fcw == 0x37F  # the x87 reset value
    f.fcw = 0x27F
    f.xmm[3][0] = 0xAB
    vcpu.set_fpu(f)
    back = vcpu.get_fpu()
    assert back.fcw == 0x27F and back.xmm[3][0] == 0xAB
    with pytest.raises(TypeError):
        vcpu.set_regs(s)


def test_msrs_get_set(vm):
    vcpu = vm.create_vcpu()
    SYSENTER_CS, TSC_AUX = 0x174, 0xC0000103
    vcpu.set_msrs({SYSENTER_CS: 0x10})
    assert vcpu.get_msrs([SYSENTER_CS]) == {SYSENTER_CS: 0x10}
    with pytest.raises(pykvm.KvmError, match="refused MSR 0xdeadbeef"):
        vcpu.set_msrs({0xDEADBEEF: 1})
    with pytest.raises(ValueError):
        vcpu.set_msrs({SYSENTER_CS: -1})
    assert TSC_AUX not in vcpu.get_msrs([0xDEADBEEF, TSC_AUX])  # stops at the unreadable one


def test_cpuid2_set_and_get(kvm, vm):
    vcpu = vm.create_vcpu()
    entries = kvm.supported_cpuid()
    vcpu.set_cpuid2(entries)
    got = vcpu.get_cpuid2()
    assert {(e.function, e.index) for e in got} == {(e.function, e.index) for e in entries}


def test_guest_sees_cpuid_we_set(kvm, vm, watchdog):
    # cpuid with eax=0, then out the vendor's first 4 bytes (ebx) through port 0x10
    code = bytes.fromhex("31c0" "0fa2" "89d8" "66ba1000" "ef" "f4")  # xor eax,eax; cpuid; mov eax,ebx; mov dx,0x10; out dx,eax; hlt
    vcpu = long_mode(vm, code)
    entries = kvm.supported_cpuid()
    for e in entries:
        if e.function == 0:
            e.ebx = int.from_bytes(b"pyKV", "little")
    vcpu.set_cpuid2(entries)
    with watchdog(vcpu):
        e = vcpu.run()
    assert isinstance(e, pykvm.IoOut) and e.data == b"pyKV"


def test_exit_reason_and_raw_path(vm, watchdog):
    vcpu = real_mode(vm, REAL_MODE_HELLO, rax=0, rbx=0)
    with watchdog(vcpu):
        assert vcpu.run_raw() == uapi.KVM_EXIT_IO
        run = vcpu.kvm_run
        assert (run.io.port, run.io.direction) == (0x3F8, uapi.KVM_EXIT_IO_OUT)
        assert vcpu.run_mmap[run.io.data_offset] == ord("0")
        assert vcpu.exit_reason == uapi.KVM_EXIT_IO


def test_fault_without_idt_is_reported_not_hung(vm, watchdog):
    """int3 with an empty IDT: #BP -> #DF -> triple fault.

    VMX/SVM hosts report KVM_EXIT_SHUTDOWN; this host's CPL0 emulator gives
    up first (KVM_EXIT_INTERNAL_ERROR, emulation, with the instruction bytes).
    """
    vcpu = long_mode(vm, bytes.fromhex("cc"))
    s = vcpu.get_sregs()
    s.idt.base, s.idt.limit = 0, 0
    vcpu.set_sregs(s)
    with watchdog(vcpu) as dog:
        e = vcpu.run()
    assert not dog.fired
    if isinstance(e, pykvm.InternalError):
        assert e.suberror == uapi.KVM_INTERNAL_ERROR_EMULATION
        assert e.description == "emulation failure"
        assert e.insn_bytes[:1] == b"\xcc"
    else:
        assert isinstance(e, pykvm.Shutdown), e


def test_run_without_memory_raises_named_error(vm):
    vcpu = vm.create_vcpu()
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.run()
    assert "KVM_RUN" in str(ei.value)


def test_closed_vcpu_raises_and_never_reaches_fd(vm):
    vcpu = vm.create_vcpu()
    vcpu.close()
    for call in (vcpu.run, vcpu.run_raw, vcpu.get_regs, vcpu.kick):
        with pytest.raises(pykvm.KvmClosedError):
            call()
    assert vcpu.closed and "closed" in repr(vcpu)


def test_libc_run_path_used_on_python_314(vm, watchdog, monkeypatch):
    """The KVM_RUN path chosen for Python >= 3.14 (no EINTR retry) exits and interrupts."""
    import pykvm.vcpu.run as V

    monkeypatch.setattr(V, "_run_ioctl", V._libc_run_ioctl)
    vcpu = real_mode(vm, REAL_MODE_HELLO + SPIN, rax=1, rbx=1)
    with watchdog(vcpu):
        assert vcpu.run() == pykvm.IoOut(0x3F8, 1, 1, b"2")
    vcpu.immediate_exit = True
    assert isinstance(vcpu.run(), pykvm.Interrupted)
    with vcpu.kick_after(0.2):
        vcpu.run()  # '\n'
        r = vcpu.get_regs()
        r.rip = 0x1000 + len(REAL_MODE_HELLO)  # the jmp $
        vcpu.set_regs(r)
        assert isinstance(vcpu.run(), pykvm.Interrupted)  # kicked out of a spinning guest
    vcpu.close()
    with pytest.raises(pykvm.KvmClosedError):
        vcpu.run()


def test_hold_keeps_run_out_and_complete_pending_exit(vm, watchdog):
    """hold() blocks run() from any thread; complete_pending_exit() finishes an IN."""
    vcpu = long_mode(vm, bytes.fromhex("ec" "88042500800000" "f4"))  # in al,dx; mov [0x8000],al; hlt
    assert vcpu.complete_pending_exit() is None  # never ran: nothing to do
    with watchdog(vcpu):
        e = vcpu.run()
    assert isinstance(e, pykvm.IoIn)
    e.set_data(0x77)
    with vcpu.hold() as held:
        assert held is vcpu
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.run()
        assert ei.value.errno == errno.EBUSY
        assert vcpu.complete_pending_exit() is None  # KVM stored AL, ran nothing
        assert vcpu.get_regs().rax & 0xFF == 0x77
        assert vm.read(0x8000, 1) == b"\x00"  # the mov after the IN has not run
    with watchdog(vcpu):
        assert isinstance(vcpu.run(), pykvm.Hlt)
    assert vm.read(0x8000, 1) == b"\x77"


def test_close_does_not_deadlock_on_a_hold(vm):
    vcpu = vm.create_vcpu()
    with vcpu.hold():
        vcpu.close()  # same thread holds it: closes at once
    assert vcpu.closed
    other = vm.create_vcpu(1)
    h = other.hold()
    del h  # dropped without release: the lock is given back
    with other.hold():
        pass
    other.close()
    assert other.closed


def test_kicks_racing_short_lived_runner_threads(vm):
    """kick() never signals a runner thread that has already left run() and exited.

    Each round a new thread does one run() (an immediate IoOut exit) and ends while
    another thread kicks as fast as it can; a signal to a dead thread would be
    undefined behaviour (a crash), a lost kick a hang.
    """
    vcpu = real_mode(vm, bytes.fromhex("e6f8" "ebfc"))  # out 0xf8, al; jmp back
    stop = threading.Event()
    kicks = 0

    def kicker():
        nonlocal kicks
        while not stop.is_set():
            vcpu.kick()
            kicks += 1

    k = threading.Thread(target=kicker)
    k.start()
    outcomes = set()
    try:
        for _ in range(300):
            t = threading.Thread(target=lambda: outcomes.add(type(vcpu.run()).__name__))
            t.start()
            t.join(10)
            assert not t.is_alive()
    finally:
        stop.set()
        k.join(10)
    assert kicks > 0 and outcomes <= {"IoOut", "Interrupted"}
