"""Memory slots: KVM_SET_USER_MEMORY_REGION2 and its flags, guest_memfd, memory attributes."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

import pytest

import pykvm
from pykvm import Cap
from pykvm.gmem import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, GuestMemfd
from pykvm.uapi import structs as S
from tests.support.guests import HLT, real_mode
from tests.support.runs import run_to_exit
from tests.vm.support_irqguest import es_read_byte_out, es_segment, es_write_byte

GPA, SIZE = 0x10000, 0x10000
# read [0x10000] and report it, write [0x10010], read it back and report it
CODE = (es_segment(GPA >> 4) + es_read_byte_out(0x0000) + es_write_byte(0x0010, 0x77)
        + es_read_byte_out(0x0010) + HLT)


def _addr(buf) -> int:
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def test_readonly_slot_reads_memory_and_turns_writes_into_mmio_exits(vm, watchdog):
    assert vm.check_extension(Cap.READONLY_MEM)
    vcpu = real_mode(vm, CODE)
    rom = vm.add_memory(GPA, SIZE, flags=S.KVM_MEM_READONLY)
    rom.write(0, b"\x42")
    rom.write(0x10, b"\x43")
    assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x42")
    assert run_to_exit(vcpu) == pykvm.MmioWrite(GPA + 0x10, b"\x77")
    assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x43")   # the write did not land
    assert rom.read(0x10, 1) == b"\x43"


@pytest.mark.parametrize("flags", [0, S.KVM_MEM_READONLY, S.KVM_MEM_LOG_DIRTY_PAGES])
def test_set_user_memory_region2_maps_host_memory(vm, watchdog, flags):
    assert vm.check_extension(Cap.USER_MEMORY2)
    vcpu = real_mode(vm, CODE)
    host = mmap.mmap(-1, SIZE)
    host[0] = 0x31
    host[0x10] = 0x32
    vm.set_user_memory_region2(5, GPA, SIZE, _addr(host), flags)
    try:
        assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x31")
        if flags & S.KVM_MEM_READONLY:
            assert run_to_exit(vcpu) == pykvm.MmioWrite(GPA + 0x10, b"\x77")
            assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x32")
        else:
            assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x77")
            assert host[0x10] == 0x77
        if flags & S.KVM_MEM_LOG_DIRTY_PAGES:
            assert vm.get_dirty_log(5) == [0]
    finally:
        vm.set_user_memory_region2(5, GPA, 0, _addr(host))   # delete the slot before unmapping
    host.close()


def test_guest_memfd_mmap_init_shared_backs_the_slot(vm, watchdog):
    assert vm.check_extension(Cap.GUEST_MEMFD)
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    supported = vm.check_extension(Cap.GUEST_MEMFD_FLAGS)
    assert supported & flags == flags, f"KVM_CAP_GUEST_MEMFD_FLAGS = {supported:#x}"
    vcpu = real_mode(vm, CODE)
    gmem = vm.create_guest_memfd(SIZE, flags)
    assert isinstance(gmem, GuestMemfd) and gmem.size == SIZE
    assert fcntl.fcntl(gmem.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.readlink(f"/proc/self/fd/{gmem.fileno()}") == "anon_inode:[kvm-gmem]"
    view = gmem.mmap()
    view[0] = 0x55
    # The slot's memory is the guest_memfd itself: host and guest share its pages.
    vm.set_user_memory_region2(3, GPA, SIZE, _addr(view), guest_memfd=gmem)
    assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x55")
    assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x77")
    assert view[0x10] == 0x77
    vm.set_user_memory_region2(3, GPA, 0, 0)
    view.close()


def test_guest_memfd_slot_takes_shared_memory_from_userspace_addr(vm, watchdog):
    # A guest_memfd without MMAP only holds *private* memory; on a default VM
    # (no memory attributes) every access is shared and uses userspace_addr.
    vcpu = real_mode(vm, CODE)
    gmem = vm.create_guest_memfd(SIZE)
    with pytest.raises(ValueError):
        gmem.mmap()
    host = mmap.mmap(-1, SIZE)
    host[0] = 0x66
    vm.set_user_memory_region2(3, GPA, SIZE, _addr(host), S.KVM_MEM_GUEST_MEMFD,
                               guest_memfd=gmem.fileno(), guest_memfd_offset=0)
    assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x66")
    assert run_to_exit(vcpu) == pykvm.IoOut(0xE9, 1, 1, b"\x77")
    assert host[0x10] == 0x77
    vm.set_user_memory_region2(3, GPA, 0, 0)
    host.close()
    gmem.punch_hole(0, SIZE)


def test_guest_memfd_is_closed_with_the_vm_and_checks_input(kvm):
    vm = kvm.create_vm()
    g = vm.create_guest_memfd(0x2000)
    with pytest.raises(ValueError):
        vm.create_guest_memfd(0x1001)
    with pytest.raises(pykvm.KvmError) as ei:
        vm.create_guest_memfd(0x1000, flags=1 << 40)          # unknown flag
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_CREATE_GUEST_MEMFD"
    with pytest.raises(ValueError):
        vm.set_user_memory_region2(1, 0, 0x1000, 0, S.KVM_MEM_GUEST_MEMFD)   # flag without fd
    vm.close()
    assert g.closed
    with pytest.raises(pykvm.KvmClosedError):
        g.punch_hole(0, 0x1000)


def test_set_memory_attributes_needs_the_capability(kvm, vm):
    attrs = vm.check_extension(Cap.MEMORY_ATTRIBUTES)
    if attrs & S.KVM_MEMORY_ATTRIBUTE_PRIVATE:  # pragma: no cover - not on the project's hosts
        vm.set_memory_attributes(0, 0x1000, S.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        return
    # KVM_CAP_MEMORY_ATTRIBUTES is 0 for a default VM here: private memory
    # needs a KVM_X86_SW_PROTECTED_VM (or a confidential) VM type, and this
    # host offers only the default type (KVM_CAP_VM_TYPES).
    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_memory_attributes(0, 0x1000, S.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert ei.value.errno in (errno.ENOTTY, errno.EINVAL), ei.value
    assert ei.value.ioctl == "KVM_SET_MEMORY_ATTRIBUTES"
    if S.KVM_X86_SW_PROTECTED_VM in kvm.vm_types():  # pragma: no cover - not on the project's hosts
        with kvm.create_vm(S.KVM_X86_SW_PROTECTED_VM) as pvm:
            assert pvm.check_extension(Cap.MEMORY_ATTRIBUTES) & S.KVM_MEMORY_ATTRIBUTE_PRIVATE
            pvm.set_memory_attributes(0, 0x1000, S.KVM_MEMORY_ATTRIBUTE_PRIVATE)
