"""Hostile guests: random programs and register states never take the process down,
and faults come back as typed exits with the vCPU state still readable.

The fuzz itself runs in a child process (``tests/reliability/fuzz_guests.py``) so
that a crash of the interpreter is a failed test, not a dead test runner.
CI runs ``FUZZ_CI_COUNT`` cases (about 20 s here); set ``PYKVM_FUZZ_COUNT`` for
long runs, e.g. ``PYKVM_FUZZ_COUNT=100000 pytest tests/reliability -k fuzz``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pykvm
from pykvm import uapi
from tests.support import guests, procs

#: Cases per CI run (documented in docs/safety.md).
FUZZ_CI_COUNT = 4000
FUZZ_SEED = int(os.environ.get("PYKVM_FUZZ_SEED", "20261125"))

ALLOWED = {"Shutdown", "InternalError", "FailEntry", "Hlt", "timeout", "exit-budget",
           "Debug", "SystemEvent", "Hypercall", "MemoryFault", "Unknown", "X86Rdmsr",
           "X86Wrmsr", "IrqWindowOpen", "Exception_", "Notify", "X86BusLock"}


def _run_fuzz(count: int, seed: int, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=procs.REPO)
    proc = subprocess.run([sys.executable, "-m", "tests.reliability.fuzz_guests", "--count",
                           str(count), "--seed", str(seed), *extra],
                          capture_output=True, text=True, env=env, cwd=procs.REPO,
                          timeout=max(300, count / 20))
    assert proc.returncode == 0, (
        f"fuzz child died (returncode {proc.returncode}, seed {seed}); "
        f"replay with PYKVM_FUZZ_TRACE=1 python -m tests.reliability.fuzz_guests "
        f"--count {count} --seed {seed}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def test_fuzz_random_guests_never_kill_the_process():
    count = int(os.environ.get("PYKVM_FUZZ_COUNT", FUZZ_CI_COUNT))
    result = _run_fuzz(count, FUZZ_SEED)
    print(f"\nfuzz: {json.dumps(result)}")
    assert result["cases"] == count
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == count
    unexpected = {k: v for k, v in outcomes.items()
                  if k not in ALLOWED and not k.startswith(("setup:", "run:"))}
    assert not unexpected, unexpected
    # errors from KVM are fine, but only the ones KVM documents for bad state
    errors = {k for k in outcomes if k.startswith(("setup:", "run:"))}
    assert errors <= {"setup:EINVAL", "run:EINVAL", "run:EFAULT", "run:ENOEXEC",
                      "run:EOPNOTSUPP", "run:ENOSPC"}, errors
    # the mix is really hostile: faults and timeouts both happen
    assert outcomes.get("Shutdown", 0) + outcomes.get("InternalError", 0) > count // 4
    assert outcomes.get("timeout", 0) > 0
    assert set(result["modes"]) == {"real", "long0", "long3", "long3-iopl3"}


def test_fuzz_with_heavy_register_corruption():
    """Half of the cases with corrupted segment/control registers, fewer of them."""
    result = _run_fuzz(400, FUZZ_SEED + 1, "--sregs-fraction", "0.9")
    assert result["cases"] == 400


# ---- faults are reported, with the vCPU state readable afterwards -----------------------

def _fault(vm, code: str, cpl: int):
    vcpu, = guests.long_mode_vm(vm, bytes.fromhex(code), cpl=cpl)
    return vcpu, vcpu.run()


@pytest.mark.parametrize("cpl", [0, 3])
def test_triple_fault_is_a_shutdown_exit_with_state_readable(vm, cpl):
    vcpu, e = _fault(vm, "0f0b", cpl)              # ud2 with no IDT: #UD -> #DF -> triple fault
    # VMX/SVM report SHUTDOWN; a CPL0 emulator may give up first (INTERNAL_ERROR).
    assert isinstance(e, (pykvm.Shutdown, pykvm.InternalError)), e
    assert e.reason in (pykvm.ExitReason.SHUTDOWN, pykvm.ExitReason.INTERNAL_ERROR)
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    assert regs.rip == guests.CODE and sregs.cs.dpl == cpl
    # A dead guest stays dead but harmless: running again gives another exit, not a hang.
    vcpu.kick()
    assert isinstance(vcpu.run(), pykvm.Exit)


def test_emulation_failure_is_an_internal_error_with_the_instruction(vm):
    vcpu, e = _fault(vm, "0f38f0c0", 0)            # movbe eax, eax: not emulated at CPL0 here
    if not isinstance(e, pykvm.InternalError):
        pytest.skip(f"this host runs movbe at CPL0 ({e!r})")
    assert e.suberror == uapi.KVM_INTERNAL_ERROR_EMULATION
    assert e.description == "emulation failure"
    assert e.insn_bytes.startswith(bytes.fromhex("0f38f0c0"))
    assert "InternalError" in repr(e) and "suberror" in repr(e)
    assert vcpu.get_regs().rip == guests.CODE


def test_failed_entry_from_bad_state_is_an_error_not_a_crash(vm):
    """State KVM cannot enter with is refused by SET_SREGS or reported by KVM_RUN."""
    vcpu, = guests.long_mode_vm(vm, guests.HELLO_OUT)
    s = vcpu.get_sregs()
    s.cr0 &= ~1                                       # paging without protection: invalid
    try:
        vcpu.set_sregs(s)
    except pykvm.KvmError as err:
        assert "KVM_SET_SREGS" in str(err) and err.hint
        return
    try:
        e = vcpu.run()
    except pykvm.KvmError as err:
        assert "KVM_RUN" in str(err)
    else:
        assert isinstance(e, (pykvm.FailEntry, pykvm.InternalError, pykvm.Shutdown)), e


@pytest.mark.parametrize("code,cpl,reason,words", [
    ("0f0b", 0, ("shutdown", "internal-error"), ["CPL 0", "0f 0b"]),      # ud2, no IDT
    ("31c9f7f1", 3, ("shutdown",), ["CPL 3", "f7 f1"]),                  # div by zero at CPL3
    ("0f38f0c0", 0, ("internal-error", "shutdown"), ["0f 38 f0 c0"]),    # movbe: emulation failure here
])
def test_fatal_stops_are_reported_with_the_vcpu_state(vm, code, cpl, reason, words):
    """The run loop turns triple faults, emulation failures and internal errors into a
    GuestError whose text is the vCPU state: mode, CPL, registers, the bytes at RIP."""
    from pykvm.x86.runloop import GuestError, RunLoop

    vcpu, = guests.long_mode_vm(vm, bytes.fromhex(code), cpl=cpl)
    with pytest.raises(GuestError) as ei:
        RunLoop(vcpu).run(timeout=10)
    stop = ei.value.stop
    assert stop.reason in reason, stop
    text = str(ei.value)
    assert "long 64-bit" in text and "rip=0x1000" in text and f"cr0={guests.CR0:#x}" in text, text
    for w in words:
        assert w in text, text
    assert "rax=" in text and "rsp=" in text
    if stop.reason == "internal-error":
        assert "emulation failure" in text


def test_next_vm_works_after_thousands_of_dead_guests_in_this_process(kvm):
    """In-process: 200 quick hostile guests, then a normal guest in a fresh VM."""
    import random

    from . import fuzz_guests

    kicks = fuzz_guests.Kicks()
    rng = random.Random(7)

    class A:
        timeout_ms, max_exits, sregs_fraction = 20.0, 16, 0.25
    for _ in range(200):
        fuzz_guests.run_case(kvm, kicks, rng, A, kvm.msr_index_list())
    fuzz_guests.sanity(kvm)
