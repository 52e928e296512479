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

KVM_MAJOR, KVM_MINOR = 10, 232
VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm", "kvm_hv")

__all__ = [
    "KVM_MAJOR",
    "KVM_MINOR",
    "VENDOR_MODULES",
    "cpu_flags",
    "cpu_vendor_module",
    "explain",
    "loaded_kvm_modules",
    "raw_virt_flags",
]


def loaded_kvm_modules() -> list[str]:
    """Names of KVM modules present in /sys/module (vendor modules first)."""
    found = [m for m in VENDOR_MODULES if os.path.isdir(f"/sys/module/{m}")]
    if os.path.isdir("/sys/module/kvm"):
        found.append("kvm")
    return found


def cpu_flags() -> set[str]:
    """The ``flags`` line of /proc/cpuinfo as a set (empty if unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def raw_virt_flags() -> tuple[bool | None, bool | None]:
    """(vmx, svm) as the CPUID instruction reports them here; (None, None) if unknown."""
    try:
        from .cpu import cpuid
    except Exception:  # pragma: no cover - the probe package is part of pykvm
        return (None, None)
    l1 = cpuid(1)
    if l1 is None:
        return (None, None)
    ext = cpuid(0x80000000)
    svm = None
    if ext is not None and ext[0] >= 0x80000001:
        e1 = cpuid(0x80000001)
        svm = bool(e1[2] >> 2 & 1) if e1 else None
    return (bool(l1[2] >> 5 & 1), svm)


def cpu_vendor_module() -> str:
    """``kvm_intel``/``kvm_amd`` if the CPU flags show VMX/SVM, else ``""``."""
    flags = cpu_flags()
    if "vmx" in flags:
        return "kvm_intel"
    if "svm" in flags:
        return "kvm_amd"
    return ""


def _firmware_hint() -> str | None:
    """A sentence if the CPU has VMX/SVM but the kernel shows it disabled."""
    flags = cpu_flags()
    vmx, svm = raw_virt_flags()
    if vmx and "vmx" not in flags:
        return ("the CPU has VT-x (CPUID says VMX) but the kernel shows no 'vmx' flag: "
                "VT-x is disabled or locked off in the firmware; enable 'Intel Virtualization "
                "Technology' in the BIOS/UEFI setup and power-cycle")
    if svm and "svm" not in flags:
        return ("the CPU has AMD-V (CPUID says SVM) but the kernel shows no 'svm' flag: "
                "enable 'SVM Mode' in the BIOS/UEFI setup")
    return None


def explain(path: str, err: int | None) -> str:
    """A hint for an ``open(path)`` that failed with *err* (or ENOTTY/ENODEV)."""
    mods = loaded_kvm_modules()
    vendor = cpu_vendor_module()
    flags = cpu_flags()
    if err == errno.ENOENT:
        if not mods:
            if vendor:
                return (f"{path} does not exist and no KVM module is loaded: run "
                        f"'modprobe {vendor}' as root; if it fails, see 'dmesg' (\"disabled by "
                        "bios\" means: enable virtualization in the firmware setup)")
            fw = _firmware_hint()
            if fw:
                return f"{path} does not exist and no KVM module is loaded: {fw}"
            hyper = "hypervisor" in flags
            return (f"{path} does not exist, no KVM module is loaded and the CPU flags show "
                    "neither vmx nor svm: "
                    + ("this machine is itself a guest without nested virtualization; enable "
                       "nested virtualization on its host (e.g. kvm_intel nested=1 / kvm_amd "
                       "nested=1 there, or the cloud's nested-virtualization option)"
                       if hyper else "enable virtualization (VT-x/AMD-V) in the firmware setup")
                    + " (or load a KVM module that needs no VMX/SVM, such as kvm_pvm)")
        if mods == ["kvm"]:
            return (f"only the generic 'kvm' module is loaded; load the vendor module"
                    f" ({vendor or 'kvm_intel or kvm_amd'}) as root; if it fails, virtualization "
                    "may be disabled in the firmware (see dmesg)")
        return (f"{path} does not exist although {', '.join(mods)} is loaded: in a container, "
                f"pass the device in (e.g. 'docker run --device {path}'); otherwise create it as "
                f"root with 'mknod {path} c {KVM_MAJOR} {KVM_MINOR}' or check the udev rules")
    if err in (errno.EACCES, errno.EPERM):
        return _explain_permission(path, err)
    if err in (errno.ENODEV, errno.ENXIO) and not any(m != "kvm" for m in mods):
        # The node is there but no driver answers it: the module is missing.
        return explain(path, errno.ENOENT).replace(f"{path} does not exist", f"{path} exists but",
                                                   1)
    if err in (errno.ENOTTY, errno.ENODEV, errno.ENXIO, errno.EINVAL):
        return f"{path} is not the KVM device (it does not answer KVM_GET_API_VERSION)"
    if err == errno.EISDIR:
        return f"{path} is a directory, not the KVM device"
    if err == errno.EROFS:
        return f"{path} is on a read-only filesystem; KVM needs it opened read-write"
    return f"cannot use {path}"


def _explain_permission(path: str, err: int) -> str:
    who = _user()
    try:
        st = os.stat(path)
    except OSError as e:
        return (f"user {who} may not open {path}, nor look at it ({e.strerror}): a directory "
                "on the way is closed to this user; ask the administrator for access")
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    mode = stat.filemode(st.st_mode)
    where = f"{path} is {mode} owned by {_owner(st.st_uid)}:{group}"
    group_rw = st.st_mode & 0o060 == 0o060
    other_rw = st.st_mode & 0o006 == 0o006
    in_group = st.st_gid in os.getgroups() or st.st_gid == os.getgid()
    listed = who in _members(st.st_gid)
    if other_rw or (group_rw and in_group) or (st.st_uid == os.getuid() and st.st_mode & 0o600 == 0o600):
        # The mode allows it, yet open failed: something outside the mode bits.
        if err == errno.EPERM:
            return (f"{where} and the mode allows user {who}, but the kernel refused (EPERM): "
                    "a device cgroup or seccomp policy forbids it; in a container, start it "
                    f"with the device allowed (e.g. 'docker run --device {path}')")
        return (f"{where} and the mode allows user {who}, but the open was denied: the "
                "filesystem may be mounted 'nodev', or SELinux/AppArmor denies it (see the "
                "audit log)")
    acl = (f"or grant this user an ACL as root: 'setfacl -m u:{who}:rw {path}'")
    if group_rw:
        if listed:
            return (f"user {who} is in group '{group}' but this session is not ({where}): "
                    "log out and in again (or run 'newgrp {0}')".format(group))
        return (f"user {who} may not open it ({where}): add the user to group '{group}' as "
                f"root ('usermod -aG {group} {who}', then log in again), {acl}, or run as root")
    return (f"only {_owner(st.st_uid)} may open it ({where}); as root, give the device to a "
            "group: 'groupadd -f kvm; chgrp kvm {0}; chmod 0660 {0}' (make it last with the "
            "udev rule KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\"), then 'usermod -aG kvm {1}' "
            "and log in again; {2}; or run as root".format(path, who, acl))


def _members(gid: int) -> list[str]:
    try:
        return list(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return []


def _owner(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _user() -> str:
    return _owner(os.getuid())
