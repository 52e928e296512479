"""Is this host able to restore a snapshot?  The fingerprint a file records, and the comparison.

The header carries the fingerprint of the saving host (:func:`host_fingerprint`).
:func:`problems` lists every reason this host cannot restore a parsed file:
another CPU vendor or KVM API, a missing capability, guest CPUID features,
XSAVE components or MSRs this host's KVM cannot give, an unscalable TSC
frequency, more vCPUs, higher vCPU ids or memory slots than KVM allows.  The
rules are in ``docs/snapshot.md``, "Compatibility".
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence
from typing import Any

from ..errors import KvmError
from ..system import Kvm
from ..uapi import structs
from ..uapi.enums import Cap
from .fileformat import U32, U64, Parsed, cpuid_entries, from_bytes, msr_values

__all__ = ["feature_words", "host_fingerprint", "problems"]

#: CPUID words compared between the guest's table and the host's supported one:
#: (leaf, subleaf, register, bits that change at run time and are ignored).
_FEATURE_WORDS: tuple[tuple[int, int, str, int], ...] = (
    (0x1, 0, "ecx", 1 << 27),            # OSXSAVE mirrors CR4
    (0x1, 0, "edx", 0),
    (0x7, 0, "ebx", 0),
    (0x7, 0, "ecx", 1 << 4),             # OSPKE mirrors CR4
    (0x7, 0, "edx", 0),
    (0x7, 1, "eax", 0),
    (0xD, 1, "eax", 0),
    (0x80000001, 0, "ecx", 0),
    (0x80000001, 0, "edx", 0),
    (0x80000008, 0, "ebx", 0),
    (0x40000001, 0, "eax", 0),           # KVM paravirtual features
)

#: Capabilities recorded in the fingerprint (and the ones restore relies on).
_CAPS = ("XSAVE", "XSAVE2", "XCRS", "SREGS2", "VCPU_EVENTS", "DEBUGREGS", "NESTED_STATE",
         "IRQCHIP", "PIT2", "PIT_STATE2", "ADJUST_CLOCK", "MP_STATE", "GET_TSC_KHZ",
         "TSC_CONTROL", "VM_TSC_CONTROL", "SPLIT_IRQCHIP", "EXCEPTION_PAYLOAD",
         "X86_TRIPLE_FAULT_EVENT", "TSC_DEADLINE_TIMER", "MAX_VCPUS", "MAX_VCPU_ID", "NR_MEMSLOTS",
         "READONLY_MEM")

_MSR_TSC = 0x10
_MSR_TSC_DEADLINE = 0x6E0


def _find(entries: Sequence[structs.kvm_cpuid_entry2], leaf: int,
          sub: int = 0) -> structs.kvm_cpuid_entry2 | None:
    for e in entries:
        if e.function == leaf and (e.index == sub or not e.flags & structs.KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return e
    return None


def _vendor(entries: Sequence[structs.kvm_cpuid_entry2]) -> str:
    e = _find(entries, 0)
    if e is None:
        return ""
    return struct.pack("<III", e.ebx, e.edx, e.ecx).decode("latin-1")


def feature_words(entries: Sequence[structs.kvm_cpuid_entry2]) -> dict[str, int]:
    out: dict[str, int] = {}
    for leaf, sub, reg, _ in _FEATURE_WORDS:
        e = _find(entries, leaf, sub)
        out[f"{leaf:#x}.{sub}.{reg}"] = int(getattr(e, reg)) if e is not None else 0
    return out


def _xcr0_supported(entries: Sequence[structs.kvm_cpuid_entry2]) -> int:
    e = _find(entries, 0xD, 0)
    return int(e.eax | e.edx << 32) if e is not None else 0x3


def _caps(kvm: Kvm) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in _CAPS:
        cap = getattr(Cap, name, None)
        if cap is not None:
            try:
                out[name] = kvm.check_extension(cap)
            except KvmError:
                out[name] = 0
    return out


_probe_cache: dict[str, Any] = {}


def _probe_host(kvm: Kvm) -> tuple[dict[str, int], int]:
    """(feature words a guest gets, TSC kHz of a new vCPU) on this host, via a scratch vCPU.

    The feature words are those of the host's supported CPUID *after* KVM
    accepted it on a vCPU: some vendor modules (PVM) add host features there,
    so the supported list alone would understate what a guest may use.
    """
    if "features" not in _probe_cache:
        sup = kvm.supported_cpuid()
        words = feature_words(sup)
        khz = 0
        try:
            with kvm.create_vm() as vm:
                v = vm.create_vcpu()
                v.set_cpuid2(sup)
                for k, val in feature_words(v.get_cpuid2()).items():
                    words[k] |= val
                try:
                    khz = max(0, v.get_tsc_khz())
                except KvmError:
                    pass
        except KvmError:
            pass
        _probe_cache["features"], _probe_cache["tsc_khz"] = words, khz
    return dict(_probe_cache["features"]), _probe_cache["tsc_khz"]


def host_fingerprint(kvm: Kvm) -> dict[str, Any]:
    """What a snapshot records about the host that took it (JSON-ready).

    CPU vendor and signature, kernel release, KVM API version, the
    capabilities restore depends on, the CPUID feature words this host's KVM
    gives a guest, the XSAVE features it supports, its MSR index list and
    the TSC frequency of a new vCPU.
    """
    sup = kvm.supported_cpuid()
    leaf1 = _find(sup, 1)
    sig = leaf1.eax if leaf1 is not None else 0
    family = (sig >> 8) & 0xF
    model = (sig >> 4) & 0xF
    if family in (0x6, 0xF):
        model |= (sig >> 12) & 0xF0
    if family == 0xF:
        family += (sig >> 20) & 0xFF
    words, khz = _probe_host(kvm)
    return {
        "cpu_vendor": _vendor(sup),
        "cpu_signature": {"family": family, "model": model, "stepping": sig & 0xF},
        "kernel": os.uname().release,
        "kvm_api": kvm.api_version,
        "caps": _caps(kvm),
        "cpuid_features": {k: f"{v:#010x}" for k, v in words.items()},
        "xcr0_supported": f"{_xcr0_supported(sup):#x}",
        "msr_index_list": [f"{i:#x}" for i in kvm.msr_index_list()],
        "tsc_khz": khz,
    }



# ---------------------------------------------------------------------------
# comparison

def problems(p: Parsed, kvm: Kvm, *, allow_tsc_mismatch: bool) -> list[str]:
    """Every reason this host cannot restore *p* (empty: none found without trying)."""
    hdr = p.info.header
    snap_host = hdr.get("host", {})
    here = host_fingerprint(kvm)
    found: list[str] = []
    if snap_host.get("cpu_vendor") != here["cpu_vendor"]:
        found.append(f"CPU vendor differs: snapshot taken on a {snap_host.get('cpu_vendor')!r} host, "
                        f"this host is {here['cpu_vendor']!r}")
    if snap_host.get("kvm_api") != here["kvm_api"]:
        found.append(f"KVM API version differs: {snap_host.get('kvm_api')} vs {here['kvm_api']}")
    caps = here["caps"]
    host_msrs = {int(x, 16) for x in here["msr_index_list"]}
    sup_words = {k: int(v, 16) for k, v in here["cpuid_features"].items()}
    xcr0_ok = int(here["xcr0_supported"], 16)
    ignore = {f"{leaf:#x}.{sub}.{reg}": mask for leaf, sub, reg, mask in _FEATURE_WORDS}
    nv = len(p.vcpus)
    if nv > max(caps.get("MAX_VCPUS", 0), 1):
        found.append(f"the snapshot has {nv} vCPUs, this host allows {caps.get('MAX_VCPUS')}")

    max_id = caps.get("MAX_VCPU_ID") or caps.get("MAX_VCPUS") or 0
    high = [vid for vid, _ in p.vcpus if vid >= max_id]
    if high:
        found.append(f"vCPU id(s) {high} are not below this host's KVM_CAP_MAX_VCPU_ID ({max_id})")
    nr_slots = caps.get("NR_MEMSLOTS") or 0
    slots = [slot for slot, _, _, _ in p.regions if slot >= nr_slots]
    if slots:
        found.append(f"memory slot(s) {slots} are not below this host's KVM_CAP_NR_MEMSLOTS ({nr_slots})")

    def need(cap: str, what: str) -> None:
        if not caps.get(cap):
            found.append(f"{what} needs KVM_CAP_{cap}, which this host lacks")

    if any(flags & structs.KVM_MEM_READONLY for _, flags, _, _ in p.regions):
        need("READONLY_MEM", "read-only guest memory")

    if any(k.startswith("irqchip.") for k in p.vm):
        need("IRQCHIP", "the in-kernel irqchip")
    if "pit2" in p.vm:
        need("PIT_STATE2", "the in-kernel PIT")
    for vid, items in p.vcpus:
        tag = f"vCPU {vid}"
        if "sregs2" in items:
            need("SREGS2", f"{tag} sregs2")
        if "xsave" in items:
            size = len(items["xsave"])
            if size > 4096:
                if caps.get("XSAVE2", 0) < size:
                    found.append(f"{tag}: XSAVE area of {size} bytes, this host's KVM handles "
                                    f"{max(caps.get('XSAVE2', 0), 4096 if caps.get('XSAVE') else 0)}")
            else:
                need("XSAVE", f"{tag} XSAVE state")
            if size >= 520:
                (xstate_bv,) = U64.unpack_from(items["xsave"], 512)
                if xstate_bv & ~xcr0_ok:
                    found.append(f"{tag}: XSAVE state uses components {xstate_bv & ~xcr0_ok:#x} "
                                    f"this host does not support (supported XCR0 {xcr0_ok:#x})")
        if "xcrs" in items:
            need("XCRS", f"{tag} XCRs")
            xcrs = from_bytes(structs.kvm_xcrs, items["xcrs"], f"{tag} xcrs")
            for i in range(min(xcrs.nr_xcrs, structs.KVM_MAX_XCRS)):
                if xcrs.xcrs[i].xcr == 0 and xcrs.xcrs[i].value & ~xcr0_ok:
                    found.append(f"{tag}: guest XCR0 {xcrs.xcrs[i].value:#x} enables features this "
                                    f"host lacks (supported {xcr0_ok:#x})")
        if "events" in items:
            need("VCPU_EVENTS", f"{tag} events")
        if "debugregs" in items:
            need("DEBUGREGS", f"{tag} debug registers")
        if "nested" in items and len(items["nested"]) > ctypes.sizeof(structs.kvm_nested_state):
            need("NESTED_STATE", f"{tag} nested virtualization state")
        if ("lapic" in items and not any(k.startswith("irqchip.") for k in p.vm)
                and not caps.get("SPLIT_IRQCHIP")):
            need("SPLIT_IRQCHIP", f"{tag} LAPIC without an irqchip")
        if "msrs" in items:
            missing = sorted({i for i, _ in msr_values(items["msrs"], f"{tag} msrs")} - host_msrs)
            if missing:
                found.append(f"{tag}: MSRs {[hex(m) for m in missing]} are not in this host's "
                                "KVM_GET_MSR_INDEX_LIST")
        if "cpuid" in items:
            words = feature_words(cpuid_entries(items["cpuid"]))
            for key, val in words.items():
                extra = val & ~sup_words.get(key, 0) & ~ignore.get(key, 0)
                if extra:
                    leaf, sub, reg = key.split(".")
                    bits = [b for b in range(32) if extra >> b & 1]
                    found.append(f"{tag}: guest CPUID leaf {leaf} subleaf {sub} {reg} bits {bits} are "
                                    "features this host's KVM cannot offer")
        if "tsc_khz" in items and caps.get("GET_TSC_KHZ") and not allow_tsc_mismatch:
            (khz,) = U32.unpack(items["tsc_khz"])
            here_khz = here["tsc_khz"]
            if here_khz and khz and abs(here_khz - khz) * 1000 > khz and not caps.get("TSC_CONTROL"):
                found.append(f"{tag}: guest TSC runs at {khz} kHz, this host at {here_khz} kHz and "
                                "cannot scale it (KVM_CAP_TSC_CONTROL); pass allow_tsc_mismatch=True "
                                "to restore anyway")
    return found
