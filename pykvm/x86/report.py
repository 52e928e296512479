"""A readable dump of a vCPU: registers, mode, control registers, the bytes at RIP.

:func:`describe_vcpu` is what :class:`~pykvm.x86.runloop.RunLoop` prints when
a guest stops abnormally; call it yourself whenever a guest surprises you::

    print(describe_vcpu(vcpu, exit))

If the optional ``capstone`` disassembler is installed (``pip install
'kvmbind[disasm]'``), the instruction at RIP is disassembled too.
"""

from __future__ import annotations

from .consts import CR0, CR4, EFER, RFLAGS
from .paging import translate

__all__ = ["MP_STATES", "bytes_at_rip", "cpu_mode", "describe_vcpu", "disassemble"]

MP_STATES = {0: "RUNNABLE", 1: "UNINITIALIZED", 2: "INIT_RECEIVED", 3: "HALTED",
             4: "SIPI_RECEIVED", 5: "STOPPED", 6: "CHECK_STOP", 7: "OPERATING", 8: "LOAD",
             9: "AP_RESET_HOLD", 10: "SUSPENDED"}

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def cpu_mode(sregs) -> str:
    """``"real"``, ``"protected 16/32-bit"``, ``"compat"`` or ``"long 64-bit"`` from *sregs*."""
    if not sregs.cr0 & CR0.PE:
        return "real"
    if sregs.efer & EFER.LMA:
        return "long 64-bit" if sregs.cs.l else "compatibility"
    bits = 32 if sregs.cs.db else 16
    return f"protected {bits}-bit" + (", paging" if sregs.cr0 & CR0.PG else "")


def linear_rip(regs, sregs) -> int:
    """The linear address of the next instruction."""
    if sregs.efer & EFER.LMA and sregs.cs.l:
        return regs.rip
    return (sregs.cs.base + regs.rip) & 0xFFFFFFFF


def bytes_at_rip(vcpu, regs=None, sregs=None, n: int = 16):
    """``(linear, physical or None, bytes)`` of the code at RIP, read through the guest's page tables."""
    regs = regs or vcpu.get_regs()
    sregs = sregs or vcpu.get_sregs()
    lin = linear_rip(regs, sregs)
    phys = translate(vcpu.vm, sregs, lin)
    if phys is None:
        return lin, None, b""
    out = b""
    for k in range(n):  # stop at the end of guest RAM (the next byte may be MMIO)
        try:
            out += vcpu.vm.read(phys + k, 1)
        except ValueError:
            break
    return lin, phys, out


def disassemble(code: bytes, address: int, bits: int = 64, count: int = 1) -> list[str] | None:
    """Up to *count* instructions as text with capstone, or None if capstone is not installed."""
    try:
        import capstone  # type: ignore
    except ImportError:
        return None
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    out = []
    for insn in md.disasm(code, address):
        out.append(f"{insn.mnemonic} {insn.op_str}".strip())
        if len(out) >= count:
            break
    return out


def code_bits(sregs) -> int:
    """16, 32 or 64: the code size of the current code segment."""
    if sregs.efer & EFER.LMA and sregs.cs.l:
        return 64
    if sregs.cr0 & CR0.PE and sregs.cs.db:
        return 32
    return 16


def mp_state(vcpu) -> int | None:
    """``KVM_GET_MP_STATE`` (None if unavailable)."""
    try:
        return vcpu.get_mp_state()
    except Exception:
        return None


def _seg(name: str, s) -> str:
    if s.unusable:
        return f"{name}={s.selector:04x} (unusable)"
    return (f"{name}={s.selector:04x} base={s.base:x} limit={s.limit:x} type={s.type:x} "
            f"dpl={s.dpl}{' L' if s.l else ''}{' D' if s.db else ''}")


def describe_vcpu(vcpu, exit=None, *, title: str | None = None) -> str:
    """A multi-line description of *vcpu*'s state (and of *exit*, if given)."""
    lines = []
    head = title or f"vCPU {vcpu.id}"
    if exit is not None:
        head += f": {exit!r}"
        desc = getattr(exit, "description", None)
        if isinstance(desc, str):
            head += f" ({desc})"
    lines.append(head)
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except Exception as e:  # closed vCPU, or the fd is gone
        lines.append(f"  (state unavailable: {e})")
        return "\n".join(lines)
    cpl = sregs.cs.selector & 3 if sregs.cr0 & CR0.PE else 0
    lines.append(f"  mode {cpu_mode(sregs)}, CPL {cpl}; rip={regs.rip:#x} "
                 f"rflags={regs.rflags:#x} [{RFLAGS.decode(regs.rflags)}]")
    for k in range(0, 16, 4):
        lines.append("  " + "  ".join(f"{n:>3}={getattr(regs, n):016x}" for n in _GPRS[k:k + 4]))
    lines.append("  " + _seg("cs", sregs.cs) + "   " + _seg("ss", sregs.ss))
    lines.append(f"  cr0={sregs.cr0:#x} [{CR0.decode(sregs.cr0)}]  cr2={sregs.cr2:#x}  "
                 f"cr3={sregs.cr3:#x}")
    lines.append(f"  cr4={sregs.cr4:#x} [{CR4.decode(sregs.cr4)}]  "
                 f"efer={sregs.efer:#x} [{EFER.decode(sregs.efer)}]")
    lines.append(f"  gdt={sregs.gdt.base:#x}/{sregs.gdt.limit:#x}  idt={sregs.idt.base:#x}/"
                 f"{sregs.idt.limit:#x}  tr={sregs.tr.selector:#x}")
    pending = [i for i in range(256) if sregs.interrupt_bitmap[i // 64] >> (i % 64) & 1]
    if pending:
        lines.append(f"  pending interrupt: {pending}")
    mp = mp_state(vcpu)
    if mp is not None and mp != 0:
        lines.append(f"  mp_state={MP_STATES.get(mp, mp)}")
    try:
        lin, phys, code = bytes_at_rip(vcpu, regs, sregs)
    except Exception as e:  # pragma: no cover - defensive: a report must not raise
        lin, phys, code = linear_rip(regs, sregs), None, b""
        lines.append(f"  (could not read code: {e})")
    if phys is None:
        lines.append(f"  code at {lin:#x}: not mapped by the guest's page tables")
    elif not code:
        lines.append(f"  code at {lin:#x} (gpa {phys:#x}): not in guest RAM")
    else:
        text = f"  code at {lin:#x} (gpa {phys:#x}): {code.hex(' ')}"
        dis = disassemble(code, lin, code_bits(sregs))
        if dis:
            text += f"   ; {dis[0]}"
        lines.append(text)
    return "\n".join(lines)

