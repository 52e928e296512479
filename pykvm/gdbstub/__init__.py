"""A GDB remote-protocol stub for a pykvm vCPU (x86-64).

::

    from pykvm.gdbstub import GdbStub, Exited

    def on_exit(ex):                       # your device model, as in any run loop
        if isinstance(ex, pykvm.IoOut) and ex.port == 0x3F8:
            sys.stdout.buffer.write(ex.data)
            return None                     # handled: keep running
        if isinstance(ex, pykvm.Hlt):
            return Exited(0)                # the guest is done: gdb sees it exit

    with GdbStub(vcpu, on_exit=on_exit) as stub:
        print(" ".join(f"-ex '{c}'" for c in stub.gdb_commands()))
        stub.serve()                        # blocks: one gdb session, running the vCPU

    $ gdb -ex 'set architecture i386:x86-64' -ex 'target remote /tmp/pykvm-gdb-…/gdb.sock'

The package, by concern:

* :mod:`~pykvm.gdbstub.protocol` — framing, checksums, escapes, limits (pure);
* :mod:`~pykvm.gdbstub.registers` — the target description and register file;
* :mod:`~pykvm.gdbstub.target` — memory at guest virtual addresses (through
  :func:`pykvm.x86.paging.translate`), breakpoints keyed by guest physical
  address, ``KVM_SET_GUEST_DEBUG``;
* :mod:`~pykvm.gdbstub.support` — what this host's KVM does for a debugger;
* :mod:`~pykvm.gdbstub.stub` — the socket (private UNIX socket by default,
  TCP with a token when asked), one session at a time, packet dispatch;
* :mod:`~pykvm.gdbstub.cli` — ``pykvm gdb``.

See ``docs/gdbstub.md``.
"""

from __future__ import annotations

from ..vcpu import Vcpu
from .protocol import PACKET_SIZE, ProtocolError
from .registers import REGISTERS, TARGET_XML
from .stub import Exited, GdbStub, SessionEnd, Stop, default_on_exit
from .support import DebugSupport, debug_support

__all__ = [
    "PACKET_SIZE",
    "REGISTERS",
    "TARGET_XML",
    "DebugSupport",
    "Exited",
    "GdbStub",
    "ProtocolError",
    "SessionEnd",
    "Stop",
    "debug_support",
    "default_on_exit",
    "kvm_translate",
    "translate",
]


def translate(vcpu: Vcpu, vaddr: int) -> int | None:
    """Deprecated: use ``pykvm.x86.translate(vcpu.vm, vcpu.get_sregs(), vaddr)`` (the one walker).

    Guest physical address of guest virtual *vaddr* under the vCPU's current
    paging mode, or None.  Kept for one release.
    """
    from ..x86.paging import translate as walk

    return walk(vcpu.vm, vcpu.get_sregs(), vaddr)


def kvm_translate(vcpu: Vcpu, vaddr: int) -> int | None:
    """The same question asked of KVM (``KVM_TRANSLATE``); None if not mapped."""
    t = vcpu.translate_gva(vaddr)
    return int(t.physical_address) if t.valid else None
