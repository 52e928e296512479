"""Names of the well-known x86 MSRs and decoding of KVM's feature MSRs.

Names follow ``arch/x86/include/asm/msr-index.h``, ``hyperv-tlfs.h`` and
``kvm_para.h`` without the ``MSR_`` prefix (``IA32_SYSENTER_CS``, ``EFER``,
``KVM_SYSTEM_TIME_NEW`` ...).  Numbered families (machine-check banks,
performance counters, MTRRs, x2APIC registers, Hyper-V SINTs ...) are named by
rule.  An index pykvm does not know gets ``None`` from :func:`msr_name`
(the probe then shows just the number).
"""

from __future__ import annotations

__all__ = ["MSR_NAMES", "decode_feature_msr", "msr_name"]

MSR_NAMES: dict[int, str] = {
    0x10: "IA32_TSC",
    0x11: "KVM_WALL_CLOCK",
    0x12: "KVM_SYSTEM_TIME",
    0x1B: "IA32_APICBASE",
    0x33: "TEST_CTRL",
    0x34: "SMI_COUNT",
    0x3A: "IA32_FEAT_CTL",
    0x3B: "IA32_TSC_ADJUST",
    0x48: "IA32_SPEC_CTRL",
    0x49: "IA32_PRED_CMD",
    0x4E: "PPIN_CTL",
    0x4F: "PPIN",
    0x8B: "IA32_UCODE_REV",
    0x8C: "IA32_SGXLEPUBKEYHASH0",
    0x8D: "IA32_SGXLEPUBKEYHASH1",
    0x8E: "IA32_SGXLEPUBKEYHASH2",
    0x8F: "IA32_SGXLEPUBKEYHASH3",
    0x9E: "IA32_SMBASE",
    0xC1: "IA32_PERFCTR0",
    0xC2: "IA32_PERFCTR1",
    0xCE: "PLATFORM_INFO",
    0xCF: "IA32_CORE_CAPS",
    0xE1: "IA32_UMWAIT_CONTROL",
    0xE7: "IA32_MPERF",
    0xE8: "IA32_APERF",
    0xFE: "MTRRcap",
    0x10A: "IA32_ARCH_CAPABILITIES",
    0x10B: "IA32_FLUSH_CMD",
    0x122: "IA32_TSX_CTRL",
    0x123: "IA32_MCU_OPT_CTRL",
    0x140: "MISC_FEATURES_ENABLES",
    0x174: "IA32_SYSENTER_CS",
    0x175: "IA32_SYSENTER_ESP",
    0x176: "IA32_SYSENTER_EIP",
    0x179: "IA32_MCG_CAP",
    0x17A: "IA32_MCG_STATUS",
    0x17B: "IA32_MCG_CTL",
    0x186: "ARCH_PERFMON_EVENTSEL0",
    0x187: "ARCH_PERFMON_EVENTSEL1",
    0x198: "IA32_PERF_STATUS",
    0x199: "IA32_PERF_CTL",
    0x1A0: "IA32_MISC_ENABLE",
    0x1C4: "IA32_XFD",
    0x1C5: "IA32_XFD_ERR",
    0x1D9: "IA32_DEBUGCTLMSR",
    0x1DB: "IA32_LASTBRANCHFROMIP",
    0x1DC: "IA32_LASTBRANCHTOIP",
    0x1DD: "IA32_LASTINTFROMIP",
    0x1DE: "IA32_LASTINTTOIP",
    0x1FC: "IA32_POWER_CTL",
    0x250: "MTRRfix64K_00000",
    0x258: "MTRRfix16K_80000",
    0x259: "MTRRfix16K_A0000",
    0x268: "MTRRfix4K_C0000",
    0x269: "MTRRfix4K_C8000",
    0x26A: "MTRRfix4K_D0000",
    0x26B: "MTRRfix4K_D8000",
    0x26C: "MTRRfix4K_E0000",
    0x26D: "MTRRfix4K_E8000",
    0x26E: "MTRRfix4K_F0000",
    0x26F: "MTRRfix4K_F8000",
    0x277: "IA32_CR_PAT",
    0x2FF: "MTRRdefType",
    0x345: "IA32_PERF_CAPABILITIES",
    0x38D: "CORE_PERF_FIXED_CTR_CTRL",
    0x38E: "CORE_PERF_GLOBAL_STATUS",
    0x38F: "CORE_PERF_GLOBAL_CTRL",
    0x390: "CORE_PERF_GLOBAL_OVF_CTRL",
    0x3F1: "IA32_PEBS_ENABLE",
    0x3F2: "PEBS_DATA_CFG",
    0x3F6: "PEBS_LD_LAT_THRESHOLD",
    0x480: "IA32_VMX_BASIC",
    0x481: "IA32_VMX_PINBASED_CTLS",
    0x482: "IA32_VMX_PROCBASED_CTLS",
    0x483: "IA32_VMX_EXIT_CTLS",
    0x484: "IA32_VMX_ENTRY_CTLS",
    0x485: "IA32_VMX_MISC",
    0x486: "IA32_VMX_CR0_FIXED0",
    0x487: "IA32_VMX_CR0_FIXED1",
    0x488: "IA32_VMX_CR4_FIXED0",
    0x489: "IA32_VMX_CR4_FIXED1",
    0x48A: "IA32_VMX_VMCS_ENUM",
    0x48B: "IA32_VMX_PROCBASED_CTLS2",
    0x48C: "IA32_VMX_EPT_VPID_CAP",
    0x48D: "IA32_VMX_TRUE_PINBASED_CTLS",
    0x48E: "IA32_VMX_TRUE_PROCBASED_CTLS",
    0x48F: "IA32_VMX_TRUE_EXIT_CTLS",
    0x490: "IA32_VMX_TRUE_ENTRY_CTLS",
    0x491: "IA32_VMX_VMFUNC",
    0x492: "IA32_VMX_PROCBASED_CTLS3",
    0x493: "IA32_VMX_EXIT_CTLS2",
    0x4D0: "IA32_MCG_EXT_CTL",
    0x560: "IA32_RTIT_OUTPUT_BASE",
    0x561: "IA32_RTIT_OUTPUT_MASK",
    0x570: "IA32_RTIT_CTL",
    0x571: "IA32_RTIT_STATUS",
    0x572: "IA32_RTIT_CR3_MATCH",
    0x580: "IA32_RTIT_ADDR0_A",
    0x581: "IA32_RTIT_ADDR0_B",
    0x582: "IA32_RTIT_ADDR1_A",
    0x583: "IA32_RTIT_ADDR1_B",
    0x584: "IA32_RTIT_ADDR2_A",
    0x585: "IA32_RTIT_ADDR2_B",
    0x586: "IA32_RTIT_ADDR3_A",
    0x587: "IA32_RTIT_ADDR3_B",
    0x600: "IA32_DS_AREA",
    0x6A0: "IA32_U_CET",
    0x6A2: "IA32_S_CET",
    0x6A4: "IA32_PL0_SSP",
    0x6A5: "IA32_PL1_SSP",
    0x6A6: "IA32_PL2_SSP",
    0x6A7: "IA32_PL3_SSP",
    0x6A8: "IA32_INT_SSP_TAB",
    0x6E0: "IA32_TSC_DEADLINE",
    0x6E1: "IA32_PKRS",
    0xD90: "IA32_BNDCFGS",
    0xD93: "IA32_PASID",
    0xDA0: "IA32_XSS",
    0x14CE: "ARCH_LBR_CTL",
    0x14CF: "ARCH_LBR_DEPTH",
    0xC0000080: "EFER",
    0xC0000081: "STAR",
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0xC0000084: "SYSCALL_MASK",
    0xC0000100: "FS_BASE",
    0xC0000101: "GS_BASE",
    0xC0000102: "KERNEL_GS_BASE",
    0xC0000103: "TSC_AUX",
    0xC0000104: "AMD64_TSC_RATIO",
    0xC0000300: "AMD64_PERF_CNTR_GLOBAL_STATUS",
    0xC0000301: "AMD64_PERF_CNTR_GLOBAL_CTL",
    0xC0000302: "AMD64_PERF_CNTR_GLOBAL_STATUS_CLR",
    0xC0010010: "AMD64_SYSCFG",
    0xC0010015: "K7_HWCR",
    0xC0010114: "VM_CR",
    0xC0010117: "VM_HSAVE_PA",
    0xC001011F: "AMD64_VIRT_SPEC_CTRL",
    0xC0010131: "AMD64_SEV_STATUS",
    0xC0010140: "AMD64_OSVW_ID_LENGTH",
    0xC0010141: "AMD64_OSVW_STATUS",
    0xC0011029: "AMD64_DE_CFG",
    0xC001102E: "ZEN4_BP_CFG",
    0x4B564D00: "KVM_WALL_CLOCK_NEW",
    0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    0x4B564D02: "KVM_ASYNC_PF_EN",
    0x4B564D03: "KVM_STEAL_TIME",
    0x4B564D04: "KVM_PV_EOI_EN",
    0x4B564D05: "KVM_POLL_CONTROL",
    0x4B564D06: "KVM_ASYNC_PF_INT",
    0x4B564D07: "KVM_ASYNC_PF_ACK",
    0x4B564D08: "KVM_MIGRATION_CONTROL",
    0x40000000: "HV_X64_MSR_GUEST_OS_ID",
    0x40000001: "HV_X64_MSR_HYPERCALL",
    0x40000002: "HV_X64_MSR_VP_INDEX",
    0x40000003: "HV_X64_MSR_RESET",
    0x40000010: "HV_X64_MSR_VP_RUNTIME",
    0x40000020: "HV_X64_MSR_TIME_REF_COUNT",
    0x40000021: "HV_X64_MSR_REFERENCE_TSC",
    0x40000022: "HV_X64_MSR_TSC_FREQUENCY",
    0x40000023: "HV_X64_MSR_APIC_FREQUENCY",
    0x40000070: "HV_X64_MSR_EOI",
    0x40000071: "HV_X64_MSR_ICR",
    0x40000072: "HV_X64_MSR_TPR",
    0x40000073: "HV_X64_MSR_VP_ASSIST_PAGE",
    0x40000080: "HV_X64_MSR_SCONTROL",
    0x40000081: "HV_X64_MSR_SVERSION",
    0x40000082: "HV_X64_MSR_SIEFP",
    0x40000083: "HV_X64_MSR_SIMP",
    0x40000084: "HV_X64_MSR_EOM",
    0x40000100: "HV_X64_MSR_CRASH_P0",
    0x40000101: "HV_X64_MSR_CRASH_P1",
    0x40000102: "HV_X64_MSR_CRASH_P2",
    0x40000103: "HV_X64_MSR_CRASH_P3",
    0x40000104: "HV_X64_MSR_CRASH_P4",
    0x40000105: "HV_X64_MSR_CRASH_CTL",
    0x40000106: "HV_X64_MSR_REENLIGHTENMENT_CONTROL",
    0x40000107: "HV_X64_MSR_TSC_EMULATION_CONTROL",
    0x40000108: "HV_X64_MSR_TSC_EMULATION_STATUS",
    0x40000114: "HV_X64_MSR_TSC_INVARIANT_CONTROL",
}

