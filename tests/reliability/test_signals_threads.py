"""Signals and threads: kick() and Ctrl-C stop spinning guests, EINTR is an exit,
vCPUs run in parallel with the GIL released, and one vCPU never runs in two threads.

"Promptly" means within a generous timeout (join(10)), never a timing assert.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

import pykvm
from pykvm import _kick
from tests.support import guests, procs


class Runner(threading.Thread):
    """Run a vCPU once in a thread; keep the exit or the exception."""

    def __init__(self, vcpu: pykvm.Vcpu, method: str = "run") -> None:
        super().__init__(daemon=True)
        self.vcpu, self.method = vcpu, method
        self.result = self.error = None
        self.started = threading.Event()

    def run(self) -> None:
        self.started.set()
        try:
            self.result = getattr(self.vcpu, self.method)()
        except BaseException as e:
            self.error = e


def _wait_inside_run(vcpu: pykvm.Vcpu, runner: Runner) -> None:
    """Wait until *runner* is really inside KVM_RUN (or has finished)."""
    runner.started.wait(10)
    deadline = time.monotonic() + 10
    while vcpu._thread is None and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)  # past the lock, into the ioctl


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("method", ["run", "run_raw"])
def test_kick_stops_a_spinning_guest(vm, cpl, method):
    """CPL0 spins in KVM's emulator here, CPL3 natively: both must stop."""
    vcpu, = guests.long_mode_vm(vm, guests.SPIN, cpl=cpl)
    r = Runner(vcpu, method)
    r.start()
    _wait_inside_run(vcpu, r)
    assert r.is_alive()
    vcpu.kick()
    r.join(10)
    assert not r.is_alive(), "kick() did not stop the guest"
    assert r.error is None
    assert r.result in (pykvm.Interrupted(), pykvm.ExitReason.INTR)
    assert vcpu.get_regs().rip == guests.CODE
    # The vCPU is usable afterwards: run it to a real exit.
    vm.write(guests.CODE, guests.HELLO_OUT)
    if cpl == 3:
        r = vcpu.get_regs()
        r.rflags |= guests.RFLAGS_IOPL3
        vcpu.set_regs(r)
    assert vcpu.run() == pykvm.IoOut(0x10, 1, 1, b"A")


def test_vmcall_at_cpl0_hang_is_broken_by_kick(vm):
    """On this host vmcall at CPL0 never returns to user space unless kicked."""
    vcpu, = guests.long_mode_vm(vm, bytes.fromhex("0f01c1" "0f01d9" "f4"))  # vmcall; vmmcall; hlt
    r = Runner(vcpu)
    r.start()
    r.join(1.0)
    if r.is_alive():
        vcpu.kick()
        r.join(10)
    assert not r.is_alive() and r.error is None, r.error
    assert isinstance(r.result, pykvm.Exit)


def test_immediate_exit_and_kick_before_run(vm):
    vcpu, = guests.long_mode_vm(vm, guests.SPIN)
    vcpu.immediate_exit = True
    assert vcpu.run() == pykvm.Interrupted()
    assert not vcpu.immediate_exit
    vcpu.kick()
    assert vcpu.run_raw() == pykvm.ExitReason.INTR


def test_eintr_from_any_signal_is_an_interrupted_exit_not_an_exception(vm):
    """A signal with a Python handler (main thread) and a plain C-level signal in a
    worker thread: KVM_RUN returns EINTR, run() returns Interrupted."""
    vcpu, = guests.long_mode_vm(vm, guests.SPIN, cpl=3)
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda *a: seen.append(a[0]))
    try:
        # main thread runs; a helper thread sends SIGUSR1 to it
        main = threading.get_ident()
        timer = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGUSR1))
        timer.start()
        e = vcpu.run()
        timer.join()
        assert e == pykvm.Interrupted()
        assert seen == [signal.SIGUSR1]  # the Python handler ran too
        # worker thread runs; the signal interrupts it there (the handler runs in main)
        r = Runner(vcpu)
        r.start()
        _wait_inside_run(vcpu, r)
        signal.pthread_kill(r.ident, signal.SIGUSR1)
        r.join(10)
        assert not r.is_alive()
        assert r.error is None and r.result == pykvm.Interrupted()
    finally:
        signal.signal(signal.SIGUSR1, old)


