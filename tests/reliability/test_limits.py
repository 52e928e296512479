"""Resource limits: the memslot and vCPU limits, fd exhaustion and out-of-memory give a
clear error, and what was created before keeps working.

Measured here: all 32,764 memslots (one shared 4 KiB page mapped 32,764 times) take
about 3 s to fill and 0.3 s to tear down; 1,024 vCPUs take 0.1 s and 2,048 fds.
"""

from __future__ import annotations

import errno
import mmap
import resource

import pytest

import pykvm
from tests.support import guests, procs

OUT_A = bytes.fromhex("b041" "e610" "f4")       # real mode: mov al,'A'; out 0x10,al; hlt


def _real_mode_vcpu(vm, vcpu_id=0):
    v = vm.create_vcpu(vcpu_id)
    guests.set_real_mode(v, 0x1000)
    return v


def test_every_memslot_filled_then_a_clear_error_and_the_vm_still_runs(kvm):
    n = kvm.nr_memslots
    assert n >= 32
    page = mmap.mmap(-1, mmap.PAGESIZE)
    page[:len(OUT_A)] = OUT_A
    import ctypes

    anchor = ctypes.c_char.from_buffer(page)
    addr = ctypes.addressof(anchor)
    vm = kvm.create_vm()
    try:
        for slot in range(n):  # the same host page at every guest page 0 .. n-1
            vm.set_user_memory_region(slot, slot * mmap.PAGESIZE, mmap.PAGESIZE, addr)
        with pytest.raises(pykvm.KvmError) as ei:
            vm.set_user_memory_region(n, n * mmap.PAGESIZE, mmap.PAGESIZE, addr)
        assert ei.value.errno == errno.EINVAL and "slot out of range" in str(ei.value)
        with pytest.raises(pykvm.KvmError) as ei:
            vm.add_memory(0x10000000, 0x1000)
        assert ei.value.errno == errno.ENOSPC and f"all {n} memory slots are in use" in str(ei.value)
        # Earlier slots still work: the guest runs from slot 1 (guest page 1 = our page).
        vcpu = _real_mode_vcpu(vm)
        assert vcpu.run() == pykvm.IoOut(0x10, 1, 1, b"A")
        assert isinstance(vcpu.run(), pykvm.Hlt)
        # Freeing one slot makes room again.
        vm.set_user_memory_region(n - 1, (n - 1) * mmap.PAGESIZE, 0, addr)
        mem = vm.add_memory(0x10000000, 0x1000)
        assert mem.slot == n - 1
    finally:
        vm.close()
        del anchor
        page.close()


