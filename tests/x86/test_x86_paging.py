"""Page tables: the software walker on tables we build, and guests using them."""

from __future__ import annotations

import struct

import pytest

from pykvm import ExitReason, x86
from pykvm.x86.paging import iter_mappings, walk

from .support_guest import STACK, collect_out, needs_binutils


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


# ---------------------------------------------------------------------------
# the one walker (x86.translate / x86.paging.walk) in every paging mode

class Sregs:
    """The four fields the walker reads from a ``kvm_sregs``."""

    def __init__(self, cr0: int = 0, cr3: int = 0, cr4: int = 0, efer: int = 0) -> None:
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer


PG = int(x86.CR0.PG | x86.CR0.PE)
LMA = int(x86.EFER.LMA | x86.EFER.LME)
PAE = int(x86.CR4.PAE)


def _q(phys: FakePhys, addr: int, value: int) -> None:
    phys.write(addr, struct.pack("<Q", value))


@pytest.mark.no_kvm_needed
def test_walker_no_paging_and_bad_addresses() -> None:
    phys = FakePhys(0x1000)
    assert x86.translate(phys, Sregs(), 0x1_2345_6789) == 0x2345_6789   # low 32 bits
    with pytest.raises(ValueError):
        x86.translate(phys, Sregs(), -1)
    with pytest.raises(ValueError):
        x86.translate(phys, Sregs(), 1 << 64)
    with pytest.raises(TypeError):
        x86.translate(phys, Sregs(), 1.5)


@pytest.mark.no_kvm_needed
def test_walker_4_and_5_level() -> None:
    phys = FakePhys(1 << 20)
    pt = x86.PageTables(x86.Arena(phys, 0x1000, 0x40000))
    pt.map(0, 0x80000, 0x1000, page_size=x86.PAGE_4K, user=True)
    pt.map(0x7FFF_FFFF_F000, 0x81000, 0x1000, page_size=x86.PAGE_4K)      # top of the low half
    pt.map(0xFFFF_8000_0000_0000, 0x82000, 0x1000, page_size=x86.PAGE_4K)  # bottom of the high half
    four = Sregs(PG, pt.cr3, PAE, LMA)
    assert x86.translate(phys, four, 0x123) == 0x80123
    assert x86.translate(phys, four, 0x7FFF_FFFF_FABC) == 0x81ABC
    assert x86.translate(phys, four, 0xFFFF_8000_0000_0010) == 0x82010
    assert x86.translate(phys, four, 0x0000_8000_0000_0000) is None       # not canonical (48 bits)
    assert x86.translate(phys, four, 0x2000) is None                      # not present
    # 5-level: a PML5 whose entries 0 and 3 both lead to that PML4
    pml5 = 0x60000
    _q(phys, pml5, pt.cr3 | 7)
    _q(phys, pml5 + 3 * 8, pt.cr3 | 7)
    five = Sregs(PG, pml5, PAE | int(x86.CR4.LA57), LMA)
    assert x86.translate(phys, five, 0x123) == 0x80123
    assert x86.translate(phys, five, (3 << 48) | 0x456) == 0x80456         # bits 56:48 index PML5
    assert x86.translate(phys, five, 1 << 48) is None                     # PML5[1] not present
    assert x86.translate(phys, five, 0x0100_0000_0000_0000) is None       # not canonical (57 bits)
    assert x86.translate(phys, five, 0xFF00_0000_0000_0000) is None       # canonical, not mapped
    # flags: U/S is the AND over every level (PML5 entry 3 lacks it)
    _q(phys, pml5 + 3 * 8, pt.cr3 | 3)
    assert walk(phys, five, 0x10)[1] & x86.PTE.US
    assert not walk(phys, five, (3 << 48) | 0x10)[1] & x86.PTE.US


