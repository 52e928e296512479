"""Booting the test kernels with ``python -m pykvm.vmm`` on the real /dev/kvm.

Each run is a subprocess with the VMM's ``--timeout`` watchdog and an outer
process timeout.  The kernels live in ``kernels/*.S`` (see their headers).
"""

from __future__ import annotations

import os
import re
import struct

import pytest

from pykvm.vmm import status as S


def test_hello_prints_cmdline_memory_map_and_exit_code(kernels, vmm):
    k = kernels["hello"]
    r = vmm(k, "--memory", "64", "--append", "exit=7 loopback")
    assert r.status == S.debug_exit_status(7) == 15, r
    assert r.lines[:4] == ["uart: loopback ok", "hello: magic ok", "bss: zero",
                           f"cmdline: {k} exit=7 loopback"], r
    assert "mem_lower=639 KiB mem_upper=64512 KiB" in r.lines, r
    mmap = [tuple(int(x, 16) if x.startswith("0x") else int(x)
                  for x in re.findall(r"=(\S+)", line))
            for line in r.lines if line.startswith("mmap:")]
    assert mmap == [
        (0x0, 0x9FC00, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
        (0x100000, 63 << 20, 1),
        (0xFFFBC000, 0x44000, 2),
    ], r
    assert "modules: 0" in r.lines and "loader: pykvm" in r.lines, r
    assert r.err == "", r


@pytest.mark.parametrize("code", [0, 1, 42, 127])
def test_debug_exit_status(kernels, vmm, code):
    r = vmm(kernels["hello"], "--append", f"exit={code}")
    assert r.status == (code << 1) | 1, r


def test_modules_and_their_strings(kernels, vmm, tmp_path):
    a, b = tmp_path / "first.txt", tmp_path / "second.bin"
    a.write_bytes(b"first line of the first module\nsecond line\n")
    b.write_bytes(b"\x00" * 5000)
    r = vmm(kernels["hello"], "--module", f"{a} alpha beta", "--module", str(b))
    assert r.status == 1, r
    assert "modules: 2" in r.lines, r
    assert f"module: {a} alpha beta size={len(a.read_bytes())} aligned=yes " \
           "first=first line of the first module" in r.lines, r
    assert f"module: {b} size=5000 aligned=yes first=" in r.lines, r


def test_several_files_after_one_module_option(kernels, vmm, tmp_path):
    files = [tmp_path / f"m{i}" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(f"module number {i}".encode())
    r = vmm(kernels["hello"], "--module", *map(str, files))
    assert "modules: 3" in r.lines, r
    for i, f in enumerate(files):
        assert any(line.startswith(f"module: {f} size=15") and line.endswith(f"module number {i}")
                   for line in r.lines), r


def test_aout_kludge_flat_binary(kernels, vmm):
    """The flat image is followed by 8 KiB of 0xaa: only load_end_addr's worth may load."""
    r = vmm(kernels["hello_aout"], "--append", "exit=3")
    assert r.status == 7, r
    assert r.lines[:2] == ["hello: magic ok", "bss: zero"], r


def test_bss_check_has_teeth(kernels, vmm, tmp_path):
    """With load_end_addr = bss_end_addr = 0 the whole file (junk included) loads
    and nothing is zeroed: the kernel's bss check must notice."""
    data = bytearray(open(kernels["hello_aout"], "rb").read())
    off = data.find(struct.pack("<I", 0x1BADB002))
    struct.pack_into("<II", data, off + 20, 0, 0)      # load_end_addr, bss_end_addr
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    r = vmm(str(bad))
    assert "bss: DIRTY" in r.lines, r


def test_platform_ports(kernels, vmm):
    r = vmm(kernels["hello"], "--append", "probe")
    assert r.status == 1, r
    for line in ["pci: 0xffffffff", "cmos: base memory 640 KiB", "pic: mask 0x000000fb",
                 "com2: lsr 0x000000ff", "mmio: 0xffffffff", "fw_cfg: QEMU"]:
        assert line in r.lines, r
    # unhandled accesses are logged once per address, and nothing else is
    err = r.err.splitlines()
    assert len(err) == 3, r
    assert sum("I/O port read 0x2fd" in e for e in err) == 1, r
    assert sum("I/O port write 0x2f9" in e for e in err) == 1, r
    assert sum("MMIO read at 0xfed00000" in e for e in err) == 1, r


def test_serial_input(kernels, vmm):
    r = vmm(kernels["hello"], "--append", "echo", input=b"ping pong\n")
    assert r.status == 1, r
    assert "echo: ping pong" in r.lines, r


def test_keyboard_controller_reset_ends_the_run(kernels, vmm):
    r = vmm(kernels["hello"], "--append", "reset exit=9")
    assert r.status == S.RESET, r
    assert "reset: still running" not in r.out, r


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_fw_cfg_and_init_sipi(kernels, vmm, cpus):
    r = vmm(kernels["smp"], "--smp", str(cpus))
    assert r.status == 1, r
    assert r.lines[:6] == ["fw_cfg: signature QEMU", f"fw_cfg: cpus {cpus}",
                           "fw_cfg: ram 128 MiB", "fw_cfg: file etc/e820",
                           f"mptable: cpus {cpus} ioapics 1", f"acpi: madt cpus {cpus}"], r
    assert "bsp: apic id 0" in r.lines, r
    online = sorted(int(m.group(1)) for m in map(re.compile(r"ap: cpu (\d+) online").match, r.lines) if m)
    assert online == list(range(1, cpus)), r
    assert r.lines[-1] == f"smp: all {cpus} cpus online", r


def test_smp_more_cpus_than_host_cores(kernels, vmm):
    r = vmm(kernels["smp"], "--smp", "8", "--memory", "32")
    assert r.status == 1, r
    assert r.lines[-1] == "smp: all 8 cpus online", r
    assert "fw_cfg: ram 32 MiB" in r.lines, r


@pytest.mark.parametrize("route,name", [("", "8259 PIC"), ("ioapic", "IOAPIC")])
def test_timer_interrupts(kernels, vmm, route, name):
    r = vmm(kernels["timer"], "--append", route)
    assert r.status == 1, r
    assert r.lines == [f"timer: 20 ticks through the {name}"], r


def test_iret_or_emulation_failure_report(kernels, vmm):
    """Protected-mode IRET: fine on VMX/SVM; KVM's emulator (all CPL0 code on PVM)
    cannot do it, which must end the run with status 6 and a report."""
    r = vmm(kernels["timer"], "--append", "iret")
    if r.status == 1:
        assert r.lines == ["timer: 20 ticks through the 8259 PIC"], r
        return
    assert r.status == S.EMULATION_FAILURE, r
    assert "emulation failure" in r.err, r
    assert re.search(r"code at 0x[0-9a-f]+ \(gpa 0x[0-9a-f]+\): cf ", r.err), r   # cf = iret
    assert "mode protected 32-bit, CPL 0; rip=" in r.err and "cr0=0x11 " in r.err, r


def test_triple_fault_report(kernels, vmm):
    r = vmm(kernels["triple"])
    assert r.status == S.TRIPLE_FAULT, r
    assert r.lines == ["triple: faulting now"], r
    at = kernels.symbol("triple", "fault_here")
    assert "triple fault (KVM_EXIT_SHUTDOWN)" in r.err, r
    assert f"rip={at:#x} " in r.err, r
    assert "rax=00000000deadbeef" in r.err, r
    assert f"code at {at:#x} (gpa {at:#x}): 0f 0b" in r.err, r     # ud2


def test_timeout_kicks_halted_and_waiting_cpus(kernels, vmm):
    r = vmm(kernels["timer"], "--append", "hang", "--smp", "2", timeout=1)
    assert r.status == S.TIMEOUT, r
    assert "timeout" in r.err and "mp_state=HALTED" in r.err, r
    assert "vCPU 1: waiting for INIT/SIPI (never started)" in r.err, r


def test_timeout_kicks_a_spinning_cpu(kernels, vmm):
    r = vmm(kernels["timer"], "--append", "spin", timeout=1)
    assert r.status == S.TIMEOUT, r
    assert r.lines == ["timer: spinning"], r


def test_timeout_ends_a_vmcall(kernels, vmm):
    """vmcall at CPL0 never comes back on PVM hosts; elsewhere the kernel spins after it."""
    r = vmm(kernels["timer"], "--append", "vmcall", timeout=1)
    assert r.status == S.TIMEOUT, r
    assert r.lines[0] == "timer: vmcall", r


def test_sigint_ends_the_run(kernels):
    import signal
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "pykvm.vmm", kernels["timer"], "--append", "spin",
                          "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        assert p.stdout.readline() == b"timer: spinning\n"       # the guest runs
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == S.INTERRUPTED


def test_tiny_kernel_one_line(kernels, vmm):
    r = vmm(kernels["tiny"])
    assert (r.status, r.out, r.err) == (1, "hello from a multiboot kernel\n", ""), r


def test_high_memory_above_4g(kernels, vmm):
    """More than 3.5 GiB: RAM is split at 3 GiB and continues at 4 GiB."""
    r = vmm(kernels["hello"], "--memory", "3600")
    assert r.status == 1, r
    assert "mmap: base=0x0000000100000000 length=0x0000000021000000 type=1" in r.lines, r
    assert "mem_lower=639 KiB mem_upper=3144704 KiB" in r.lines, r


def flat_kernel(load_addr: int, code: bytes) -> bytes:
    """A flat a.out-kludge kernel: the 32-byte header, then *code* (the entry)."""
    flags = 1 << 16
    return struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF,
                       load_addr, load_addr, 0, 0, load_addr + 32) + code


EXIT_42 = bytes([0xB8, 42, 0, 0, 0, 0xE7, 0xF4, 0xF4])     # mov eax, 42; out 0xf4, eax; hlt


def test_kernel_below_1mib(vmm, tmp_path):
    k = tmp_path / "low.bin"
    k.write_bytes(flat_kernel(0x20000, EXIT_42))
    m = tmp_path / "mod"
    m.write_bytes(b"module")
    r = vmm(str(k), "--module", str(m))
    assert r.status == 85, r


def test_kernel_over_the_boot_information_is_refused(vmm, tmp_path):
    k = tmp_path / "clash.bin"
    k.write_bytes(flat_kernel(0x9000, EXIT_42))
    r = vmm(str(k))
    assert r.status == S.LOAD_ERROR and "overlaps the boot information" in r.err, r


# -- errors before the guest runs ------------------------------------------------------------

def test_missing_kernel(vmm, tmp_path):
    r = vmm(str(tmp_path / "nope.elf"))
    assert r.status == S.LOAD_ERROR and "cannot read kernel" in r.err, r


def test_not_multiboot(vmm, tmp_path):
    f = tmp_path / "junk"
    f.write_bytes(os.urandom(4096))
    r = vmm(str(f))
    assert r.status == S.LOAD_ERROR and "no multiboot header" in r.err, r


def test_module_does_not_fit(kernels, vmm, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * (3 << 20))
    r = vmm(kernels["hello"], "--memory", "4", "--module", str(big))
    assert r.status == S.LOAD_ERROR and "not inside guest RAM" in r.err, r
    r = vmm(kernels["hello"], "--memory", "2", "--module", str(big))
    assert r.status == S.LOAD_ERROR and "larger than the" in r.err, r   # refused before reading


def test_bad_usage(vmm, kernels):
    r = vmm(kernels["hello"], "--smp", "lots")
    assert r.status == S.LOAD_ERROR and r.err == "pykvm vmm: --smp 'lots': not a number (see --help)\n", r


# -- the Machine API in-process ------------------------------------------------------------------

def test_machine_in_process(kernels, tmp_path):
    from pykvm.vmm import Machine

    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        m = Machine(kernels["smp"], smp=2, timeout=20, stdout=fd, stdin=None)
        assert m.run() == 1
        m.close()
        assert m.vm.closed
    finally:
        os.close(fd)
    assert out.read_text().endswith("smp: all 2 cpus online\n")


@pytest.mark.parametrize("stdin_open", [False, True])
def test_teardown_helper_keeps_no_output_open(kernels, stdin_open):
    """The VMM hands the VM's teardown to a helper (a forked child when no other
    thread is left, else a spawned `cat`).  Whoever reads our output must see its
    end when we exit, and no warning may appear (Python 3.12+ warns about fork()
    in a threaded process; run with -W error)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-W", "error", "-m", "pykvm.vmm", kernels["tiny"], "--timeout", "20"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin_open else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = p.stdout.read()          # returns at EOF: nothing else holds the pipe
        err = p.stderr.read()
        status = p.wait(timeout=30)
    finally:
        if p.stdin:
            p.stdin.close()
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (status, out, err) == (1, b"hello from a multiboot kernel\n", b"")
