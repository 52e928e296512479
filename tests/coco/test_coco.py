"""Confidential-computing wrappers (pykvm.coco) against the real /dev/kvm.

This project's hosts have neither SEV nor TDX: KVM refuses every command.
The refusal tests run only where the host reports no confidential VM type in
KVM_CAP_VM_TYPES (on an SEV/TDX host they would create real guests); the
argument checks need no KVM.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
from pathlib import Path

import pytest

import pykvm
from pykvm import coco
from pykvm.errors import hint_for
from pykvm.uapi import consts, x86

CONFIDENTIAL = {consts.KVM_X86_SEV_VM, consts.KVM_X86_SEV_ES_VM, consts.KVM_X86_SNP_VM,
                consts.KVM_X86_TDX_VM}


def _hint(name: str, err: int) -> str:
    """The text a refusal must carry: coco's own, else the one table in pykvm.errors (never none)."""
    text = coco.HINTS.get((name, err)) or hint_for(name, err)
    assert text, f"no hint for {name} {err}"
    return text


@pytest.fixture
def plain_host(kvm):
    if coco.supported_vm_types(kvm) & CONFIDENTIAL:
        pytest.skip("this host offers confidential VM types; the refusal tests do not apply")
    return kvm


def test_vm_types_always_include_the_default(kvm):
    types = coco.supported_vm_types(kvm)
    assert consts.KVM_X86_DEFAULT_VM in types
    assert set(coco.VM_TYPES.values()) == {0, 1, 2, 3, 4, 5}


def test_confidential_vm_types_are_refused(plain_host):
    for vm_type in sorted(CONFIDENTIAL):
        with pytest.raises(pykvm.KvmError) as info:
            plain_host.create_vm(vm_type)
        assert info.value.errno == errno.EINVAL and info.value.ioctl == "KVM_CREATE_VM"


def test_sev_commands_are_refused_with_a_hint(plain_host):
    with plain_host.create_vm() as vm:
        for cmd_id in (consts.KVM_SEV_INIT, consts.KVM_SEV_LAUNCH_FINISH):
            with pytest.raises(pykvm.KvmError) as info:
                coco.sev_command(vm, cmd_id)
            e = info.value
            assert e.ioctl == "KVM_MEMORY_ENCRYPT_OP"
            assert e.errno in (errno.ENOTTY, errno.EINVAL)
            assert e.hint == _hint("KVM_MEMORY_ENCRYPT_OP", e.errno)
        status = x86.kvm_sev_guest_status()
        with pytest.raises(pykvm.KvmError):
            coco.sev_command(vm, consts.KVM_SEV_GUEST_STATUS, status)


def test_tdx_commands_are_refused_with_a_hint(plain_host):
    with plain_host.create_vm() as vm:
        with pytest.raises(pykvm.KvmError) as info:
            coco.tdx_capabilities(vm)
        assert info.value.ioctl == "KVM_MEMORY_ENCRYPT_OP"
        assert "memory encryption" in str(info.value) or "confidential" in str(info.value)
        vcpu = vm.create_vcpu(0)
        with pytest.raises(pykvm.KvmError) as info:
            coco.tdx_command(vcpu, consts.KVM_TDX_INIT_VCPU, 0)
        assert info.value.errno in (errno.ENOTTY, errno.EINVAL)


def test_encrypted_region_registration_is_refused(plain_host):
    with plain_host.create_vm() as vm, mmap.mmap(-1, 4096) as mem:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        for fn, name in ((coco.register_region, "KVM_MEMORY_ENCRYPT_REG_REGION"),
                         (coco.unregister_region, "KVM_MEMORY_ENCRYPT_UNREG_REGION")):
            with pytest.raises(pykvm.KvmError) as info:
                fn(vm, addr, 4096)
            e = info.value
            assert e.ioctl == name and e.errno in (errno.ENOTTY, errno.EINVAL)
            assert e.hint == _hint(name, e.errno)
        del addr


def test_sev_attribute_group_is_absent(plain_host):
    assert not coco.has_system_attr(plain_host, consts.KVM_X86_GRP_SEV,
                                    consts.KVM_X86_SEV_VMSA_FEATURES)
    with pytest.raises(pykvm.KvmError) as info:
        coco.sev_vmsa_features(plain_host)
    assert info.value.errno == errno.ENXIO and "KVM_X86_GRP_SEV" in info.value.hint


def test_guest_xsave_components_cover_cpuid_leaf_0xd(kvm):
    """KVM_X86_XCOMP_GUEST_SUPP (6.9+) bounds what CPUID.(0xD,0) offers the guest."""
    if not coco.has_system_attr(kvm, consts.KVM_X86_GRP_SYSTEM, consts.KVM_X86_XCOMP_GUEST_SUPP):
        pytest.skip("kernel older than 6.9: no KVM_X86_XCOMP_GUEST_SUPP")
    supp = coco.system_attr(kvm, consts.KVM_X86_GRP_SYSTEM, consts.KVM_X86_XCOMP_GUEST_SUPP)
    leaf = [e for e in kvm.supported_cpuid() if e.function == 0xD and e.index == 0]
    assert supp & 0b11 == 0b11  # x87 and SSE state are always there
    if leaf:
        offered = leaf[0].eax | leaf[0].edx << 32
        assert offered & ~supp == 0


@pytest.mark.no_kvm_needed
def test_commands_get_exactly_their_structure():
    class Fd:
        def fileno(self) -> int:
            raise AssertionError("no ioctl may be issued")

    with pytest.raises(TypeError):
        coco.sev_command(Fd(), consts.KVM_SEV_LAUNCH_START, x86.kvm_sev_launch_measure())
    with pytest.raises(TypeError):
        coco.sev_command(Fd(), consts.KVM_SEV_LAUNCH_START)
    with pytest.raises(TypeError):
        coco.sev_command(Fd(), consts.KVM_SEV_INIT, x86.kvm_sev_init())
    with pytest.raises(ValueError):
        coco.sev_command(Fd(), 99)
    with pytest.raises(ValueError):
        coco.sev_command(Fd(), consts.KVM_SEV_INIT, sev_fd=-1)
    with pytest.raises(TypeError):
        coco.tdx_command(Fd(), consts.KVM_TDX_INIT_VCPU, x86.kvm_tdx_init_vm())
    with pytest.raises(TypeError):
        coco.tdx_command(Fd(), consts.KVM_TDX_INIT_VCPU, 2**64)
    with pytest.raises(ValueError):
        coco.tdx_command(Fd(), consts.KVM_TDX_CMD_NR_MAX)
    with pytest.raises(ValueError):
        coco.register_region(Fd(), -1, 4096)
    with pytest.raises(ValueError):
        coco.system_attr(Fd(), 2**32, 0)
    with pytest.raises(ValueError):
        coco.tdx_capabilities(Fd(), 0)


@pytest.mark.no_kvm_needed
def test_every_command_id_of_the_kernel_is_typed():
    """Each enumerator of the kernel's sev_cmd_id / kvm_tdx_cmd_id has an entry."""
    record = json.loads((Path(__file__).parents[1] / "uapi" / "kernel-7.3.json").read_text())
    ids = {}
    for c in record["consts"]:
        if c.get("enum") in ("sev_cmd_id", "kvm_tdx_cmd_id") and not c["name"].endswith("_MAX"):
            ids.setdefault(c["enum"], set()).add(c["value"])
    assert ids["sev_cmd_id"] == set(coco.SEV_COMMANDS)
    assert ids["kvm_tdx_cmd_id"] == set(coco.TDX_COMMANDS)
