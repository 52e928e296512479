"""Dirty-page tracking: KVM_GET_DIRTY_LOG, manual protection with KVM_CLEAR_DIRTY_LOG, dirty rings.

The guest writes pages 0, 2 and 5 of a dirty-logged slot at 0x10000, exits,
then writes page 2 again; each mechanism must report exactly those pages.
"""

from __future__ import annotations

import ctypes
import errno

import pytest

import pykvm
from pykvm import Cap
from pykvm.dirty import DirtyRing, bitmap_to_pages, pages_to_bitmap
from pykvm.uapi import structs as S
from tests.support.guests import HLT, OUT_E9, real_mode
from tests.support.runs import run_to_exit
from tests.vm.support_irqguest import es_segment, es_write_byte

SLOT_GPA, SLOT_SIZE = 0x10000, 0x8000          # 8 pages, outside real_mode's 0..64 KiB
CODE = (es_segment(SLOT_GPA >> 4)
        + es_write_byte(0x0000, 1) + es_write_byte(0x2000, 2) + es_write_byte(0x5FFF, 3)  # pages 0, 2, 5
        + OUT_E9
        + es_write_byte(0x2000, 4)                                                          # page 2 again
        + OUT_E9 + HLT)


def _setup(vm):
    vcpu = real_mode(vm, CODE)
    mem = vm.add_memory(SLOT_GPA, SLOT_SIZE, flags=S.KVM_MEM_LOG_DIRTY_PAGES)
    return vcpu, mem


def test_get_dirty_log_returns_the_written_pages(vm, watchdog):
    vcpu, mem = _setup(vm)
    assert vm.get_dirty_log(mem.slot) == []
    assert run_to_exit(vcpu).port == 0xE9
    assert vm.get_dirty_log(mem.slot) == [0, 2, 5]
    assert vm.get_dirty_log(mem.slot) == []              # fetching cleared and re-protected it
    assert run_to_exit(vcpu).port == 0xE9
    assert vm.get_dirty_log(mem.slot) == [2]
    assert mem.read(0x5FFF, 1) == b"\x03"


def test_get_dirty_log_refuses_a_slot_without_logging(vm):
    mem = vm.add_memory(0, 0x1000)
    with pytest.raises(pykvm.KvmError) as ei:
        vm.get_dirty_log(mem.slot)
    assert ei.value.errno == errno.ENOENT and ei.value.ioctl == "KVM_GET_DIRTY_LOG"
    with pytest.raises(ValueError):
        vm.get_dirty_log(77)                              # not a slot of this VM


def test_manual_protect_keeps_bits_until_clear_dirty_log(vm, watchdog):
    assert vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & S.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, S.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    vcpu, mem = _setup(vm)
    assert run_to_exit(vcpu).port == 0xE9
    assert vm.get_dirty_log(mem.slot) == [0, 2, 5]
    assert vm.get_dirty_log(mem.slot) == [0, 2, 5]        # manual mode: fetching clears nothing
    vm.clear_dirty_log(mem.slot, pages=[2, 5])
    assert vm.get_dirty_log(mem.slot) == [0]
    assert run_to_exit(vcpu).port == 0xE9       # page 2 was re-protected: logged again
    assert vm.get_dirty_log(mem.slot) == [0, 2]
    vm.clear_dirty_log(mem.slot)                          # all of them
    assert vm.get_dirty_log(mem.slot) == []


