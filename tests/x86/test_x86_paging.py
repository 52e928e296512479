"""Page tables: the software walker on tables we build, and guests using them."""

from __future__ import annotations

import struct

import pytest

from pykvm import ExitReason, x86
from pykvm.x86.paging import iter_mappings

from .helpers import STACK, collect_out, needs_binutils


class FakePhys:
    """Guest physical memory as a bytearray (for tests without KVM)."""

    def __init__(self, size: int) -> None:
        self.ram = bytearray(size)

    def read(self, gpa: int, n: int) -> bytes:
        if gpa + n > len(self.ram):
            raise ValueError("outside RAM")
        return bytes(self.ram[gpa:gpa + n])

    def write(self, gpa: int, data) -> None:
        self.ram[gpa:gpa + len(data)] = bytes(data)


@pytest.mark.no_kvm_needed
def test_long_mode_tables_translate() -> None:
    phys = FakePhys(1 << 20)
    pt = x86.PageTables(x86.Arena(phys, 0x1000, 0x40000))
    pt.identity(0, 8 * x86.MiB)                                        # 2 MiB pages
    pt.map(0x4000_0000, 0, x86.GiB, page_size=x86.PAGE_1G, writable=False)
    pt.map(0x8000_0000, 0x5000, 0x1000, page_size=x86.PAGE_4K, user=True, nx=True)
    assert pt.translate(0x12345)[0] == 0x12345
    assert pt.translate(0x4000_0000 + 0x123456)[0] == 0x123456
    assert pt.translate(0x4000_0000)[1] & x86.PTE.PS and not pt.translate(0x4000_0000)[1] & x86.PTE.RW
    phys_addr, flags = pt.translate(0x8000_0123)
    assert phys_addr == 0x5123 and flags & x86.PTE.US and flags & x86.PTE.NX
    assert pt.translate(0x9000_0000) is None
    leaves = list(iter_mappings(pt))
    assert (0x4000_0000, 0, x86.GiB) in [(v, p, s) for v, p, s, _ in leaves]
    assert len(leaves) == 4 + 1 + 1


@pytest.mark.no_kvm_needed
def test_small_page_inside_a_large_one_splits_it() -> None:
    phys = FakePhys(1 << 20)
    pt = x86.PageTables(x86.Arena(phys, 0x1000, 0x40000))
    pt.map(0x4000_0000, 0, x86.GiB, page_size=x86.PAGE_1G)
    pt.map(0x7FFF_F000, 0x5000, 0x1000, page_size=x86.PAGE_4K, user=True)
    assert pt.translate(0x4000_0000 + 0x123456)[0] == 0x123456      # rest of the 1 GiB kept
    assert pt.translate(0x7FFF_E123)[0] == 0x3FFF_E123               # same 2 MiB, split to 4 KiB
    assert pt.translate(0x7FFF_F123)[0] == 0x5123
    assert not pt.translate(0x7FFF_E000)[1] & x86.PTE.US


@pytest.mark.no_kvm_needed
def test_user_bit_must_be_on_every_level() -> None:
    phys = FakePhys(1 << 20)
    pt = x86.PageTables(x86.Arena(phys, 0x1000, 0x40000))
    pt.map(0x200000, 0x200000, 0x200000, user=True)
    pt.map(0, 0, 0x200000)
    assert pt.translate(0x200000)[1] & x86.PTE.US
    assert not pt.translate(0x1000)[1] & x86.PTE.US


@pytest.mark.no_kvm_needed
def test_alignment_and_canonical_checks() -> None:
    pt = x86.PageTables(x86.Arena(FakePhys(1 << 20), 0x1000, 0x40000))
    with pytest.raises(ValueError, match="aligned"):
        pt.map(0x1000, 0x1000, 0x200000)
    with pytest.raises(ValueError, match="page_size"):
        pt.map(0, 0, 0x1000, page_size=12345)
    with pytest.raises(ValueError, match="canonical"):
        pt.map(0x8000_0000_0000, 0, 0x200000)


@pytest.mark.no_kvm_needed
def test_arena_is_bounded_and_zeroes() -> None:
    phys = FakePhys(0x10000)
    phys.ram[:] = b"\xff" * 0x10000
    a = x86.Arena(phys, 0x1000, 0x3000)
    p = a.alloc(0x1000)
    assert p == 0x1000 and phys.read(p, 0x1000) == bytes(0x1000)
    assert a.put(b"abc", align=16) == 0x2000
    with pytest.raises(MemoryError, match="full"):
        a.alloc(0x2000)


