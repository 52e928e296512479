"""Careless callers cannot make a second owner of an fd or a mapping, nor make KVM
touch memory outside pykvm's buffers (issue 12, "Callers who get it wrong").

Every test runs on the real /dev/kvm; the fork tests fork for real.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import os
import pickle
import signal

import pytest

import pykvm
from pykvm import uapi
from pykvm._check import flex_fits
from pykvm.vm.dirty import DirtyEntries, DirtyPages, pages_to_bitmap
from pykvm.vm.msr_filter import MsrFilterRange, msr_filter_bitmap_size
from tests.support import fdtable

from . import support_zoo

COPIERS = {
    "copy.copy": copy.copy,
    "copy.deepcopy": copy.deepcopy,
    "pickle": lambda o: pickle.loads(pickle.dumps(o)),
}


@pytest.fixture
def zoo(kvm):
    z = support_zoo.build_zoo(kvm)
    yield z
    z["vm"].close()
    for k in ("irqfd", "ioeventfd"):
        z[k].close()


@pytest.mark.parametrize("how", sorted(COPIERS))
def test_nothing_that_owns_an_fd_or_a_mapping_can_be_copied_or_pickled(zoo, how):
    for kind, obj in zoo.items():
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            COPIERS[how](obj)
        assert not getattr(obj, "closed", False), kind   # the refusal left the original alone


def test_a_refused_copy_leaves_guest_memory_mapped_under_the_vm(kvm):
    # The path issue 12 found: a shallow copy of a Vm shared its fd number and
    # guest memory; collecting the copy closed the fd and unmapped the memory
    # while the original's vCPU could still run on it.
    vm = kvm.create_vm()
    mem = vm.add_memory(0, 0x1000)
    with pytest.raises(TypeError):
        copy.copy(vm)
    assert not mem.closed and fdtable.mapped(mem.userspace_addr)
    vm.close()
    assert mem.closed


def test_removing_memory_keeps_it_mapped_while_an_alias_slot_points_into_it(kvm, watchdog):
    vm = kvm.create_vm()
    mem = vm.add_memory(0x1000, 0x2000)
    # A second slot registered through the raw call, aliasing mem's host pages.
    vm.set_user_memory_region(7, 0x100000, 0x1000, mem.userspace_addr)
    addr = mem.userspace_addr
    vm.remove_memory(mem)
    assert fdtable.mapped(addr) and not mem.closed       # KVM can still write there through slot 7
    with pytest.raises(ValueError):
        mem.close()                                 # and the caller cannot unmap it either
    vm.close()
    assert mem.closed and not fdtable.mapped(addr)


def test_remove_memory_unmaps_at_once_without_an_alias(kvm):
    vm = kvm.create_vm()
    mem = vm.add_memory(0, 0x1000)
    addr = mem.userspace_addr
    vm.remove_memory(mem)
    assert mem.closed and not fdtable.mapped(addr)
    vm.close()


# --- fork ---------------------------------------------------------------------------------------
def _in_child(body) -> str:
    """Run *body()* in a forked child; return what it returned (a str) or its exception."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            signal.alarm(20)   # a hang in the child ends as a killed child, never a hung test
            msg = body()
        except BaseException as e:
            msg = f"raised {type(e).__name__}: {e}"
        os.write(w, msg.encode()[:4000])
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child died: status {status:#x}"
    return b"".join(chunks).decode()


def test_a_forked_childs_objects_are_inert_with_a_clear_error(zoo):
    def body() -> str:
        out = []
        for kind in ("kvm", "vm", "vcpu", "vm-stats", "irqfd"):
            obj = zoo[kind]
            try:
                obj.fileno()
                out.append(f"{kind}: usable")
            except pykvm.KvmInheritedError as e:
                assert e.errno == errno.EIO and "inherited across fork()" in str(e), str(e)
                assert obj.inherited and not obj.closed
        try:
            zoo["vm"].check_extension(pykvm.Cap.NR_MEMSLOTS)
            out.append("check_extension ran")
        except pykvm.KvmInheritedError:
            pass
        try:
            zoo["vcpu"].get_regs()
            out.append("get_regs ran")
        except pykvm.KvmError as e:
            assert e.errno == errno.EIO and "fork" in str(e)
        return "; ".join(out) or "ok"

    assert _in_child(body) == "ok"
    assert zoo["vcpu"].get_regs() is not None      # the parent's objects are untouched
    assert zoo["kvm"].check_extension(pykvm.Cap.NR_MEMSLOTS) > 0


def test_close_in_a_forked_child_closes_only_its_inherited_fds_and_never_hangs(zoo):
    vm, vcpu = zoo["vm"], zoo["vcpu"]
    parent_fds = {k: zoo[k].fileno() for k in ("kvm", "vm", "vcpu", "vm-stats")}

    def body() -> str:
        fds_before = set(fdtable.fds())
        vm.close()                # closes the VM and what it owns: vCPUs, devices, stats fds
        zoo["kvm"].close()
        gone = fds_before - set(fdtable.fds())
        missing = {k: fd for k, fd in parent_fds.items() if fd not in gone}
        if missing:
            return f"still open in the child: {missing}"
        if not (vm.closed and vcpu.closed and zoo["mem"].closed is False):
            return f"states: vm={vm.closed} vcpu={vcpu.closed}"
        vm.close()                # idempotent
        zoo["mem"].close()        # the child's own copy of guest RAM: the child may unmap it
        return "ok"

    with vcpu.hold():   # the run lock is held at fork(): the child's close must not wait for it
        assert _in_child(body) == "ok"
    # The parent's VM still works: its fds, mappings and run page were not touched.
    assert vcpu.get_regs() is not None
    assert vm.check_extension(pykvm.Cap.NR_MEMSLOTS) > 0
    assert zoo["mem"].read(0, 4) is not None and not zoo["mem"].closed


def test_objects_created_in_the_child_after_fork_work(kvm):
    def body() -> str:
        with pykvm.Kvm() as k2, k2.create_vm() as vm2:
            vm2.add_memory(0, 0x1000)
            vm2.create_vcpu(0).get_regs()
        return "ok"

    assert _in_child(body) == "ok"


# --- buffers handed to the kernel -------------------------------------------------------------
def test_flex_counts_larger_than_the_buffer_are_refused():
    buf = uapi.flex(uapi.kvm_irq_routing, 2)
    flex_fits(buf, "nr", "entries")
    buf.nr = 3
    with pytest.raises(ValueError, match="holds 2 entries"):
        flex_fits(buf, "nr", "entries")
    msrs = uapi.flex(uapi.kvm_msrs, 1)
    msrs.nmsrs = 1000
    with pytest.raises(ValueError):
        flex_fits(msrs, "nmsrs", "entries")


def test_device_attr_buffers_shorter_than_a_u64_are_refused_or_padded(kvm, vm):
    vcpu = vm.create_vcpu(0)
    if not vcpu.has_device_attr(0, 0):
        pytest.skip("no vCPU TSC attribute here")
    with pytest.raises(ValueError, match="at least 8 bytes"):
        vcpu.get_device_attr(0, 0, bytearray(1))       # KVM would write 8 bytes into 1
    with pytest.raises(ValueError, match="at least 8 bytes"):
        vcpu.get_device_attr(0, 0, ctypes.c_uint8())
    # A 1-byte value is passed zero-padded to 8 bytes (KVM reads a __u64).
    vcpu.set_device_attr(0, 0, b"\x01")
    out = bytearray(8)
    assert vcpu.get_device_attr(0, 0, out) is out


def test_msr_filter_bitmaps_are_handed_over_as_whole_longs(vm):
    assert msr_filter_bitmap_size(1) == 8 and msr_filter_bitmap_size(64) == 8
    assert msr_filter_bitmap_size(65) == 16
    # 9 MSRs in a 2-byte bitmap: KVM copies 8 bytes, pykvm passes a zero-padded copy of 8.
    vm.set_msr_filter([MsrFilterRange(uapi.KVM_MSR_FILTER_READ, 0x10, b"\xff\x01", 9)])
    vm.set_msr_filter([])


def test_pmu_event_filter_refuses_a_huge_iterable_without_consuming_it(vm):
    def endless():
        n = 0
        while True:
            n += 1
            yield 0xC0
            assert n < 10_000, "consumed far beyond KVM's limit"

    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_pmu_event_filter(endless())
    assert ei.value.errno == errno.E2BIG


def test_same_memory_region_again_still_checks_its_arguments(vm):
    mem = vm.add_memory(0, 0x1000)
    vm.set_user_memory_region(mem.slot, 0, 0x1000, mem.userspace_addr)   # the fast path
    with pytest.raises(TypeError):
        vm.set_user_memory_region(mem.slot, 0, 4096.0, mem.userspace_addr)
    with pytest.raises(TypeError):
        vm.set_user_memory_region(mem.slot, 0, 0x1000, mem.userspace_addr, True)
    with pytest.raises(pykvm.KvmError) as ei:                              # still a real ioctl
        vm.set_user_memory_region(mem.slot, 0, 0x2000, mem.userspace_addr)
    assert ei.value.errno == errno.EINVAL


# --- compact decoders ---------------------------------------------------------------------
@pytest.mark.no_kvm_needed
def test_dirty_pages_is_a_compact_sequence():
    words = pages_to_bitmap([0, 3, 64, 65, 66, 199], 200)
    pages = DirtyPages(bytes(memoryview(words).cast("B")), 200)
    assert len(pages) == 6 and pages == [0, 3, 64, 65, 66, 199]
    assert 65 in pages and 4 not in pages and 200 not in pages
    assert pages.ranges() == [(0, 1), (3, 4), (64, 67), (199, 200)]
    assert pages[2] == 64 and pages[-1] == 199 and list(pages) == pages.tolist()
    assert DirtyPages(b"\xff\xff", 9) == list(range(9))      # bits beyond npages ignored
    assert len(DirtyPages(b"\xff\xff", 9)) == 9


@pytest.mark.no_kvm_needed
def test_dirty_entries_compare_and_index():
    import array

    e = DirtyEntries(array.array("I", [1, 1]), array.array("Q", [5, 9]))
    assert len(e) == 2 and e.pairs() == [(1, 5), (1, 9)]
    assert e[1].offset == 9 and e[-1].slot == 1
    assert [g.offset for g in e] == [5, 9]
    assert e == [uapi.kvm_dirty_gfn(slot=1, offset=5), uapi.kvm_dirty_gfn(slot=1, offset=9)]
    with pytest.raises(IndexError):
        e[2]
