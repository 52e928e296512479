"""Memory lifetime: guest RAM stays mapped while KVM can reach it, is unmapped once it
cannot, the kvm_run area is unmapped exactly once, and a live memoryview pins a mapping.
"""

from __future__ import annotations

import gc
import json
import mmap
import re
import shutil
import struct
import subprocess
import sys

import pytest

import pykvm
from tests.support import fdtable, guests, procs

# mov rax, 0x1122334455667788; mov [DATA], rax; out 0x10, al; jmp back to start
STORE = (bytes.fromhex("48b8") + struct.pack("<Q", 0x1122334455667788)
         + bytes.fromhex("48890425") + struct.pack("<I", guests.DATA) + bytes.fromhex("e610ebec"))


def test_registered_memory_stays_mapped_without_a_python_reference(vm):
    vcpu, = guests.long_mode_vm(vm, STORE)
    mem = vm.memory[0]
    addr = mem.userspace_addr
    del mem
    gc.collect()
    assert fdtable.mapped(addr)
    assert isinstance(vcpu.run(), pykvm.IoOut)
    assert vm.read(guests.DATA, 8) == struct.pack("<Q", 0x1122334455667788)


def test_registered_memory_refuses_close_resize_and_with_unmaps_only_after_removal(vm):
    vcpu, = guests.long_mode_vm(vm, STORE)
    mem = vm.memory[0]
    with pytest.raises(ValueError, match="remove_memory"):
        mem.close()
    with pytest.raises(ValueError, match="resized"):
        mem.resize(mmap.PAGESIZE)
    assert not mem.closed and fdtable.mapped(mem.userspace_addr + guests.RAM - 1)
    assert isinstance(vcpu.run(), pykvm.IoOut)
    addr = mem.userspace_addr
    with mem:                     # mmap's own __exit__ would unmap a live memslot
        pass
    assert mem.closed and not mem.registered and vm.memory == []
    assert not fdtable.mapped(addr)
    # The guest's RAM is gone from the VM, not from under it: fetching code is now MMIO
    # (or an emulation failure), never a read of whatever the host maps there next.
    e = vcpu.run()
    assert not isinstance(e, pykvm.IoOut), e


def test_remove_memory_unmaps_and_the_guest_no_longer_sees_it(vm, watchdog):
    vcpu, = guests.long_mode_vm(vm, STORE)
    extra = vm.add_memory(0x400000, 0x10000)
    addr = extra.userspace_addr
    vm.remove_memory(extra)
    assert extra.closed and not extra.registered and not fdtable.mapped(addr)
    with pytest.raises(ValueError, match="not memory of this VM"):
        vm.remove_memory(extra)
    with watchdog(vcpu):
        assert isinstance(vcpu.run(), pykvm.IoOut)


def test_vm_close_unmaps_all_guest_memory(kvm):
    vm = kvm.create_vm()
    mems = [vm.add_memory(i * 0x100000, 0x10000) for i in range(4)]
    addrs = [m.userspace_addr for m in mems]
    vcpu = vm.create_vcpu()
    vm.close()
    assert all(m.closed for m in mems)
    assert not any(fdtable.mapped(a) for a in addrs)
    assert vcpu.closed and not fdtable.kvm_run_mappings()


def test_memoryview_pins_the_mapping_past_remove_and_close(kvm):
    vm = kvm.create_vm()
    mem = vm.add_memory(0, 0x10000)
    mem.write(0x10, b"pinned")
    addr = mem.userspace_addr
    view = memoryview(mem)
    with pytest.raises(BufferError):
        mmap.mmap.close(mem)      # even the unguarded base-class close refuses
    vm.remove_memory(mem)         # the slot is gone, the mapping stays for the view
    assert fdtable.mapped(addr) and bytes(view[0x10:0x16]) == b"pinned"
    mem2 = vm.add_memory(0x100000, 0x10000)
    view2 = memoryview(mem2)[0x20:0x30]  # a slice pins it too
    vm.close()
    assert fdtable.mapped(addr) and fdtable.mapped(mem2.userspace_addr)
    view2[:4] = b"safe"               # writing through the view is harmless: no VM uses it
    assert bytes(view[0x10:0x16]) == b"pinned"
    del view, view2
    gc.collect()
    del mem, mem2
    gc.collect()
    assert not fdtable.mapped(addr)


