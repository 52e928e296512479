"""Register state through the vCPU fd, each value checked from inside the guest.

regs, sregs, sregs2, fpu, xsave/xsave2, xcrs, debugregs, msrs, ONE_REG,
CPUID (old KVM_SET_CPUID), nested state.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

import pykvm
from pykvm import uapi
from pykvm.uapi import structs as S
from tests.support.guests import CR4, long_mode, real_mode, user_mode
from tests.support.host import host_is_pvm
from tests.support.runs import outs, run_until

from .support_hints import check_hint

REGS_SUM = bytes.fromhex(
    "89d8"                      # 0x00: mov ax,bx
    "01c8"                      # 0x02: add ax,cx
    "e710"                      # 0x04: out 0x10,ax
    "b84242"                    # 0x06: mov ax,0x4242
    "f4"                        # 0x09: hlt
)


def test_guest_sees_regs_and_we_see_its(vm, watchdog):
    vcpu = real_mode(vm, REGS_SUM)
    r = vcpu.get_regs()
    r.rbx, r.rcx = 0x1200, 0x34
    vcpu.set_regs(r)
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [0x1234]
    assert isinstance(exits[-1], pykvm.Hlt)
    assert vcpu.get_regs().rax & 0xFFFF == 0x4242


SEG_CR4 = bytes.fromhex(
    "648b042500000000"          # 0x00: mov eax,DWORD PTR fs:0x0
    "e710"                      # 0x08: out 0x10,eax
    "658b042500000000"          # 0x0a: mov eax,DWORD PTR gs:0x0
    "e710"                      # 0x12: out 0x10,eax
    "0f20e0"                    # 0x14: mov rax,cr4
    "e710"                      # 0x17: out 0x10,eax
    "f4"                        # 0x19: hlt
)


def test_sregs_and_sregs2_segment_bases_and_cr4_seen_by_guest(vm, kvm, watchdog):
    assert kvm.check_extension(pykvm.Cap.SREGS2)
    vcpu = long_mode(vm, SEG_CR4)
    vm.write(0x8000, b"FSFS")
    vm.write(0x8100, b"GSGS")
    s = vcpu.get_sregs()
    s.fs.base = 0x8000
    vcpu.set_sregs(s)

    s2 = vcpu.get_sregs2()
    # same state as KVM_GET_SREGS, and no PDPTRs in 4-level paging
    for f in ("cr0", "cr3", "cr4", "efer", "apic_base"):
        assert getattr(s2, f) == getattr(vcpu.get_sregs(), f), f
    assert s2.fs.base == 0x8000 and s2.cs.l == 1
    assert s2.flags == 0
    s2.gs.base = 0x8100
    assert s2.cr4 == CR4                 # PAE | OSFXSR | OSXMMEXCPT, as set up
    s2.cr4 &= ~0x400                     # clear OSXMMEXCPT through KVM_SET_SREGS2
    vcpu.set_sregs2(s2)

    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [int.from_bytes(b"FSFS", "little"), int.from_bytes(b"GSGS", "little"),
                                 CR4 & ~0x400]
    assert vcpu.get_sregs().gs.base == 0x8100


def test_sregs2_pdptrs_refused_outside_pae_paging(vm):
    vcpu = long_mode(vm, b"\xf4")
    s2 = vcpu.get_sregs2()
    s2.flags = S.KVM_SREGS2_FLAGS_PDPTRS_VALID  # long mode has no PDPTE registers
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.set_sregs2(s2)
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_SREGS2"
    s2.flags = 2  # undefined flag
    with pytest.raises(pykvm.KvmError):
        vcpu.set_sregs2(s2)
    with pytest.raises(TypeError):
        vcpu.set_sregs2(vcpu.get_sregs())


PAE_READ = bytes.fromhex(
    "a100002000"                # 0x00: mov eax,ds:0x200000
    "e710"                      # 0x05: out 0x10,eax
    "f4"                        # 0x07: hlt
)


def test_sregs2_pdptrs_from_user_space(vm, watchdog):
    """32-bit PAE paging: the PDPTE in memory at CR3 points to a page directory
    mapping the linear page 0x200000 to "BBBB"; the PDPTE we hand KVM with
    KVM_SET_SREGS2 points to one mapping it to "AAAA".  The guest must see AAAA.

    PVM runs no 32-bit paging (only 64-bit paging or none): it clears CR0.PG,
    so there KVM_GET_SREGS2 never reports PDPTRs; the test asserts that instead.
    """
    mem = vm.add_memory(0, 0x400000)
    PDPT_, PDA, PDB = 0x1000, 0x2000, 0x3000
    mem.write(PDPT_, struct.pack("<Q", PDB | 1))
    mem.write(PDA, struct.pack("<QQ", 0x83, 0x200000 | 0x83))  # 2 MiB pages
    mem.write(PDB, struct.pack("<QQ", 0x83, 0x300000 | 0x83))
    mem.write(0x200000, b"AAAA")
    mem.write(0x300000, b"BBBB")
    mem.write(0x10000, PAE_READ)
    vcpu = vm.create_vcpu()
    s2 = vcpu.get_sregs2()
    s2.cr3, s2.cr4, s2.cr0, s2.efer = PDPT_, 0x20, 0x80000011, 0
    for seg in ("cs", "ds", "es", "fs", "gs", "ss"):
        sg = getattr(s2, seg)
        sg.base, sg.limit, sg.selector = 0, 0xFFFFFFFF, 8 if seg == "cs" else 16
        sg.type, sg.present, sg.dpl, sg.s, sg.g, sg.l, sg.db = (11 if seg == "cs" else 3), 1, 0, 1, 1, 0, 1
    s2.flags = S.KVM_SREGS2_FLAGS_PDPTRS_VALID
    s2.pdptrs[0] = PDA | 1
    try:
        vcpu.set_sregs2(s2)
    except pykvm.KvmError as e:
        assert host_is_pvm() and e.errno == errno.EINVAL, e
        paging = False
    else:
        paging = bool(vcpu.get_sregs2().cr0 & 0x80000000)
    if not paging:
        assert host_is_pvm(), "CR0.PG with CR4.PAE and no EFER.LMA should stick"
        s2.flags = 0
        vcpu.set_sregs2(s2)
        back = vcpu.get_sregs2()
        assert not back.cr0 & 0x80000000 and back.flags == 0  # PVM dropped PG: no PAE mode here
        return
    back = vcpu.get_sregs2()
    assert back.flags & S.KVM_SREGS2_FLAGS_PDPTRS_VALID and back.pdptrs[0] == PDA | 1
    r = vcpu.get_regs()
    r.rip, r.rflags = 0x10000, 2
    vcpu.set_regs(r)
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [int.from_bytes(b"AAAA", "little")]


STORE_FPU = bytes.fromhex(
    "f30f7f1c2500800000"        # 0x00: movdqu XMMWORD PTR ds:0x8000,xmm3
    "d93c2510800000"            # 0x09: fnstcw WORD PTR ds:0x8010
    "dd1c2518800000"            # 0x10: fstp QWORD PTR ds:0x8018
    "e610"                      # 0x17: out 0x10,al
)


def test_fpu_values_seen_by_guest(kvm, vm, watchdog):
    """KVM_SET_FPU: the guest (CPL3, native here) stores xmm3, the control word
    and st(0) we set.

    KVM_SET_FPU writes the legacy FXSAVE area only; on a fresh vCPU the XSAVE
    header still marks x87/SSE as "init", and XRSTOR would then load the init
    state instead.  So the test first sets XSTATE_BV bits 0-1 with KVM_SET_XSAVE.
    KVM_GET/SET_FPU also ignore ``mxcsr`` (use xsave for it).
    """
    vcpu = user_mode(vm, STORE_FPU, cpuid=kvm.supported_cpuid())
    xs = vcpu.get_xsave()
    struct.pack_into("<Q", xs, 512, struct.unpack_from("<Q", xs, 512)[0] | 3)
    vcpu.set_xsave(xs)
    f = vcpu.get_fpu()
    assert f.fcw == 0x37F
    f.xmm[3][:] = list(range(0x60, 0x70))
    f.fcw = 0x27F                                     # 53-bit precision
    f.fpr[0][:10] = list(struct.pack("<QH", 0xC000000000000000, 0x3FFF))  # 1.5 as 80-bit
    f.fsw, f.ftwx = 0, 1                               # TOP = 0, R0 valid
    vcpu.set_fpu(f)
    back = vcpu.get_fpu()
    assert back.fcw == 0x27F and bytes(back.xmm[3]) == bytes(range(0x60, 0x70))
    exits = run_until(vcpu, n=1)
    assert isinstance(exits[0], pykvm.IoOut)
    assert vm.read(0x8000, 16) == bytes(range(0x60, 0x70))
    assert struct.unpack("<H", vm.read(0x8010, 2))[0] == 0x27F
    assert struct.unpack("<d", vm.read(0x8018, 8))[0] == 1.5
    with pytest.raises(TypeError):
        vcpu.set_fpu(back.xmm)


STORE_XMM_YMM = bytes.fromhex(
    "f30f7f0c2500800000"        # 0x00: movdqu XMMWORD PTR ds:0x8000,xmm1
    "c5fe7f0c2510800000"        # 0x09: vmovdqu YMMWORD PTR ds:0x8010,ymm1
    "e610"                      # 0x12: out 0x10,al
)


def _has_avx_state(cpuid) -> bool:
    # CPUID.(0xD,0).EAX: the XCR0 bits KVM lets a guest enable (bit 2: AVX state).
    # (PVM clears XSAVE/AVX in leaf 1, yet supports the components and the
    # guest's CPL3 code runs AVX natively.)
    leaf_d = next(e for e in cpuid if e.function == 0xD and e.index == 0)
    return bool(leaf_d.eax & 4)


def test_xsave_and_xsave2_values_seen_by_guest(kvm, vm, watchdog):
    """KVM_SET_XSAVE: XMM1 (legacy area) and the upper half of YMM1 (AVX
    component at offset 576) reach the guest; KVM_GET_XSAVE2 returns the
    KVM_CAP_XSAVE2-sized image whose first 4 KiB equal KVM_GET_XSAVE's."""
    cpuid = kvm.supported_cpuid()
    assert _has_avx_state(cpuid), "this host's KVM offers the AVX state component"
    vcpu = user_mode(vm, STORE_XMM_YMM, cpuid=cpuid, cr4=0x40000)  # CR4.OSXSAVE
    x = vcpu.get_xcrs()
    x.xcrs[0].value = 7  # x87 | SSE | AVX
    vcpu.set_xcrs(x)

    size = vm.check_extension(pykvm.Cap.XSAVE2)
    assert size >= 4096
    xs2 = vcpu.get_xsave2()
    assert ctypes.sizeof(xs2) == size
    assert bytes(xs2)[:4096] == bytes(vcpu.get_xsave())

    raw = memoryview(xs2).cast("B")
    raw[160 + 16:160 + 32] = bytes(range(0x10, 0x20))   # XMM1
    raw[576 + 16:576 + 32] = bytes(range(0x20, 0x30))   # YMM1[255:128]
    struct.pack_into("<Q", raw, 512, struct.unpack_from("<Q", raw, 512)[0] | 7)  # XSTATE_BV
    vcpu.set_xsave(xs2)
    assert bytes(vcpu.get_xsave2())[576 + 16:576 + 32] == bytes(range(0x20, 0x30))
    exits = run_until(vcpu, n=1)
    assert isinstance(exits[0], pykvm.IoOut), exits
    assert vm.read(0x8000, 16) == bytes(range(0x10, 0x20))
    assert vm.read(0x8010, 32) == bytes(range(0x10, 0x30))


