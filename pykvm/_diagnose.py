"""Explain why ``/dev/kvm`` cannot be used, in words a user can act on.

The decision "KVM works" is always made by opening the device and asking its
API version; this module only explains a failure (and is shared with the
probe).  CPU flags are evidence, never proof: some hosts (PVM) run KVM with
neither ``vmx`` nor ``svm`` in ``/proc/cpuinfo``.
"""

from __future__ import annotations

import errno
import grp
import os
import stat
from typing import List

KVM_MAJOR, KVM_MINOR = 10, 232
VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm", "kvm_hv")


def loaded_kvm_modules() -> List[str]:
    """Names of KVM modules present in /sys/module (vendor modules first)."""
    found = [m for m in VENDOR_MODULES if os.path.isdir(f"/sys/module/{m}")]
    if os.path.isdir("/sys/module/kvm"):
        found.append("kvm")
    return found


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_vendor_module() -> str:
    flags = cpu_flags()
    if "vmx" in flags:
        return "kvm_intel"
    if "svm" in flags:
        return "kvm_amd"
    return ""


def explain(path: str, err: int) -> str:
    """A hint for an ``open(path)`` that failed with *err* (or ENOTTY/ENODEV)."""
    mods = loaded_kvm_modules()
    vendor = cpu_vendor_module()
    flags = cpu_flags()
    if err == errno.ENOENT:
        if not mods:
            if vendor:
                return (f"{path} does not exist and no KVM module is loaded: "
                        f"run 'modprobe {vendor}' as root")
            hyper = "hypervisor" in flags
            return (f"{path} does not exist, no KVM module is loaded and the CPU flags show "
                    "neither vmx nor svm: "
                    + ("this machine is itself a guest; enable nested virtualization on its host"
                       if hyper else "enable virtualization (VT-x/AMD-V) in the firmware")
                    + " (or load a KVM module that needs no VMX/SVM, such as kvm_pvm)")
        if mods == ["kvm"]:
            return (f"only the generic 'kvm' module is loaded; load the vendor module"
                    f" ({vendor or 'kvm_intel or kvm_amd'}); if it fails, virtualization may be"
                    " disabled in the firmware (see dmesg)")
        return (f"{path} does not exist although {', '.join(mods)} is loaded: "
                "create it with 'mknod /dev/kvm c 10 232' or check udev/container device rules")
    if err in (errno.EACCES, errno.EPERM):
        who = _user()
        try:
            st = os.stat(path)
            try:
                group = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                group = str(st.st_gid)
            mode = stat.filemode(st.st_mode)
            where = f"{path} is {mode} owned by group '{group}'"
        except OSError:
            where, group = path, "kvm"
        return (f"user {who} may not open it ({where}): add the user to group '{group}' "
                f"('usermod -aG {group} {who}', then log in again), or grant an ACL "
                f"('setfacl -m u:{who}:rw {path}'), or run as root")
    if err in (errno.ENOTTY, errno.ENODEV, errno.ENXIO, errno.EINVAL):
        return f"{path} is not the KVM device (it does not answer KVM_GET_API_VERSION)"
    if err == errno.EISDIR:
        return f"{path} is a directory, not the KVM device"
    return f"cannot use {path}"


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())
