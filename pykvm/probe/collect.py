"""Gather a :class:`~pykvm.probe.model.ProbeReport` from this machine.

Order: access (open the device: the only test of "usable"), host facts and
modules (readable without KVM), then, on an open system fd, capabilities on
the system fd and on a fresh VM fd, limits, CPUID, MSRs and binary-stats
descriptors of a VM and a vCPU.  Each section is collected on its own: a
failure is recorded in ``report.errors`` and the rest goes on.
"""

from __future__ import annotations

import datetime
import errno as _errno
import fcntl
import grp
import os
import platform
import pwd
import socket
import stat
from collections.abc import Callable
from typing import TypeVar

from ..errors import KvmError, KvmUnavailable
from ..host import cpu as host_cpu
from ..host import diagnose
from ..system import Kvm
from ..uapi import ioctls as I
from ..uapi import structs as S
from ..uapi.enums import Cap
from . import cpuid as C
from .model import (
    Access,
    Capability,
    CpuidReport,
    HostInfo,
    Limits,
    Module,
    Msr,
    MsrReport,
    ProbeReport,
    StatsReport,
)
from .msrs import decode_feature_msr, msr_name

__all__ = ["CAP_PROBE_LIMIT", "VM_TYPE_NAMES", "cap_meaning", "collect"]

#: Capability numbers asked: 0 .. CAP_PROBE_LIMIT-1 (pykvm names 0..246).
CAP_PROBE_LIMIT = 512

VM_TYPE_NAMES: dict[int, str] = {
    S.KVM_X86_DEFAULT_VM: "DEFAULT_VM",
    S.KVM_X86_SW_PROTECTED_VM: "SW_PROTECTED_VM",
    S.KVM_X86_SEV_VM: "SEV_VM",
    S.KVM_X86_SEV_ES_VM: "SEV_ES_VM",
    S.KVM_X86_SNP_VM: "SNP_VM",
    S.KVM_X86_TDX_VM: "TDX_VM",
}

T = TypeVar("T")


def _flag_names(prefix: str, strip: str = "") -> dict[int, str]:
    """Single-bit constants of pykvm.uapi.structs starting with *prefix* -> {bit: name}."""
    out: dict[int, str] = {}
    for name in dir(S):
        if not name.startswith(prefix) or "MASK" in name or "VALID" in name:
            continue
        v = getattr(S, name)
        if isinstance(v, int) and v > 0 and v & (v - 1) == 0:
            out.setdefault(v.bit_length() - 1, name[len(strip or prefix):])
    return out


_HYPERCALLS = {1: "VAPIC_POLL_IRQ", 2: "MMU_OP", 3: "FEATURES", 4: "PPC_MAP_MAGIC_PAGE",
               5: "KICK_CPU", 6: "MIPS_GET_CLOCK_FREQ", 7: "MIPS_EXIT_VM",
               8: "MIPS_CONSOLE_OUTPUT", 9: "CLOCK_PAIRING", 10: "SEND_IPI",
               11: "SCHED_YIELD", 12: "MAP_GPA_RANGE"}

#: Capabilities whose value is a bit mask, with the kernel's names of the bits.
_CAP_BITS: dict[int, dict[int, str]] = {
    Cap.X86_DISABLE_EXITS: _flag_names("KVM_X86_DISABLE_EXITS_"),
    Cap.X2APIC_API: {**_flag_names("KVM_X2APIC_API_"),
                     2: "ENABLE_SUPPRESS_EOI_BROADCAST", 3: "DISABLE_SUPPRESS_EOI_BROADCAST"},
    Cap.SYNC_REGS: _flag_names("KVM_SYNC_X86_"),
    # bit 10 is newer than pykvm.uapi (include/uapi/asm/kvm.h, 6.18)
    Cap.DISABLE_QUIRKS2: {10: "VMCS12_ALLOW_FREEZE_IN_SMM", **_flag_names("KVM_X86_QUIRK_")},
    Cap.X86_BUS_LOCK_EXIT: _flag_names("KVM_BUS_LOCK_DETECTION_"),
    Cap.X86_NOTIFY_VMEXIT: _flag_names("KVM_X86_NOTIFY_VMEXIT_"),
    Cap.SET_GUEST_DEBUG2: _flag_names("KVM_GUESTDBG_"),
    Cap.MANUAL_DIRTY_LOG_PROTECT2: {0: "MANUAL_PROTECT_ENABLE", 1: "INITIALLY_SET"},
    Cap.GUEST_MEMFD_FLAGS: _flag_names("GUEST_MEMFD_FLAG_"),
    Cap.VM_TYPES: dict(VM_TYPE_NAMES),
    Cap.EXIT_HYPERCALL: dict(_HYPERCALLS),
    Cap.PMU_CAPABILITY: _flag_names("KVM_PMU_CAP_"),
}