class Boom(Exception):
    pass


def test_exception_from_a_signal_handler_propagates_and_leaves_vcpu_usable(vm):
    vcpu, = guests.long_mode_vm(vm, guests.SPIN, cpl=3)

    def handler(*a):
        raise Boom("from the handler")

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        main = threading.get_ident()
        timer = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGUSR1))
        timer.start()
        with pytest.raises(Boom):
            vcpu.run()
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    vcpu.kick()
    assert vcpu.run() == pykvm.Interrupted()   # not EBUSY: the run lock was released


SIGINT_CHILD = r'''
import sys, os
import pykvm
from tests.support import guests
kvm = pykvm.Kvm()
vm = kvm.create_vm()
vcpu, = guests.long_mode_vm(vm, guests.SPIN, cpl=int(sys.argv[1]))
print("spinning", flush=True)
try:
    while True:
        vcpu.run()          # an Interrupted exit would just loop: only Ctrl-C ends this
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
vcpu.immediate_exit = True
assert vcpu.run() == pykvm.Interrupted()   # still usable, lock released
print("regs", hex(vcpu.get_regs().rip), flush=True)
vm.close(); kvm.close()
print("clean exit", flush=True)
'''


@pytest.mark.parametrize("cpl", [0, 3])
def test_ctrl_c_stops_a_spinning_guest_in_the_main_thread(cpl):
    env = dict(os.environ, PYTHONPATH=procs.REPO)
    child = subprocess.Popen([sys.executable, "-c", SIGINT_CHILD, str(cpl)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=procs.REPO)
    try:
        assert child.stdout.readline().strip() == "spinning"
        time.sleep(0.3)
        # One SIGINT is enough unless it lands in the few instructions between the
        # interpreter's last signal check and the KVM_RUN syscall (docs/safety.md),
        # so repeat it until the child reacts.
        for _ in range(20):
            child.send_signal(signal.SIGINT)
            try:
                out, err = child.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            raise AssertionError("Ctrl-C did not stop the guest")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert out.splitlines() == ["KeyboardInterrupt", f"regs {guests.CODE:#x}", "clean exit"], (out, err)
    assert "Traceback" not in err


def test_vcpus_run_in_parallel_with_the_gil_released(vm):
    """Two vCPUs spin at CPL3 (native speed) counting in guest memory while the main
    thread keeps counting in Python: all three make progress at the same time."""
    vcpus = guests.long_mode_vm(vm, guests.COUNT_LOOP, cpl=3, vcpus=2)
    for i, v in enumerate(vcpus):
        r = v.get_regs()
        r.rbx = guests.DATA + 8 * i
        v.set_regs(r)
    runners = [Runner(v) for v in vcpus]
    for r in runners:
        r.start()
    try:
        for v, r in zip(vcpus, runners, strict=False):
            _wait_inside_run(v, r)
        before = struct.unpack("<QQ", vm.read(guests.DATA, 16))
        n = 0
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            n += 1
        after = struct.unpack("<QQ", vm.read(guests.DATA, 16))
        assert all(r.is_alive() for r in runners)
    finally:
        for v in vcpus:
            v.kick()
        for r in runners:
            r.join(10)
    assert not any(r.is_alive() for r in runners)
    assert [r.result for r in runners] == [pykvm.Interrupted()] * 2
    assert n > 1000, "the main thread was starved: is the GIL held in KVM_RUN?"
    assert after[0] > before[0] and after[1] > before[1], (before, after)


def test_many_vcpus_in_many_threads_all_stop(vm):
    vcpus = guests.long_mode_vm(vm, guests.SPIN, cpl=3, vcpus=8)
    runners = [Runner(v) for v in vcpus]
    for r in runners:
        r.start()
    for v, r in zip(vcpus, runners, strict=False):
        _wait_inside_run(v, r)
    for v in vcpus:
        v.kick()
    for r in runners:
        r.join(10)
    assert [r.result for r in runners] == [pykvm.Interrupted()] * 8


@pytest.mark.parametrize("method", ["run", "run_raw"])
def test_second_thread_on_the_same_vcpu_is_refused(vm, method):
    vcpu, = guests.long_mode_vm(vm, guests.SPIN, cpl=3)
    r = Runner(vcpu)
    r.start()
    _wait_inside_run(vcpu, r)
    try:
        for _ in range(3):
            with pytest.raises(pykvm.KvmError) as ei:
                getattr(vcpu, method)()
            assert ei.value.errno == errno.EBUSY and "another thread" in str(ei.value)
        assert r.is_alive()  # the refused call did not disturb the running one
    finally:
        vcpu.kick()
        r.join(10)
    assert r.result == pykvm.Interrupted()


def test_register_access_from_another_thread_waits_for_the_run(vm):
    """KVM serialises vCPU ioctls: get_regs() from a second thread blocks until run()
    returns (documented); a kick releases both."""
    vcpu, = guests.long_mode_vm(vm, guests.SPIN, cpl=3)
    r = Runner(vcpu)
    r.start()
    _wait_inside_run(vcpu, r)
    g = Runner(vcpu, "get_regs")
    g.start()
    g.join(0.3)
    blocked = g.is_alive()
    vcpu.kick()
    r.join(10)
    g.join(10)
    assert not r.is_alive() and not g.is_alive()
    assert g.error is None and g.result.rip == guests.CODE
    assert blocked or g.result is not None


def test_kick_works_even_if_the_signal_was_ignored():
    """SIG_IGN is inherited across exec; pykvm must replace it, or kick() is a no-op."""
    code = r'''
import signal, threading, sys
import pykvm
from pykvm import _kick
signal.signal(_kick.KICK_SIGNAL, signal.SIG_IGN)
from tests.support import guests
vm = pykvm.Kvm().create_vm()
v, = guests.long_mode_vm(vm, guests.SPIN, cpl=3)
res = []
t = threading.Thread(target=lambda: res.append(v.run()), daemon=True)
t.start(); t.join(0.3); v.kick(); t.join(10)
print("stopped" if not t.is_alive() else "spinning", res)
sys.stdout.flush(); import os; os._exit(0)
'''
    proc = procs.run_python(code, timeout=60)
    assert proc.stdout.strip() == "stopped [Interrupted()]", (proc.stdout, proc.stderr)


def test_kick_handler_is_restored_if_reset_to_default():
    """SIG_DFL on a real-time signal terminates the process: a new vCPU re-installs the
    handler.  In a child, so that a regression kills the child, not the test runner."""
    code = r'''
import signal, threading, sys, os
import pykvm
from pykvm import _kick
from tests.support import guests
vm = pykvm.Kvm().create_vm()
guests.long_mode_vm(vm, guests.SPIN, cpl=3)                  # installs the handler
signal.signal(_kick.KICK_SIGNAL, signal.SIG_DFL)   # someone resets it
vm2 = pykvm.Kvm().create_vm()
v, = guests.long_mode_vm(vm2, guests.SPIN, cpl=3)            # a new vCPU puts it back
res = []
t = threading.Thread(target=lambda: res.append(v.run()), daemon=True)
t.start(); t.join(0.3); v.kick(); t.join(10)
print("stopped" if not t.is_alive() else "spinning", res)
sys.stdout.flush(); os._exit(0)
'''
    proc = procs.run_python(code, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.strip() == "stopped [Interrupted()]", (proc.stdout, proc.stderr)


def test_close_from_another_thread_stops_the_running_guest(kvm):
    """KVM_RUN holds its own reference to the vCPU, so closing the fd does not stop it.

    Without a kick-and-wait in close(), the guest keeps running while Vm.close()
    unmaps its RAM (KVM then faults on, or writes into, whatever the host maps at
    that address next) and run() finally dies on a released memoryview.
    """
    vm = kvm.create_vm()
    vcpu, = guests.long_mode_vm(vm, guests.SPIN, cpl=3)
    r = Runner(vcpu)
    r.start()
    _wait_inside_run(vcpu, r)
    closer = threading.Thread(target=vm.close, daemon=True)
    closer.start()
    r.join(5)
    stopped = not r.is_alive()
    if not stopped:  # rescue the thread: signal it directly (kick() refuses, fd is closed)
        signal.pthread_kill(r.ident, _kick.KICK_SIGNAL)
        r.join(10)
    closer.join(10)
    assert stopped, "run() kept spinning after its vCPU was closed"
    assert r.result == pykvm.Interrupted() or isinstance(r.error, pykvm.KvmClosedError), r.error


OUT_LOOP = bytes.fromhex("e610" "ebfc")   # out 0x10, al; jmp back: an exit every iteration


def test_close_racing_a_busy_run_loop_gives_only_closed_errors(kvm):
    import random

    rng = random.Random(5)
    problems = []
    for _ in range(100):
        vm = kvm.create_vm()
        vcpu, = guests.long_mode_vm(vm, OUT_LOOP)
        errs = []

        def loop(vcpu=vcpu, errs=errs):
            try:
                while True:
                    vcpu.run()
            except pykvm.KvmClosedError:
                pass
            except BaseException as e:
                errs.append(repr(e))

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        time.sleep(rng.random() * 0.003)
        vm.close()
        t.join(10)
        assert not t.is_alive(), "run() loop survived vm.close()"
        problems += errs
    assert not problems, problems[:5]


@pytest.mark.parametrize("disposition", ["SIG_DFL", "SIG_IGN"])
def test_kick_after_the_signal_is_reset_is_a_clear_error_then_works_again(disposition):
    """A program resets the kick signal *after* the vCPU exists: kick() must neither kill
    the process (SIG_DFL) nor silently do nothing (SIG_IGN).  It raises KvmError naming the
    signal; once a handler is back (ensure_kick_handler), the same kick stops the guest."""
    code = rf'''
import signal, threading, sys, os, time
import pykvm, pykvm.vcpu
from pykvm import _kick
from tests.support import guests
vm = pykvm.Kvm().create_vm()
v, = guests.long_mode_vm(vm, guests.SPIN, cpl=3)
res = []
t = threading.Thread(target=lambda: res.append(v.run()), daemon=True)
t.start()
while v._thread is None: time.sleep(0.001)
time.sleep(0.2)  # past the lock, into KVM_RUN (else immediate_exit alone stops it)
signal.signal(_kick.KICK_SIGNAL, signal.{disposition})
try:
    v.kick(); print("no error")
except pykvm.KvmError as e:
    print("error", e.errno, e.ioctl, "{disposition}" in str(e), v.immediate_exit)
t.join(0.3); print("spinning" if t.is_alive() else "stopped")
pykvm.vcpu.ensure_kick_handler()
v.kick(); t.join(10)
print("stopped" if not t.is_alive() else "spinning", res)
sys.stdout.flush(); os._exit(0)
'''
    proc = procs.run_python(code, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.split("\n")[:3] == [
        f"error {errno.EINVAL} kick True True", "spinning", "stopped [Interrupted()]"], (proc.stdout, proc.stderr)


def test_forked_child_closes_an_inherited_vcpu_without_hanging_or_touching_the_parent(vm):
    """fork() while a parent thread is inside run() (holding the run lock): in the child the
    vCPU is inert; kick() refuses instead of writing the shared run page and close() returns
    at once.  The parent's vCPU keeps running untouched and still stops on a kick."""
    import warnings

    vcpu, = guests.long_mode_vm(vm, guests.SPIN, cpl=3)
    r = Runner(vcpu)
    r.start()
    _wait_inside_run(vcpu, r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: on purpose
        pid = os.fork()
    if pid == 0:  # the child: only os._exit leaves it
        status = 1
        try:
            try:
                vcpu.kick()
                status = 2  # kick wrote into the parent's run page
            except pykvm.KvmError as e:
                if e.errno == errno.EBADF:
                    vcpu.close()  # would hang on the run lock held by the parent's thread
                    vm.close()
                    status = 0 if vcpu.closed else 3
        finally:
            os._exit(status)
    deadline = time.monotonic() + 30  # hang detection, not a timing assertion
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done and os.waitstatus_to_exitcode(status) == 0, "child hung or failed"
    assert r.is_alive() and not vcpu.immediate_exit  # the parent's guest still runs, untouched
    vcpu.kick()
    r.join(10)
    assert not r.is_alive() and isinstance(r.result, pykvm.Interrupted)