def test_set_xsave_pads_a_short_image(vm, monkeypatch):
    """KVM_SET_XSAVE reads as many bytes as the guest's XSAVE image has; when
    that is more than the buffer given (AMX hosts), pykvm passes a padded copy."""
    vcpu = vm.create_vcpu()
    xs = vcpu.get_xsave()
    sizes = []
    real_ioctl = vcpu._ioctl
    monkeypatch.setattr(vcpu, "_xsave_size", lambda: 4096 + 1024)
    monkeypatch.setattr(vcpu, "_ioctl", lambda req, arg=0: (sizes.append(ctypes.sizeof(arg)), real_ioctl(req, arg))[1])
    vcpu.set_xsave(xs)
    assert sizes == [4096 + 1024]
    with pytest.raises(TypeError):
        vcpu.set_xsave(vcpu.get_fpu())


CPUID_D_EBX = bytes.fromhex(
    "66b80d000000"              # 0x00: mov eax,0xd
    "6631c9"                    # 0x06: xor ecx,ecx
    "0fa2"                      # 0x09: cpuid
    "6689d8"                    # 0x0b: mov eax,ebx
    "66e710"                    # 0x0e: out 0x10,eax
    "f4"                        # 0x11: hlt
)


@pytest.mark.parametrize("xcr0, xsave_bytes", [(0x3, 576), (0x7, 832)])
def test_xcr0_seen_by_guest_through_cpuid(kvm, vm, watchdog, xcr0, xsave_bytes):
    """The guest sees XCR0 through CPUID.(EAX=0xD,ECX=0):EBX, the XSAVE size
    for the components XCR0 enables, which KVM recomputes from XCR0.

    (``xgetbv`` cannot show it here: at CPL0 the emulator fails on it, and at
    CPL3 PVM leaves the host's XCR0 loaded.)
    """
    cpuid = kvm.supported_cpuid()
    assert _has_avx_state(cpuid)
    vcpu = real_mode(vm, CPUID_D_EBX)
    vcpu.set_cpuid2(cpuid)
    x = vcpu.get_xcrs()
    assert x.nr_xcrs == 1 and x.xcrs[0].xcr == 0 and x.xcrs[0].value == 1  # x87 only at reset
    x.xcrs[0].value = xcr0
    vcpu.set_xcrs(x)
    assert vcpu.get_xcrs().xcrs[0].value == xcr0
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [xsave_bytes]


