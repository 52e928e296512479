"""Real, protected (with and without paging) and long mode set-up, CPUID set-up."""

from __future__ import annotations

import struct

import pytest

from pykvm import x86
from pykvm.host.diagnose import loaded_kvm_modules

from .support_guest import collect_out, long_mode_guest, needs_binutils


@needs_binutils
def test_real_mode_segments(kvm, vm) -> None:
    x86.prepare_vm(vm)
    vm.add_memory(0, 0x10000)
    prog = x86.assemble("""
        mov  ax, cs
        out  0xf0, ax
        mov  ax, [0x10]             # DS=0x200: linear 0x2010
        out  0xf0, ax
        hlt
    """, base=0, bits=16)          # linked at offset 0 of its segment
    vm.write(0x1000, prog.code)
    vm.write(0x2010, struct.pack("<H", 0xBEEF))
    vcpu = vm.create_vcpu()
    x86.setup_real_mode(vcpu, cs=0x100, ip=0, ds=0x200, sp=0x8000)
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    assert loop.run(timeout=10).reason == "hlt"
    assert got == [0x100, 0xBEEF]
    assert x86.cpu_mode(vcpu.get_sregs()) == "real"


@needs_binutils
def test_protected_mode_flat(kvm, vm) -> None:
    vm.add_memory(0, 2 * x86.MiB)
    prog = x86.assemble("""
        mov  eax, [0x2000]
        out  0xf0, eax
        mov  eax, cr0
        out  0xf0, eax
        mov  ax, ds
        out  0xf0, eax
        hlt
    """, base=0x10000, bits=32)
    prog.load(vm)
    vm.write(0x2000, struct.pack("<I", 0x600DF00D))
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    x86.setup_protected_mode(vcpu, x86.Arena(vm, 0x3000, 0x8000), entry=prog.entry, stack=0x80000)
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    loop.run(timeout=10)
    assert got[0] == 0x600DF00D
    assert got[1] & x86.CR0.PE and not got[1] & x86.CR0.PG
    assert got[2] & 0xFFFF == 0x10
    assert x86.cpu_mode(vcpu.get_sregs()) == "protected 32-bit"


@needs_binutils
def test_protected_mode_paging_4m_and_4k(kvm, vm) -> None:
    vm.add_memory(0, 2 * x86.MiB)
    prog = x86.assemble("""
        mov  eax, [0x40000010]      # 4 KiB page -> physical 0x5000
        out  0xf0, eax
        mov  eax, cr0
        out  0xf0, eax
        hlt
    """, base=0x10000, bits=32)
    prog.load(vm)
    vm.write(0x5010, struct.pack("<I", 0x4B1D))
    pm = x86.ProtectedMode.build(x86.Arena(vm, 0x1000, 0x4000), paging=True,
                                 identity=(0, 8 * x86.MiB))       # 4 MiB pages
    pm.page_tables.map(0x4000_0000, 0x5000, 0x1000, page_size=x86.PAGE_4K)
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    try:
        pm.load(vcpu, entry=prog.entry, stack=0x80000)
    except x86.UnsupportedMode as e:
        pytest.skip(f"host limitation: {e}")   # PVM: no 32-bit paging
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    loop.run(timeout=10)
    assert got[0] == 0x4B1D
    assert got[1] & x86.CR0.PG
    assert x86.translate(vm, vcpu.get_sregs(), 0x4000_0010) == 0x5010


@needs_binutils
def test_long_mode_state_and_cpuid_apic_id(kvm, vm) -> None:
    vcpu, _prog, lm = long_mode_guest(kvm, vm, """
        mov  eax, 1
        cpuid
        shr  ebx, 24                # initial APIC id
        out  0xf0, eax
        mov  eax, ebx
        out  0xf0, eax
        mov  eax, 0x80000001
        cpuid
        mov  eax, edx
        out  0xf0, eax
        hlt
    """)
    x86.setup_cpuid(kvm, vcpu, apic_id=5, disable=[x86.Feature.RDTSCP])
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    loop.run(timeout=10)
    family_model = next(e for e in kvm.supported_cpuid() if e.function == 1).eax
    assert got[0] == family_model
    assert got[1] == 5
    assert got[2] >> 29 & 1                       # LM
    assert not got[2] >> 27 & 1                   # RDTSCP, disabled above
    s = vcpu.get_sregs()
    assert x86.cpu_mode(s) == "long 64-bit"
    assert s.efer & x86.EFER.LMA and s.cr4 & x86.CR4.PAE and s.cr3 == lm.cr3
    assert (s.tr.selector, s.tr.type, s.tr.base) == (0x30, 0xB, lm.tss_bases[0])


@needs_binutils
def test_long_mode_user_start(kvm, vm) -> None:
    """cpl=3 starts in user mode: the guest records its CS and RFLAGS in memory."""
    vcpu, _prog, _lm = long_mode_guest(kvm, vm, """
        mov  ax, cs
        mov  [0x20000], ax
        pushfq
        pop  rax
        mov  [0x20008], rax
        ud2                         # no IDT: ends the run (shutdown)
    """, build={"user": True}, cpl=3, iopl=3)
    stop = x86.RunLoop(vcpu).run(timeout=10, check=False)
    assert stop.reason == "shutdown"
    cs, rflags = struct.unpack("<HxxxxxxQ", vm.read(0x20000, 16))
    assert cs & 3 == 3                            # RPL 3 (PVM shows its own selector, 0x33)
    assert vcpu.get_sregs().cs.dpl == 3
    pvm = "kvm_pvm" in loaded_kvm_modules()
    assert rflags >> 12 & 3 == (0 if pvm else 3)  # PVM forces IOPL 0 in user mode
