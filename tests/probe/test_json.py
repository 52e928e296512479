"""`pykvm probe --json` against values read here with plain fcntl.ioctl."""

from __future__ import annotations

import json
import os

import pytest

from . import support_rawioctl as rawioctl
from .support_cli import run_cli

# The documented top-level keys (docs/probe.md): a change here is a schema change.
TOP_KEYS = ["schema", "schema_version", "pykvm_version", "generated_at", "usable", "access",
            "host", "modules", "vendor_module", "capability_range", "capabilities", "vm",
            "limits", "cpuid", "msrs", "stats", "bench", "errors"]
LIMIT_KEYS = ["api_version", "vcpu_mmap_size", "nr_vcpus", "max_vcpus", "max_vcpu_id",
              "nr_memslots", "address_spaces", "vm_types", "vm_type_names", "mce_banks",
              "mce_cap_supported", "xsave2_size", "dirty_ring_max_bytes", "tsc_khz"]


@pytest.fixture(scope="module")
def doc():
    p = run_cli("probe", "--json")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def raw():
    """Everything the probe reports, read here with plain ioctls."""
    sys_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm_fd = vcpu_fd = -1
    try:
        vm_fd = rawioctl.fcntl.ioctl(sys_fd, rawioctl.KVM_CREATE_VM, 0)
        vcpu_fd = rawioctl.fcntl.ioctl(vm_fd, rawioctl.KVM_CREATE_VCPU, 0)
        feats = rawioctl.msr_list(sys_fd, rawioctl.KVM_GET_MSR_FEATURE_INDEX_LIST)
        return {
            "api": rawioctl.fcntl.ioctl(sys_fd, rawioctl.KVM_GET_API_VERSION, 0),
            "mmap": rawioctl.fcntl.ioctl(sys_fd, rawioctl.KVM_GET_VCPU_MMAP_SIZE, 0),
            "sys": {n: rawioctl.check(sys_fd, n) for n in range(512)},
            "vm": {n: rawioctl.check(vm_fd, n) for n in range(512)},
            "supported": rawioctl.cpuid(sys_fd, rawioctl.KVM_GET_SUPPORTED_CPUID),
            "emulated": rawioctl.cpuid(sys_fd, rawioctl.KVM_GET_EMULATED_CPUID),
            "msrs": rawioctl.msr_list(sys_fd, rawioctl.KVM_GET_MSR_INDEX_LIST),
            "features": {i: rawioctl.get_msr(sys_fd, i) for i in feats},
            "stats_vm": rawioctl.stats(vm_fd),
            "stats_vcpu": rawioctl.stats(vcpu_fd),
            "tsc_khz": rawioctl.fcntl.ioctl(vcpu_fd, rawioctl.KVM_GET_TSC_KHZ, 0),
        }
    finally:
        for fd in (vcpu_fd, vm_fd, sys_fd):
            if fd >= 0:
                os.close(fd)


def test_schema_and_stable_keys(doc):
    assert list(doc) == TOP_KEYS
    assert doc["schema"] == "pykvm-probe" and doc["schema_version"] == 1
    assert list(doc["limits"]) == LIMIT_KEYS
    assert doc["usable"] is True and doc["errors"] == []
    assert doc["access"]["opened"] and doc["access"]["is_kvm_device"]
    assert doc["access"]["device"] == "10:232"
    assert doc["vm"] == {"created": True, "error": None}
    assert doc["bench"] is None


def test_limits_match_ioctls(doc, raw):
    lim = doc["limits"]
    assert lim["api_version"] == raw["api"] == doc["access"]["api_version"] == 12
    assert lim["vcpu_mmap_size"] == raw["mmap"]
    assert lim["nr_vcpus"] == raw["sys"][9]                      # KVM_CAP_NR_VCPUS
    assert lim["max_vcpus"] == (raw["sys"][66] or raw["sys"][9])  # KVM_CAP_MAX_VCPUS
    assert lim["max_vcpu_id"] == (raw["sys"][128] or lim["max_vcpus"])
    assert lim["nr_memslots"] == raw["sys"][10]
    assert lim["tsc_khz"] == raw["tsc_khz"]
    mask = raw["sys"][235]                                        # KVM_CAP_VM_TYPES
    assert lim["vm_types"] == ([t for t in range(64) if mask >> t & 1] if mask else [0])