@pytest.mark.no_kvm_needed
def test_32bit_tables_translate() -> None:
    phys = FakePhys(1 << 20)
    pt = x86.PageTables32(x86.Arena(phys, 0x1000, 0x20000))
    pt.identity(0, 8 * x86.MiB)                                          # 4 MiB pages
    pt.map(0x4000_0000, 0x3000, 0x2000, page_size=x86.PAGE_4K, user=True)
    assert pt.translate(0x765432)[0] == 0x765432
    assert pt.translate(0x4000_1234)[0] == 0x4234
    assert pt.translate(0x4000_2000) is None


@needs_binutils
def test_guest_uses_a_non_identity_mapping(kvm, vm) -> None:
    """VA 0x40000000 -> PA 0x180000 (4 KiB page): the guest writes through it."""
    vm.add_memory(0, 2 * x86.MiB)
    prog = x86.assemble("""
        mov  rax, 0x1122334455667788
        mov  rbx, 0x40000000
        mov  [rbx + 8], rax
        hlt
    """, base=0x10000)
    prog.load(vm)
    lm = x86.LongMode.build(x86.Arena(vm, 0x1000, 0xF000), identity=(0, 2 * x86.MiB))
    lm.page_tables.map(0x4000_0000, 0x180000, 0x1000, page_size=x86.PAGE_4K)
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    lm.load(vcpu, entry=prog.entry, stack=STACK)
    assert x86.RunLoop(vcpu).run(timeout=10).reason == "hlt"
    assert struct.unpack("<Q", vm.read(0x180008, 8))[0] == 0x1122334455667788
    assert x86.translate(vm, vcpu.get_sregs(), 0x4000_0008) == 0x180008


@needs_binutils
def test_cpl3_user_bit(kvm, vm) -> None:
    """User code uses its user page, then faults on a supervisor page.

    The fault reaches the #PF handler on VMX/SVM hosts; PVM hosts cannot deliver
    it to a non-PVM kernel and shut the vCPU down instead.  Either way CR2 names
    the supervisor address and the user-page accesses before it worked.
    """
    vm.add_memory(0, 4 * x86.MiB)
    kernel = x86.assemble("""
    on_pf:
        mov  rax, cr2
        out  0xf1, eax
        hlt
    """, base=0x10000)
    user = x86.assemble("""
        mov  eax, [0x300000]       # user page: fine
        inc  eax
        mov  [0x300100], eax       # (user mode cannot use ports on every host: memory)
        mov  eax, [0x10000]        # supervisor page: #PF
        mov  [0x300104], eax
        ud2
    """, base=0x200000)
    kernel.load(vm)
    user.load(vm)
    vm.write(0x300000, struct.pack("<I", 0xC0FFEE))
    idt = x86.Idt()
    idt[x86.Vector.PF] = kernel["on_pf"]
    lm = x86.LongMode.build(x86.Arena(vm, 0x1000, 0xF000), idt=idt)
    lm.page_tables.map(0x200000, 0x200000, 0x200000, user=True)
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    lm.load(vcpu, entry=user.entry, stack=0x400000, cpl=3)
    loop = x86.RunLoop(vcpu)
    cr2 = collect_out(loop, 0xF1)
    stop = loop.run(timeout=10, check=False)
    assert struct.unpack("<II", vm.read(0x300100, 8)) == (0xC0FFEF, 0)
    if stop.reason == "hlt":
        assert cr2 == [0x10000]
    else:
        assert stop.reason == "shutdown" and stop.exit.reason == ExitReason.SHUTDOWN
        s = vcpu.get_sregs()
        assert s.cr2 == 0x10000 and s.cs.dpl == 3


@needs_binutils
def test_1g_pages(kvm, vm) -> None:
    if not x86.cpuid_has(kvm.supported_cpuid(), x86.Feature.PDPE1GB):
        pytest.skip("this host's KVM offers no 1 GiB pages (CPUID PDPE1GB)")
    vm.add_memory(0, 2 * x86.MiB)
    prog = x86.assemble("""
        mov  rbx, 0x40000000        # 1 GiB page aliasing physical 0
        mov  eax, [rbx + 0x10000]   # = our own first instruction bytes
        out  0xf0, eax
        hlt
    """, base=0x10000)
    prog.load(vm)
    lm = x86.LongMode.build(x86.Arena(vm, 0x1000, 0xF000), identity=(0, 2 * x86.GiB),
                            page_size=x86.PAGE_1G)
    lm.page_tables.map(0x4000_0000, 0, x86.GiB, page_size=x86.PAGE_1G)
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    lm.load(vcpu, entry=prog.entry, stack=STACK)
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    loop.run(timeout=10)
    assert got == [struct.unpack("<I", prog.code[:4])[0]]
