"""Short answers from a probe report: ``pykvm probe --brief`` and ``pykvm probe --check``.

:func:`brief` is a ``kvm-ok``-style verdict: one line saying whether KVM
acceleration can be used, and when it cannot, one line with the fix.

:func:`checklist` is a ``virt-host-validate``-style list of checks, each
PASS, WARN or FAIL with a hint.  FAIL means a KVM user cannot run guests
here (the command exits 1); WARN means something works less well or a
feature that some guests need is missing.  "Usable" is never decided from
CPU flags: on hosts such as PVM, KVM works without ``vmx``/``svm`` in
``/proc/cpuinfo``, which is a WARN, not a FAIL.

Both only read a :class:`~pykvm.probe.model.ProbeReport` and a few host files
(``/proc/meminfo``, transparent hugepages); they do no ioctl themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..uapi.enums import Cap
from .model import ProbeReport

__all__ = [
    "FAIL",
    "IMPORTANT_CAPS",
    "PASS",
    "WARN",
    "Check",
    "brief",
    "checklist",
    "render_checklist",
]

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

#: capabilities most VMMs need (QEMU, Firecracker and pykvm's own VMM use all of them)
IMPORTANT_CAPS = (Cap.USER_MEMORY, Cap.IRQCHIP, Cap.IMMEDIATE_EXIT, Cap.EXT_CPUID,
                  Cap.SET_TSS_ADDR, Cap.IOEVENTFD, Cap.IRQFD, Cap.MP_STATE)


@dataclass(frozen=True)
class Check:
    """One line of the checklist."""

    name: str           #: "Checking if device /dev/kvm exists"
    status: str         #: PASS, WARN or FAIL
    hint: str = ""      #: what it means / what to do (WARN and FAIL)

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"name": self.name, "status": self.status, "hint": self.hint}


def _first_sentence(text: str | None) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    cut = line.find(". ")
    return line if cut < 0 else line[:cut + 1]


def brief(r: ProbeReport) -> str:
    """A ``kvm-ok``-style verdict in one line, plus a hint line when KVM is not usable."""
    a = r.access
    if r.usable:
        extra = []
        if r.vendor_module:
            extra.append(f"module {r.vendor_module}")
        if r.limits is not None:
            extra.append(f"{r.limits.max_vcpus} vCPUs max")
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"KVM acceleration can be used: {a.path} answered API version {a.api_version}{tail}\n"
    why = a.error or ("no such device" if not a.exists else "the device did not answer")
    hint = _first_sentence(a.explanation) or "run 'pykvm probe' for the full report"
    return f"KVM acceleration can NOT be used: {why}\nhint: {hint}\n"


def _module_param(r: ProbeReport, name: str) -> str | None:
    for m in r.modules:
        if m.role == "vendor" and name in m.parameters:
            return m.parameters[name]
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(65536)
    except OSError:
        return None


def _hugepages() -> list[Check]:
    out = []
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp is None:
        out.append(Check("Checking for transparent hugepages", WARN,
                         "not available in this kernel: guest memory is mapped with 4 KiB pages"))
    elif "[never]" in thp:
        out.append(Check("Checking for transparent hugepages", WARN,
                         "disabled ([never]): echo madvise > /sys/kernel/mm/transparent_hugepage/enabled"))
    else:
        out.append(Check("Checking for transparent hugepages", PASS))
    meminfo = _read("/proc/meminfo") or ""
    total = next((line.split()[1] for line in meminfo.splitlines()
                  if line.startswith("HugePages_Total:") and len(line.split()) > 1), "0")
    if total.isdigit() and int(total) > 0:
        out.append(Check("Checking for reserved hugetlbfs pages", PASS))
    else:
        out.append(Check("Checking for reserved hugetlbfs pages", WARN,
                         "none reserved (only needed for hugetlbfs-backed guest memory): "
                         "sysctl vm.nr_hugepages=N"))
    return out


def checklist(r: ProbeReport) -> list[Check]:
    """The checks, in the order a user would fix them."""
    a, h = r.access, r.host
    out: list[Check] = []
    if h.flags_vmx or h.flags_svm:
        out.append(Check("Checking for hardware virtualization", PASS))
    elif r.usable:
        out.append(Check("Checking for hardware virtualization", WARN,
                         "no vmx/svm flag in /proc/cpuinfo, yet KVM works here "
                         f"(module {r.vendor_module or '?'}): expect software-assisted performance"))
    else:
        out.append(Check("Checking for hardware virtualization", FAIL,
                         "no vmx/svm flag in /proc/cpuinfo: enable VT-x/AMD-V in the firmware, "
                         "or nested virtualization on the hypervisor running this machine"))
    if r.vendor_module:
        out.append(Check("Checking for a KVM vendor module", PASS))
    else:
        out.append(Check("Checking for a KVM vendor module", FAIL,
                         "none loaded: modprobe kvm_intel (Intel) or kvm_amd (AMD)"))
    out.append(Check(f"Checking if device {a.path} exists", PASS if a.exists else FAIL,
                     "" if a.exists else "load the KVM modules (modprobe kvm_intel or kvm_amd)"))
    if a.exists:
        out.append(Check(f"Checking if {a.path} is the KVM device (10:232)",
                         PASS if a.is_kvm_device else FAIL,
                         "" if a.is_kvm_device else f"it is {a.device or 'not a character device'}"))
        out.append(Check(f"Checking if device {a.path} is accessible", PASS if a.opened else FAIL,
                         "" if a.opened else _first_sentence(a.explanation) or (a.error or "")))
    if a.opened:
        ok = a.api_version == 12
        out.append(Check("Checking for KVM API version 12", PASS if ok else FAIL,
                         "" if ok else f"the device answered {a.api_version}"))
    if not r.usable:
        return out + _hugepages()
    out.append(Check("Checking if a VM can be created", PASS if r.vm_created else FAIL,
                     "" if r.vm_created else (r.vm_error or "KVM_CREATE_VM failed")))
    nested = _module_param(r, "nested")
    if nested is None:
        out.append(Check("Checking for nested virtualization", WARN,
                         "the vendor module has no 'nested' parameter: guests cannot run KVM"))
    elif nested in ("Y", "1"):
        out.append(Check("Checking for nested virtualization", PASS))
    else:
        out.append(Check("Checking for nested virtualization", WARN,
                         f"off (nested={nested}): guests cannot run KVM; "
                         f"modprobe {r.vendor_module} nested=1 to allow it"))
    lim = r.limits
    if lim is not None:
        cpus = h.online_cpus or os.cpu_count() or 1
        if lim.nr_vcpus and lim.nr_vcpus >= cpus:
            out.append(Check("Checking vCPU limits", PASS))
        else:
            out.append(Check("Checking vCPU limits", WARN,
                             f"KVM recommends at most {lim.nr_vcpus} vCPUs per VM, fewer than the "
                             f"{cpus} online host CPUs ({lim.max_vcpus} is the hard limit)"))
        slots = lim.nr_memslots or 0
        out.append(Check("Checking memory slots", PASS if slots >= 32 else WARN,
                         "" if slots >= 32 else f"only {slots} memory slots per address space"))
    missing = []
    for cap in IMPORTANT_CAPS:
        c = r.capability(cap)
        if c is None or not (c.system or c.vm):
            missing.append(f"KVM_CAP_{cap.name}")
    out.append(Check("Checking for the capabilities VMMs rely on", FAIL if missing else PASS,
                     ("missing: " + " ".join(missing)) if missing else ""))
    stats = r.capability(Cap.BINARY_STATS_FD)
    out.append(Check("Checking for binary statistics (pykvm stat)",
                     PASS if stats is not None and stats.system else WARN,
                     "" if stats is not None and stats.system else
                     "KVM_CAP_BINARY_STATS_FD missing (Linux 5.14+): statistics only through debugfs"))
    return out + _hugepages()


def render_checklist(checks: list[Check]) -> str:
    """The checklist as ``virt-host-validate`` prints it: ``KVM: <check> ... : PASS (hint)``."""
    width = max((len(c.name) for c in checks), default=0) + 2
    lines = []
    for c in checks:
        line = f"  KVM: {c.name:<{width}}: {c.status}"
        lines.append(line + (f" ({c.hint})" if c.hint else ""))
    return "\n".join(lines) + "\n"