def cap_meaning(cap: int, value: int | None) -> list[str]:
    """The names of the bits of *value* for bit-mask capabilities (else ``[]``)."""
    names = _CAP_BITS.get(cap)
    if not names or not value or value < 0:
        return []
    return [names.get(b, f"bit{b}") for b in range(value.bit_length()) if value >> b & 1]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _errstr(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _section(report: ProbeReport, name: str, fn: Callable[[], T]) -> T | None:
    """Run *fn*; on an expected failure record it under *name* and return None."""
    try:
        return fn()
    except (KvmError, OSError, ValueError) as e:
        report.errors.append(f"{name}: {_errstr(e)}")
        return None


# -- access ---------------------------------------------------------------------------
def _name_of_uid(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _name_of_gid(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def access(path: str) -> tuple[Access, Kvm | None]:
    """Stat and open *path*; return the facts and the open :class:`Kvm` (or None)."""
    a = Access(path=path, uid=os.getuid(), user=_name_of_uid(os.getuid()))
    gids = sorted(set(os.getgroups()) | {os.getgid()})
    a.groups = [_name_of_gid(g) for g in gids]
    try:
        st = os.stat(path)
        a.exists = True
        a.is_char_device = stat.S_ISCHR(st.st_mode)
        a.mode = stat.filemode(st.st_mode)
        a.owner, a.group = _name_of_uid(st.st_uid), _name_of_gid(st.st_gid)
        if a.is_char_device:
            a.device = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            a.is_kvm_device = (os.major(st.st_rdev), os.minor(st.st_rdev)) == (
                diagnose.KVM_MAJOR, diagnose.KVM_MINOR)
    except FileNotFoundError:
        pass
    except OSError as e:  # e.g. EACCES on a parent directory
        a.exists = e.errno != _errno.ENOENT
    try:
        kvm = Kvm(path)
    except KvmUnavailable as e:
        a.errno = e.errno
        name = _errno.errorcode.get(e.errno, str(e.errno))
        a.error = f"{e.ioctl} failed: {name} ({e.strerror})"
        a.explanation = e.hint or diagnose.explain(path, e.errno or 0)
        return a, None
    a.opened = True
    a.api_version = kvm.api_version
    if not a.is_kvm_device and a.is_char_device:
        a.explanation = (f"{path} is device {a.device}, not {diagnose.KVM_MAJOR}:"
                         f"{diagnose.KVM_MINOR}, but it answers like KVM")
    return a, kvm


# -- host and modules -------------------------------------------------------------------
def host_info() -> HostInfo:
    """Kernel, CPU model and the virtualization flags (cpuinfo and CPUID)."""
    u = platform.uname()
    info = host_cpu.cpuinfo()
    flags = set(info.get("flags", "").split())
    h = HostInfo(
        hostname=socket.gethostname(), kernel_release=u.release, kernel_version=u.version,
        machine=u.machine, cpu_model=info.get("model name", ""),
        cpu_vendor=info.get("vendor_id", ""), online_cpus=os.cpu_count() or 0,
        flags_vmx="vmx" in flags, flags_svm="svm" in flags,
        flags_hypervisor="hypervisor" in flags,
        python=f"{platform.python_implementation()} {platform.python_version()}",
    )
    vmx, svm = diagnose.raw_virt_flags()
    h.raw_vmx, h.raw_svm = vmx, svm
    return h


def modules() -> list[Module]:
    """The loaded KVM modules (vendor modules first, then ``kvm``) with parameters."""
    out = []
    for name in diagnose.loaded_kvm_modules():
        m = Module(name=name, role="core" if name == "kvm" else "vendor")
        pdir = f"/sys/module/{name}/parameters"
        try:
            params = sorted(os.listdir(pdir))
        except OSError:
            params = []
        for p in params:
            try:
                with open(os.path.join(pdir, p)) as f:
                    m.parameters[p] = f.read().strip()
            except OSError:
                m.unreadable.append(p)
        out.append(m)
    return out


# -- with an open /dev/kvm -------------------------------------------------------------
def _check(fd: int, cap: int) -> int:
    try:
        return int(_ioctl_raw(fd, I.KVM_CHECK_EXTENSION, cap))
    except OSError:
        return 0


def _ioctl_raw(fd: int, request: int, arg: int = 0) -> int:
    return fcntl.ioctl(fd, request, arg)


def capabilities(kvm: Kvm, vm_fd: int | None, limit: int = CAP_PROBE_LIMIT) -> list[Capability]:
    """Every known capability, plus every unknown number below *limit* that answers non-zero."""
    known = {int(c): "KVM_CAP_" + c.name for c in Cap}
    out = []
    sys_fd = kvm.fileno()
    if vm_fd is not None and not _check(sys_fd, Cap.CHECK_EXTENSION_VM):
        vm_fd = None  # kernels before KVM_CAP_CHECK_EXTENSION_VM do not answer on a VM fd
    for n in range(limit):
        sv = _check(sys_fd, n)
        vv = _check(vm_fd, n) if vm_fd is not None else None
        name = known.get(n)
        if name is None and not sv and not vv:
            continue
        out.append(Capability(number=n, name=name, system=sv, vm=vv,
                              meaning=cap_meaning(n, vv if vv is not None else sv)))
    return out


def limits(kvm: Kvm, vm, vcpu, report: ProbeReport) -> Limits:
    """Sizes and counts from the system fd, the VM fd and a vCPU."""
    lim = Limits(api_version=kvm.api_version)
    lim.vcpu_mmap_size = _section(report, "limits.vcpu_mmap_size", lambda: kvm.vcpu_mmap_size)
    chk = kvm.check_extension
    lim.nr_vcpus = chk(Cap.NR_VCPUS)
    lim.max_vcpus = chk(Cap.MAX_VCPUS) or lim.nr_vcpus
    lim.max_vcpu_id = chk(Cap.MAX_VCPU_ID) or lim.max_vcpus
    lim.nr_memslots = chk(Cap.NR_MEMSLOTS)
    lim.address_spaces = (vm.check_extension(Cap.MULTI_ADDRESS_SPACE) if vm else
                          chk(Cap.MULTI_ADDRESS_SPACE)) or 1
    mask = chk(Cap.VM_TYPES)
    lim.vm_types = [t for t in range(64) if mask >> t & 1] if mask else [0]
    lim.vm_type_names = [VM_TYPE_NAMES.get(t, f"type{t}") for t in lim.vm_types]
    lim.mce_banks = chk(Cap.MCE) or None
    if lim.mce_banks:
        lim.mce_cap_supported = _section(report, "limits.mce_cap_supported", kvm.mce_cap_supported)
    if vm is not None:
        lim.xsave2_size = vm.check_extension(Cap.XSAVE2) or None
    lim.dirty_ring_max_bytes = chk(Cap.DIRTY_LOG_RING) or None
    if vcpu is not None and chk(Cap.GET_TSC_KHZ):
        lim.tsc_khz = _section(report, "limits.tsc_khz",
                               lambda: int(_ioctl_raw(vcpu.fileno(), I.KVM_GET_TSC_KHZ)))
    return lim


def cpuid_report(kvm: Kvm, report: ProbeReport) -> CpuidReport:
    """Supported and emulated CPUID, decoded; plus what the host CPU has that KVM does not offer."""
    sup = C.sorted_entries([C.CpuidEntry.from_kvm(e) for e in kvm.supported_cpuid()])
    emu: list[C.CpuidEntry] = []
    if kvm.check_extension(Cap.EXT_EMUL_CPUID):
        got = _section(report, "cpuid.emulated", kvm.emulated_cpuid)
        emu = C.sorted_entries([C.CpuidEntry.from_kvm(e) for e in got or []])
    m = C.entry_map(sup)
    r = CpuidReport(supported=sup, emulated=emu)
    r.vendor = C.vendor(m)
    r.family, r.model, r.stepping = C.family_model_stepping(m)
    r.brand = C.brand(m)
    r.max_basic_leaf, r.max_extended_leaf = C.max_leaves(m)
    r.hypervisor_signature = C.hypervisor_signature(m)
    r.phys_addr_bits, r.virt_addr_bits = C.address_bits(m)
    r.xcr0, r.xss = C.xsave_components(m)
    r.xsave_components = C.component_names(r.xcr0 | r.xss)
    r.features = C.feature_names(sup)
    have = set(r.features)
    r.emulated_features = [f for f in C.feature_names(emu) if f not in have]
    r.kvm_pv_features = C.kvm_pv_features(sup)
    r.host_only_features = host_only_features(sup)
    return r


def host_only_features(supported: list[C.CpuidEntry]) -> list[str] | None:
    """Feature flags the host CPU reports (CPUID run here) that KVM's supported set lacks.

    None when CPUID cannot be executed here.  Hypervisor leaves are left out.
    """
    if host_cpu.cpuid(0) is None:
        return None
    kvm_bits = C.feature_bits(supported)
    max_basic = host_cpu.cpuid(0)[0]
    max_ext = host_cpu.cpuid(0x80000000)[0]
    out: list[str] = []
    seen = set()
    for reg in C.FEATURE_REGS:
        fn, idx, r = reg
        if fn >= 0x40000000 and fn < 0x80000000:
            continue
        if (fn < 0x80000000 and fn > max_basic) or (fn >= 0x80000000 and fn > max_ext):
            continue
        regs = host_cpu.cpuid(fn, idx)
        if regs is None:
            continue
        host = regs[["eax", "ebx", "ecx", "edx"].index(r)]
        missing = host & ~kvm_bits.get(reg, 0)
        for n in C.decode_mask(reg, missing, skip_dynamic=True):
            if n not in seen:
                seen.add(n)
                out.append(n)
    return out


def msr_report(kvm: Kvm, report: ProbeReport) -> MsrReport:
    """The MSR index list (named) and the feature MSRs with their values."""
    r = MsrReport()
    r.index_list = [Msr(i, msr_name(i)) for i in kvm.msr_index_list()]
    if kvm.check_extension(Cap.GET_MSR_FEATURES):
        feats = _section(report, "msrs.feature_index_list", kvm.msr_feature_index_list) or []
        values: dict[int, int] = {}
        for i in feats:  # one by one: KVM_GET_MSRS stops at the first unreadable MSR
            got = _section(report, f"msrs.feature {i:#x}", lambda i=i: kvm.get_msrs([i]))
            if got:
                values.update(got)
        r.feature_msrs = [Msr(i, msr_name(i), values.get(i),
                              decode_feature_msr(i, values[i]) if i in values else [])
                          for i in feats]
    return r


def stats_report(owner) -> StatsReport:
    """The binary-stats id and descriptors of a VM or vCPU."""
    from ..stats import open_stats

    with open_stats(owner.fileno()) as st:
        return StatsReport(id=st.id, descriptors=[d.as_dict() for d in st.descriptors])


def collect(path: str = "/dev/kvm", *, bench: bool = False, bench_seconds: float = 0.5,
            cap_limit: int = CAP_PROBE_LIMIT) -> ProbeReport:
    """Probe *path* and this host; see :func:`pykvm.probe.probe`."""
    from .. import __version__

    acc, kvm = access(path)
    report = ProbeReport(usable=kvm is not None, access=acc, host=HostInfo(),
                         generated_at=_now(), pykvm_version=__version__,
                         capability_range=[0, cap_limit - 1])
    report.host = _section(report, "host", host_info) or HostInfo()
    report.modules = _section(report, "modules", modules) or []
    vendors = [m.name for m in report.modules if m.role == "vendor"]
    report.vendor_module = vendors[0] if vendors else None
    if kvm is None:
        return report
    try:
        _with_kvm(kvm, report, cap_limit)
        if bench:
            from .bench import run_benchmarks

            report.bench = _section(report, "bench", lambda: run_benchmarks(kvm, bench_seconds))
    finally:
        kvm.close()
    return report


def _with_kvm(kvm: Kvm, report: ProbeReport, cap_limit: int) -> None:
    """Fill the sections that need the open system fd (and a VM and a vCPU)."""
    vm = vcpu = None
    try:
        try:
            vm = kvm.create_vm()
            report.vm_created = True
        except KvmError as e:
            report.vm_error = _errstr(e)
            report.errors.append(f"vm: {_errstr(e)}")
        if vm is not None:
            try:
                vcpu = vm.create_vcpu(0)
            except KvmError as e:
                report.errors.append(f"vcpu: {_errstr(e)}")
        vm_fd = vm.fileno() if vm is not None else None
        report.capabilities = _section(
            report, "capabilities", lambda: capabilities(kvm, vm_fd, cap_limit)) or []
        report.limits = _section(report, "limits", lambda: limits(kvm, vm, vcpu, report))
        report.cpuid = _section(report, "cpuid", lambda: cpuid_report(kvm, report))
        report.msrs = _section(report, "msrs", lambda: msr_report(kvm, report))
        if kvm.check_extension(Cap.BINARY_STATS_FD):
            if vm is not None:
                report.stats_vm = _section(report, "stats.vm", lambda: stats_report(vm))
            if vcpu is not None:
                report.stats_vcpu = _section(report, "stats.vcpu", lambda: stats_report(vcpu))
        else:
            report.errors.append("stats: KVM_CAP_BINARY_STATS_FD is absent")
    finally:
        if vm is not None:
            vm.close()  # closes the vCPU too
