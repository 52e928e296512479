"""Use after close: every method of a closed object raises, and no system call ever
reaches the fd number it used to own (the number is reused by another file here).

Checked with strace on a child process, so *every* syscall counts (ioctl, pread,
mmap, close ...), not just the ones pykvm routes through its ioctl helper.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

import pykvm
from tests.support import procs

CHILD = r'''
import faulthandler, json, os, sys
faulthandler.dump_traceback_later(120, exit=True)
import pykvm
from tests.reliability.support_zoo import build_zoo, public_methods, synth_args
from pykvm.fd import FdObject

kvm = pykvm.Kvm()
zoo = build_zoo(kvm)
numbers = {k: o.fileno() for k, o in zoo.items() if isinstance(o, FdObject)}
objs = {k: o for k, o in zoo.items() if k != "mem"}   # + dirty ring, coalesced ring
vcpu = zoo["vcpu"]
vcpu.run()                      # a vCPU that has run (run page in use)
view = vcpu.kvm_run             # and a live view of its run page
for k in ("vcpu", "vm-stats", "vcpu-stats"):
    objs[k].close()
objs["vm"].close()              # closes what is left of the VM's children
for o in objs.values():
    if hasattr(o, "close"):
        o.close()
# Every old number now names another file.
null = os.open("/dev/null", os.O_RDWR)
for n in numbers.values():
    os.dup2(null, n)
outcomes = {}
os.stat("/pykvm-strace-begin") if os.path.exists("/pykvm-strace-begin") else None
for kind, obj in objs.items():
    for name in public_methods(obj):
        try:
            attr = getattr(obj, name)
            if callable(attr):
                attr(*synth_args(attr))
            outcome = "ok"
        except pykvm.KvmClosedError:
            outcome = "closed"
        except Exception as e:
            outcome = type(e).__name__ + ": " + str(e)[:80]
        outcomes[f"{kind}.{name}"] = outcome
os.stat("/pykvm-strace-end") if os.path.exists("/pykvm-strace-end") else None
print(json.dumps({"numbers": numbers, "outcomes": outcomes}))
'''

# Methods that may work after close because they touch no fd: pure Python state,
# cached values, zero-length requests, and fields of the run page (it stays mapped
# while a view of it is alive, and is then inert).  The strace check above is what
# proves they reached no fd.
ALLOWED_OK = {"close", "closed", "inherited", "id", "vm", "path", "memory", "vcpus", "names", "descriptors",
              "header", "name_size", "data_size", "as_dict", "vcpu_mmap_size", "max_memslots",
              "read", "immediate_exit", "if_flag", "ready_for_interrupt_injection",
              "request_interrupt_window", "pre_fault_memory", "size", "flags", "dev_type",
              "nonblocking", "vcpu_id", "entries", "type", "name"}
# Methods with a pending fix elsewhere (none at the moment).
KNOWN: set = set()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_closed_objects_never_touch_their_old_fd_numbers(tmp_path):
    log = tmp_path / "strace.log"
    code = CHILD
    proc = procs.run_python(f"import sys; sys.argv=['x']\n{code}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    # Again under strace (the first run is a plain sanity check of the script itself).
    import os
    import subprocess
    import sys as _sys

    env = dict(os.environ, PYTHONPATH=procs.REPO)
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(log), _sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=300, env=env, cwd=procs.REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    numbers = set(result["numbers"].values())
    lines = log.read_text().splitlines()
    begin = next(i for i, ln in enumerate(lines) if "/pykvm-strace-begin" in ln)
    end = next(i for i, ln in enumerate(lines) if "/pykvm-strace-end" in ln)
    window = lines[begin:end]
    assert len(window) > 0
    touched = []
    for ln in window:
        m = re.match(r"^\d+\s+(\w+)\((.*)", ln)
        if not m:
            continue
        call, args = m.groups()
        first = re.match(r"(-?\d+)[,)]", args)
        if first and int(first.group(1)) in numbers and call not in ("newfstatat", "stat"):
            touched.append(ln)
        if call == "mmap":
            parts = [a.strip() for a in args.split(",")]
            if len(parts) >= 5 and parts[4].lstrip("-").isdigit() and int(parts[4]) in numbers:
                touched.append(ln)
    assert not touched, "syscalls on closed objects' fd numbers:\n" + "\n".join(touched[:20])
    outcomes = result["outcomes"]
    bad = {k: v for k, v in outcomes.items()
           if v != "closed" and not (v == "ok" and k.split(".", 1)[1] in ALLOWED_OK)
           and not v.startswith(("ValueError", "TypeError", "KeyError")) and k not in KNOWN}
    assert not bad, json.dumps(bad, indent=1)
    # Most methods must say "closed" (the arguments we made up are type-correct).
    closed = sum(v == "closed" for v in outcomes.values())
    assert closed >= len(outcomes) // 2, outcomes


def test_closed_vm_says_closed_before_anything_else(kvm):
    vm = kvm.create_vm()
    vm.create_vcpu(0)
    vm.close()
    with pytest.raises(pykvm.KvmClosedError):
        vm.create_vcpu(0)


def test_closed_eventfd_says_closed():
    from pykvm.eventfd import EventFd

    e = EventFd()
    e.close()
    with pytest.raises(pykvm.KvmClosedError):
        e.write(1)
    with pytest.raises(pykvm.KvmClosedError):
        e.read()