def test_every_capability_on_both_fds(doc, raw):
    caps = {c["number"]: c for c in doc["capabilities"]}
    assert doc["capability_range"] == [0, 511]
    for n in range(512):
        if raw["sys"][n] or raw["vm"][n]:
            assert n in caps, f"capability {n} answers {raw['sys'][n]}/{raw['vm'][n]} but is not listed"
    for n, c in caps.items():
        assert c["system"] == raw["sys"][n], c
        assert c["vm"] == raw["vm"][n], c
        assert c["known"] == (c["name"] is not None)
    # Every number pykvm names is listed, present or not.
    import pykvm

    assert {int(c) for c in pykvm.Cap} <= set(caps)
    assert caps[9]["name"] == "KVM_CAP_NR_VCPUS"


def _per_cpu_masked(e):
    """Blank the fields KVM copies from the host CPU the ioctl happened to run on:
    the initial APIC id (leaf 1 EBX[31:24]), the x2APIC id (leaves 0xb/0x1f EDX)
    and the extended APIC id (leaf 0x8000001e EAX)."""
    fn, idx, flags, eax, ebx, ecx, edx = e
    if fn == 1:
        ebx &= 0x00FFFFFF
    if fn in (0xB, 0x1F):
        edx = 0
    if fn == 0x8000001E:
        eax = 0
    return (fn, idx, flags, eax, ebx, ecx, edx)


def test_cpuid_matches_ioctls(doc, raw):
    def entries(key):
        return sorted(_per_cpu_masked(tuple(e[k] for k in (
            "function", "index", "flags", "eax", "ebx", "ecx", "edx"))) for e in doc["cpuid"][key])

    assert entries("supported") == sorted(map(_per_cpu_masked, raw["supported"]))
    assert entries("emulated") == sorted(map(_per_cpu_masked, raw["emulated"]))
    leaf0 = next(e for e in raw["supported"] if e[0] == 0)
    vendor = b"".join(v.to_bytes(4, "little") for v in (leaf0[4], leaf0[6], leaf0[5])).decode()
    assert doc["cpuid"]["vendor"] == vendor
    assert doc["cpuid"]["max_basic_leaf"] == leaf0[3]
    leaf1 = next(e for e in raw["supported"] if e[0] == 1)
    assert ("fpu" in doc["cpuid"]["features"]) == bool(leaf1[6] & 1)
    assert ("sse2" in doc["cpuid"]["features"]) == bool(leaf1[6] >> 26 & 1)


def test_msrs_match_ioctls(doc, raw):
    assert [m["index"] for m in doc["msrs"]["index_list"]] == raw["msrs"]
    named = {m["index"]: m["name"] for m in doc["msrs"]["index_list"]}
    if 0x174 in named:
        assert named[0x174] == "IA32_SYSENTER_CS"
    feats = {m["index"]: m["value"] for m in doc["msrs"]["feature_msrs"]}
    assert feats == raw["features"]


def test_stats_descriptor_names(doc, raw):
    for kind in ("vm", "vcpu"):
        got = doc["stats"][kind]
        want = raw["stats_" + kind]
        assert [d["name"] for d in got["descriptors"]] == [d["name"] for d in want["descriptors"]]
        assert [d["size"] for d in got["descriptors"]] == [d["size"] for d in want["descriptors"]]
    assert doc["stats"]["vcpu"]["id"].endswith("/vcpu-0")


def test_module_parameters_from_sysfs(doc):
    for m in doc["modules"]:
        pdir = f"/sys/module/{m['name']}/parameters"
        for p, v in m["parameters"].items():
            with open(os.path.join(pdir, p)) as f:
                assert f.read().strip() == v
    assert doc["vendor_module"] in {m["name"] for m in doc["modules"]}
