"""Descriptor, GDT, IDT and TSS encodings (pure Python), and a guest reading its GDT."""

from __future__ import annotations

import struct

import pytest

from pykvm import x86
from pykvm.x86.descriptors import decode_descriptor

from .support_guest import collect_out, long_mode_guest, needs_binutils

pytestmark_pure = pytest.mark.no_kvm_needed


@pytestmark_pure
def test_well_known_descriptors() -> None:
    # The values every OS tutorial lists for flat segments.
    assert struct.unpack("<Q", x86.Segment.code64().descriptor())[0] == 0x00AF9B000000FFFF
    assert struct.unpack("<Q", x86.Segment.data().descriptor())[0] == 0x00CF93000000FFFF
    assert struct.unpack("<Q", x86.Segment.code32().descriptor())[0] == 0x00CF9B000000FFFF
    assert struct.unpack("<Q", x86.Segment.data(dpl=3).descriptor())[0] == 0x00CFF3000000FFFF


@pytestmark_pure
@pytest.mark.parametrize("seg", [
    x86.Segment.code64(3), x86.Segment.data(0, base=0x12345000, limit=0xFFFFF),
    x86.Segment.code16(base=0xF0000), x86.Segment.tss(0xFFFF_8000_1234_5678, 103),
])
def test_descriptor_roundtrip(seg) -> None:
    assert decode_descriptor(seg.descriptor()) == seg


@pytestmark_pure
def test_kvm_segment_matches_descriptor() -> None:
    ks = x86.Segment.code64(3).kvm_segment(0x2B)
    assert (ks.selector, ks.type, ks.s, ks.dpl, ks.present, ks.l, ks.db, ks.g) == (0x2B, 0xB, 1, 3, 1, 1, 0, 1)
    assert ks.limit == 0xFFFFFFFF


@pytestmark_pure
def test_limit_needs_page_granularity() -> None:
    with pytest.raises(ValueError, match="0xfff"):
        x86.Segment.data(limit=0x123456).descriptor()


@pytestmark_pure
def test_standard64_layout_matches_star() -> None:
    g = x86.Gdt.standard64(tss_base=0x5000)
    s = g.selectors
    assert (s["kernel_cs"], s["kernel_ds"], s["user_cs32"], s["user_ds"], s["user_cs"], s["tss"]) == \
        (0x08, 0x10, 0x1B, 0x23, 0x2B, 0x30)
    star = x86.STAR64
    assert (star >> 32) & 0xFFFF == s["kernel_cs"]
    sysret_base = (star >> 48) & 0xFFFC
    assert (sysret_base + 16) | 3 == s["user_cs"] and (sysret_base + 8) | 3 == s["user_ds"]
    raw = bytes(g)
    assert len(raw) == g.limit + 1 == 8 * 8          # TSS takes two slots
    assert decode_descriptor(raw[0x30:0x40]).base == 0x5000


@pytestmark_pure
def test_gates_and_tss_layout() -> None:
    gate = x86.gate64(0x1122_3344_5566_7788, 0x08, dpl=3, ist=2)
    lo, sel, ist, attr, mid, hi, _ = struct.unpack("<HHBBHII", gate)
    assert (lo, sel, ist, attr, mid, hi) == (0x7788, 0x08, 2, 0xEE, 0x5566, 0x11223344)
    assert x86.gate64(0, trap=True)[5] == 0x8F
    assert struct.unpack("<HHBBH", x86.gate32(0x12345678, 0x08)) == (0x5678, 8, 0, 0x8E, 0x1234)
    idt = x86.Idt()
    idt[0x20] = 0x4000
    assert len(bytes(idt)) == 4096 and bytes(idt)[0x200:0x202] == b"\x00\x40"
    tss = bytes(x86.Tss64(rsp0=0xAABB, ist=[0, 0x1111, 0, 0, 0, 0, 0, 0]))
    assert len(tss) == 104
    assert struct.unpack_from("<Q", tss, 4)[0] == 0xAABB
    assert struct.unpack_from("<Q", tss, 36)[0] == 0x1111
    assert struct.unpack_from("<H", tss, 102)[0] == 104


@needs_binutils
def test_guest_loads_selectors_from_our_gdt(kvm, vm) -> None:
    """The CPU reads the GDT bytes when the guest loads selectors: the hidden
    state it ends up with must be what we described."""
    src = """
        mov  ax, 0x23             # user data (DPL 3) is loadable into DS at CPL0
        mov  ds, ax
        sgdt [rip + gdtr]
        mov  rax, [rip + gdtr + 2]
        out  0xf0, eax            # the GDT base the guest sees
        lea  rax, [rip + 1f]
        push 0x08                 # far return: reload CS from the GDT
        push rax
        retfq
    1:  xor  eax, eax
        str  ax
        out  0xf0, eax            # the task register
        hlt
    gdtr: .space 10
    """
    vcpu, _prog, lm = long_mode_guest(kvm, vm, src)
    loop = x86.RunLoop(vcpu)
    got = collect_out(loop)
    assert loop.run(timeout=10).reason == "hlt"
    assert got == [lm.gdt_base, 0x30]
    s = vcpu.get_sregs()
    assert (s.ds.selector, s.ds.dpl, s.ds.type & 0xE, s.ds.s) == (0x23, 3, 0x2, 1)
    assert (s.cs.selector, s.cs.l, s.cs.dpl) == (0x08, 1, 0)