def test_invalid_xcr0_refused(kvm, vm):
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid2(kvm.supported_cpuid())
    x = vcpu.get_xcrs()
    x.xcrs[0].value = 0x2  # SSE without x87: architecturally invalid
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.set_xcrs(x)
    assert ei.value.errno == errno.EINVAL


READ_DRS = bytes.fromhex(
    "0f21c0"                    # 0x00: mov eax,dr0
    "66e710"                    # 0x03: out 0x10,eax
    "0f21d8"                    # 0x06: mov eax,dr3
    "66e710"                    # 0x09: out 0x10,eax
    "0f21f8"                    # 0x0c: mov eax,dr7
    "66e710"                    # 0x0f: out 0x10,eax
    "f4"                        # 0x12: hlt
)


def test_debugregs_seen_by_guest(vm, watchdog):
    vcpu = real_mode(vm, READ_DRS)
    d = vcpu.get_debug_regs()
    assert list(d.db) == [0, 0, 0, 0] and d.dr6 == 0xFFFF0FF0 and d.dr7 == 0x400  # reset values
    d.db[0], d.db[3], d.dr7 = 0x12345678, 0xABCDEF, 0x400 | 0x2  # G0
    vcpu.set_debug_regs(d)
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [0x12345678, 0xABCDEF, 0x402]
    back = vcpu.get_debug_regs()
    assert back.db[0] == 0x12345678 and back.dr7 == 0x402
    back.dr7 = 1 << 40  # reserved upper half
    with pytest.raises(pykvm.KvmError):
        vcpu.set_debug_regs(back)


