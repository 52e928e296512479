"""The VM fd: memory slots, vCPU creation, x86 set-up calls, bad input."""

from __future__ import annotations

import errno
import mmap

import pytest

import pykvm
from pykvm import uapi

PAGE = mmap.PAGESIZE


def test_vm_fd_identity_and_caps(kvm, vm):
    import os

    assert os.readlink(f"/proc/self/fd/{vm.fileno()}") == "anon_inode:kvm-vm"
    vcpu = vm.create_vcpu(3)
    assert os.readlink(f"/proc/self/fd/{vcpu.fileno()}") == "anon_inode:kvm-vcpu:3"
    assert vm.check_extension(pykvm.Cap.USER_MEMORY) == 1
    assert vm.check_extension(pykvm.Cap.NR_MEMSLOTS) == kvm.nr_memslots > 0


def test_add_memory_is_zero_copy_and_slotted(vm):
    a = vm.add_memory(0, 0x10000)
    b = vm.add_memory(0x10000, 0x2000)
    assert (a.slot, b.slot) == (0, 1)
    assert (a.guest_phys_addr, a.size) == (0, 0x10000)
    view = memoryview(a)
    view[0x100:0x104] = b"abcd"
    assert a.read(0x100, 4) == b"abcd" and vm.read(0x100, 4) == b"abcd"
    view.release()
    # reads and writes that cross two regions
    vm.write(0xFFFE, b"WXYZ")
    assert a.read(0xFFFE, 2) == b"WX" and b.read(0, 2) == b"YZ"
    assert vm.read(0xFFFE, 4) == b"WXYZ"
    with pytest.raises(ValueError):
        vm.read(0x12000, 1)
    with pytest.raises(ValueError):
        a.write(0xFFFF, b"xx")


def test_remove_memory_frees_slot_and_unmaps(vm):
    m = vm.add_memory(0x100000, 0x1000)
    vm.remove_memory(m)
    assert m.closed and not m.registered
    again = vm.add_memory(0x100000, 0x1000)  # same range and slot are free again
    assert again.slot == m.slot
    with pytest.raises(ValueError):
        vm.remove_memory(m)


def test_registered_memory_cannot_be_unmapped_under_a_view(vm):
    m = vm.add_memory(0, 0x1000)
    with pytest.raises(ValueError, match="remove_memory"):
        m.close()
    view = memoryview(m)
    vm.remove_memory(m)      # KVM forgets the slot...
    assert not m.closed      # ...but the mapping lives while the view does
    view[0] = 7
    view.release()


@pytest.mark.parametrize("gpa,size", [(0x800, 0x1000), (0, 0x800), (0, 0), (-PAGE, PAGE)])
def test_misaligned_or_bad_memory_is_refused(vm, gpa, size):
    with pytest.raises(ValueError):
        vm.add_memory(gpa, size)
    assert vm.memory == []


def test_overlapping_memory_is_refused(vm):
    vm.add_memory(0, 0x4000)
    with pytest.raises(pykvm.KvmError) as ei:
        vm.add_memory(0x2000, 0x4000)
    assert ei.value.errno == errno.EEXIST and "overlaps slot 0" in str(ei.value)
    assert len(vm.memory) == 1


def test_kernel_errors_name_the_ioctl(vm):
    m = vm.add_memory(0, 0x1000)
    # Raw overlapping region straight to the kernel: EEXIST from KVM itself.
    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_user_memory_region(5, 0, 0x1000, m.userspace_addr)
    assert ei.value.errno == errno.EEXIST
    assert ei.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert "overlaps" in str(ei.value)
    # Bad slot number
    with pytest.raises(pykvm.KvmError) as ei:
        vm.set_user_memory_region(0xFFFF, 0x10000, 0x1000, m.userspace_addr)
    assert ei.value.errno == errno.EINVAL and "KVM_SET_USER_MEMORY_REGION" in str(ei.value)
    with pytest.raises(ValueError):
        vm.set_user_memory_region(2**32, 0, 0x1000, m.userspace_addr)
    with pytest.raises(TypeError):
        vm.set_user_memory_region("0", 0, 0x1000, m.userspace_addr)


def test_vcpu_ids(kvm, vm):
    vm.create_vcpu(0)
    with pytest.raises(pykvm.KvmError) as ei:
        vm.create_vcpu(0)
    assert ei.value.errno == errno.EEXIST
    max_id = vm.check_extension(pykvm.Cap.MAX_VCPU_ID) or kvm.max_vcpus
    with pytest.raises(pykvm.KvmError) as ei:
        vm.create_vcpu(max_id)
    assert ei.value.errno == errno.EINVAL and "KVM_CREATE_VCPU" in str(ei.value)
    with pytest.raises(ValueError):
        vm.create_vcpu(-1)
    assert [v.id for v in vm.vcpus] == [0]


def test_tss_and_identity_map_above_2_31(vm):
    vm.set_tss_address(0xFFFBD000)        # >= 2**31: fcntl.ioctl alone would overflow
    vm.set_identity_map_address(0xFFFBC000)


def test_irqchip_and_pit(vm):
    vm.create_irq_chip()
    vm.create_pit2()
    with pytest.raises(pykvm.KvmError) as ei:
        vm.create_irq_chip()
    assert ei.value.errno == errno.EEXIST
    # The in-kernel PIC now answers KVM_GET_IRQCHIP
    chip = uapi.kvm_irqchip(chip_id=uapi.KVM_IRQCHIP_PIC_MASTER)
    from pykvm.fd import ioctl

    ioctl(vm.fileno(), uapi.KVM_GET_IRQCHIP, chip)
    assert chip.chip_id == 0


def test_enable_cap_on_vm(vm):
    if not vm.check_extension(pykvm.Cap.X86_DISABLE_EXITS):
        pytest.fail("host lacks KVM_CAP_X86_DISABLE_EXITS")
    vm.enable_cap(pykvm.Cap.X86_DISABLE_EXITS, uapi.KVM_X86_DISABLE_EXITS_PAUSE)
    with pytest.raises(pykvm.KvmError, match="KVM_ENABLE_CAP"):
        vm.enable_cap(9999)
    with pytest.raises(ValueError):
        vm.enable_cap(1, 1, 2, 3, 4, 5)


def test_closing_vm_closes_vcpus_and_unmaps(kvm):
    vm = kvm.create_vm()
    mem = vm.add_memory(0, 0x1000)
    vcpu = vm.create_vcpu()
    with vm:
        pass
    assert vm.closed and vcpu.closed and mem.closed
    with pytest.raises(pykvm.KvmClosedError):
        vm.add_memory(0x1000, 0x1000)
    with pytest.raises(pykvm.KvmClosedError):
        vm.create_vcpu(1)
