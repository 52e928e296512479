"""Work-arounds for hosts whose KVM differs from VMX/SVM behaviour.

PVM hosts (``kvm_pvm``: KVM without VMX/SVM, used in some cloud sandboxes)
run guest CPL3 code natively but deliver events from user mode (SYSCALL,
``int n``, exceptions, interrupts) only through PVM's own paravirtual entry
protocol, not through the guest's IDT or its SYSCALL MSRs as an ordinary x86
kernel expects.  A ``syscall`` executed at CPL3 there is left half done:
RIP = ``LSTAR``, RCX and R11 saved, RFLAGS masked by ``SYSCALL_MASK`` — but
CS/SS still the user's, so the first fetch from the (supervisor-only) kernel
page faults, and with no way to deliver the fault the vCPU shuts down.

:func:`complete_syscall` finishes such a SYSCALL from the VMM: it loads the
kernel CS/SS that ``STAR`` names, after which the guest kernel's handler
runs at CPL0 and its ``sysretq`` works.  On VMX/SVM hosts the situation never
arises and the function returns False.  Register it for shutdown exits::

    loop.on_exit(ExitReason.SHUTDOWN, lambda exit: x86.quirks.complete_syscall(vcpu))
"""

from __future__ import annotations

from .consts import EFER, MSR
from .descriptors import Segment

__all__ = ["complete_syscall"]


def complete_syscall(vcpu) -> bool:
    """Finish a SYSCALL the host left half done (see the module text); True if it did.

    Checks that the vCPU is in 64-bit mode with ``EFER.SCE``, still at CPL3,
    and at RIP = ``LSTAR`` — the signature of that case — before changing
    anything.
    """
    sregs = vcpu.get_sregs()
    if not (sregs.efer & EFER.LMA and sregs.efer & EFER.SCE) or sregs.cs.dpl != 3:
        return False
    msrs = vcpu.get_msrs([MSR.LSTAR, MSR.STAR])
    regs = vcpu.get_regs()
    if regs.rip != msrs.get(MSR.LSTAR):
        return False
    kernel_cs = (msrs[MSR.STAR] >> 32) & 0xFFFC
    sregs.cs = Segment.code64(0).kvm_segment(kernel_cs)
    sregs.ss = Segment.data(0).kvm_segment(kernel_cs + 8)
    vcpu.set_sregs(sregs)
    return True