def test_manual_protect_initially_set(vm):
    caps = vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2)
    assert caps & S.KVM_DIRTY_LOG_INITIALLY_SET, f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = {caps}"
    vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2,
                  S.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | S.KVM_DIRTY_LOG_INITIALLY_SET)
    mem = vm.add_memory(SLOT_GPA, SLOT_SIZE, flags=S.KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.get_dirty_log(mem.slot) == list(range(8))   # every page starts dirty
    vm.clear_dirty_log(mem.slot, 0, 8, pages=[1, 3])
    assert vm.get_dirty_log(mem.slot) == [0, 2, 4, 5, 6, 7]


def test_clear_dirty_log_bad_input(vm):
    mem = vm.add_memory(0, 0x100000, flags=S.KVM_MEM_LOG_DIRTY_PAGES)   # 256 pages
    with pytest.raises(ValueError):
        vm.clear_dirty_log(mem.slot, first_page=3)        # not a multiple of 64
    with pytest.raises(ValueError):
        vm.clear_dirty_log(mem.slot, 0, 10)               # neither a multiple of 64 nor the end
    with pytest.raises(ValueError):
        vm.clear_dirty_log(mem.slot, 64, 64, pages=[0])   # page outside the range
    with pytest.raises(ValueError):
        vm.clear_dirty_log(mem.slot, 0, 300)


@pytest.mark.parametrize("acq_rel", [True, False], ids=["acq_rel", "plain"])
def test_dirty_ring_harvest_and_reset(vm, watchdog, acq_rel):
    cap = Cap.DIRTY_LOG_RING_ACQ_REL if acq_rel else Cap.DIRTY_LOG_RING
    max_bytes = vm.check_extension(cap)
    assert max_bytes >= 0x10000, f"{cap.name} = {max_bytes}"
    assert vm.enable_dirty_ring(0x10000, acq_rel=acq_rel) == cap
    vcpu, mem = _setup(vm)
    ring = vm.dirty_ring(vcpu)
    assert isinstance(ring, DirtyRing) and ring.entries == 0x10000 // 16
    assert vm.dirty_ring(vcpu) is ring
    assert ring.harvest() == []
    assert run_to_exit(vcpu).port == 0xE9
    assert ring.pending() == 3
    got = ring.harvest()
    assert [(g.slot, g.offset) for g in got] == [(mem.slot, 0), (mem.slot, 2), (mem.slot, 5)]
    assert all(g.flags & S.KVM_DIRTY_GFN_F_DIRTY for g in got)
    assert vm.reset_dirty_rings() == 3                    # KVM recycled the three entries
    assert run_to_exit(vcpu).port == 0xE9       # page 2 written again: logged again
    assert [(g.slot, g.offset) for g in ring.harvest(reset=False)] == [(mem.slot, 2)]
    assert [(g.slot, g.offset) for g in ring.harvest()] == [(mem.slot, 2)]
    assert vm.reset_dirty_rings() == 1
    with pytest.raises(pykvm.KvmError) as ei:             # the bitmap is off while rings are on
        vm.get_dirty_log(mem.slot)
    assert ei.value.errno == errno.ENXIO


def test_dirty_ring_must_come_before_vcpus(vm):
    vm.create_vcpu(0)
    with pytest.raises(pykvm.KvmError) as ei:
        vm.enable_dirty_ring(0x10000)
    assert ei.value.ioctl == "KVM_ENABLE_CAP" and "before creating vCPUs" in str(ei.value)
    with pytest.raises(pykvm.KvmError):
        vm.dirty_ring(vm.vcpus[0])                        # never enabled
    with pytest.raises(ValueError):
        vm.enable_dirty_ring(0x3000)                      # not a power of two
    with pytest.raises(ValueError):
        vm.enable_dirty_ring(16)                          # below a page


def test_dirty_ring_is_unmapped_with_the_vm(kvm):
    vm = kvm.create_vm()
    vm.enable_dirty_ring(0x1000)
    ring = vm.dirty_ring(vm.create_vcpu(0))
    vm.close()
    assert ring.closed
    with pytest.raises(pykvm.KvmClosedError):
        ring.harvest()


@pytest.mark.no_kvm_needed
def test_bitmap_helpers_round_trip():
    bm = pages_to_bitmap([0, 63, 64, 200], 256)
    assert len(bm) == 4 and bm[0] == 1 | 1 << 63 and bm[1] == 1
    assert bitmap_to_pages(bm) == [0, 63, 64, 200]
    assert bitmap_to_pages(bm, npages=100) == [0, 63, 64]
    assert bitmap_to_pages(bytes([0b101])) == [0, 2]
    assert bitmap_to_pages((ctypes.c_uint64 * 2)()) == []
    with pytest.raises(ValueError):
        pages_to_bitmap([256], 256)
    with pytest.raises(TypeError):
        pages_to_bitmap(["1"], 256)