def test_run_page_views_outlive_the_vcpu_safely(kvm):
    """A view into kvm_run keeps the mapping (and, through the fd CPython's mmap
    holds, the kernel's vCPU) alive; it goes with the last Python reference."""
    vm = kvm.create_vm()
    vcpu, = guests.long_mode_vm(vm, bytes.fromhex("e410"))   # in al, 0x10
    e = vcpu.run()
    assert isinstance(e, pykvm.IoIn)
    run = vcpu.kvm_run
    vcpu.close()
    assert len(fdtable.kvm_run_mappings()) == 1       # pinned by the views
    e.data[:] = b"\x01"                          # inert page, but still mapped: no crash
    assert run.exit_reason == pykvm.ExitReason.IO
    with pytest.raises(pykvm.KvmClosedError):
        vcpu.kvm_run  # noqa: B018 (the attribute access is what raises)
    vm.close()
    del e, run
    gc.collect()
    assert len(fdtable.kvm_run_mappings()) == 1       # the closed Vcpu object still holds it
    del vm, vcpu
    gc.collect()
    assert fdtable.kvm_run_mappings() == []


MUNMAP_CHILD = r'''
import ctypes, gc, json, os
import pykvm
from tests.support import guests
kvm = pykvm.Kvm()
vm = kvm.create_vm()
ring = kvm.check_extension(pykvm.Cap.DIRTY_LOG_RING)
if ring:
    vm.enable_dirty_ring(0x10000)
mem = vm.add_memory(0, guests.RAM)
extra = vm.add_memory(0x400000, 0x10000)
vcpus = guests.long_mode_vm(vm, guests.HELLO_OUT, vcpus=2, mem=mem)
vcpus[0].run()
view = vcpus[1].kvm_run                     # pins vCPU 1's run page past close
runs = [ctypes.addressof(ctypes.c_char.from_buffer(v.run_mmap)) for v in vcpus]
addrs = {"mem": mem.userspace_addr, "extra": extra.userspace_addr, "run0": runs[0], "run1": runs[1]}
if ring:
    rings = [vm.dirty_ring(v) for v in vcpus]
    for i, r in enumerate(rings):
        a = ctypes.c_char.from_buffer(r._mm)
        addrs[f"ring{i}"] = ctypes.addressof(a)
        del a
    rings[0].close(); rings[0].close()      # closed early (idempotent), ring 1 by vm.close()
print(json.dumps(addrs), flush=True)
vm.remove_memory(extra)
vcpus[0].close(); vcpus[0].close()
vm.close(); vm.close()
del view
gc.collect()
del vcpus, mem, extra
if ring:
    del rings
gc.collect()
print("done", flush=True)
'''


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_every_mapping_is_unmapped_exactly_once(tmp_path):
    log = tmp_path / "strace.log"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=mmap,munmap,mremap,write", "-o", str(log),
                           sys.executable, "-c", MUNMAP_CHILD],
                          capture_output=True, text=True, timeout=120, cwd=procs.REPO,
                          env={"PYTHONPATH": procs.REPO, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    addrs = json.loads(proc.stdout.splitlines()[0])
    assert proc.stdout.splitlines()[-1] == "done"
    text = log.read_text()
    assert "mremap" not in text or not any(hex(a) in text for a in addrs.values())
    # Events in order: ("map", addr) when mmap returns addr, ("unmap", addr).  An
    # address may be handed out again after it was freed (malloc, other mmaps):
    # only unmaps between our mapping's creation and the next reuse count.
    events = []
    for line in text.splitlines():
        if re.search(r"\bwrite\(1, \"\{", line):
            events.append(("printed", 0))  # the child printed the addresses: all ours are mapped
            continue
        m = re.search(r"\bmmap\(.*\)\s+= (0x[0-9a-f]+)", line)
        if m:
            events.append(("map", int(m.group(1), 16)))
            continue
        m = re.search(r"\bmunmap\((0x[0-9a-f]+), (\d+)\)\s+= 0", line)
        if m:
            events.append(("unmap", int(m.group(1), 16)))
    printed = events.index(("printed", 0))
    for name, addr in addrs.items():
        # Ours is the last mmap returning addr before the print; count unmaps until reuse.
        ours = max(i for i, e in enumerate(events[:printed]) if e == ("map", addr))
        hits = 0
        for kind, a in events[ours + 1:]:
            if a != addr:
                continue
            if kind == "map":
                break
            hits += 1
        assert hits == 1, f"{name} at {addr:#x} unmapped {hits} times"
