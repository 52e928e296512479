"""Render a :class:`~pykvm.probe.model.ProbeReport` as text for a person.

The report starts with a one-line verdict (``KVM usable: yes`` / ``KVM
usable: NO``), followed, when it is NO, by the reason and what to do; then
sections headed ``== Name ==`` (see :data:`SECTIONS`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

from .cpuid import CpuidEntry
from .model import Capability, ProbeReport

__all__ = ["KVM_SECTIONS", "SECTIONS", "render"]

#: Section titles, in order (Benchmark only with --bench, Problems only if any).
SECTIONS = ("Access", "Host", "Modules", "Limits", "Capabilities", "CPUID", "MSRs",
            "Statistics", "Benchmark", "Problems")
#: Sections that need an open /dev/kvm.
KVM_SECTIONS = ("Limits", "Capabilities", "CPUID", "MSRs", "Statistics")

_WIDTH = 100
_OTHER_ARCH = ("S390_", "PPC_", "ARM_", "MIPS_", "RISCV_", "SPAPR_", "LOONGARCH_")
# Parameters worth a look first, when the module has them.
_KEY_PARAMS = ("nested", "ept", "npt", "enable_apicv", "avic", "vpid", "unrestricted_guest",
               "enable_pmu", "tdp_mmu", "halt_poll_ns", "nx_huge_pages", "ignore_msrs",
               "pvm_native")


def _wrap(words: Iterable[str], indent: str = "    ") -> list[str]:
    text = " ".join(words)
    if not text:
        return [indent + "(none)"]
    return textwrap.wrap(text, _WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False)


def _yn(v: bool | None) -> str:
    return "?" if v is None else ("yes" if v else "no")


def _num(v: int | None) -> str:
    if v is None:
        return "-"
    return f"{v}" if -10 < v < 10 else f"{v} ({v:#x})"


def _head(title: str, note: str = "") -> list[str]:
    return ["", f"== {title} ==" + (f"  ({note})" if note else "")]


def render(r: ProbeReport) -> str:
    """The whole report as one string (ends with a newline)."""
    out: list[str] = []
    h = r.host
    out.append(f"pykvm probe {r.pykvm_version}: {h.hostname or '?'}, Linux {h.kernel_release} "
               f"{h.machine}, {r.generated_at}")
    a = r.access
    if r.usable:
        mod = f", module {r.vendor_module}" if r.vendor_module else ""
        out.append(f"KVM usable: yes ({a.path} opened read-write, API version {a.api_version}{mod})")
    else:
        out.append(f"KVM usable: NO ({a.error or 'cannot open ' + a.path})")
        if a.explanation:
            out.extend(textwrap.wrap("what to do: " + a.explanation, _WIDTH,
                                     subsequent_indent="  "))
    out += _access(r)
    out += _host(r)
    out += _modules(r)
    if r.usable:
        out += _limits(r)
        out += _capabilities(r)
        out += _cpuid(r)
        out += _msrs(r)
        out += _stats(r)
        if r.bench is not None:
            out += _bench(r)
    else:
        out += ["", "(" + ", ".join(KVM_SECTIONS) + " need an open " + a.path + ": not probed)"]
    if r.errors:
        out += _head("Problems", "parts that could not be collected")
        out += ["  " + e for e in r.errors]
    return "\n".join(out) + "\n"


def _access(r: ProbeReport) -> list[str]:
    a = r.access
    out = _head("Access")
    if not a.exists:
        out.append(f"  device     {a.path}: does not exist")
    else:
        kind = ("char " + (a.device or "?") + (" (the KVM device)" if a.is_kvm_device
                                                  else " (not 10:232)")
                if a.is_char_device else "not a character device")
        out.append(f"  device     {a.path}  {a.mode or '?'} {a.owner or '?'}:{a.group or '?'}  {kind}")
    out.append(f"  user       {a.user} (uid {a.uid}), groups: {', '.join(a.groups) or '-'}")
    if a.opened:
        out.append(f"  open       ok: O_RDWR, KVM_GET_API_VERSION = {a.api_version}")
    else:
        out.append(f"  open       FAILED: {a.error}")
        if a.explanation:
            out.extend(textwrap.wrap("why        " + a.explanation, _WIDTH,
                                     initial_indent="  ", subsequent_indent="             "))
    if a.opened and a.explanation:
        out.append(f"  note       {a.explanation}")
    return out


def _host(r: ProbeReport) -> list[str]:
    h = r.host
    out = _head("Host")
    out.append(f"  kernel     {h.kernel_release} ({h.kernel_version}) {h.machine}")
    out.append(f"  CPU        {h.cpu_model or '?'} ({h.cpu_vendor or '?'}), "
               f"{h.online_cpus} online CPU(s)")
    raw = ""
    if h.raw_vmx is not None:
        raw = f"; CPUID run here: vmx {_yn(h.raw_vmx)}, svm {_yn(h.raw_svm)}"
    out.append(f"  CPU flags  vmx {_yn(h.flags_vmx)}, svm {_yn(h.flags_svm)}, "
               f"hypervisor {_yn(h.flags_hypervisor)}{raw}")
    if r.usable and not (h.flags_vmx or h.flags_svm):
        out.append(f"  note       neither vmx nor svm in /proc/cpuinfo, yet KVM works here"
                   f"{' (' + r.vendor_module + ')' if r.vendor_module else ''}: "
                   "pykvm decides by opening the device, not by flags")
    if h.flags_hypervisor:
        out.append("  note       this machine is itself a virtual machine (nested KVM or PVM)")
    out.append(f"  Python     {h.python}")
    return out


def _modules(r: ProbeReport) -> list[str]:
    out = _head("Modules", "parameters from /sys/module/*/parameters")
    if not r.modules:
        out.append("  no KVM module loaded (or KVM is built in without parameters)")
        return out
    for m in r.modules:
        out.append(f"  {m.name} ({m.role}): {len(m.parameters)} parameters")
        key = [f"{p}={m.parameters[p]}" for p in _KEY_PARAMS if p in m.parameters]
        if key:
            out.extend(_wrap(["key:", *key]))
        rest = [f"{k}={v}" for k, v in m.parameters.items() if k not in _KEY_PARAMS]
        if rest:
            out.extend(_wrap(rest))
        if m.unreadable:
            out.extend(_wrap(["unreadable by this user:", *m.unreadable]))
    return out


def _limits(r: ProbeReport) -> list[str]:
    out = _head("Limits")
    lim = r.limits
    if lim is None:
        return [*out, "  (not collected)"]
    rows = [
        ("API version", _num(lim.api_version)),
        ("vCPU mmap size", f"{lim.vcpu_mmap_size} bytes (KVM_GET_VCPU_MMAP_SIZE)"),
        ("vCPUs per VM", f"{lim.nr_vcpus} recommended, {lim.max_vcpus} max, "
                         f"vCPU ids < {lim.max_vcpu_id}"),
        ("memory slots", f"{lim.nr_memslots} per address space, "
                         f"{lim.address_spaces} address space(s)"),
        ("VM types", ", ".join(f"{t} {n}" for t, n in zip(lim.vm_types, lim.vm_type_names, strict=False))),
    ]
    if lim.mce_banks:
        mcg = f", MCG_CAP supported {lim.mce_cap_supported:#x}" if lim.mce_cap_supported is not None else ""
        rows.append(("MCE banks", f"{lim.mce_banks}{mcg}"))
    if lim.xsave2_size:
        rows.append(("XSAVE2 size", f"{lim.xsave2_size} bytes"))
    if lim.dirty_ring_max_bytes:
        rows.append(("dirty ring", f"up to {lim.dirty_ring_max_bytes} bytes"))
    if lim.tsc_khz:
        rows.append(("vCPU TSC", f"{lim.tsc_khz} kHz"))
    return out + [f"  {k:<16} {v}" for k, v in rows]


def _cap_row(c: Capability) -> str:
    vm = "-" if c.vm is None else _num(c.vm)
    mark = "  differs" if c.vm is not None and c.vm != c.system else ""
    meaning = f"  [{' '.join(c.meaning)}]" if c.meaning else ""
    unknown = "  (unknown to pykvm)" if not c.known else ""
    return f"  {c.number:>4}  {c.display_name:<40} {_num(c.system):>18} {vm:>18}{mark}{meaning}{unknown}"


def _capabilities(r: ProbeReport) -> list[str]:
    present = [c for c in r.capabilities if c.present]
    unknown = [c for c in present if not c.known]
    differ = [c for c in r.capabilities if c.vm is not None and c.vm != c.system]
    lo, hi = r.capability_range
    note = (f"KVM_CHECK_EXTENSION {lo}..{hi} on /dev/kvm and on a VM fd; {len(present)} present, "
            f"{len(differ)} differ, {len(unknown)} unknown to pykvm")
    out = _head("Capabilities", note)
    if not r.vm_created:
        out.append(f"  (no VM could be created: {r.vm_error}; the vm column is empty)")
    out.append(f"  {'#':>4}  {'name':<40} {'system fd':>18} {'VM fd':>18}")
    out += [_cap_row(c) for c in present]
    absent = [c for c in r.capabilities if c.known and not c.present]
    x86 = [c.display_name[len("KVM_CAP_"):] for c in absent
           if not c.display_name[len("KVM_CAP_"):].startswith(_OTHER_ARCH)]
    other = len(absent) - len(x86)
    out.append(f"  absent ({len(x86)}, not counting {other} of other architectures):")
    out += _wrap(x86)
    return out


def _entry_rows(entries: list[CpuidEntry]) -> list[str]:
    rows, zero = [], []
    for e in entries:
        if not (e.eax or e.ebx or e.ecx or e.edx):
            zero.append(f"{e.function:#x}" + (f".{e.index}" if e.index else ""))
            continue
        rows.append(f"    {e.function:#010x} {e.index:>3} {e.flags:>3}  {e.eax:08x} {e.ebx:08x} "
                    f"{e.ecx:08x} {e.edx:08x}")
    if rows:
        rows.insert(0, f"    {'function':<10} {'idx':>3} {'flg':>3}  {'eax':<8} {'ebx':<8} "
                       f"{'ecx':<8} {'edx':<8}")
    if zero:
        rows += _wrap([f"all-zero ({len(zero)}):", *zero])
    return rows


def _cpuid(r: ProbeReport) -> list[str]:
    c = r.cpuid
    out = _head("CPUID", "KVM_GET_SUPPORTED_CPUID / KVM_GET_EMULATED_CPUID")
    if c is None:
        return [*out, "  (not collected)"]
    out.append(f"  vendor     {c.vendor or '?'}, family {c.family:#x} model {c.model:#x} "
               f"stepping {c.stepping}" + (f", \"{c.brand}\"" if c.brand else ""))
    out.append(f"  leaves     {len(c.supported)} supported (max basic {c.max_basic_leaf:#x}, "
               f"max extended {c.max_extended_leaf:#x}), {len(c.emulated)} emulated")
    if c.hypervisor_signature:
        out.append(f"  hypervisor signature {c.hypervisor_signature!r} at 0x40000000")
    out.append(f"  addresses  {c.phys_addr_bits} physical bits, {c.virt_addr_bits} linear bits")
    out.append(f"  XSAVE      XCR0 {c.xcr0:#x}, XSS {c.xss:#x}: {' '.join(c.xsave_components) or '-'}")
    out.append(f"  features offered to guests ({len(c.features)}):")
    out += _wrap(c.features)
    out.append(f"  emulated only, slow ({len(c.emulated_features)}):")
    out += _wrap(c.emulated_features)
    if c.kvm_pv_features:
        out.append(f"  KVM paravirtual features, leaf 0x40000001 ({len(c.kvm_pv_features)}):")
        out += _wrap(c.kvm_pv_features)
    if c.host_only_features is not None:
        out.append(f"  on the host CPU but not offered to guests ({len(c.host_only_features)}):")
        out += _wrap(c.host_only_features)
    out.append(f"  supported leaves ({len(c.supported)}):")
    out += _entry_rows(c.supported)
    out.append(f"  emulated leaves ({len(c.emulated)}):")
    out += _entry_rows(c.emulated)
    return out


def _msrs(r: ProbeReport) -> list[str]:
    m = r.msrs
    out = _head("MSRs", "KVM_GET_MSR_INDEX_LIST / KVM_GET_MSR_FEATURE_INDEX_LIST")
    if m is None:
        return [*out, "  (not collected)"]
    out.append(f"  saved/restored by a VMM ({len(m.index_list)}):")
    cells = [f"{x.index:#010x} {x.name or '?':<24}"
             for x in sorted(m.index_list, key=lambda x: x.index)]
    for i in range(0, len(cells), 3):
        out.append("    " + "  ".join(cells[i:i + 3]).rstrip())
    out.append(f"  feature MSRs ({len(m.feature_msrs)}), values from KVM_GET_MSRS on /dev/kvm:")
    for x in m.feature_msrs:
        val = "unreadable" if x.value is None else f"{x.value:#018x}"
        dec = f"  {' '.join(x.decoded)}" if x.decoded else ""
        out.append(f"    {x.index:#010x} {x.name or '?':<24} {val}{dec}")
    return out


def _stats(r: ProbeReport) -> list[str]:
    out = _head("Statistics", "KVM_GET_STATS_FD descriptor names")
    for label, s in (("VM", r.stats_vm), ("vCPU", r.stats_vcpu)):
        if s is None:
            out.append(f"  {label}: (not collected)")
            continue
        out.append(f"  {label} ({s.id}): {len(s.descriptors)} statistics")
        words = []
        for d in s.descriptors:
            extra = []
            if d["type"] not in ("cumulative", "instant"):
                extra.append(d["type"] + (f"x{d['size']}" if d["size"] != 1 else ""))
            if d["unit"] not in ("none",):
                extra.append(d["unit"] if d["exponent"] == 0 else f"{d['unit']}*{d['base']}^{d['exponent']}")
            words.append(d["name"] + (f"[{','.join(extra)}]" if extra else ""))
        out += _wrap(words)
    return out


def _bench(r: ProbeReport) -> list[str]:
    out = _head("Benchmark", "microseconds per operation; noisy, compare on one machine")
    for b in r.bench or []:
        if b.note:
            out.append(f"  {b.name:<20} not measured: {b.note}")
            continue
        out.append(f"  {b.name:<20} {b.mean_us:>9.2f} mean {b.best_us:>9.2f} best  "
                   f"({b.iterations} iterations) {b.description}")
    return out
