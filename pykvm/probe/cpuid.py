"""CPUID decoding: vendor, family/model/stepping and feature-flag names.

Flag names follow the kernel's ``arch/x86/include/asm/cpufeatures.h`` (the
``/proc/cpuinfo`` spelling where the kernel gives one, else the lower-cased
``X86_FEATURE_*`` name) and KVM's ``arch/x86/kvm/reverse_cpuid.h`` for the
leaves only KVM names (7.1 EDX, 7.2 EDX, 0x80000007 EDX, ...).  KVM's own
paravirtual leaf 0x40000001 uses ``KVM_FEATURE_*`` from ``kvm_para.h``.

A set bit without a name in these tables is never dropped: it is named after
its place, e.g. ``"7.0.ecx[31]"`` (leaf in hex, sub-leaf, register, bit).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DYNAMIC_BITS",
    "FEATURE_REGS",
    "KVM_SIGNATURE",
    "XSAVE_COMPONENTS",
    "CpuidEntry",
    "address_bits",
    "bit_name",
    "brand",
    "component_names",
    "decode_mask",
    "entry_map",
    "family_model_stepping",
    "feature_bits",
    "feature_names",
    "hypervisor_signature",
    "kvm_pv_features",
    "max_leaves",
    "sorted_entries",
    "vendor",
    "xsave_components",
]

Reg = tuple[int, int, str]  # (function, index, register)


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf as KVM reports it (``struct kvm_cpuid_entry2`` without padding)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def from_kvm(cls, e) -> CpuidEntry:
        """From a ``kvm_cpuid_entry2`` (or anything with the same attributes)."""
        return cls(int(e.function), int(e.index), int(e.flags), int(e.eax), int(e.ebx),
                   int(e.ecx), int(e.edx))

    def reg(self, name: str) -> int:
        """The value of register *name* (``"eax"`` .. ``"edx"``)."""
        return getattr(self, name)

    def as_dict(self) -> dict[str, int]:
        """JSON form: function, index, flags, eax, ebx, ecx, edx (all ints)."""
        return {"function": self.function, "index": self.index, "flags": self.flags,
                "eax": self.eax, "ebx": self.ebx, "ecx": self.ecx, "edx": self.edx}


def _names(spec: str) -> dict[int, str]:
    """``"0 fpu 1 vme ..."`` -> {0: "fpu", 1: "vme"}."""
    parts = spec.split()
    return {int(parts[i]): parts[i + 1] for i in range(0, len(parts), 2)}


_LEAF1_EDX = _names("""
 0 fpu 1 vme 2 de 3 pse 4 tsc 5 msr 6 pae 7 mce 8 cx8 9 apic 11 sep 12 mtrr 13 pge
 14 mca 15 cmov 16 pat 17 pse36 18 pn 19 clflush 21 dts 22 acpi 23 mmx 24 fxsr
 25 sse 26 sse2 27 ss 28 ht 29 tm 30 ia64 31 pbe""")

#: Feature registers: (leaf, sub-leaf, register) -> {bit: name}.
FEATURE_REGS: dict[Reg, dict[int, str]] = {
    (0x1, 0, "edx"): _LEAF1_EDX,
    (0x1, 0, "ecx"): _names("""
 0 pni 1 pclmulqdq 2 dtes64 3 monitor 4 ds_cpl 5 vmx 6 smx 7 est 8 tm2 9 ssse3 10 cid
 11 sdbg 12 fma 13 cx16 14 xtpr 15 pdcm 17 pcid 18 dca 19 sse4_1 20 sse4_2 21 x2apic
 22 movbe 23 popcnt 24 tsc_deadline_timer 25 aes 26 xsave 27 osxsave 28 avx 29 f16c
 30 rdrand 31 hypervisor"""),
    (0x6, 0, "eax"): _names("""
 0 dtherm 1 ida 2 arat 4 pln 6 pts 7 hwp 8 hwp_notify 9 hwp_act_window 10 hwp_epp
 11 hwp_pkg_req 15 hwp_highest_perf_change 19 hfi"""),
    (0x7, 0, "ebx"): _names("""
 0 fsgsbase 1 tsc_adjust 2 sgx 3 bmi1 4 hle 5 avx2 6 fdp_excptn_only 7 smep 8 bmi2
 9 erms 10 invpcid 11 rtm 12 cqm 13 zero_fcs_fds 14 mpx 15 rdt_a 16 avx512f
 17 avx512dq 18 rdseed 19 adx 20 smap 21 avx512ifma 23 clflushopt 24 clwb 25 intel_pt
 26 avx512pf 27 avx512er 28 avx512cd 29 sha_ni 30 avx512bw 31 avx512vl"""),
    (0x7, 0, "ecx"): _names("""
 0 prefetchwt1 1 avx512vbmi 2 umip 3 pku 4 ospke 5 waitpkg 6 avx512_vbmi2 7 shstk
 8 gfni 9 vaes 10 vpclmulqdq 11 avx512_vnni 12 avx512_bitalg 13 tme
 14 avx512_vpopcntdq 16 la57 22 rdpid 23 kl 24 bus_lock_detect 25 cldemote 27 movdiri
 28 movdir64b 29 enqcmd 30 sgx_lc 31 pks"""),
    (0x7, 0, "edx"): _names("""
 2 avx512_4vnniw 3 avx512_4fmaps 4 fsrm 5 uintr 8 avx512_vp2intersect 9 srbds_ctrl
 10 md_clear 11 rtm_always_abort 13 tsx_force_abort 14 serialize 15 hybrid_cpu
 16 tsxldtrk 18 pconfig 19 arch_lbr 20 ibt 22 amx_bf16 23 avx512_fp16 24 amx_tile
 25 amx_int8 26 spec_ctrl 27 intel_stibp 28 flush_l1d 29 arch_capabilities
 30 core_capabilities 31 spec_ctrl_ssbd"""),
    (0x7, 1, "eax"): _names("""
 0 sha512 1 sm3 2 sm4 4 avx_vnni 5 avx512_bf16 6 lass 7 cmpccxadd 8 arch_perfmon_ext
 10 fzrm 11 fsrs 12 fsrc 17 fred 18 lkgs 19 wrmsrns 21 amx_fp16 23 avx_ifma 26 lam
 27 msrlist 31 movrs"""),
    (0x7, 1, "ecx"): _names("5 msr_imm"),
    (0x7, 1, "edx"): _names("""
 4 avx_vnni_int8 5 avx_ne_convert 8 amx_complex 10 avx_vnni_int16 14 prefetchiti
 19 avx10"""),
    (0x7, 2, "edx"): _names("0 intel_psfd 1 ipred_ctrl 2 rrsba_ctrl 3 ddpd_u 4 bhi_ctrl 5 mcdt_no"),
    (0xD, 1, "eax"): _names("0 xsaveopt 1 xsavec 2 xgetbv1 3 xsaves 4 xfd"),
    (0x12, 0, "eax"): _names("0 sgx1 1 sgx2 11 sgx_edeccssa"),
    (0x24, 0, "ebx"): _names("16 avx10_128 17 avx10_256 18 avx10_512"),
    # AMD repeats these leaf-1 EDX bits here; the kernel names only the others.
    (0x80000001, 0, "edx"): {
        **{b: n for b, n in _LEAF1_EDX.items() if b in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13,
                                                         14, 15, 16, 17, 23, 24)},
        **_names("11 syscall 19 mp 20 nx 22 mmxext 25 fxsr_opt 26 pdpe1gb 27 rdtscp 29 lm "
                 "30 3dnowext 31 3dnow")},
    (0x80000001, 0, "ecx"): _names("""
 0 lahf_lm 1 cmp_legacy 2 svm 3 extapic 4 cr8_legacy 5 abm 6 sse4a 7 misalignsse
 8 3dnowprefetch 9 osvw 10 ibs 11 xop 12 skinit 13 wdt 15 lwp 16 fma4 17 tce
 19 nodeid_msr 21 tbm 22 topoext 23 perfctr_core 24 perfctr_nb 26 bpext 27 ptsc
 28 perfctr_llc 29 mwaitx"""),
    (0x80000007, 0, "ebx"): _names("0 overflow_recov 1 succor 3 smca"),
    (0x80000007, 0, "edx"): _names("8 constant_tsc"),
    (0x80000008, 0, "ebx"): _names("""
 0 clzero 1 irperf 2 xsaveerptr 4 rdpru 9 wbnoinvd 12 amd_ibpb 14 amd_ibrs 15 amd_stibp
 17 amd_stibp_always_on 23 amd_ppin 24 amd_ssbd 25 virt_ssbd 26 amd_ssb_no 27 cppc
 28 amd_psfd 29 btc_no 30 amd_ibpb_ret 31 brs"""),
    (0x8000000A, 0, "edx"): _names("""
 0 npt 1 lbrv 2 svm_lock 3 nrip_save 4 tsc_scale 5 vmcb_clean 6 flushbyasid
 7 decodeassists 10 pausefilter 12 pfthreshold 13 avic 15 v_vmsave_vmload 16 vgif
 18 x2avic 20 v_spec_ctrl 25 vnmi 28 svme_addr_chk"""),
    (0x8000001F, 0, "eax"): _names("""
 0 sme 1 sev 2 vm_page_flush 3 sev_es 4 sev_snp 9 v_tsc_aux 10 sme_coherent
 14 debug_swap 28 svsm"""),
    (0x80000021, 0, "eax"): _names("""
 0 no_nested_data_bp 1 wrmsr_xx_base_ns 2 lfence_rdtsc 5 verw_clear 6 null_sel_clr_base
 8 autoibrs 9 no_smm_ctl_msr 27 sbpb 28 ibpb_brtype 29 srso_no 30 srso_user_kernel_no
 31 srso_msr_fix"""),
    (0x80000021, 0, "ecx"): _names("1 tsa_sq_no 2 tsa_l1_no"),
    (0x80000022, 0, "eax"): _names("0 perfmon_v2"),
    # KVM's paravirtual features (kvm_para.h), meaningful under the KVM signature only.
    (0x40000001, 0, "eax"): _names("""
 0 clocksource 1 nop_io_delay 2 mmu_op 3 clocksource2 4 async_pf 5 steal_time 6 pv_eoi
 7 pv_unhalt 9 pv_tlb_flush 10 async_pf_vmexit 11 pv_send_ipi 12 poll_control
 13 pv_sched_yield 14 async_pf_int 15 msi_ext_dest_id 16 hc_map_gpa_range
 17 migration_control 24 clocksource_stable_bit"""),
    (0x40000001, 0, "edx"): _names("0 realtime"),
}

#: Bits that mirror guest state (CR4.OSXSAVE, CR4.PKE) rather than a capability;
#: ignored when comparing what two hosts can offer.
DYNAMIC_BITS = {(0x1, 0, "ecx", 27), (0x7, 0, "ecx", 4)}

#: XSAVE state components (bit of XCR0 / IA32_XSS).
XSAVE_COMPONENTS: dict[int, str] = _names("""
 0 x87 1 sse 2 avx 3 bndregs 4 bndcsr 5 opmask 6 zmm_hi256 7 hi16_zmm 8 pt 9 pkru
 10 pasid 11 cet_u 12 cet_s 13 hdc 14 uintr 15 lbr 16 hwp 17 xtilecfg 18 xtiledata
 19 apx""")

KVM_SIGNATURE = "KVMKVMKVM"


def entry_map(entries: Iterable[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
    """``{(function, index): entry}``; an entry without a significant index answers index 0."""
    return {(e.function, e.index): e for e in entries}


def _get(entries: Mapping[tuple[int, int], CpuidEntry], fn: int, idx: int = 0) -> CpuidEntry | None:
    return entries.get((fn, idx))


def bit_name(reg: Reg, bit: int) -> str:
    """The flag name of *bit* of *reg*, or its place (``"7.0.ecx[31]"``) if unnamed."""
    name = FEATURE_REGS.get(reg, {}).get(bit)
    if name:
        return name
    fn, idx, r = reg
    return f"{fn:x}.{idx}.{r}[{bit}]"


def hypervisor_signature(entries: Mapping[tuple[int, int], CpuidEntry]) -> str:
    """The 12-byte signature of leaf 0x40000000 (``"KVMKVMKVM"``), or ``""``."""
    e = _get(entries, 0x40000000)
    if e is None:
        return ""
    return struct.pack("<III", e.ebx, e.ecx, e.edx).split(b"\0", 1)[0].decode("ascii", "replace")


def feature_bits(entries: Iterable[CpuidEntry]) -> dict[Reg, int]:
    """The value of every feature register present in *entries* (mask of set bits).

    Leaf 0x40000001 is included only under the KVM signature.
    """
    emap = entry_map(entries)
    kvm = hypervisor_signature(emap) == KVM_SIGNATURE
    out: dict[Reg, int] = {}
    for reg in FEATURE_REGS:
        fn, idx, r = reg
        if fn == 0x40000001 and not kvm:
            continue
        e = emap.get((fn, idx))
        if e is not None:
            out[reg] = e.reg(r)
    return out


def decode_mask(reg: Reg, value: int, *, skip_dynamic: bool = False) -> list[str]:
    """Names of the set bits of *value* for register *reg*, low bit first."""
    out = []
    for bit in range(32):
        if value >> bit & 1 and not (skip_dynamic and (*reg, bit) in DYNAMIC_BITS):
            out.append(bit_name(reg, bit))
    return out


def feature_names(entries: Iterable[CpuidEntry]) -> list[str]:
    """All feature flags set in *entries*, leaf by leaf, without repeats.

    The AMD leaf 0x80000001 EDX repeats some leaf-1 bits (fpu, tsc ...);
    a name appears once.  Leaf 0x40000001 (KVM PV features) is left out:
    see :func:`kvm_pv_features`.
    """
    seen: dict[str, None] = {}
    for reg, value in feature_bits(entries).items():
        if reg[0] == 0x40000001:
            continue
        for n in decode_mask(reg, value):
            seen.setdefault(n, None)
    return list(seen)


def kvm_pv_features(entries: Iterable[CpuidEntry]) -> list[str]:
    """KVM paravirtual features (leaf 0x40000001 EAX) under the KVM signature."""
    bits = feature_bits(entries)
    v = bits.get((0x40000001, 0, "eax"))
    return decode_mask((0x40000001, 0, "eax"), v) if v is not None else []


def vendor(entries: Mapping[tuple[int, int], CpuidEntry]) -> str:
    """The vendor string of leaf 0 (``"GenuineIntel"``, ``"AuthenticAMD"`` ...)."""
    e = _get(entries, 0)
    if e is None:
        return ""
    return struct.pack("<III", e.ebx, e.edx, e.ecx).split(b"\0", 1)[0].decode("ascii", "replace")


def family_model_stepping(entries: Mapping[tuple[int, int], CpuidEntry]) -> tuple[int, int, int]:
    """Display family, model and stepping from leaf 1 EAX (with the extended fields)."""
    e = _get(entries, 1)
    if e is None:
        return (0, 0, 0)
    eax = e.eax
    stepping = eax & 0xF
    model = (eax >> 4) & 0xF
    family = (eax >> 8) & 0xF
    if family == 0xF:
        family += (eax >> 20) & 0xFF
    if family >= 6:
        model |= ((eax >> 16) & 0xF) << 4
    return family, model, stepping


def brand(entries: Mapping[tuple[int, int], CpuidEntry]) -> str:
    """The brand string of leaves 0x80000002..4 (often empty in KVM's supported set)."""
    raw = b""
    for fn in (0x80000002, 0x80000003, 0x80000004):
        e = _get(entries, fn)
        if e is None:
            return ""
        raw += struct.pack("<IIII", e.eax, e.ebx, e.ecx, e.edx)
    return raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()


def max_leaves(entries: Mapping[tuple[int, int], CpuidEntry]) -> tuple[int, int]:
    """(highest basic leaf, highest extended leaf) from leaves 0 and 0x80000000."""
    b = _get(entries, 0)
    x = _get(entries, 0x80000000)
    return (b.eax if b else 0, x.eax if x else 0)


def address_bits(entries: Mapping[tuple[int, int], CpuidEntry]) -> tuple[int, int]:
    """(physical, linear) address bits from leaf 0x80000008 EAX; (0, 0) if absent."""
    e = _get(entries, 0x80000008)
    if e is None:
        return (0, 0)
    return (e.eax & 0xFF, (e.eax >> 8) & 0xFF)


def xsave_components(entries: Mapping[tuple[int, int], CpuidEntry]) -> tuple[int, int]:
    """(XCR0 mask, IA32_XSS mask) KVM supports, from leaf 0xd.0 and 0xd.1."""
    e0 = _get(entries, 0xD, 0)
    e1 = _get(entries, 0xD, 1)
    xcr0 = (e0.eax | e0.edx << 32) if e0 else 0
    xss = (e1.ecx | e1.edx << 32) if e1 else 0
    return xcr0, xss


def component_names(mask: int) -> list[str]:
    """Names of the XSAVE components set in *mask* (unknown ones as ``"bitN"``)."""
    return [XSAVE_COMPONENTS.get(b, f"bit{b}") for b in range(64) if mask >> b & 1]


def sorted_entries(entries: Sequence[CpuidEntry]) -> list[CpuidEntry]:
    """Entries ordered by (function, index), as people read CPUID dumps."""
    return sorted(entries, key=lambda e: (e.function, e.index))
