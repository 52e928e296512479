"""The small PC: a VM with in-kernel irqchip and PIT, RAM, port devices, vCPU threads.

:class:`Machine` builds the VM, loads a multiboot kernel (:mod:`.multiboot`),
runs one thread per vCPU and returns the exit status (see
:mod:`pykvm.vmm.status`).  Everything x86 comes from :mod:`pykvm.x86`: the
port bus and run loop (one :class:`~pykvm.x86.RunLoop` per vCPU over one shared
:class:`~pykvm.x86.Bus`), COM1 (:class:`~pykvm.x86.Uart16550`), CPUID
(:func:`~pykvm.x86.setup_cpuid`), the GDT and the reports
(:func:`~pykvm.x86.describe_vcpu`).  What stays here is the PC: the address
map (:mod:`.layout`), fw_cfg, CMOS, PCI, debug exit (:mod:`.devices`), the MP
and ACPI tables (:mod:`.tables`) and multiboot.

The boot CPU (vCPU 0) starts at the kernel's entry in 32-bit protected mode;
the others wait in KVM, in ``KVM_MP_STATE_UNINITIALIZED``, for INIT and SIPI
from the boot CPU's local APIC, as on real hardware.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import Kvm, KvmError, KvmUnavailable
from ..irq import IOAPIC, PIC_MASTER, PIC_SLAVE, irqchip_route
from ..uapi.structs import (
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
)
from ..vcpu import lapic_set_reg
from ..x86.bus import Bus, RunLoop, RunResult
from ..x86.consts import CR0
from ..x86.cpu import prepare_vm, setup_cpuid
from ..x86.descriptors import Gdt, dtable
from ..x86.devices.uart16550 import Uart16550
from . import layout, multiboot, tables
from .devices import Cmos, DebugExit, FdOutput, FwCfg, Misc, Pci
from .errors import MachineError
from .files import read_image
from .status import EMULATION_FAILURE, GDB_SOCKET, INTERNAL_ERROR, INTERRUPTED, RESET, TIMEOUT, TRIPLE_FAULT, VMM_ERROR

__all__ = ["MAX_CPUS", "MAX_MEMORY_MIB", "MIN_MEMORY_MIB", "Machine", "MachineError"]

MAX_CPUS = 255                  # xAPIC ids are 8 bits, 0xff is broadcast
MIN_MEMORY_MIB = 2
MAX_MEMORY_MIB = 1 << 20        # 1 TiB
_MAX_LOG_LINES = 64             # unhandled-access messages per run (and keys remembered)
_STOP_GRACE = 2.0               # seconds to get every vCPU thread out of KVM_RUN


def _check_number(name: str, value: Any, low: float, high: float, integer: bool) -> None:
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise MachineError(f"{name} {value!r}: want a {'whole ' if integer else ''}number")
    if isinstance(value, float) and value - value != 0.0:      # nan, +-inf
        raise MachineError(f"{name} {value!r}: want a finite number")
    if not low <= value <= high:
        raise MachineError(f"{name} {value!r}: want {low:g} .. {high:g}")


class Machine:
    """A PC that boots one multiboot kernel.

    *kernel* is a path; *modules* are paths, each optionally followed by a
    space and arguments (the whole string becomes the module's string, as
    with QEMU's ``-initrd``).  UART output and the debug console go to
    *stdout* (an fd), UART input comes from *stdin* (an fd, or None),
    reports go to *stderr*.  :meth:`run` returns the exit status.
    """

    def __init__(self, kernel: str, *, smp: int = 1, memory_mib: int = 128, append: str = "",
                 modules: Sequence[str] = (), timeout: float | None = None,
                 stdout: int = 1, stdin: int | None = 0, stderr: int = 2,
                 gdb: int | None = None) -> None:
        _check_number("--smp", smp, 1, MAX_CPUS, True)
        _check_number("--memory", memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB, True)
        if timeout is not None:
            _check_number("--timeout", timeout, 0, threading.TIMEOUT_MAX, False)
            if timeout <= 0:
                raise MachineError(f"--timeout {timeout!r}: want a positive number of seconds")
        if gdb is not None:
            if gdb != GDB_SOCKET:
                _check_number("--gdb", gdb, 0, 0xFFFF, True)
            if smp != 1:
                raise MachineError("--gdb debugs one CPU: use --smp 1")
        self.gdb_port = gdb
        self.gdb_address: Any = None
        self.kernel, self.smp, self.memory = kernel, smp, memory_mib * layout.MiB
        self.append, self.modules, self.timeout = append, list(modules), timeout
        self.out_fd, self.in_fd, self.err_fd = stdout, stdin, stderr
        self.status: int | None = None
        self.reason = ""
        self._done = threading.Event()
        self._stop = False
        self._finish_lock = threading.Lock()
        self._lock = threading.Lock()      # the device lock: one handler at a time
        self._logged: set[tuple[str, int]] = set()
        self._log_count = 0
        self.kvm: Kvm | None = None
        self.vm: Any = None
        self.vcpus: list[Any] = []
        self.loops: list[RunLoop] = []
        self._stop_hooks: list[Callable[[], None]] = []
        self.threads: list[threading.Thread] = []
        self.low_end, self.high_size = layout.split_ram(self.memory)

    # -- messages --------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        try:
            os.write(self.err_fd, f"pykvm vmm: {msg}\n".encode("utf-8", "replace"))
        except OSError:
            pass

    def _log_once(self, key: tuple[str, int], msg: str) -> None:
        # The set is capped with the messages: a guest touching every address
        # cannot make it grow.
        if key in self._logged or self._log_count > _MAX_LOG_LINES:
            return
        self._log_count += 1
        if self._log_count <= _MAX_LOG_LINES:
            self._logged.add(key)
            self.log(msg + " (logged once)")
        else:
            self.log("too many unhandled addresses: not logging more")

    def finish(self, status: int, reason: str) -> None:
        """End the run with *status* (the first call wins) and stop every vCPU."""
        with self._finish_lock:
            if self.status is not None:
                return
            self.status, self.reason = status, reason
            self._stop = True
        for loop in self.loops:
            try:
                loop.stop()
            except Exception:
                pass
        self._done.set()

    def _reset(self, why: str) -> None:
        self.finish(RESET, why)

    # -- memory layout -------------------------------------------------------------------------
    def ram_regions(self) -> list[multiboot.Region]:
        r = [multiboot.Region(0, self.low_end)]
        if self.high_size:
            r.append(multiboot.Region(layout.HIGH_RAM_BASE, self.high_size))
        return r

    def memory_map(self) -> list[multiboot.Region]:
        Region, RESERVED = multiboot.Region, multiboot.RESERVED
        m = [Region(0, layout.EBDA_ADDR), Region(layout.EBDA_ADDR, 0x400, RESERVED),
             Region(layout.BIOS_ADDR, layout.HIGH_MEMORY - layout.BIOS_ADDR, RESERVED),
             Region(layout.HIGH_MEMORY, self.low_end - layout.HIGH_MEMORY),
             Region(layout.IDENTITY_MAP_ADDR, (1 << 32) - layout.IDENTITY_MAP_ADDR, RESERVED)]
        if self.high_size:
            m.append(Region(layout.HIGH_RAM_BASE, self.high_size))
        return m

    # -- set-up ----------------------------------------------------------------------------------------
    def _read_inputs(self) -> tuple[bytes, list[tuple[bytes, str]]]:
        """The kernel and module files, together at most the guest RAM size."""
        room = self.memory
        kernel = read_image(self.kernel, "kernel", room)
        room -= len(kernel)
        mods = []
        for m in self.modules:
            path = m if os.path.exists(m) or " " not in m else m.split(" ", 1)[0]
            data = read_image(path, "module", room)
            room -= len(data)
            mods.append((data, m))
        return kernel, mods

    def setup(self) -> None:
        """Create the VM, load the kernel and prepare every vCPU (raises MachineError)."""
        kernel, mods = self._read_inputs()
        try:
            self.kvm = Kvm()
        except KvmUnavailable as e:
            raise MachineError(str(e), VMM_ERROR) from None
        vm = self.vm = self.kvm.create_vm()
        prepare_vm(vm, tss_address=layout.TSS_ADDR, identity_map_address=None)
        # RAM before the irqchip: KVM makes a memslot added after KVM_CREATE_IRQCHIP
        # wait for an SRCU grace period.
        vm.add_memory(0, self.low_end)
        if self.high_size:
            vm.add_memory(layout.HIGH_RAM_BASE, self.high_size)
        vm.create_irq_chip()
        self._set_gsi_routing()
        vm.create_pit2(1)                       # KVM_PIT_SPEAKER_DUMMY: port 0x61 in the kernel

        regions = self.ram_regions()
        cmdline = f"{self.kernel} {self.append}" if self.append else self.kernel
        try:
            self.header, self.image = multiboot.load_kernel(vm, kernel, regions)
            for start, end, what in layout.VMM_AREAS:
                for paddr, _, memsz in self.image.segments:
                    if paddr < end and start < paddr + memsz:
                        raise multiboot.MultibootError(
                            f"the image [{paddr:#x}, {paddr + memsz:#x}) overlaps {what} "
                            f"[{start:#x}, {end:#x})")
            self.info_addr, self.placed_modules = multiboot.build_info(
                vm, image_end=self.image.high, cmdline=cmdline, modules=mods,
                memory_map=self.memory_map(), ram_regions=regions)
        except multiboot.MultibootError as e:
            raise MachineError(f"{self.kernel!r}: {e}") from None
        del kernel, mods
        if self.header.flags & multiboot.F_VIDEO_MODE:
            self.log("the kernel asks for a video mode: there is none (serial console only)")
        self.gdt = Gdt.flat32()
        vm.write(layout.GDT_ADDR, bytes(self.gdt))
        vm.write(layout.MP_ADDR, tables.mp_table(self.smp))
        vm.write(layout.RSDP_ADDR, tables.acpi_tables(self.smp))

        self.bus = self._make_devices(cmdline.encode("utf-8", "surrogateescape"))
        cpuid = self.kvm.supported_cpuid()
        for i in range(self.smp):
            vcpu = vm.create_vcpu(i)
            setup_cpuid(self.kvm, vcpu, entries=cpuid)
            self.vcpus.append(vcpu)
            self.loops.append(RunLoop(vcpu, self.bus, strict=False, on_unhandled=self._unhandled))
        self._boot_cpu(self.vcpus[0])
        for ap in self.vcpus[1:]:
            ap.set_mp_state(KVM_MP_STATE_UNINITIALIZED)   # KVM's default for APs too

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

    def _make_devices(self, cmdline: bytes) -> Bus:
        bus = Bus(lock=self._lock)
        output = FdOutput(self.out_fd)
        self.uart = bus.add(Uart16550(layout.COM1, output, output_limit=0, input_fd=self.in_fd,
                                      irq=lambda level: self.set_irq(layout.COM1_IRQ, level)))
        e820 = [(r.base, r.length, r.type) for r in self.memory_map()]
        self.fw_cfg = bus.add(FwCfg(cpus=self.smp, ram_size=self.memory, cmdline=cmdline, e820=e820))
        bus.add(Cmos(low_ram=self.low_end, high_ram=self.high_size, cpus=self.smp))
        bus.add(Pci(self._reset))
        bus.add(DebugExit(self.finish))
        bus.add(Misc(output, self._reset))
        return bus

    def _boot_cpu(self, vcpu: Any) -> None:
        """The multiboot machine state: flat 32-bit segments, CR0.PE, paging off,
        EAX = magic, EBX = information address."""
        g = self.gdt
        cs, ds = g.selectors["kernel_cs"], g.selectors["kernel_ds"]
        s = vcpu.get_sregs()
        s.cs = g.segment(cs).kvm_segment(cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(s, name, g.segment(ds).kvm_segment(ds))
        s.gdt = dtable(layout.GDT_ADDR, g.limit)
        s.idt = dtable(0, 0)                    # undefined by the spec: faults escalate at once
        s.cr0 = int(CR0.PE | CR0.ET)            # paging off, caches on
        s.cr4, s.efer = 0, 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rax, r.rbx, r.rip = multiboot.BOOTLOADER_MAGIC, self.info_addr, self.image.entry
        r.rsp, r.rflags = layout.BOOT_STACK, 2
        vcpu.set_regs(r)
        # Virtual wire: LINT0 ExtINT and LINT1 NMI on the boot CPU, as the BIOS
        # leaves them, so the PIC's interrupts reach it with the LAPIC enabled.
        lapic = vcpu.get_lapic()
        lapic_set_reg(lapic, 0x350, 0x700)      # LVT LINT0: ExtINT
        lapic_set_reg(lapic, 0x360, 0x400)      # LVT LINT1: NMI
        vcpu.set_lapic(lapic)

    # -- running ---------------------------------------------------------------------------------------
    def _unhandled(self, kind: str, addr: int, size: int, data: bytes | None) -> None:
        if kind == "out":
            value = int.from_bytes(data or b"", "little")
            msg = f"unhandled I/O port write {addr:#x} <- {value:#x} (size {size}): ignored"
        elif kind == "in":
            msg = f"unhandled I/O port read {addr:#x} (size {size}): returning all ones"
        elif kind == "mmio-write":
            msg = f"unhandled MMIO write at {addr:#x} ({size} bytes, {(data or b'').hex()}): ignored"
        else:
            msg = f"unhandled MMIO read at {addr:#x} ({size} bytes): returning all ones"
        self._log_once((kind, addr), msg)

    def _vcpu_thread(self, vcpu: Any, loop: RunLoop) -> None:
        try:
            while not self._stop:
                result = loop.run(check=False)
                if result.reason in ("stopped", "timeout", "hlt"):
                    continue                     # hlt cannot reach us with the in-kernel LAPIC
                self._fatal(vcpu, result)
                return
        except BaseException as e:               # a bug in a device model: end the run
            import traceback

            self.finish(VMM_ERROR, f"vCPU {vcpu.id}: {type(e).__name__}: {e}")
            self.log(f"vCPU {vcpu.id}: internal error: {type(e).__name__}: {e}")
            if os.environ.get("PYKVM_DEBUG"):
                self.log("".join(traceback.format_exception(e)).rstrip())

    def _fatal(self, vcpu: Any, result: RunResult) -> None:
        from ..exits import InternalError, Shutdown, SystemEvent

        ex = result.exit
        if isinstance(ex, SystemEvent) and ex.type in (KVM_SYSTEM_EVENT_SHUTDOWN,
                                                       KVM_SYSTEM_EVENT_RESET):
            kind = "shutdown" if ex.type == KVM_SYSTEM_EVENT_SHUTDOWN else "reset"
            self._reset(f"guest {kind} (KVM_EXIT_SYSTEM_EVENT)")
            return
        if isinstance(ex, Shutdown):
            status, what = TRIPLE_FAULT, "triple fault (KVM_EXIT_SHUTDOWN)"
        elif isinstance(ex, InternalError):
            emulation = ex.suberror == KVM_INTERNAL_ERROR_EMULATION
            status = EMULATION_FAILURE if emulation else INTERNAL_ERROR
            what = (f"KVM internal error: {ex.description} (KVM_EXIT_INTERNAL_ERROR, "
                    f"suberror {ex.suberror})")
        else:
            status, what = INTERNAL_ERROR, f"unexpected exit {ex!r} ({result.reason})"
        self.log(f"vCPU {vcpu.id}: {what}\n{result.report}")
        self.finish(status, what)

    def _vcpu_state(self, vcpu: Any) -> str:
        try:
            mp = vcpu.get_mp_state()
        except KvmError:
            mp = None
        if mp in (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED):
            return f"vCPU {vcpu.id}: waiting for INIT/SIPI (never started)"
        from ..x86.report import describe_vcpu  # only for reports: keeps start-up light

        return describe_vcpu(vcpu)

    def run(self, ready: Callable[[Machine], None] | None = None) -> int:
        """Set up (unless done), run until an exit condition, stop the vCPUs; return the status.

        *ready(machine)*, if given, is called once the VM is set up, before any vCPU runs.
        """
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
        if ready is not None:
            ready(self)
        if self.gdb_port is not None:
            try:
                self._start_gdb()
            except OSError as e:
                self.log(f"--gdb {self.gdb_port}: cannot listen: {e.strerror}")
                self.close()
                return VMM_ERROR
        else:
            for vcpu, loop in zip(self.vcpus, self.loops):
                t = threading.Thread(target=self._vcpu_thread, args=(vcpu, loop),
                                     name=f"vcpu{vcpu.id}", daemon=True)
                self.threads.append(t)
                t.start()
        try:
            # The main thread is the timer: no watchdog thread that could die unseen.
            if not self._done.wait(self.timeout):
                self.finish(TIMEOUT, "timeout")
        except KeyboardInterrupt:
            self.finish(INTERRUPTED, "interrupted")
        self._stop_threads()
        if self.status == TIMEOUT:
            self.log(f"timeout: no exit after {self.timeout:g} s; stopped the guest")
            for v, t in zip(self.vcpus, self.threads):
                if not t.is_alive():
                    self.log(self._vcpu_state(v))
        return self.status if self.status is not None else VMM_ERROR

    # -- under gdb ---------------------------------------------------------------------------------
    def _start_gdb(self) -> None:
        """Serve vCPU 0 to gdb (like ``qemu -s -S``): it stays at the kernel's entry
        until gdb continues or steps it; port and MMIO exits go to the bus."""
        from ..gdbstub import GdbStub

        # --gdb: a private UNIX socket (0600 in a 0700 directory); --gdb=PORT: loopback
        # TCP, which any local user can reach, so gdb must first send the stub's token.
        if self.gdb_port == GDB_SOCKET:
            stub = GdbStub(self.vcpus[0], on_exit=self._gdb_exit)
        else:
            stub = GdbStub(self.vcpus[0], port=self.gdb_port, on_exit=self._gdb_exit)
        self._stub = stub
        self.gdb_address = stub.address
        where = stub.path if stub.path is not None else "%s:%d" % tuple(stub.address[:2])
        command = " ".join(f"-ex '{c}'" for c in stub.gdb_commands())
        self.log(f"waiting for gdb on {where} (the kernel is stopped at its entry): gdb {command}")
        t = threading.Thread(target=self._gdb_thread, name="vcpu0-gdb", daemon=True)
        self.threads.append(t)
        t.start()
        self._stop_hooks.append(stub.close)

    def _gdb_thread(self) -> None:
        try:
            end = self._stub.serve()
            if end.reason == "detached" and not self._stop:
                self._vcpu_thread(self.vcpus[0], self.loops[0])    # runs on without gdb
            elif not self._stop:
                self.finish(INTERRUPTED, f"the gdb session ended ({end.reason})")
        except BaseException as e:
            self.finish(VMM_ERROR, f"gdb: {type(e).__name__}: {e}")
            self.log(f"gdb stub: internal error: {type(e).__name__}: {e}")

    def _gdb_exit(self, ex: Any) -> Any:
        from ..exits import Interrupted
        from ..gdbstub import Exited

        if not self.bus.dispatch(ex, self._unhandled) and not isinstance(ex, Interrupted):
            from ..x86.report import describe_vcpu

            vcpu = self.vcpus[0]
            reason = "shutdown" if type(ex).__name__ == "Shutdown" else "unhandled-exit"
            self._fatal(vcpu, RunResult(reason, ex, report=describe_vcpu(vcpu, ex)))
        if self._stop:
            return Exited(self.status if self.status is not None else VMM_ERROR)
        return None

    def _stop_threads(self) -> None:
        if self._stop_hooks:
            # Under gdb the stub thread sends gdb the exit packet itself when the
            # guest ended the run; give it a moment before closing its connection.
            for t in self.threads:
                t.join(_STOP_GRACE / 4)
        for hook in self._stop_hooks:
            try:
                hook()
            except Exception:
                pass
        deadline = time.monotonic() + _STOP_GRACE
        for t in self.threads:
            while t.is_alive() and time.monotonic() < deadline:
                for loop in self.loops:   # again: a stop can race with a loop (re)starting
                    try:
                        loop.stop()
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
