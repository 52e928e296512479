"""The GDB stub, driven by the real gdb (batch mode) and by a minimal protocol client.

gdb must be installed (Debian package ``gdb``); without it these tests fail
with a message saying so rather than skip, because CI machines have it.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

import pykvm
from pykvm import gdbstub, x86
from pykvm.gdbstub import REGISTERS, GdbStub, debug_support, kvm_translate

from .support_client import Client
from .support_guest import (
    AFTER_BP,
    BP_HERE,
    CODE,
    CODE_ALIAS,
    DATA_PA,
    DATA_PA2,
    DATA_VA,
    EXPECTED,
    OUT_DIGIT,
    PORT_EXIT,
    PORT_OUT,
    SPIN,
    STACK_TOP,
    ServedGuest,
    build_guest,
)

# ---------------------------------------------------------------------------
# helpers

@pytest.fixture(scope="module")
def gdb() -> str:
    path = shutil.which("gdb")
    if path is None:
        pytest.fail("gdb is not installed: the gdbstub tests drive the real gdb; "
                    "install it (Debian/Ubuntu: apt-get install gdb)")
    return path


def _where(address) -> str:
    return address if isinstance(address, str) else "{}:{}".format(*address)


def _gdb(gdb: str, address, *commands: str, timeout: float = 60) -> str:
    args = [gdb, "-nx", "-batch", "-ex", "set architecture i386:x86-64",
            "-ex", f"target remote {_where(address)}"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return p.stdout + p.stderr


def _run_plain(kvm: pykvm.Kvm, vm: pykvm.Vm) -> bytes:
    """Run the guest without a debugger (the reference output), under a watchdog."""
    out = bytearray()
    vcpu = vm.vcpus[0]
    with vcpu.kick_after(30):                                  # a hung guest ends as Interrupted
        for _ in range(1000):
            ex = vcpu.run()
            if isinstance(ex, pykvm.IoOut) and ex.port == PORT_OUT:
                out += ex.data
            elif isinstance(ex, pykvm.IoOut) and ex.port == PORT_EXIT:
                return bytes(out)
            else:
                raise AssertionError(ex)
    raise AssertionError("guest did not finish")


@pytest.fixture
def served(kvm):
    """(ServedGuest, Client) for the guest at its start; the session is torn down after."""
    vm = build_guest(kvm)
    with ServedGuest(vm) as g:
        c = Client(g.address)
        try:
            yield g, c
        finally:
            c.close()
    vm.close()


# ---------------------------------------------------------------------------
# the acceptance test: real gdb

def test_gdb_breakpoint_step_modify_continue(kvm, gdb) -> None:
    with build_guest(kvm) as vm:
        assert _run_plain(kvm, vm) == EXPECTED                 # undebugged: rbx = 5
    with build_guest(kvm) as vm, ServedGuest(vm) as g:
        out = _gdb(gdb, g.address,
                   f"break *{BP_HERE:#x}", "continue",
                   "info registers rip rbx",
                   f"x/s {DATA_VA:#x}",                        # virtual: page tables map it
                   "stepi", "p/x $rip", "p/x $rax",         # lea eax,[rbx+0x30] ran: '5'
                   "set $rax = $rax + 2",                  # modify a register: '7'

                   f"set {{char}}{DATA_VA + 0x11:#x} = 'A'",   # guest memory write
                   "continue")
        end = g.join()
        guest_output = bytes(g.output)
    assert f"Breakpoint 1, 0x{BP_HERE:016x} in ?? ()" in out, out
    assert re.search(rf"rip\s+0x{BP_HERE:x}\s", out), out
    assert re.search(r"rbx\s+0x5\s+5", out), out
    assert f'{DATA_VA:#x}:\t"hello gdb: "' in out, out
    assert f"$1 = {AFTER_BP:#x}" in out and "$2 = 0x35" in out, out
    assert "exited normally" in out, out
    assert end == gdbstub.SessionEnd("exited", 0)
    assert guest_output == b"hello gdb: 7 And bye\n"         # the modified register and memory


def test_gdb_hardware_breakpoint_registers_and_disassembly(kvm, gdb) -> None:
    with build_guest(kvm) as vm, ServedGuest(vm) as g:
        sregs = vm.vcpus[0].get_sregs()
        out = _gdb(gdb, g.address,
                   f"hbreak *{OUT_DIGIT:#x}", "continue",
                   "p/x $rax", "x/2i $pc",
                   "info registers cr0 cr3 cr4 efer fs_base eflags cs",
                   "p $xmm0.uint128", "p/x $mxcsr",
                   "set $rax = 0x39",
                   "delete", "stepi", "p/x $pc",
                   "continue")
        end = g.join()
        guest_output = bytes(g.output)
    assert "Hardware assisted breakpoint 1" in out, out
    assert f"Breakpoint 1, 0x{OUT_DIGIT:016x}" in out, out
    assert "$1 = 0x35" in out, out                            # '0' + 5
    assert re.search(r"=> 0x10018:\s+out\s+%al,\(%dx\)", out), out
    assert re.search(rf"cr0\s+{sregs.cr0:#x}\s", out) and re.search(rf"cr3\s+{sregs.cr3:#x}\s", out), out
    assert re.search(rf"efer\s+{sregs.efer:#x}\s", out) and re.search(r"cs\s+0x8\s", out), out
    assert "$2 = 0" in out and re.search(r"\$3 = 0x[0-9a-f]+", out), out
    assert f"$4 = {OUT_DIGIT + 1:#x}" in out, out             # stepped over the OUT exactly once
    assert end.reason == "exited"
    assert guest_output == b"hello gdb: 9 and bye\n"


def test_gdb_ctrl_c_interrupts_a_running_guest(kvm, gdb) -> None:
    with build_guest(kvm, entry=SPIN) as vm:
        log: list[str] = []
        with ServedGuest(vm, log=log) as g:
            args = [gdb, "-nx", "-batch", "-ex", "set architecture i386:x86-64",
                    "-ex", f"target remote {_where(g.address)}", "-ex", "continue",
                    "-ex", "p/x $pc", "-ex", "p $rcx > 100", "-ex", "kill"]
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.monotonic() + 20
                while "<- b'c'" not in log and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.2)                                 # let the guest spin a while
                p.send_signal(signal.SIGINT)                    # Ctrl-C: gdb sends \x03
                out, _ = p.communicate(timeout=30)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            end = g.join()
    assert "Program received signal SIGINT, Interrupt." in out, out
    assert re.search(r"\$1 = 0x1003[ef]|\$1 = 0x1004[01]", out), out
    assert "$2 = 1" in out, out                                 # it really ran
    assert end.reason == "killed"


# ---------------------------------------------------------------------------
# protocol details, with the small client

def test_target_description_and_register_file(served) -> None:
    g, c = served
    feats = c.cmd(b"qSupported:swbreak+;hwbreak+;xmlRegisters=i386")
    assert b"qXfer:features:read+" in feats and b"swbreak+" in feats
    xml, off = b"", 0
    while True:                                               # small chunks: exercise m/l
        part = c.cmd(b"qXfer:features:read:target.xml:%x,100" % off)
        xml += part[1:]
        off += len(part) - 1
        if part[:1] == b"l":
            break
        assert part[:1] == b"m"
    assert xml.decode() == gdbstub.TARGET_XML
    root = ET.fromstring(xml)
    regs = [(r.get("name"), int(r.get("bitsize"))) for r in root.iter("reg")]
    assert regs == [(n, size * 8) for n, size in REGISTERS]
    assert root.find("architecture").text == "i386:x86-64"
    g_reply = c.cmd(b"g")
    assert len(g_reply) == 2 * sum(size for _, size in REGISTERS)
    assert c.reg("rip") == CODE and c.reg("rsp") == STACK_TOP
    assert c.reg("cr3") == g.vm.vcpus[0].get_sregs().cr3
    assert c.cmd(b"?") == b"S05"
    assert c.cmd(b"qC") == b"QC1" and c.cmd(b"qfThreadInfo") == b"m1"
    assert c.cmd(b"qAttached") == b"1"
    assert c.cmd(b"vCont?") == b""                            # unsupported: gdb uses c/s


def test_register_writes(served) -> None:
    g, c = served
    c.set_reg("rbx", 0x1122334455667788)
    c.set_reg("xmm7", (0xCAFE << 64) | 0xBEEF)
    c.set_reg("fs_base", 0x7000)
    c.set_reg("mxcsr", 0x1F80 | 0x8000)
    c.set_reg("st2", 0x4000C000000000000000)                   # 3.0 (80-bit)
    c.set_reg("cr8", 0)
    assert c.reg("rbx") == 0x1122334455667788
    assert c.reg("xmm7") == (0xCAFE << 64) | 0xBEEF
    assert c.reg("fs_base") == 0x7000 and c.reg("mxcsr") == 0x9F80   # via XSAVE: KVM_GET_FPU lacks it
    assert c.reg("st2") == 0x4000C000000000000000
    n_cs = [r for r, _ in REGISTERS].index("cs")
    assert c.cmd(b"P%x=18000000" % n_cs).startswith(b"E")    # selectors are read-only
    blob = c.cmd(b"g")                                         # G with the same values: accepted
    assert c.cmd(b"G" + blob) == b"OK"
    # G with one change (rcx)
    raw = bytearray(bytes.fromhex(blob.decode()))
    raw[16:24] = (0xABCDEF).to_bytes(8, "little")
    assert c.cmd(b"G" + raw.hex().encode()) == b"OK"
    assert c.reg("rcx") == 0xABCDEF
    vcpu = g.vm.vcpus[0]
    assert vcpu.get_regs().rbx == 0x1122334455667788           # really in KVM
    assert vcpu.get_sregs().fs.base == 0x7000


def test_memory_through_guest_page_tables(served) -> None:
    g, c = served
    vcpu = g.vm.vcpus[0]
    sregs = vcpu.get_sregs()
    for va in (CODE, DATA_VA, DATA_VA + 0x1ABC, 0x1FFFF8):
        assert x86.translate(g.vm, sregs, va) == kvm_translate(vcpu, va)
    assert x86.translate(g.vm, sregs, DATA_VA) == DATA_PA
    assert x86.translate(g.vm, sregs, 0x800000) is None and kvm_translate(vcpu, 0x800000) is None
    assert x86.translate(g.vm, sregs, 1 << 63) is None        # not canonical
    assert gdbstub.translate(vcpu, DATA_VA) == DATA_PA         # the deprecated alias
    assert bytes.fromhex(c.cmd(b"m%x,b" % DATA_VA).decode()) == b"hello gdb: "
    assert c.cmd(b"m800000,4").startswith(b"E")               # unmapped
    # a read across the end of the mapping returns the mapped part
    tail = c.cmd(b"m%x,20" % (CODE_ALIAS + 0x1000 - 8))      # 0x404000 is not mapped
    assert len(bytes.fromhex(tail.decode())) == 8
    # X (binary, with escapes) and M
    payload = b"#$}*\x00\xff ok"
    esc = b"".join(b"}" + bytes([x ^ 0x20]) if x in b"#$}*" else bytes([x]) for x in payload)
    assert c.cmd(b"X%x,%x:" % (DATA_VA + 0x30, len(payload)) + esc) == b"OK"
    assert g.vm.read(DATA_PA + 0x30, len(payload)) == payload
    # M across a page boundary: the two virtual pages map to distant physical pages
    assert c.cmd(b"M%x,3:414243" % (DATA_VA + 0xFFF)) == b"OK"
    assert g.vm.read(DATA_PA + 0xFFF, 1) == b"A" and g.vm.read(DATA_PA2, 2) == b"BC"
    # ... and into an unmapped page: refused, nothing written
    assert c.cmd(b"M%x,2:5859" % (CODE_ALIAS + 0xFFF)) == b"E0e"
    assert g.vm.read(CODE + 0xFFF, 1) == b"\0"


def test_breakpoint_bookkeeping(served) -> None:
    g, c = served
    orig = g.vm.read(BP_HERE, 1)
    assert c.cmd(b"Z0,%x,1" % BP_HERE) == b"OK"
    assert g.vm.read(BP_HERE, 1) == b"\xcc"                   # planted
    assert c.cmd(b"m%x,1" % BP_HERE) == orig.hex().encode()   # but hidden from gdb
    assert c.cmd(b"z0,%x,1" % BP_HERE) == b"OK"
    assert g.vm.read(BP_HERE, 1) == orig
    for i in range(4):
        assert c.cmd(b"Z1,%x,1" % (CODE + i)) == b"OK"
    assert c.cmd(b"Z1,%x,1" % (CODE + 9)) == b"E1c"           # ENOSPC: 4 debug registers
    assert c.cmd(b"z1,%x,1" % CODE) == b"OK"
    assert c.cmd(b"Z2,%x,4" % (DATA_VA + 1)) == b"E16"        # misaligned watchpoint
    assert c.cmd(b"Z2,%x,8" % DATA_VA) == b"OK"
    assert c.cmd(b"Z3,%x,8" % DATA_VA) == b""                 # read-only watch: not on x86


def test_step_over_port_io_and_breakpoint_stop(served) -> None:
    g, c = served
    c.cmd(b"qSupported:swbreak+;hwbreak+")
    assert c.cmd(b"Z1,%x,1" % OUT_DIGIT) == b"OK"
    assert c.cmd(b"c") == b"T05thread:1;hwbreak:;"
    assert c.reg("rip") == OUT_DIGIT and bytes(g.output) == b"hello gdb: "
    assert c.cmd(b"z1,%x,1" % OUT_DIGIT) == b"OK"
    assert c.cmd(b"s") == b"T05thread:1;"                     # one instruction: the OUT
    assert c.reg("rip") == OUT_DIGIT + 1 and bytes(g.output) == b"hello gdb: 5"
    assert c.cmd(b"Z0,%x,1" % 0x1002D) == b"OK"               # software breakpoint in puts
    assert c.cmd(b"c") == b"T05thread:1;swbreak:;"
    assert c.reg("rip") == 0x1002D
    assert c.cmd(b"z0,%x,1" % 0x1002D) == b"OK"
    c.send(b"c")
    assert c.recv() == b"W00"
    assert g.join() == gdbstub.SessionEnd("exited", 0)
    assert bytes(g.output) == b"hello gdb: 5 and bye\n"


def test_detach_removes_breakpoints_and_debugging(kvm) -> None:
    vm = build_guest(kvm)
    with vm:
        with ServedGuest(vm) as g:
            c = Client(g.address)
            assert c.cmd(b"Z0,%x,1" % BP_HERE) == b"OK"
            assert c.cmd(b"Z1,%x,1" % OUT_DIGIT) == b"OK"
            assert c.cmd(b"D") == b"OK"
            assert g.join() == gdbstub.SessionEnd("detached")
            c.close()
        assert vm.read(BP_HERE, 1) == b"\x8d"
        assert _run_plain(kvm, vm) == EXPECTED                   # runs on, undisturbed


def test_bad_checksum_is_nacked_and_noack_mode(served) -> None:
    _g, c = served
    for junk in (b"mzz,4", b"P1=zz", b"Z0,10011", b"qXfer:features:read:target.xml:x,y", b"p999"):
        assert c.cmd(junk).startswith(b"E")                  # malformed: an error, not a crash
    assert c.cmd(b"qXfer:features:read:other.xml:0,10") == b"E02"
    c.send_raw(b"$g#00")
    assert c._byte() == ord("-")
    assert c.cmd(b"QStartNoAckMode") == b"OK"
    c.send_raw(b"$?#3f")                                       # no '+' comes back now
    body = c.sock.recv(100)
    assert body == b"$S05#b8"


def test_kill_and_disconnect_end_the_session(kvm) -> None:
    with build_guest(kvm) as vm, ServedGuest(vm) as g:
        c = Client(g.address)
        c.send(b"k")
        assert g.join().reason == "killed"
        c.close()
    with build_guest(kvm) as vm, ServedGuest(vm) as g:
        c = Client(g.address)
        c.cmd(b"?")
        c.close()
        assert g.join().reason == "disconnected"
    with build_guest(kvm, entry=SPIN) as vm, ServedGuest(vm) as g:   # gdb dies mid-run
        c = Client(g.address)
        c.send(b"c")
        time.sleep(0.05)
        c.close()
        assert g.join().reason == "disconnected"


def test_ctrl_c_byte_interrupts(kvm) -> None:
    with build_guest(kvm, entry=SPIN) as vm, ServedGuest(vm) as g:
        c = Client(g.address)
        c.send(b"c")
        time.sleep(0.1)
        c.send_raw(b"\x03")
        assert c.recv() == b"T02thread:1;"
        rcx = c.reg("rcx")
        assert rcx > 0 and c.reg("rip") in (SPIN, SPIN + 3)
        c.send(b"k")
        g.join()
        c.close()


def test_single_step_at_cpl3(kvm) -> None:
    """Where KVM cannot stop CPL3 code after a step (PVM), the stub says so and does not step."""
    sup = debug_support(kvm)
    with build_guest(kvm, entry=SPIN, cpl=3) as vm, ServedGuest(vm) as g:
        c = Client(g.address)
        assert c.reg("cs") & 3 == 3
        reply = c.cmd(b"s")
        assert reply == b"T05thread:1;"
        if sup.step_cpl3:
            assert c.reg("rip") == SPIN + 3 and not c.console
        else:
            assert c.reg("rip") == SPIN
            assert "does not stop CPL3 code after a single step" in "".join(c.console)
        c.send(b"k")
        g.join()
        c.close()


def test_stub_refuses_non_loopback_and_reports_port(kvm) -> None:
    with build_guest(kvm) as vm:
        with pytest.raises(ValueError, match="loopback"):
            GdbStub(vm.vcpus[0], host="0.0.0.0", port=0)
        with GdbStub(vm.vcpus[0], port=0) as stub:
            host, port = stub.address
            assert host == "127.0.0.1" and port == stub.port > 0 and stub.path is None
            assert stub.token and len(stub.token) >= 32              # TCP always has a token
        with GdbStub(vm.vcpus[0]) as stub:                   # the default: a UNIX socket
            assert stub.port is None and stub.address == stub.path and stub.token is None
            with pytest.raises(socket.timeout):                # nobody connects
                stub.serve(accept_timeout=0.05)
