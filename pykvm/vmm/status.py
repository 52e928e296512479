"""Process exit statuses of ``python -m pykvm.vmm``.

The guest's debug-exit port (0xf4) gives odd statuses, ``(v << 1) | 1``
(modulo 256, as QEMU's isa-debug-exit); the VMM's own outcomes are even, so
the two never collide.
"""

RESET = 0              #: the guest reset or powered off the machine (0x64 <- 0xfe, 0xcf9, 0x92)
LOAD_ERROR = 2         #: bad command line, or the kernel / a module could not be loaded
TRIPLE_FAULT = 4       #: KVM_EXIT_SHUTDOWN: the guest triple-faulted
EMULATION_FAILURE = 6  #: KVM_EXIT_INTERNAL_ERROR, suberror 1 (KVM could not emulate an instruction)
INTERNAL_ERROR = 8     #: another internal error, entry failure or unexpected exit
VMM_ERROR = 10         #: /dev/kvm unusable or a failure inside the VMM itself
TIMEOUT = 124          #: --timeout expired (as coreutils' timeout)
INTERRUPTED = 130      #: SIGINT (Ctrl-C)


def debug_exit_status(value: int) -> int:
    """The status a debug-exit write of *value* produces."""
    return ((value << 1) | 1) & 0xFF

#: ``Machine(gdb=GDB_SOCKET)`` / ``--gdb`` without a port: serve gdb on a private UNIX socket.
GDB_SOCKET = -1
