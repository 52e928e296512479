"""The probe's result as dataclasses, and its JSON form.

:class:`ProbeReport` is what :func:`pykvm.probe` returns.  ``to_dict()`` gives
the JSON document described in ``docs/probe.md`` (``schema_version`` 1): keys
are stable; numbers are JSON integers (CPUID registers and MSR values too);
sections that could not be collected are ``null`` with a line in ``errors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .cpuid import CpuidEntry

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "Access",
    "BenchResult",
    "Capability",
    "CpuidReport",
    "HostInfo",
    "Limits",
    "Module",
    "Msr",
    "MsrReport",
    "ProbeReport",
    "StatsReport",
]

SCHEMA = "pykvm-probe"
SCHEMA_VERSION = 1


@dataclass
class Access:
    """Can this process use the KVM device?  Decided by opening it."""

    path: str
    exists: bool = False
    is_char_device: bool = False
    device: str | None = None          #: "major:minor" of the node
    is_kvm_device: bool = False           #: the node is 10:232
    mode: str | None = None            #: "crw-rw----"
    owner: str | None = None
    group: str | None = None
    user: str = ""
    uid: int = -1
    groups: list[str] = field(default_factory=list)  #: this process's groups
    opened: bool = False                  #: open(O_RDWR) and KVM_GET_API_VERSION worked
    api_version: int | None = None
    errno: int | None = None
    error: str | None = None           #: what failed, e.g. "open(/dev/kvm) failed: EACCES ..."
    explanation: str | None = None     #: why, and what to do

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return dict(self.__dict__)


@dataclass
class Module:
    """A loaded KVM kernel module and its parameters (from /sys/module/NAME/parameters)."""

    name: str
    role: str                              #: "vendor" (kvm_intel, kvm_amd, kvm_pvm ...) or "core" (kvm)
    parameters: dict[str, str] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)  #: parameters this user may not read

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return {"name": self.name, "role": self.role, "parameters": dict(self.parameters),
                "unreadable": list(self.unreadable)}


@dataclass
class HostInfo:
    """The machine around KVM: kernel, CPU, and what the CPU flags claim."""

    hostname: str = ""
    kernel_release: str = ""
    kernel_version: str = ""
    machine: str = ""
    cpu_model: str = ""
    cpu_vendor: str = ""
    online_cpus: int = 0
    flags_vmx: bool = False                #: "vmx" in /proc/cpuinfo
    flags_svm: bool = False                #: "svm" in /proc/cpuinfo
    flags_hypervisor: bool = False         #: this machine is itself a guest
    raw_vmx: bool | None = None         #: CPUID.1:ECX.VMX executed here (None: could not run CPUID)
    raw_svm: bool | None = None         #: CPUID.80000001h:ECX.SVM executed here
    python: str = ""

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return dict(self.__dict__)


@dataclass
class Capability:
    """One ``KVM_CAP_*`` number and what ``KVM_CHECK_EXTENSION`` answers for it."""

    number: int
    name: str | None                    #: "KVM_CAP_IRQCHIP"; None: unknown to pykvm
    system: int | None                  #: on the /dev/kvm fd (None: not asked)
    vm: int | None                      #: on a VM fd (None: no VM / not asked)
    meaning: list[str] = field(default_factory=list)  #: decoded bits of a bitmask value

    @property
    def known(self) -> bool:
        """True if pykvm has a name for the number."""
        return self.name is not None

    @property
    def present(self) -> bool:
        """True if either fd answers non-zero."""
        return bool(self.system) or bool(self.vm)

    @property
    def display_name(self) -> str:
        """The name, or ``KVM_CAP_<n>?`` for numbers pykvm does not know."""
        return self.name or f"KVM_CAP_{self.number}?"

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return {"number": self.number, "name": self.name, "known": self.known,
                "system": self.system, "vm": self.vm, "meaning": list(self.meaning)}


@dataclass
class Limits:
    """Sizes and counts a VMM must respect."""

    api_version: int | None = None
    vcpu_mmap_size: int | None = None   #: KVM_GET_VCPU_MMAP_SIZE
    nr_vcpus: int | None = None         #: recommended vCPUs per VM (KVM_CAP_NR_VCPUS)
    max_vcpus: int | None = None        #: KVM_CAP_MAX_VCPUS
    max_vcpu_id: int | None = None      #: KVM_CAP_MAX_VCPU_ID (ids are < this)
    nr_memslots: int | None = None      #: KVM_CAP_NR_MEMSLOTS per address space
    address_spaces: int | None = None   #: KVM_CAP_MULTI_ADDRESS_SPACE (2 with SMM)
    vm_types: list[int] = field(default_factory=list)
    vm_type_names: list[str] = field(default_factory=list)
    mce_banks: int | None = None        #: KVM_CAP_MCE
    mce_cap_supported: int | None = None  #: KVM_X86_GET_MCE_CAP_SUPPORTED
    xsave2_size: int | None = None      #: KVM_CAP_XSAVE2 on the VM fd (bytes for KVM_GET_XSAVE2)
    dirty_ring_max_bytes: int | None = None  #: KVM_CAP_DIRTY_LOG_RING
    tsc_khz: int | None = None          #: KVM_GET_TSC_KHZ of a fresh vCPU

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return dict(self.__dict__)


@dataclass
class CpuidReport:
    """KVM_GET_SUPPORTED_CPUID / KVM_GET_EMULATED_CPUID, raw and decoded."""

    vendor: str = ""
    family: int = 0
    model: int = 0
    stepping: int = 0
    brand: str = ""
    max_basic_leaf: int = 0
    max_extended_leaf: int = 0
    hypervisor_signature: str = ""
    phys_addr_bits: int = 0
    virt_addr_bits: int = 0
    xcr0: int = 0                          #: XSAVE components guests may enable in XCR0
    xss: int = 0                           #: supervisor components (IA32_XSS)
    xsave_components: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)           #: supported feature flags
    emulated_features: list[str] = field(default_factory=list)  #: emulated set, not in supported
    kvm_pv_features: list[str] = field(default_factory=list)    #: leaf 0x40000001 EAX
    host_only_features: list[str] | None = None  #: host CPU has them, KVM does not offer them
    supported: list[CpuidEntry] = field(default_factory=list)
    emulated: list[CpuidEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("supported", "emulated")}
        d["supported"] = [e.as_dict() for e in self.supported]
        d["emulated"] = [e.as_dict() for e in self.emulated]
        return d


@dataclass
class Msr:
    """One MSR: index, name (None if unknown), and for feature MSRs its value."""

    index: int
    name: str | None
    value: int | None = None
    decoded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return {"index": self.index, "name": self.name, "value": self.value,
                "decoded": list(self.decoded)}


@dataclass
class MsrReport:
    """KVM_GET_MSR_INDEX_LIST and KVM_GET_MSR_FEATURE_INDEX_LIST (with values)."""

    index_list: list[Msr] = field(default_factory=list)
    feature_msrs: list[Msr] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return {"index_list": [m.to_dict() for m in self.index_list],
                "feature_msrs": [m.to_dict() for m in self.feature_msrs]}


@dataclass
class StatsReport:
    """The binary-stats descriptors of one VM or vCPU fd."""

    id: str
    descriptors: list[dict[str, Any]] = field(default_factory=list)  #: StatDesc.as_dict() each

    @property
    def names(self) -> list[str]:
        return [d["name"] for d in self.descriptors]

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return {"id": self.id, "descriptors": [dict(d) for d in self.descriptors]}


@dataclass
class BenchResult:
    """One measurement of ``--bench``: mean and best-batch time per operation."""

    name: str
    description: str
    iterations: int
    seconds: float
    mean_us: float
    best_us: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready data (keys documented in docs/probe.md)."""
        return dict(self.__dict__)


