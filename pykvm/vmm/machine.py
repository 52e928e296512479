"""The small PC: a VM with in-kernel irqchip and PIT, RAM, Python port devices, vCPU threads.

:class:`Machine` builds the VM, loads a multiboot kernel (:mod:`.multiboot`),
runs one thread per vCPU and returns the exit status (see
:mod:`pykvm.vmm` for the table).  The boot CPU (vCPU 0) starts at the
kernel's entry in 32-bit protected mode; the others wait in KVM, in
``KVM_MP_STATE_UNINITIALIZED``, for INIT and SIPI from the boot CPU's local
APIC, as on real hardware.

Guest physical layout::

    0x0000_0000  RAM (low)   0x9000 memory map, 0x9400 GDT, 0x9500 multiboot info
    0x0009_fc00  reserved    (EBDA; 0xa0000-0xfffff is RAM too, so VGA text writes land)
    0x000f_0000  reserved    MP table (0xf0000), ACPI RSDP/RSDT/MADT (0xf8000)
    0x0010_0000  RAM         kernel, then modules, page aligned
    low_end      PCI hole    low_end = memory, or 3 GiB when memory > 3.5 GiB
    0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC (in KVM)
    0xfffb_c000  reserved    (KVM's identity map and TSS pages)
    0x1_0000_0000 RAM (rest, when memory > 3.5 GiB)
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import List, Optional, Sequence

from .. import Kvm, KvmError, KvmUnavailable
from ..irq import IOAPIC, PIC_MASTER, PIC_SLAVE, irqchip_route
from ..uapi import structs as S
from ..vcpu import lapic_set_reg
from . import devices as D
from . import multiboot as MB
from . import tables
from .status import (EMULATION_FAILURE, INTERNAL_ERROR, INTERRUPTED, LOAD_ERROR, RESET,
                     TIMEOUT, TRIPLE_FAULT, VMM_ERROR)

__all__ = ["Machine", "MachineError"]

MiB = 1 << 20
GiB = 1 << 30
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
GDT_ADDR = 0x9400
BOOT_STACK = 0x7C00
LAPIC_BASE = 0xFEE00000

_IO = struct.Struct("<BBHIQ")            # kvm_run.io: direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")          # kvm_run.mmio: phys_addr, data, len, is_write
_EXIT_IO, _EXIT_MMIO, _EXIT_INTR = 2, 6, 10
_MP_STATE_UNINITIALIZED = 1
_MAX_LOG_LINES = 64
# Low memory the VMM writes itself: a kernel image must not overlap it.
_VMM_AREAS = [(MB.MMAP_ADDR, 0xA000, "the boot information and GDT"),
              (tables.MP_ADDR, 0x100000, "the MP and ACPI tables")]


class MachineError(Exception):
    """Set-up failed before the guest ran; ``status`` is the exit status to use."""

    def __init__(self, message: str, status: int = LOAD_ERROR) -> None:
        super().__init__(message)
        self.status = status


def _seg(seg, selector: int, type_: int) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 1, 0, 0


class Machine:
    """A PC that boots one multiboot kernel.

    *kernel* is a path; *modules* are paths, each optionally followed by a
    space and arguments (the whole string becomes the module's string, as
    with QEMU's ``-initrd``).  UART output and the debug console go to
    *stdout* (an fd), UART input comes from *stdin* (an fd, or None),
    reports go to *stderr*.  :meth:`run` returns the exit status.
    """

    def __init__(self, kernel: str, *, smp: int = 1, memory_mib: int = 128, append: str = "",
                 modules: Sequence[str] = (), timeout: Optional[float] = None,
                 stdout: int = 1, stdin: Optional[int] = 0, stderr: int = 2) -> None:
        if smp < 1 or smp > 255:
            raise MachineError(f"--smp {smp}: want 1..255 CPUs")
        if memory_mib < 2 or memory_mib > 1 << 20:
            raise MachineError(f"--memory {memory_mib}: want 2 MiB .. 1 TiB")
        self.kernel, self.smp, self.memory = kernel, smp, memory_mib * MiB
        self.append, self.modules, self.timeout = append, list(modules), timeout
        self.out_fd, self.in_fd, self.err_fd = stdout, stdin, stderr
        self.status: Optional[int] = None
        self.reason = ""
        self._done = threading.Event()
        self._stop = False
        self._finish_lock = threading.Lock()
        self._lock = threading.Lock()      # the device lock
        self._logged: set = set()
        self._log_count = 0
        self.kvm = self.vm = None
        self.vcpus: list = []
        self.threads: List[threading.Thread] = []
        low = self.memory if self.memory <= 0xE0000000 else 0xC0000000
        self.low_end, self.high_size = low, self.memory - low

    # -- messages --------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        try:
            os.write(self.err_fd, f"pykvm.vmm: {msg}\n".encode("utf-8", "replace"))
        except OSError:
            pass

    def _log_once(self, key, msg: str) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        self._log_count += 1
        if self._log_count < _MAX_LOG_LINES:
            self.log(msg + " (logged once)")
        elif self._log_count == _MAX_LOG_LINES:
            self.log("too many unhandled addresses: not logging more")

    def finish(self, status: int, reason: str) -> None:
        """End the run with *status* (the first call wins) and kick every vCPU."""
        with self._finish_lock:
            if self.status is not None:
                return
            self.status, self.reason = status, reason
            self._stop = True
        for v in self.vcpus:
            try:
                v.kick()
            except Exception:
                pass
        self._done.set()

    def _reset(self, why: str) -> None:
        self.finish(RESET, why)

    # -- memory layout ---------------------------------------------------------------------------
    def ram_regions(self) -> List[MB.Region]:
        r = [MB.Region(0, self.low_end)]
        if self.high_size:
            r.append(MB.Region(4 * GiB, self.high_size))
        return r

    def memory_map(self) -> List[MB.Region]:
        m = [MB.Region(0, 0x9FC00), MB.Region(0x9FC00, 0x400, MB.RESERVED),
             MB.Region(0xF0000, 0x10000, MB.RESERVED),
             MB.Region(0x100000, self.low_end - 0x100000),
             MB.Region(IDENTITY_MAP_ADDR, (1 << 32) - IDENTITY_MAP_ADDR, MB.RESERVED)]
        if self.high_size:
            m.append(MB.Region(4 * GiB, self.high_size))
        return m

    # -- set-up ----------------------------------------------------------------------------------------
    def _read_file(self, path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise MachineError(f"cannot read {what} {path!r}: {e.strerror}") from None

    def setup(self) -> None:
        """Create the VM, load the kernel and prepare every vCPU (raises MachineError)."""
        kernel = self._read_file(self.kernel, "kernel")
        mods = []
        for m in self.modules:
            path = m if os.path.exists(m) or " " not in m else m.split(" ", 1)[0]
            mods.append((self._read_file(path, "module"), m))
        try:
            self.kvm = Kvm()
        except KvmUnavailable as e:
            raise MachineError(str(e), VMM_ERROR) from None
        vm = self.vm = self.kvm.create_vm()
        vm.set_tss_address(TSS_ADDR)
        # RAM before the irqchip: a memslot added after KVM_CREATE_IRQCHIP costs
        # ~5 ms more here (measured on the PVM host), before it ~0.1 ms.
        vm.add_memory(0, self.low_end)
        if self.high_size:
            vm.add_memory(4 * GiB, self.high_size)
        vm.create_irq_chip()
        self._set_gsi_routing()
        vm.create_pit2(1)                       # KVM_PIT_SPEAKER_DUMMY: port 0x61 in the kernel

        regions = self.ram_regions()
        try:
            self.header, self.image = MB.load_kernel(vm, kernel, regions)
            for start, end, what in _VMM_AREAS:
                for paddr, _, memsz in self.image.segments:
                    if paddr < end and start < paddr + memsz:
                        raise MB.MultibootError(
                            f"the image [{paddr:#x}, {paddr + memsz:#x}) overlaps {what} "
                            f"[{start:#x}, {end:#x})")
            cmdline = f"{self.kernel} {self.append}" if self.append else self.kernel
            self.info_addr, self.placed_modules = MB.build_info(
                vm, image_end=self.image.high, cmdline=cmdline, modules=mods,
                memory_map=self.memory_map(), ram_regions=regions)
        except MB.MultibootError as e:
            raise MachineError(f"{self.kernel}: {e}") from None
        if self.header.flags & MB.F_VIDEO_MODE:
            self.log("the kernel asks for a video mode: there is none (serial console only)")
        vm.write(GDT_ADDR, struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF))
        vm.write(tables.MP_ADDR, tables.mp_table(self.smp))
        vm.write(tables.RSDP_ADDR, tables.acpi_tables(self.smp))

        self.ports = self._make_devices(cmdline)
        cpuid = self.kvm.supported_cpuid()
        for i in range(self.smp):
            vcpu = vm.create_vcpu(i)
            vcpu.set_cpuid2(self._cpuid_for(cpuid, i))
            self.vcpus.append(vcpu)
        self._boot_cpu(self.vcpus[0])
        for ap in self.vcpus[1:]:
            ap.set_mp_state(_MP_STATE_UNINITIALIZED)   # KVM's default for non-boot CPUs too

    def _set_gsi_routing(self) -> None:
        # As QEMU's pc: GSI 0-15 to the PICs (not 2, the cascade), GSI 0-23 to
        # the IOAPIC with the ISA override GSI 0 -> pin 2, so the PIT (GSI 0)
        # reaches IOAPIC pin 2 the way a PC's MADT says.
        routes = []
        for gsi in range(24):
            if gsi < 16 and gsi != 2:
                routes.append(irqchip_route(gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi & 7))
            if gsi != 2:
                routes.append(irqchip_route(gsi, IOAPIC, 2 if gsi == 0 else gsi))
        self.vm.set_gsi_routing(routes)

    def set_irq(self, irq: int, level: int) -> None:
        """Drive ISA IRQ line *irq* (GSI) to *level* through the in-kernel PIC/IOAPIC."""
        self.vm.set_irq_line(irq, level)

    def _make_devices(self, cmdline: str) -> D.Ports:
        ports = D.Ports()
        self.uart = D.Uart16550(self.out_fd, self.in_fd, lambda lvl: self.set_irq(4, lvl), self._lock)
        self.uart.register(ports)
        e820 = [(r.base, r.length, r.type) for r in self.memory_map()]
        self.fw_cfg = D.FwCfg(cpus=self.smp, ram_size=self.memory, cmdline=cmdline, e820=e820)
        self.fw_cfg.register(ports)
        D.Cmos(low_ram=self.low_end, high_ram=self.high_size, cpus=self.smp).register(ports)
        D.Pci(self._reset).register(ports)
        D.DebugExit(self.finish).register(ports)
        D.Misc(self.out_fd, self._reset).register(ports)
        return ports

    @staticmethod
    def _cpuid_for(entries, apic_id: int):
        out = []
        for e in entries:
            e = S.kvm_cpuid_entry2.from_buffer_copy(e)
            if e.function == 1:
                e.ebx = (e.ebx & 0x00FFFFFF) | (apic_id << 24)
            elif e.function in (0xB, 0x1F):
                e.edx = apic_id
            elif e.function == 0x8000001E:
                e.eax = apic_id
            out.append(e)
        return out

    def _boot_cpu(self, vcpu) -> None:
        s = vcpu.get_sregs()
        _seg(s.cs, 0x08, 0xB)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _seg(getattr(s, name), 0x10, 0x3)
        s.gdt.base, s.gdt.limit = GDT_ADDR, 23
        s.idt.base, s.idt.limit = 0, 0         # undefined by the spec: faults escalate at once
        s.cr0 = 0x11                            # PE | ET; paging off, caches on
        s.cr4, s.efer = 0, 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rax, r.rbx, r.rip = MB.BOOTLOADER_MAGIC, self.info_addr, self.image.entry
        r.rsp, r.rflags = BOOT_STACK, 2
        vcpu.set_regs(r)
        # Virtual wire: LINT0 ExtINT and LINT1 NMI on the boot CPU, as the BIOS
        # leaves them, so the PIC's interrupts reach it with the LAPIC enabled.
        lapic = vcpu.get_lapic()
        lapic_set_reg(lapic, 0x350, 0x700)      # LVT LINT0: ExtINT
        lapic_set_reg(lapic, 0x360, 0x400)      # LVT LINT1: NMI
        vcpu.set_lapic(lapic)

    # -- running ---------------------------------------------------------------------------------------
    def _vcpu_loop(self, vcpu) -> None:
        try:
            self._loop(vcpu)
        except BaseException as e:                      # a bug in a device model: end the run
            import traceback

            self.finish(VMM_ERROR, f"vCPU {vcpu.id}: {type(e).__name__}: {e}")
            self.log("".join(traceback.format_exception(e)).rstrip())

    def _loop(self, vcpu) -> None:
        run = vcpu.run_raw
        mm = vcpu.run_mmap
        io = _IO.unpack_from
        outs, ins = self.ports.out, self.ports.inp
        lock = self._lock
        from_bytes = int.from_bytes
        while not self._stop:
            reason = run()
            if reason == _EXIT_IO:
                direction, size, port, count, off = io(mm, 32)
                if direction:
                    f = outs.get(port) or self._unhandled_out
                    with lock:
                        for k in range(off, off + size * count, size):
                            f(port, size, from_bytes(mm[k:k + size], "little"))
                else:
                    f = ins.get(port) or self._unhandled_in
                    with lock:
                        for k in range(off, off + size * count, size):
                            mm[k:k + size] = (f(port, size) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            elif reason == _EXIT_INTR:
                continue
            elif reason == _EXIT_MMIO:
                addr, data, length, is_write = _MMIO.unpack_from(mm, 32)
                if is_write:
                    self._log_once(("mw", addr), f"unhandled MMIO write at {addr:#x} "
                                   f"({length} bytes, {data[:length].hex()}): ignored")
                else:
                    self._log_once(("mr", addr), f"unhandled MMIO read at {addr:#x} "
                                   f"({length} bytes): returning all ones")
                    mm[40:40 + length] = b"\xff" * length
            else:
                self._fatal(vcpu, reason)
                return

    def _unhandled_out(self, port: int, size: int, value: int) -> None:
        self._log_once(("o", port), f"unhandled I/O port write {port:#x} <- {value:#x} "
                       f"(size {size}): ignored")

    def _unhandled_in(self, port: int, size: int) -> int:
        self._log_once(("i", port), f"unhandled I/O port read {port:#x} (size {size}): "
                       f"returning all ones")
        return -1

    def _fatal(self, vcpu, reason: int) -> None:
        from ..exits import InternalError, SystemEvent, decode

        ex = decode(vcpu.run_mmap, memoryview(vcpu.run_mmap))
        extra = ""
        if reason == 8:
            status, what = TRIPLE_FAULT, "triple fault (KVM_EXIT_SHUTDOWN)"
        elif isinstance(ex, InternalError):
            status = EMULATION_FAILURE if ex.suberror == 1 else INTERNAL_ERROR
            what = f"KVM internal error: {ex.description} (KVM_EXIT_INTERNAL_ERROR, suberror {ex.suberror})"
            if ex.data:
                extra += "\n  data: " + " ".join(f"{d:#x}" for d in ex.data)
            if ex.insn_bytes:
                extra += "\n  instruction bytes (from KVM): " + ex.insn_bytes.hex(" ")
        elif isinstance(ex, SystemEvent) and ex.type in (1, 2):
            self._reset("guest " + ("shutdown" if ex.type == 1 else "reset") + " (KVM_EXIT_SYSTEM_EVENT)")
            return
        else:
            status, what = INTERNAL_ERROR, f"unexpected exit {ex!r}"
        self.log(f"vCPU {vcpu.id}: {what}{extra}\n{self.describe_vcpu(vcpu)}")
        self.finish(status, what)

    def describe_vcpu(self, vcpu) -> str:
        """Mode, registers and the 16 bytes at the instruction pointer, as indented text."""
        try:
            r, s = vcpu.get_regs(), vcpu.get_sregs()
        except KvmError as e:
            return f"  (registers unavailable: {e})"
        long_mode = bool(s.efer & 0x400)
        paging = bool(s.cr0 & 1 and s.cr0 & 0x80000000)
        mode = "long mode" if long_mode else "protected mode" if s.cr0 & 1 else "real mode"
        if long_mode:
            names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
            cells = [f"{n.upper()}={getattr(r, n):016x}" for n in names]
            ip = f"RIP={r.rip:016x} RFLAGS={r.rflags:08x}"
        else:
            names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
            cells = [f"E{n[1:].upper()}={getattr(r, n) & 0xFFFFFFFF:08x}" for n in names]
            ip = f"EIP={r.rip & 0xFFFFFFFF:08x} EFLAGS={r.rflags:08x}"
        lines = [f"{mode}{', paging' if paging else ''}: {ip}"]
        lines += [" ".join(cells[i:i + 4]) for i in range(0, len(cells), 4)]
        segs = []
        for n in ("cs", "ds", "es", "fs", "gs", "ss"):
            g = getattr(s, n)
            segs.append(f"{n.upper()}={g.selector:04x}" + (f"(base {g.base:x})" if g.base else ""))
        lines.append(" ".join(segs))
        lines.append(f"CR0={s.cr0:08x} CR2={s.cr2:x} CR3={s.cr3:x} CR4={s.cr4:x} EFER={s.efer:x} "
                     f"GDT={s.gdt.base:x}/{s.gdt.limit:x} IDT={s.idt.base:x}/{s.idt.limit:x}")
        lin = r.rip if long_mode else (s.cs.base + r.rip) & 0xFFFFFFFF
        lines.append(f"bytes at {lin:#x}: {self._bytes_at(vcpu, lin, paging)}")
        return "\n".join("  " + x for x in lines)

    def _vcpu_state(self, vcpu) -> str:
        try:
            mp = vcpu.get_mp_state()
        except KvmError:
            return self.describe_vcpu(vcpu)
        if mp in (_MP_STATE_UNINITIALIZED, 2):      # 2: INIT received
            return "  waiting for INIT/SIPI (never started)"
        state = {3: "halted, ", 4: "SIPI received, "}.get(mp, "")
        return ("  " + state + self.describe_vcpu(vcpu).lstrip()) if state else self.describe_vcpu(vcpu)

    def _bytes_at(self, vcpu, linear: int, paging: bool) -> str:
        gpa = linear
        if paging:
            try:
                t = vcpu.translate_gva(linear)
            except KvmError:
                return "(no translation)"
            if not t.valid:
                return "(not mapped)"
            gpa = t.physical_address
        try:
            return self.vm.read(gpa, 16).hex(" ")
        except ValueError:
            return f"(physical {gpa:#x} is not RAM)"

    def run(self) -> int:
        """Set up (unless done), run until an exit condition, tear down; return the status."""
        try:
            if self.vm is None:
                self.setup()
        except MachineError as e:
            self.log(str(e))
            self.close()
            return e.status
        except (KvmError, OSError) as e:                # e.g. more vCPUs or RAM than KVM allows
            self.log(f"setting up the VM failed: {e}")
            self.close()
            return VMM_ERROR
        timer = None
        if self.timeout:
            timer = threading.Timer(self.timeout, self._on_timeout)
            timer.daemon = True
            timer.start()
        for v in self.vcpus:
            t = threading.Thread(target=self._vcpu_loop, args=(v,), name=f"vcpu{v.id}", daemon=True)
            self.threads.append(t)
            t.start()
        try:
            self._done.wait()
        except KeyboardInterrupt:
            self.finish(INTERRUPTED, "interrupted")
        if timer is not None:
            timer.cancel()
        self._stop_threads()
        if self.status == TIMEOUT:
            self.log(f"timeout: no exit after {self.timeout:g} s; stopped the guest")
            for v in self.vcpus:
                if not any(t.name == f"vcpu{v.id}" and t.is_alive() for t in self.threads):
                    self.log(f"vCPU {v.id}:\n{self._vcpu_state(v)}")
        return self.status if self.status is not None else VMM_ERROR

    def _on_timeout(self) -> None:
        self.finish(TIMEOUT, "timeout")

    def _stop_threads(self) -> None:
        deadline = time.monotonic() + 2.0
        for t in self.threads:
            while t.is_alive() and time.monotonic() < deadline:
                for v in self.vcpus:       # kick again: a kick can race with entering KVM_RUN
                    try:
                        v.kick()
                    except Exception:
                        pass
                t.join(0.05)
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            self.log(f"{', '.join(stuck)} did not leave KVM_RUN after kicks")

    def close(self) -> None:
        """Close the VM and /dev/kvm (the CLI skips this: process exit does it faster)."""
        if any(t.is_alive() for t in self.threads):
            return                              # a stuck thread may still use the VM
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
