"""07 — A single-step tracer: one exit per guest instruction.

What it shows
  * ``vcpu.set_guest_debug(single_step=True)`` (``KVM_SET_GUEST_DEBUG``):
    after every instruction the vCPU exits with ``Debug(exception=1, pc=...)``,
    where ``pc`` is the address of the *next* instruction;
  * handling a kind of exit the run loop does not know: ``loop.on_exit``;
  * labelling addresses with the assembler's symbols (``prog.symbols``) and,
    if the optional disassembler is installed (``pip install capstone``, or
    the ``disasm`` extra), showing each instruction's text;
  * ``x86.describe_vcpu`` for a look at the registers at the end.

The guest computes gcd(1071, 462) with Euclid's algorithm (``div`` gives the
remainder) and reports it on port 0xf4.

This host runs CPL0 guest code in KVM's instruction emulator, which
single-steps it; single-stepping CPL3 code would need PVM's own debug-event
delivery, so the traced code runs at CPL0 (any mode works on VMX/SVM hosts).

Needs GNU binutils; capstone optional.   Run:  python examples/07_single_step.py
"""

import pykvm
from pykvm import x86

GUEST = r"""
_start:
    mov  eax, 1071
    mov  ecx, 462
euclid:
    xor  edx, edx
    div  ecx                # eax = eax / ecx, edx = eax % ecx
    mov  eax, ecx
    mov  ecx, edx
    test ecx, ecx
    jnz  euclid
    out  0xf4, al           # the gcd
    hlt
"""


def label(prog: x86.Program, addr: int) -> str:
    """``symbol+offset`` for *addr*: the nearest symbol at or below it."""
    best = max(((a, n) for n, a in prog.symbols.items() if a <= addr), default=None)
    if best is None:
        return hex(addr)
    a, n = best
    return n if a == addr else f"{n}+{addr - a:#x}"


def main() -> None:
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 2 * x86.MiB)
        prog = x86.assemble(GUEST, base=0x10000)
        prog.load(vm)
        vcpu = vm.create_vcpu()
        x86.setup_cpuid(kvm, vcpu)
        x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xF000), entry=prog.entry, stack=0x80000)

        trace = []

        def show(addr: int) -> None:
            code = vm.read(addr, 15)
            text = x86.disassemble(code, addr)           # None without capstone
            trace.append(addr)
            print(f"  {len(trace):3d}  {addr:#x}  {label(prog, addr):<12} {text[0] if text else ''}")

        def on_debug(exit_: pykvm.Debug) -> None:
            show(exit_.pc)                               # the next instruction to run

        loop = x86.RunLoop(vcpu)
        loop.on_exit(pykvm.ExitReason.DEBUG, on_debug)
        loop.on_out(0xF4, lambda port, data: loop.stop(data[0]))

        vcpu.set_guest_debug(single_step=True)
        if x86.disassemble(b"\x90", 0) is None:
            print("(install capstone to see each instruction's text)")
        print("  step address   symbol       instruction")
        show(vcpu.get_regs().rip)                        # the first one, before running
        stop = loop.run(timeout=60)          # a watchdog, never reached normally
        vcpu.set_guest_debug(enable=False)

        print(f"traced {len(trace)} instructions; the guest computed gcd(1071, 462) = {stop.value}")
        print(x86.describe_vcpu(vcpu, title="final state"))


if __name__ == "__main__":
    main()