MSRS = bytes.fromhex(
    "66b974010000"              # 0x00: mov ecx,0x174   IA32_SYSENTER_CS
    "0f32"                      # 0x06: rdmsr
    "66e710"                    # 0x08: out 0x10,eax
    "66b975010000"              # 0x0b: mov ecx,0x175   IA32_SYSENTER_ESP
    "0f32"                      # 0x11: rdmsr
    "66e710"                    # 0x13: out 0x10,eax
    "66b976010000"              # 0x16: mov ecx,0x176   IA32_SYSENTER_EIP
    "66b8feca0000"              # 0x1c: mov eax,0xcafe
    "6631d2"                    # 0x22: xor edx,edx
    "0f30"                      # 0x25: wrmsr
    "f4"                        # 0x27: hlt
)


def test_msrs_several_at_once_both_ways(vm, watchdog):
    vcpu = real_mode(vm, MSRS)
    assert vcpu.set_msrs({0x174: 0x10, 0x175: 0x7000}) == 2
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [0x10, 0x7000]
    assert vcpu.get_msrs([0x174, 0x175, 0x176]) == {0x174: 0x10, 0x175: 0x7000, 0x176: 0xCAFE}


def test_one_reg_msr_ids(kvm, vm, watchdog):
    """KVM_GET/SET_ONE_REG with x86 MSR ids (kernel 6.18+); the list holds only
    KVM-defined registers (the CET SSP, when the guest has shadow stacks)."""
    assert kvm.check_extension(pykvm.Cap.ONE_REG), "kernel 6.18+ reports KVM_CAP_ONE_REG on x86"
    vcpu = real_mode(vm, MSRS)
    cs = uapi.KVM_X86_REG_MSR(0x174)
    assert cs == 0x2030000200000174
    vcpu.set_one_reg(cs, 0x99)
    vcpu.set_one_reg(uapi.KVM_X86_REG_MSR(0x175), 0x5555)
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [0x99, 0x5555]
    assert vcpu.get_one_reg(uapi.KVM_X86_REG_MSR(0x176)) == 0xCAFE  # the guest's wrmsr
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.get_one_reg(uapi.KVM_X86_REG_MSR(0x12345))  # no such MSR
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_GET_ONE_REG"
    with pytest.raises(pykvm.KvmError):
        vcpu.get_one_reg(cs & ~uapi.KVM_REG_SIZE_MASK | uapi.KVM_REG_SIZE_U32)  # x86 regs are u64
    with pytest.raises(ValueError):
        vcpu.set_one_reg(cs, 1 << 64)

    shstk = any(e.function == 7 and e.index == 0 and e.ecx >> 7 & 1 for e in kvm.supported_cpuid())
    fresh = vm.create_vcpu(1)  # CPUID cannot change once a vCPU has run
    fresh.set_cpuid2(kvm.supported_cpuid())
    regs = fresh.get_reg_list()
    assert regs == ([uapi.KVM_X86_REG_KVM(uapi.KVM_REG_GUEST_SSP)] if shstk else [])


