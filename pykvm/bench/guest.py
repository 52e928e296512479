"""The guests every benchmark runs, described once and built twice.

A :class:`Spec` is a whole machine: memory slots with their initial bytes,
``kvm_sregs``, ``kvm_regs`` and a few options (user-space MSR exits, an
ioeventfd, a dirty ring, hypercall exits).  :meth:`Spec.build` builds it with
pykvm; :meth:`Spec.to_bytes` serialises it for the C reference
(``benchmarks/c/kvmbench.c``), which issues the same ioctls with the same
bytes.  So pykvm, C and Unicorn all run byte-identical guest code.

Guest physical layout (64-bit mode, identity paging, every level has the
U/S bit so the same tables serve CPL0 and CPL3)::

    0x1000 PML4   0x2000 PDPT   0x3000 PD (0..1 GiB, 2 MiB pages)
    0x4000 PD for 1..2 GiB (the dirty-log region)
    0x9000 result words written by in-guest (rdtsc) measurements
    0x10000 code            RAM: slot 0, 0 .. 2 MiB
    0x200000 .. 0x3fffff    mapped by the page tables, no memslot: MMIO
    0x40000000 .. +1 GiB    slot 1 when a spec asks for the dirty region

Guest code is hand-assembled; each byte group carries its assembly.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

import pykvm
from pykvm.uapi import structs as S

PML4, PDPT, PD, PD_HI = 0x1000, 0x2000, 0x3000, 0x4000
RESULT = 0x9000
CODE = 0x10000
RAM_SIZE = 0x200000
MMIO = 0x200000
DIRTY_GPA = 0x40000000
DIRTY_SIZE = 1 << 30

# Ports and MSR used by the guests.
PORT_BENCH = 0x10      # the exit being measured
PORT_DONE = 0x11       # "loop finished" (compute, dirty passes)
PORT_RESULT = 0x13     # "result words are in memory at RESULT"
PORT_EVENTFD = 0x14    # served in the kernel by an ioeventfd
MSR_INDEX = 0x4B564DFF  # an MSR nobody uses, denied by the filter -> user space

UNROLL = 1000          # exits per pass through an unrolled block

# Spec options (keys shared with kvmbench.c)
OPT_MSR_FILTER = 1     # value: MSR index to deny (user-space MSR exits, reason FILTER)
OPT_IOEVENTFD_PIO = 2  # value: port for a 1-byte PIO ioeventfd
OPT_DIRTY_RING = 3     # value: ring size in bytes (enabled before the vCPU exists)
OPT_EXIT_HYPERCALL = 4  # value: KVM_CAP_EXIT_HYPERCALL mask

MAGIC = b"PKVMSPC1"


# ---------------------------------------------------------------------------
# machine code

def _jmp_back(at: int, to: int) -> bytes:
    """``jmp rel32`` placed at offset *at* jumping to offset *to*."""
    return b"\xE9" + struct.pack("<i", to - (at + 5))


def unrolled(prologue: bytes, body: bytes, n: int = UNROLL) -> bytes:
    """*prologue*, then *body* n times, then ``jmp`` back to the first body."""
    block = prologue + body * n
    return block + _jmp_back(len(block), len(prologue))


def mov_rbx(v: int) -> bytes:
    return b"\x48\xBB" + struct.pack("<Q", v)           # mov rbx, imm64


def mov_rcx(v: int) -> bytes:
    return b"\x48\xB9" + struct.pack("<Q", v)           # mov rcx, imm64


def mov_rdx(v: int) -> bytes:
    return b"\x48\xBA" + struct.pack("<Q", v)           # mov rdx, imm64


def mov_rdi(v: int) -> bytes:
    return b"\x48\xBF" + struct.pack("<Q", v)           # mov rdi, imm64


OUT = bytes([0xE6, PORT_BENCH])                        # out 0x10, al
IN = bytes([0xE4, PORT_BENCH])                         # in al, 0x10
MMIO_W = bytes([0x88, 0x03])                           # mov [rbx], al
MMIO_R = bytes([0x8A, 0x03])                           # mov al, [rbx]
HLT = bytes([0xF4])                                    # hlt
RDMSR = bytes([0x0F, 0x32])                            # rdmsr
WRMSR = bytes([0x0F, 0x30])                            # wrmsr
# mov eax,12 (KVM_HC_MAP_GPA_RANGE); xor ebx,ebx; mov ecx,1; xor edx,edx; vmcall
HCALL = (b"\xB8\x0C\x00\x00\x00" + b"\x31\xDB" + b"\xB9\x01\x00\x00\x00"
         + b"\x31\xD2" + b"\x0F\x01\xC1")


def code_exit(kind: str) -> bytes:
    """An endless stream of the exit *kind* (one exit per instruction)."""
    if kind == "pio_out":
        return unrolled(b"", OUT)
    if kind == "pio_in":
        return unrolled(b"", IN)
    if kind == "mmio_write":
        return unrolled(mov_rbx(MMIO), MMIO_W)
    if kind == "mmio_read":
        return unrolled(mov_rbx(MMIO), MMIO_R)
    if kind == "hlt":
        return unrolled(b"", HLT)
    if kind == "rdmsr":
        return unrolled(b"\xB9" + struct.pack("<I", MSR_INDEX), RDMSR)      # mov ecx, idx
    if kind == "wrmsr":
        return unrolled(b"\xB9" + struct.pack("<I", MSR_INDEX)               # mov ecx, idx
                        + b"\x31\xC0\x31\xD2", WRMSR)                          # xor eax/edx
    if kind == "hypercall":
        return unrolled(b"", HCALL, 200)
    raise ValueError(kind)


def code_compute(iterations: int) -> bytes:
    """``mov rcx, N; l: dec rcx; jnz l; out 0x11, al; jmp start`` (the compute loop)."""
    c = mov_rcx(iterations)
    c += b"\x48\xFF\xC9" + b"\x75\xFB"                  # l: dec rcx / jnz l
    c += bytes([0xE6, PORT_DONE])                       # out 0x11, al
    return c + _jmp_back(len(c), 0)


#: (offset of the loop head, offset of the ``out``) in code_compute's bytes.
COMPUTE_LOOP = (10, 15)

_TSC_START = (b"\x0F\xAE\xE8" + b"\x0F\x31"            # lfence; rdtsc
              + b"\x48\xC1\xE2\x20" + b"\x48\x09\xD0"    # shl rdx,32; or rax,rdx
              + b"\x49\x89\xC0")                         # mov r8, rax
_TSC_END = (b"\x0F\xAE\xE8" + b"\x0F\x31"
            + b"\x48\xC1\xE2\x20" + b"\x48\x09\xD0"
            + b"\x4C\x29\xC0"                            # sub rax, r8
            + b"\x48\x89\x04\x25" + struct.pack("<I", RESULT))  # mov [RESULT], rax

IN_GUEST_BODIES: dict[str, bytes] = {
    "cpuid": b"\x31\xC0\x0F\xA2",                        # xor eax,eax; cpuid
    "xor+nop": b"\x31\xC0\x90",                          # xor eax,eax; nop (baseline for cpuid)
    "ioeventfd": bytes([0xE6, PORT_EVENTFD]),            # out 0x14, al -> eventfd in the kernel
    "nop": b"\x90",                                      # baseline for ioeventfd
}


def code_in_guest(body: bytes, n: int) -> bytes:
    """rdtsc; body x n; rdtsc; [RESULT] = cycles; out 0x13; jmp start."""
    c = _TSC_START + body * n + _TSC_END + bytes([0xE6, PORT_RESULT])
    return c + _jmp_back(len(c), 0)


def code_dirty(count: int, stride: int) -> bytes:
    """Write one byte to *count* pages of the dirty region, *stride* bytes apart; out 0x11."""
    c = mov_rdi(DIRTY_GPA) + mov_rcx(count) + mov_rdx(stride)
    c += b"\x48\x85\xC9" + b"\x74\x0A"                  # test rcx,rcx; jz done (+10: the loop)
    loop = len(c)
    c += b"\x88\x07"                                     # l: mov [rdi], al
    c += b"\x48\x01\xD7"                                 # add rdi, rdx
    c += b"\x48\xFF\xC9"                                 # dec rcx
    c += b"\x75" + struct.pack("<b", loop - (len(c) + 2))  # jnz l
    c += b"\xFE\xC0"                                     # done: inc al
    c += bytes([0xE6, PORT_DONE])                        # out 0x11, al
    return c + _jmp_back(len(c), 0)


REAL_MODE_COLD = bytes([0xB0, 0x41, 0xE6, PORT_BENCH, 0xF4])  # mov al,'A'; out 0x10,al; hlt


# ---------------------------------------------------------------------------
# machine description

@dataclass
class Slot:
    slot: int
    gpa: int
    size: int
    flags: int = 0
    image: bytes = b""


@dataclass
class Spec:
    """One machine: slots, registers, options (see the module docstring)."""

    code: bytes
    cpl: int = 0
    slots: list[Slot] = field(default_factory=list)
    options: dict[int, int] = field(default_factory=dict)
    dirty: bool = False       # add the 1 GiB region at DIRTY_GPA as slot 1 (dirty logging)
    sregs: bytes | None = None
    regs: bytes | None = None

    def __post_init__(self) -> None:
        img = bytearray(CODE + len(self.code))
        struct.pack_into("<Q", img, PML4, PDPT | 7)
        struct.pack_into("<QQ", img, PDPT, PD | 7, PD_HI | 7)
        for i in range(512):
            struct.pack_into("<Q", img, PD + 8 * i, (i << 21) | 0x87)        # P RW US PS
            struct.pack_into("<Q", img, PD_HI + 8 * i, DIRTY_GPA + (i << 21) | 0x87)
        img[CODE:] = self.code
        self.slots = [Slot(0, 0, RAM_SIZE, 0, bytes(img))]
        if self.dirty:
            # dirty logging on (with a dirty ring, KVM reports the pages there instead)
            self.slots.append(Slot(1, DIRTY_GPA, DIRTY_SIZE, S.KVM_MEM_LOG_DIRTY_PAGES))

    # -- registers ------------------------------------------------------------
    def _fill_sregs(self, s: S.kvm_sregs) -> None:
        s.cr3 = PML4
        s.cr4 = 0x20                      # PAE
        s.cr0 = 0x80000011                # PG | ET | PE
        s.efer = 0x500                    # LME | LMA
        dpl = self.cpl
        for seg, idx, typ in (("cs", 1, 11), ("ds", 2, 3), ("es", 2, 3), ("fs", 2, 3),
                              ("gs", 2, 3), ("ss", 2, 3)):
            sg = getattr(s, seg)
            sg.base, sg.limit, sg.type = 0, 0xFFFFFFFF, typ
            sg.selector = (idx + (2 if dpl else 0)) << 3 | dpl
            sg.present, sg.dpl, sg.s, sg.g = 1, dpl, 1, 1
            sg.l, sg.db = (1, 0) if seg == "cs" else (0, 1)

    def _fill_regs(self, r: S.kvm_regs) -> None:
        r.rip, r.rsp = CODE, 0x8000
        r.rflags = 0x3002 if self.cpl == 3 else 0x2   # IOPL 3 at CPL3: in/out do not fault

    # -- pykvm ----------------------------------------------------------------------
    def build(self, kvm: pykvm.Kvm) -> Machine:
        """Build the machine with pykvm; remember the register bytes for the C side."""
        vm = kvm.create_vm()
        m = Machine(vm)
        try:
            for sl in self.slots:
                mem = vm.add_memory(sl.gpa, sl.size, flags=sl.flags, slot=sl.slot)
                if sl.image:
                    mem.write(0, sl.image)
            m.fds += apply_vm_options(vm, self.options)
            vcpu = m.vcpu = vm.create_vcpu()
            s = vcpu.get_sregs()
            self._fill_sregs(s)
            vcpu.set_sregs(s)
            r = vcpu.get_regs()
            self._fill_regs(r)
            vcpu.set_regs(r)
            self.sregs, self.regs = bytes(s), bytes(r)
        except BaseException:
            m.close()
            raise
        return m

    # -- C --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        if self.sregs is None or self.regs is None:
            raise RuntimeError("build() the spec once before serialising it (registers come from KVM)")
        out = [MAGIC, struct.pack("<IIII", len(self.slots), len(self.options), len(self.sregs), len(self.regs))]
        for sl in self.slots:
            out.append(struct.pack("<IIQQQ", sl.slot, sl.flags, sl.gpa, sl.size, len(sl.image)))
            out.append(sl.image)
        out += [self.sregs, self.regs]
        for k, v in sorted(self.options.items()):
            out.append(struct.pack("<IIQ", k, 0, v))
        return b"".join(out)


# ---------------------------------------------------------------------------
# options through the raw layer (what pykvm does not wrap yet)

class Machine:
    """A VM built from a :class:`Spec`: ``vm``, ``vcpu`` and the fds it owns."""

    def __init__(self, vm: pykvm.Vm) -> None:
        self.vm = vm
        self.vcpu: pykvm.Vcpu | None = None
        self.fds: list[int] = []

    def close(self) -> None:
        import os

        self.vm.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def apply_vm_options(vm: pykvm.Vm, options: dict[int, int]) -> list[int]:
    """VM-level set-up for *options* (before the vCPU is created); returns fds to close."""
    fds: list[int] = []
    from pykvm.fd import ioctl
    from pykvm.uapi import ioctls as I
    from pykvm.uapi.enums import Cap

    if OPT_MSR_FILTER in options:
        vm.enable_cap(Cap.X86_USER_SPACE_MSR, S.KVM_MSR_EXIT_REASON_FILTER)
        flt = S.kvm_msr_filter(flags=S.KVM_MSR_FILTER_DEFAULT_ALLOW)
        bitmap = (ctypes.c_uint8 * 8)()                 # bit clear = deny
        flt.ranges[0].flags = S.KVM_MSR_FILTER_READ | S.KVM_MSR_FILTER_WRITE
        flt.ranges[0].nmsrs = 1
        flt.ranges[0].base = options[OPT_MSR_FILTER]
        flt.ranges[0].bitmap = ctypes.addressof(bitmap)
        ioctl(vm.fileno(), I.KVM_X86_SET_MSR_FILTER, flt)   # the kernel copies the bitmap
    if OPT_IOEVENTFD_PIO in options:
        import os

        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(efd)
        ev = S.kvm_ioeventfd(addr=options[OPT_IOEVENTFD_PIO], len=1, fd=efd,
                             flags=S.KVM_IOEVENTFD_FLAG_PIO)
        ioctl(vm.fileno(), I.KVM_IOEVENTFD, ev)
    if OPT_DIRTY_RING in options:
        cap = Cap.DIRTY_LOG_RING_ACQ_REL if vm.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL) \
            else Cap.DIRTY_LOG_RING
        vm.enable_cap(cap, options[OPT_DIRTY_RING])
    if OPT_EXIT_HYPERCALL in options:
        vm.enable_cap(Cap.EXIT_HYPERCALL, options[OPT_EXIT_HYPERCALL])
    return fds


def real_mode_cold_source() -> str:
    """The ``python -c`` program of the cold-start measurement (pykvm, real mode)."""
    return (
        "import pykvm\n"
        "k = pykvm.Kvm(); vm = k.create_vm()\n"
        "m = vm.add_memory(0, 0x200000)\n"
        f"m.write(0x1000, {REAL_MODE_COLD!r})\n"
        "v = vm.create_vcpu()\n"
        "s = v.get_sregs(); s.cs.base = 0; s.cs.selector = 0; v.set_sregs(s)\n"
        "r = v.get_regs(); r.rip = 0x1000; r.rflags = 2; v.set_regs(r)\n"
        "e = v.run()\n"
        f"assert e.port == {PORT_BENCH} and e.data == b'A', e\n"
    )