@dataclass
class ProbeReport:
    """Everything the probe found.  ``usable`` decides the exit status."""

    usable: bool
    access: Access
    host: HostInfo
    generated_at: str = ""
    pykvm_version: str = ""
    modules: list[Module] = field(default_factory=list)
    vendor_module: str | None = None
    capability_range: list[int] = field(default_factory=lambda: [0, 0])
    capabilities: list[Capability] = field(default_factory=list)
    vm_created: bool = False
    vm_error: str | None = None
    limits: Limits | None = None
    cpuid: CpuidReport | None = None
    msrs: MsrReport | None = None
    stats_vm: StatsReport | None = None
    stats_vcpu: StatsReport | None = None
    bench: list[BenchResult] | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """0 when KVM is usable, 1 otherwise (the CLI's exit status)."""
        return 0 if self.usable else 1

    def capability(self, cap: int) -> Capability | None:
        """The entry for capability number *cap* (None if it was not listed)."""
        for c in self.capabilities:
            if c.number == int(cap):
                return c
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see docs/probe.md for every key)."""
        def opt(x):
            return None if x is None else x.to_dict()

        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "pykvm_version": self.pykvm_version,
            "generated_at": self.generated_at,
            "usable": self.usable,
            "access": self.access.to_dict(),
            "host": self.host.to_dict(),
            "modules": [m.to_dict() for m in self.modules],
            "vendor_module": self.vendor_module,
            "capability_range": list(self.capability_range),
            "capabilities": [c.to_dict() for c in self.capabilities],
            "vm": {"created": self.vm_created, "error": self.vm_error},
            "limits": opt(self.limits),
            "cpuid": opt(self.cpuid),
            "msrs": opt(self.msrs),
            "stats": {"vm": opt(self.stats_vm), "vcpu": opt(self.stats_vcpu)},
            "bench": None if self.bench is None else [b.to_dict() for b in self.bench],
            "errors": list(self.errors),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict()`` as JSON text (keys in a fixed order)."""
        return json.dumps(self.to_dict(), indent=indent)
