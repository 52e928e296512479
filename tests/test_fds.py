"""fd hygiene: close-on-exec, no leaks, objects reclaimed without close()."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pykvm

from .guests import REAL_MODE_HELLO, real_mode


def _fds() -> dict:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def test_no_kvm_fd_survives_exec(kvm):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu()
    vm.add_memory(0, 0x1000)
    ours = {kvm.fileno(), vm.fileno(), vcpu.fileno()}
    # The child inherits every fd that lacks O_CLOEXEC (close_fds=False), then lists its own.
    child = subprocess.run(
        [sys.executable, "-c",
         "import os\n"
         "for fd in sorted(os.listdir('/proc/self/fd')):\n"
         "    try: print(fd, os.readlink('/proc/self/fd/' + fd))\n"
         "    except OSError: pass\n"],
        close_fds=False, capture_output=True, text=True, check=True)
    listed = {int(line.split()[0]): line.split(None, 1)[1] for line in child.stdout.splitlines()}
    assert not any("kvm" in target for target in listed.values()), listed
    assert not ours & {fd for fd, t in listed.items() if "kvm" in t}
    vm.close()


def test_200_vms_leave_no_fd_behind(kvm):
    before = _fds()
    for i in range(200):
        vm = kvm.create_vm()
        vm.add_memory(0, 0x10000)
        vm.create_vcpu()
        if i % 2:
            vm.close()          # explicit close
        else:
            del vm              # dropped: reclaimed by refcounting / GC
    gc.collect()
    assert _fds() == before


def test_dropped_running_guest_objects_are_reclaimed(kvm):
    before = _fds()
    for _ in range(20):
        vm = kvm.create_vm()
        vcpu = real_mode(vm, REAL_MODE_HELLO, rax=1, rbx=1)
        assert isinstance(vcpu.run(), pykvm.IoOut)
        run_view = vcpu.kvm_run  # a live ctypes view into the run page
        del vm, vcpu
        del run_view
    gc.collect()
    assert _fds() == before
    assert not [t for t in _fds().values() if "kvm-v" in t]


def test_vcpu_fd_names_and_close_order(kvm):
    vm = kvm.create_vm()
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    names = [os.readlink(f"/proc/self/fd/{v.fileno()}") for v in vcpus]
    assert names == ["anon_inode:kvm-vcpu:0", "anon_inode:kvm-vcpu:1"]
    vcpus[0].close()
    # The number may now be reused by anything; the closed object must not touch it.
    r, w = os.pipe()
    try:
        try:
            vcpus[0].get_regs()
        except pykvm.KvmClosedError:
            pass
        else:  # pragma: no cover
            raise AssertionError("closed vCPU issued an ioctl")
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"  # the pipe (maybe on fd0's old number) is untouched
    finally:
        os.close(r)
        os.close(w)
    vm.close()