CPUID_HV_EBX = bytes.fromhex(
    "66b800000040"              # 0x00: mov eax,0x40000000
    "0fa2"                      # 0x06: cpuid
    "66e710"                    # 0x08: out 0x10,eax
    "6689d8"                    # 0x0b: mov eax,ebx
    "66e710"                    # 0x0e: out 0x10,eax
    "f4"                        # 0x11: hlt
)


def test_old_set_cpuid_seen_by_guest(vm, watchdog):
    vcpu = real_mode(vm, CPUID_HV_EBX)
    e = S.kvm_cpuid_entry(function=0x40000000, eax=0x40000001, ebx=int.from_bytes(b"pyKV", "little"))
    vcpu.set_cpuid([e])
    exits = run_until(vcpu)
    assert outs(exits, 0x10) == [0x40000001, int.from_bytes(b"pyKV", "little")]
    got = [(x.function, x.index, x.flags, x.eax) for x in vcpu.get_cpuid2()]
    assert got == [(0x40000000, 0, 0, 0x40000001)]  # converted to a kvm_cpuid_entry2
    with pytest.raises(TypeError):
        vcpu.set_cpuid([S.kvm_cpuid_entry2()])


def test_nested_state(kvm, vm):
    """KVM_GET/SET_NESTED_STATE.  This host (PVM) has no nested virtualization:
    KVM_CAP_NESTED_STATE is 0 and KVM refuses both ioctls with EINVAL."""
    vcpu = vm.create_vcpu()
    size = vm.check_extension(pykvm.Cap.NESTED_STATE)
    if size == 0:
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.get_nested_state()
        assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_GET_NESTED_STATE"
        check_hint(ei.value)
        hdr = S.flex(S.kvm_nested_state, 0)
        hdr.size = ctypes.sizeof(hdr)
        with pytest.raises(pykvm.KvmError) as ei:
            vcpu.set_nested_state(hdr)
        assert ei.value.errno == errno.EINVAL
        return
    st = vcpu.get_nested_state()  # a host with VMX/SVM nesting
    assert st.format in (S.KVM_STATE_NESTED_FORMAT_VMX, S.KVM_STATE_NESTED_FORMAT_SVM)
    assert ctypes.sizeof(S.kvm_nested_state) <= st.size <= size
    vcpu.set_nested_state(st)