@pytest.mark.no_kvm_needed
def test_walker_pae() -> None:
    phys = FakePhys(1 << 20)
    pdpt, pd, pt = 0x1020, 0x2000, 0x3000               # PAE CR3 is 32-byte aligned
    _q(phys, pdpt + 8 * 2, pd | 1)                      # 2 GiB .. 3 GiB
    _q(phys, pd + 8 * 0, 0x400000 | 0x83)               # 2 MiB page
    _q(phys, pd + 8 * 1, pt | 3)
    _q(phys, pt + 8 * 5, 0x7000 | 3)
    s = Sregs(PG, pdpt, PAE)
    assert x86.translate(phys, s, 0x8001_2345) == 0x412345
    assert x86.translate(phys, s, 0x8020_5ABC) == 0x7ABC
    assert x86.translate(phys, s, 0x8020_6000) is None
    assert x86.translate(phys, s, 0x4000_0000) is None  # PDPTE 1 not present
    assert x86.translate(phys, s, 0xFFFF_FFFF_8001_2345) == 0x412345   # only the low 32 bits count


@pytest.mark.no_kvm_needed
def test_walker_32bit_pse_and_pse36() -> None:
    phys = FakePhys(1 << 20)
    pd, pt = 0x1000, 0x2000
    phys.write(pd + 4 * 1, struct.pack("<I", 0x00C00000 | 0x83))          # 4 MiB page at 12 MiB
    phys.write(pd + 4 * 2, struct.pack("<I", 0x00800000 | (0x05 << 13) | 0x83))   # PSE-36: bit 32+
    phys.write(pd + 4 * 3, struct.pack("<I", pt | 3))
    phys.write(pt + 4 * 7, struct.pack("<I", 0x9000 | 3))
    pse = Sregs(PG, pd, int(x86.CR4.PSE))
    assert x86.translate(phys, pse, 0x0040_1234) == 0x00C0_1234
    assert x86.translate(phys, pse, 0x0080_0010) == (5 << 32) | 0x0080_0010
    assert x86.translate(phys, pse, 0x00C0_7ABC) == 0x9ABC
    assert x86.translate(phys, pse, 0x0100_0000) is None
    # without CR4.PSE the PS bit is ignored: the PDE points to a page table (here: zeros)
    assert x86.translate(phys, Sregs(PG, pd, 0), 0x0040_1234) is None


@pytest.mark.no_kvm_needed
def test_walker_hostile_tables() -> None:
    """Entries that point outside memory or back at themselves: bounded, and 'not mapped'."""
    phys = FakePhys(0x10000)
    _q(phys, 0x1000, 0x1000 | 3)                        # PML4[0] -> itself, at every level
    assert x86.translate(phys, Sregs(PG, 0x1000, PAE, LMA), 0x0) == 0x1000   # 4 reads, a 'page'
    _q(phys, 0x1000, 0xF_FFFF_FFFF_F000 | 3)            # the next table beyond all memory
    assert x86.translate(phys, Sregs(PG, 0x1000, PAE, LMA), 0x0) is None
    assert x86.translate(phys, Sregs(PG, 0xFFFF_0000, PAE, LMA), 0x0) is None   # CR3 outside


def test_walker_agrees_with_kvm_translate(kvm, vm) -> None:
    """4-level long mode, 4 KiB / 2 MiB pages, aliases: the walker answers as KVM_TRANSLATE does."""
    vm.add_memory(0, 4 * x86.MiB)
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    lm = x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xF000), entry=0x10000, stack=0x20000,
                             identity=(0, 4 * x86.MiB))
    lm.page_tables.map(0x7F00_0000_0000, 0x300000, 0x2000, page_size=x86.PAGE_4K)
    lm.page_tables.map(0xFFFF_FFFF_8000_0000, 0x200000, 0x200000)
    sregs = vcpu.get_sregs()
    for va in (0x0, 0x12345, 0x3FFFFF, 0x400000, 0x7F00_0000_0ABC, 0x7F00_0000_1FFF,
               0x7F00_0000_2000, 0xFFFF_FFFF_8012_3456, 0xFFFF_FFFF_7FFF_FFFF):
        t = vcpu.translate_gva(va)
        assert x86.translate(vm, sregs, va) == (t.physical_address if t.valid else None), hex(va)