_MC_REGS = ("CTL", "STATUS", "ADDR", "MISC")


def msr_name(index: int) -> str | None:
    """The name of MSR *index*, or ``None`` if pykvm does not know it."""
    name = MSR_NAMES.get(index)
    if name:
        return name
    if 0x200 <= index < 0x214:
        return f"MTRRphys{'Base' if index % 2 == 0 else 'Mask'}{(index - 0x200) // 2}"
    if 0x280 <= index < 0x2A0:
        return f"IA32_MC{index - 0x280}_CTL2"
    if 0x400 <= index < 0x480:
        return f"IA32_MC{(index - 0x400) // 4}_{_MC_REGS[index % 4]}"
    if 0xC3 <= index <= 0xC8:
        return f"IA32_PERFCTR{index - 0xC1}"
    if 0x188 <= index <= 0x18D:
        return f"ARCH_PERFMON_EVENTSEL{index - 0x186}"
    if 0x309 <= index <= 0x30F:
        return f"CORE_PERF_FIXED_CTR{index - 0x309}"
    if 0x4C1 <= index <= 0x4C8:
        return f"IA32_PMC{index - 0x4C1}"
    if 0x800 <= index <= 0x8FF:
        return f"X2APIC_{index - 0x800:#04x}"
    if 0xDC0 <= index <= 0xDDF:
        return f"LBR_INFO_{index - 0xDC0}"
    if 0x1500 <= index <= 0x151F:
        return f"ARCH_LBR_FROM_{index - 0x1500}"
    if 0x1600 <= index <= 0x161F:
        return f"ARCH_LBR_TO_{index - 0x1600}"
    if 0x1200 <= index <= 0x121F:
        return f"ARCH_LBR_INFO_{index - 0x1200}"
    if 0xC0010000 <= index <= 0xC0010003:
        return f"K7_EVNTSEL{index - 0xC0010000}"
    if 0xC0010004 <= index <= 0xC0010007:
        return f"K7_PERFCTR{index - 0xC0010004}"
    if 0xC0010200 <= index <= 0xC001020B:
        n = (index - 0xC0010200) // 2
        return f"F15H_PERF_{'CTL' if index % 2 == 0 else 'CTR'}{n}"
    if 0x40000090 <= index <= 0x4000009F:
        return f"HV_X64_MSR_SINT{index - 0x40000090}"
    if 0x400000B0 <= index <= 0x400000B7:
        n, r = divmod(index - 0x400000B0, 2)
        return f"HV_X64_MSR_STIMER{n}_{'CONFIG' if r == 0 else 'COUNT'}"
    if 0x400000F1 <= index <= 0x400000F5:
        return ("HV_X64_MSR_SYNDBG_CONTROL", "HV_X64_MSR_SYNDBG_STATUS",
                "HV_X64_MSR_SYNDBG_SEND_BUFFER", "HV_X64_MSR_SYNDBG_RECV_BUFFER",
                "HV_X64_MSR_SYNDBG_PENDING_BUFFER")[index - 0x400000F1]
    if index == 0x400000FF:
        return "HV_X64_MSR_SYNDBG_OPTIONS"
    return None


