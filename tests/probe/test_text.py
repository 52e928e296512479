"""`pykvm probe` text output, `pykvm.probe()` and its structured result."""

from __future__ import annotations

import enum
import os
import re

import pytest

import pykvm
import pykvm.probe
from pykvm.probe import collect as probe_collect
from pykvm.probe.model import Capability
from pykvm.probe.text import KVM_SECTIONS, render

from . import support_rawioctl as rawioctl
from .support_cli import run_cli

SECTIONS_USABLE = ["Access", "Host", "Modules", "Limits", "Capabilities", "CPUID", "MSRs",
                   "Statistics"]


@pytest.fixture(scope="module")
def text():
    p = run_cli("probe")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    return p.stdout


def test_sections_in_order(text):
    heads = re.findall(r"^== (\w+) ==", text, re.M)
    assert heads == SECTIONS_USABLE
    assert text.splitlines()[1].startswith("KVM usable: yes (/dev/kvm opened read-write, API version 12")


def test_text_shows_the_ioctl_values(text):
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        mmap_size = rawioctl.fcntl.ioctl(fd, rawioctl.KVM_GET_VCPU_MMAP_SIZE, 0)
        nr_vcpus = rawioctl.check(fd, 9)
        vm = rawioctl.fcntl.ioctl(fd, rawioctl.KVM_CREATE_VM, 0)
        try:
            vm_names = [d["name"] for d in rawioctl.stats(vm)["descriptors"]]
        finally:
            os.close(vm)
    finally:
        os.close(fd)
    assert f"vCPU mmap size   {mmap_size} bytes" in text
    assert re.search(rf"^\s+9\s+KVM_CAP_NR_VCPUS\s+{nr_vcpus}\s+{nr_vcpus}$", text, re.M)
    stats = text.split("== Statistics ==")[1]
    for name in vm_names:
        assert name in stats
    cpuid = text.split("== CPUID ==")[1].split("== MSRs ==")[0]
    assert "features offered to guests" in cpuid and " fpu " in cpuid
    assert "supported leaves" in cpuid and "0x00000000" in cpuid


def test_probe_function_returns_a_dataclass():
    r = pykvm.probe()                      # the module is callable
    assert isinstance(r, pykvm.probe.ProbeReport)
    assert r.usable and r.exit_status == 0
    assert r.capability(pykvm.Cap.NR_VCPUS).system == r.limits.nr_vcpus
    assert r.limits.vcpu_mmap_size >= 4096
    assert r.cpuid.vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls")
    assert r.stats_vm.names and r.stats_vcpu.names
    assert r.to_dict()["usable"] is True
    assert pykvm.probe.probe is not pykvm.probe  # the function and the module stay distinct


def test_numbers_unknown_to_pykvm_are_shown(monkeypatch):
    """Pretend pykvm knew nothing of NR_VCPUS/NR_MEMSLOTS: they must appear as unknown numbers."""
    names = {c.name: int(c) for c in pykvm.Cap if c.name not in ("NR_VCPUS", "NR_MEMSLOTS")}
    monkeypatch.setattr(probe_collect, "Cap", enum.IntEnum("Cap", names))
    monkeypatch.setattr(probe_collect, "limits", lambda *a: None)  # uses the real names
    r = pykvm.probe(cap_limit=300)
    caps = {c.number: c for c in r.capabilities}
    assert caps[9].name is None and caps[9].system >= 1
    assert caps[10].name is None and caps[10].system >= 1
    assert caps[9].display_name == "KVM_CAP_9?"
    txt = render(r)
    assert re.search(r"^\s+9\s+KVM_CAP_9\?.*\(unknown to pykvm\)$", txt, re.M)
    assert "2 unknown to pykvm" in txt


def test_unknown_capability_rendering():
    r = pykvm.probe()
    r.capabilities.append(Capability(number=300, name=None, system=5, vm=None))
    line = next(text for text in render(r).splitlines() if "KVM_CAP_300?" in text)
    assert "5" in line and "unknown to pykvm" in line
    d = r.to_dict()["capabilities"][-1]
    assert d == {"number": 300, "name": None, "known": False, "system": 5, "vm": None, "meaning": []}


def test_bench_section():
    r = pykvm.probe(bench=True, bench_seconds=0.02)
    names = [b.name for b in r.bench]
    assert names == ["ioctl_floor", "run_immediate_exit", "pio_exit", "vm_create_close"]
    for b in r.bench:
        assert b.note is None, b.note
        assert b.iterations > 0 and b.mean_us > 0 and b.best_us > 0
    txt = render(r)
    assert "== Benchmark ==" in txt and "pio_exit" in txt
    assert r.to_dict()["bench"][2]["name"] == "pio_exit"


def test_unusable_device_text(tmp_path):
    missing = str(tmp_path / "kvm")
    r = pykvm.probe(missing)
    assert not r.usable and r.exit_status == 1
    assert not r.access.exists and r.access.errno == 2
    assert r.access.explanation
    txt = render(r)
    assert txt.splitlines()[1].startswith("KVM usable: NO")
    heads = re.findall(r"^== (\w+) ==", txt, re.M)
    assert heads == ["Access", "Host", "Modules"]
    assert ", ".join(KVM_SECTIONS) + " need an open " + missing in txt
