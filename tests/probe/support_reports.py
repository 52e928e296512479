"""Hand-made probe reports (JSON documents) for the diff and loader tests."""

from __future__ import annotations


def entry(fn, idx=0, eax=0, ebx=0, ecx=0, edx=0, flags=0):
    """One CPUID entry as a probe report holds it."""
    return {"function": fn, "index": idx, "flags": flags, "eax": eax, "ebx": ebx, "ecx": ecx,
            "edx": edx}


def report(**cpuid_overrides):
    """A minimal, valid report with a tiny CPUID (vendor AuthenticAMD)."""
    leaves = {
        0: entry(0, eax=0xD, ebx=0x68747541, ecx=0x444D4163, edx=0x69746E65),
        1: entry(1, eax=0x00B00F21, ecx=1 << 0, edx=(1 << 0) | (1 << 26)),     # pni; fpu sse2
        7: entry(7, ebx=1 << 5, flags=1),                                        # avx2
        0xD: entry(0xD, eax=0x7, flags=1),                                       # x87 sse avx
        0x80000008: entry(0x80000008, eax=0x3030),
    }
    for k, v in cpuid_overrides.items():
        leaves[int(k, 16)] = v
    return {
        "schema": "pykvm-probe", "schema_version": 1, "usable": True, "generated_at": "t",
        "host": {"hostname": "h", "kernel_release": "6.1"}, "modules": [], "vendor_module": None,
        "capabilities": [{"number": 9, "name": "KVM_CAP_NR_VCPUS", "system": 2, "vm": 2}],
        "limits": {"nr_vcpus": 2}, "msrs": {"index_list": [], "feature_msrs": []},
        "stats": {"vm": None, "vcpu": None},
        "cpuid": {"supported": list(leaves.values()), "emulated": []},
    }