# IA32_ARCH_CAPABILITIES bits (msr-index.h ARCH_CAP_*).
_ARCH_CAP = {
    0: "RDCL_NO", 1: "IBRS_ALL", 2: "RSBA", 3: "SKIP_VMENTRY_L1DFLUSH", 4: "SSB_NO",
    5: "MDS_NO", 6: "PSCHANGE_MC_NO", 7: "TSX_CTRL_MSR", 8: "TAA_NO", 13: "SBDR_SSDP_NO",
    14: "FBSDP_NO", 15: "PSDP_NO", 17: "FB_CLEAR", 18: "FB_CLEAR_CTRL", 19: "RRSBA",
    20: "BHI_NO", 21: "XAPIC_DISABLE", 24: "PBRSB_NO", 25: "GDS_CTRL", 26: "GDS_NO",
    27: "RFDS_NO", 28: "RFDS_CLEAR", 62: "ITS_NO",
}


def _bits(value: int, names: dict[int, str]) -> list[str]:
    return [names.get(b, f"bit{b}") for b in range(64) if value >> b & 1]


def decode_feature_msr(index: int, value: int) -> list[str]:
    """A few words on a feature MSR's *value* (bit names, microcode revision ...).

    Returns ``[]`` for MSRs pykvm does not decode.
    """
    if index == 0x10A:
        return _bits(value, _ARCH_CAP)
    if index == 0x8B:
        return [f"microcode revision {value >> 32:#x}"] if value >> 32 else [f"raw {value:#x}"]
    if index == 0xCE:
        out = []
        if value >> 31 & 1:
            out.append("CPUID_FAULT")
        rest = value & ~(1 << 31)
        if rest:
            out.append(f"other bits {rest:#x}")
        return out
    if index == 0x345:
        if not value:
            return []
        out = [f"LBR_FMT={value & 0x3f}"]
        if value >> 6 & 1:
            out.append("PEBS_TRAP")
        if value >> 7 & 1:
            out.append("PEBS_ARCH_REG")
        if value >> 8 & 0xF:
            out.append(f"PEBS_FORMAT={value >> 8 & 0xF}")
        if value >> 13 & 1:
            out.append("FW_WRITE")
        if value >> 14 & 1:
            out.append("PEBS_BASELINE")
        if value >> 15 & 1:
            out.append("PERF_METRICS")
        return out
    return []
