"""State shared through the run page and the run itself: sync regs
(kvm_valid_regs / kvm_dirty_regs) and KVM_SET_SIGNAL_MASK."""

from __future__ import annotations

import errno
import signal
import threading

import pytest

import pykvm
from pykvm import _kick
from pykvm.uapi import structs as S
from tests.support.guests import HANDLER_PORT, SPIN, real_mode, real_mode_handlers

SYNC = bytes.fromhex(
    "66b811000000"              # 0x00: mov eax,0x11
    "66e710"                    # 0x06: out 0x10,eax
    "6689d8"                    # 0x09: mov eax,ebx
    "66e710"                    # 0x0c: out 0x10,eax
    "a10000"                    # 0x0f: mov ax,ds:0x0
    "e710"                      # 0x12: out 0x10,ax
    "f4"                        # 0x14: hlt
)
ALL = S.KVM_SYNC_X86_REGS | S.KVM_SYNC_X86_SREGS | S.KVM_SYNC_X86_EVENTS


def test_sync_regs_read_and_write_without_get_set_ioctls(kvm, vm, watchdog):
    """KVM copies regs/sregs/events into kvm_run.s.regs at each exit; what we
    change there and mark dirty reaches the guest on the next run: a register
    (rbx), a segment base (ds) and a pending NMI, with no KVM_SET_* call."""
    assert kvm.check_extension(pykvm.Cap.SYNC_REGS) == ALL
    vcpu = real_mode_handlers(vm, SYNC, [2])
    vm.write(0x3000, b"DS")
    vcpu.set_sync_valid_reg(ALL)
    assert vcpu.sync_valid_regs == ALL
    sync = vcpu.sync_regs
    with watchdog(vcpu):
        e = vcpu.run()
        assert e == pykvm.IoOut(0x10, 4, 1, b"\x11\0\0\0")
        r, s = vcpu.get_regs(), vcpu.get_sregs()
        assert (sync.regs.rax, sync.regs.rip) == (0x11, 0x1009) == (r.rax, r.rip)
        assert bytes(sync.sregs) == bytes(s)
        assert bytes(sync.events) == bytes(vcpu.get_vcpu_events())

        sync.regs.rbx = 0xBEEF
        vcpu.set_sync_dirty_reg(S.KVM_SYNC_X86_REGS)
        assert vcpu.sync_dirty_regs == S.KVM_SYNC_X86_REGS
        e = vcpu.run()
        assert e == pykvm.IoOut(0x10, 4, 1, b"\xef\xbe\0\0")  # the guest saw rbx
        assert vcpu.sync_dirty_regs == 0                       # KVM consumed the dirty bit

        sync.sregs.ds.base = 0x3000
        vcpu.set_sync_dirty_reg(S.KVM_SYNC_X86_SREGS)
        e = vcpu.run()
        assert e == pykvm.IoOut(0x10, 2, 1, b"DS")              # ds:[0] read at 0x3000
        assert vcpu.get_sregs().ds.base == 0x3000

        sync.events.nmi.pending = 1
        sync.events.flags |= S.KVM_VCPUEVENT_VALID_NMI_PENDING
        vcpu.set_sync_dirty_reg(S.KVM_SYNC_X86_EVENTS)
        e = vcpu.run()
        assert e == pykvm.IoOut(HANDLER_PORT, 1, 1, b"\x02")   # the guest's NMI handler
        assert isinstance(vcpu.run(), pykvm.Hlt)
    vcpu.clear_sync_valid_reg(S.KVM_SYNC_X86_SREGS | S.KVM_SYNC_X86_EVENTS)
    assert vcpu.sync_valid_regs == S.KVM_SYNC_X86_REGS


def test_sync_regs_bad_mask(vm):
    vcpu = real_mode_handlers(vm, SYNC)
    with pytest.raises(ValueError, match="KVM_SYNC_X86"):
        vcpu.set_sync_valid_reg(1 << 3)
    with pytest.raises(ValueError):
        vcpu.set_sync_dirty_reg(-1)
    vcpu.kvm_run.kvm_valid_regs = 1 << 3  # behind pykvm's back: KVM refuses the run
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.run()
    assert ei.value.ioctl == "KVM_RUN" and ei.value.errno == errno.EINVAL
    vcpu.kvm_run.kvm_valid_regs = 0


OUTS = bytes.fromhex(
    "e610"                      # 0x00: out 0x10,al
    "e610"                      # 0x02: out 0x10,al
    "e610"                      # 0x04: out 0x10,al
    "f4"                        # 0x06: hlt
)


def test_signal_mask_applies_inside_kvm_run(vm):
    """A thread blocks SIG and has one pending.  With a KVM_RUN mask that also
    blocks SIG the guest runs to its exit; with an empty KVM_RUN mask the
    pending SIG interrupts KVM_RUN at once (EINTR, rip unchanged), and SIG is
    still pending (blocked again) afterwards.  ``None`` removes the KVM_RUN
    mask: the thread's own mask (SIG blocked) applies again."""
    sig = int(signal.SIGRTMIN) + 9
    _kick.ensure_kick_handler(sig)  # a no-op C handler, so SIG cannot kill us
    vcpu = real_mode_handlers(vm, OUTS)
    res = {}

    def worker():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
        try:
            signal.pthread_kill(threading.get_ident(), sig)
            res["pending"] = sig in signal.sigpending()
            vcpu.set_signal_mask([sig])
            res["blocked"] = vcpu.run()
            vcpu.set_signal_mask([])
            res["unblocked"] = vcpu.run()
            res["rip"] = vcpu.get_regs().rip
            res["still_pending"] = sig in signal.sigpending()
            res["consumed"] = signal.sigtimedwait({sig}, 0).si_signo
            res["after"] = vcpu.run()
            signal.pthread_kill(threading.get_ident(), sig)
            vcpu.set_signal_mask(None)
            res["thread_mask"] = vcpu.run()
            res["consumed2"] = signal.sigtimedwait({sig}, 0).si_signo
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert res["pending"]
    assert res["blocked"] == pykvm.IoOut(0x10, 1, 1, b"\0")
    assert isinstance(res["unblocked"], pykvm.Interrupted)
    assert res["rip"] == 0x1002 and res["still_pending"] and res["consumed"] == sig
    assert res["after"] == pykvm.IoOut(0x10, 1, 1, b"\0")
    assert res["thread_mask"] == pykvm.IoOut(0x10, 1, 1, b"\0") and res["consumed2"] == sig
    with pytest.raises(ValueError):
        vcpu.set_signal_mask([0])


def test_kick_after_stops_a_spinning_guest_and_can_be_cancelled(kvm):
    """kick_after() ends a run that would never exit; a cancelled one never fires."""
    import math

    with kvm.create_vm() as vm:
        vcpu = real_mode(vm, SPIN)  # jmp $ (never exits)
        with vcpu.kick_after(0.05) as dog:
            assert isinstance(vcpu.run(), pykvm.Interrupted)
        assert dog.fired
        dog2 = vcpu.kick_after(3600)
        dog2.cancel()
        assert not dog2.fired
        for bad in (-1, math.nan, math.inf):
            with pytest.raises(ValueError):
                vcpu.kick_after(bad)
        for bad in ("1", True, None):
            with pytest.raises(TypeError):
                vcpu.kick_after(bad)
