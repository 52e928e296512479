"""The explanations of pykvm.host.diagnose for hosts this machine is not.

The host here has KVM loaded and a root-only /dev/kvm; the other situations
(no module, firmware switch off, a guest without nested virtualization,
group and ACL set-ups, container policies) are set up by replacing what the
module reads: the loaded modules, the CPU flags, the CPUID bits, the user.
"""

from __future__ import annotations

import errno
import grp
import os

import pytest

from pykvm.host import diagnose as D

pytestmark = pytest.mark.no_kvm_needed


@pytest.fixture
def host(monkeypatch):
    """Set modules, /proc/cpuinfo flags and raw CPUID (vmx, svm) for explain()."""
    def set_(mods=(), flags=(), raw=(None, None)):
        monkeypatch.setattr(D, "loaded_kvm_modules", lambda: list(mods))
        monkeypatch.setattr(D, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(D, "raw_virt_flags", lambda: raw)
    return set_


def test_no_module_intel(host):
    host(flags={"vmx"})
    msg = D.explain("/dev/kvm", errno.ENOENT)
    assert "modprobe kvm_intel" in msg and "disabled by bios" in msg


def test_vmx_off_in_firmware(host):
    host(flags={"fpu"}, raw=(True, False))
    msg = D.explain("/dev/kvm", errno.ENOENT)
    assert "disabled or locked off in the firmware" in msg and "BIOS/UEFI" in msg


def test_guest_without_nested(host):
    host(flags={"hypervisor"}, raw=(False, False))
    msg = D.explain("/dev/kvm", errno.ENOENT)
    assert "itself a guest without nested virtualization" in msg and "kvm_pvm" in msg


def test_bare_metal_without_virtualization(host):
    host(flags={"fpu"}, raw=(False, False))
    assert "enable virtualization (VT-x/AMD-V) in the firmware" in D.explain("/dev/kvm", errno.ENOENT)


def test_only_core_module(host):
    host(mods=["kvm"], flags={"svm"})
    assert "load the vendor module (kvm_amd)" in D.explain("/dev/kvm", errno.ENOENT)


def test_module_loaded_but_no_node(host):
    host(mods=["kvm_intel", "kvm"], flags={"vmx"})
    msg = D.explain("/dev/kvm", errno.ENOENT)
    assert "--device /dev/kvm" in msg and "mknod /dev/kvm c 10 232" in msg


def test_node_without_driver(host):
    host(mods=[], flags={"svm"})
    msg = D.explain("/dev/kvm", errno.ENODEV)
    assert msg.startswith("/dev/kvm exists but") and "modprobe kvm_amd" in msg


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A stand-in for /dev/kvm with a given mode and group, seen by uid 4242."""
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    gid = os.getgid()

    def make(mode, in_group=False, listed=False):
        os.chmod(path, mode)
        monkeypatch.setattr(os, "getuid", lambda: 4242)
        monkeypatch.setattr(os, "getgid", lambda: 4242)
        monkeypatch.setattr(os, "getgroups", lambda: [gid] if in_group else [4242])
        monkeypatch.setattr(D, "_members", lambda g: ["u4242"] if listed else [])
        monkeypatch.setattr(D, "_owner", lambda uid: "u4242" if uid == 4242 else "root")
        return str(path)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return make, group


def test_root_only_device(node):
    make, _ = node
    p = make(0o600)
    msg = D.explain(p, errno.EACCES)
    assert msg.startswith("only root may open it")
    assert "chmod 0660" in msg and 'KERNEL=="kvm", GROUP="kvm", MODE="0660"' in msg
    assert f"setfacl -m u:u4242:rw {p}" in msg


def test_group_device_user_not_in_group(node):
    make, group = node
    msg = D.explain(make(0o660), errno.EACCES)
    assert f"add the user to group '{group}'" in msg and f"usermod -aG {group} u4242" in msg


def test_group_device_user_listed_but_session_old(node):
    make, group = node
    msg = D.explain(make(0o660, listed=True), errno.EACCES)
    assert "log out and in again" in msg and f"newgrp {group}" in msg


def test_mode_allows_but_denied(node):
    make, _ = node
    p = make(0o666)
    assert "device cgroup or seccomp" in D.explain(p, errno.EPERM)
    assert "nodev" in D.explain(p, errno.EACCES)