def _enough_fds(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def test_vcpu_limit_gives_a_clear_error_and_earlier_vcpus_run(kvm):
    limit = kvm.max_vcpus
    if limit > 4096:
        pytest.skip(f"KVM_CAP_MAX_VCPUS is {limit}: too many to create in a test")
    _enough_fds(2 * limit + 200)
    with kvm.create_vm() as vm:
        mem = vm.add_memory(0, 0x10000)
        mem.write(0x1000, OUT_A)
        vcpus = [vm.create_vcpu(i) for i in range(limit)]
        with pytest.raises(pykvm.KvmError) as ei:
            vm.create_vcpu(limit)
        assert ei.value.errno == errno.EINVAL
        assert "KVM_CREATE_VCPU" in str(ei.value) and "KVM_CAP_MAX_VCPUS" in str(ei.value)
        for v in (vcpus[0], vcpus[-1]):
            guests.set_real_mode(v, 0x1000)
            assert v.run() == pykvm.IoOut(0x10, 1, 1, b"A")
        assert len(vm.vcpus) == limit


def test_vcpu_id_limit(kvm):
    max_id = kvm.check_extension(pykvm.Cap.MAX_VCPU_ID) or kvm.max_vcpus
    with kvm.create_vm() as vm:
        with pytest.raises(pykvm.KvmError) as ei:
            vm.create_vcpu(max_id)
        assert ei.value.errno == errno.EINVAL and "MAX_VCPU_ID" in str(ei.value)
        v = vm.create_vcpu(max_id - 1)
        assert v.id == max_id - 1
        with pytest.raises(pykvm.KvmError) as ei:
            vm.create_vcpu(max_id - 1)
        assert ei.value.errno == errno.EEXIST


FD_CHILD = r'''
import errno, json, resource
import pykvm
from tests.support import guests
kvm = pykvm.Kvm()
vm = kvm.create_vm()
vcpu, = guests.long_mode_vm(vm, guests.HELLO_OUT)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
held, errors = [], []
for _ in range(100):                    # run out of fds, in every way pykvm uses them
    try:
        v = kvm.create_vm()
        held.append(v)
        held.append(v.create_vcpu())
    except pykvm.KvmError as e:
        errors.append((e.errno, e.ioctl, str(e)))
        if len(errors) > 3:
            break
ok = vcpu.run() == pykvm.IoOut(0x10, 1, 1, b"A")   # earlier objects still work
for o in held:
    o.close()
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
with kvm.create_vm() as vm2:                        # and new ones, once fds are free
    v2, = guests.long_mode_vm(vm2, guests.HELLO_OUT)
    ok2 = v2.run() == pykvm.IoOut(0x10, 1, 1, b"A")
print(json.dumps({"errors": errors, "ok": ok, "ok2": ok2}))
'''


def test_running_out_of_fds_is_a_clear_error():
    proc = procs.run_python(FD_CHILD, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["ok"] and res["ok2"]
    assert res["errors"], "never ran out of fds"
    for err, _ioctl, text in res["errors"]:
        assert err == errno.EMFILE, text
        assert "RLIMIT_NOFILE" in text or "could not map" in text, text


MEM_CHILD = r'''
import json, resource
import pykvm
from tests.support import guests
kvm = pykvm.Kvm()
vm = kvm.create_vm()
vcpu, = guests.long_mode_vm(vm, guests.HELLO_OUT)
out = {}
try:
    vm.add_memory(1 << 40, 1 << 46)               # 64 TiB: more than the host will give
except pykvm.KvmError as e:
    out["huge"] = [e.errno, str(e)]
try:
    vm.add_memory(1 << 40, 1 << 63)               # does not even fit the address space
except ValueError as e:
    out["absurd"] = str(e)
with open("/proc/self/statm") as f:
    vsz = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vsz + (32 << 20), resource.RLIM_INFINITY))
try:
    vm.add_memory(1 << 40, 256 << 20)             # over RLIMIT_AS
except pykvm.KvmError as e:
    out["rlimit"] = [e.errno, str(e)]
out["ok"] = vcpu.run() == pykvm.IoOut(0x10, 1, 1, b"A")
out["slots"] = len(vm.memory)
print(json.dumps(out))
'''


def test_out_of_memory_is_a_clear_error_and_the_vm_still_runs():
    proc = procs.run_python(MEM_CHILD, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["ok"] and res["slots"] == 1
    assert res["huge"][0] == errno.ENOMEM and "could not allocate" in res["huge"][1]
    assert "too large" in res["absurd"]
    assert res["rlimit"][0] == errno.ENOMEM


def test_run_without_memory_is_enospc_with_a_hint(vm):
    vcpu = vm.create_vcpu()
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.run()
    assert ei.value.errno == errno.ENOSPC and "memory region" in str(ei.value)
    # and the VM recovers once memory is added
    mem = vm.add_memory(0, 0x10000)
    mem.write(0x1000, OUT_A)
    guests.set_real_mode(vcpu, 0x1000)
    assert vcpu.run() == pykvm.IoOut(0x10, 1, 1, b"A")


def test_too_many_msrs_or_cpuid_entries_in_one_call(vm):
    vcpu = vm.create_vcpu()
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.get_msrs([0x174] * 100000)
    assert ei.value.errno == errno.E2BIG and "at most" in str(ei.value)
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.set_msrs({0x10000 + i: 0 for i in range(1000)})
    assert ei.value.errno == errno.E2BIG
    with pytest.raises(pykvm.KvmError) as ei:
        vcpu.set_cpuid2([pykvm.uapi.kvm_cpuid_entry2()] * 100000)
    assert ei.value.errno == errno.E2BIG and "KVM_MAX_CPUID_ENTRIES" in str(ei.value)
    vcpu.set_msrs({0x174: 8})
    assert vcpu.get_msrs([0x174]) == {0x174: 8}        # the vCPU is fine afterwards


def test_a_forked_child_cannot_use_the_parents_vm_and_is_told_why(vm):
    """KVM ties a VM to the creating process's address space: EIO after fork()."""
    import os

    vcpu, = guests.long_mode_vm(vm, guests.HELLO_OUT)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave without running any Python teardown
        try:
            vcpu.get_regs()
            msg = "no error"
        except pykvm.KvmError as e:
            msg = f"{e.errno} {e}"
        except BaseException as e:
            msg = repr(e)
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert msg.startswith(f"{errno.EIO} ") and "fork" in msg, msg
    assert vcpu.run() == pykvm.IoOut(0x10, 1, 1, b"A")     # the parent is unaffected
