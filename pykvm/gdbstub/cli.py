"""``pykvm gdb``: how to debug a guest with gdb, a demo guest to try it on, the host probe."""

from __future__ import annotations

import argparse
import sys

from ..command import EXIT_NO, EXIT_OK, UsageError, error, run_command

PROG = "gdb"

_DESCRIPTION = """\
Debug a pykvm guest with the real gdb through pykvm's GDB remote stub.

From Python, serve any vCPU (the calling thread runs it while gdb lets it):

    from pykvm.gdbstub import GdbStub, Exited
    with GdbStub(vcpu, on_exit=my_device_model) as stub:
        print(stub.gdb_commands())      # how gdb connects
        stub.serve()                    # one gdb session

From the VMM:  pykvm vmm --gdb ...  (serves the VMM's boot vCPU the same way).

By default the stub listens on a private UNIX socket (mode 0600 in a 0700
directory; peers of another uid are refused) and gdb connects with
    gdb -ex 'set architecture i386:x86-64' -ex 'target remote /path/gdb.sock'
A TCP port (loopback only) is used only when asked for; it requires a token:
    (gdb) target remote 127.0.0.1:PORT
    (gdb) monitor auth TOKEN
    (gdb) maintenance flush register-cache
See docs/gdbstub.md."""

_EPILOG = """\
actions:
  demo    serve a tiny built-in 64-bit guest (it prints a line and halts) and
          print the gdb command line that connects to it
  probe   print what this host's KVM does for a debugger (CPL3 steps and int3)

exit status: 0 ok, 1 no gdb came or the session broke off, 2 usage error, 3 internal error"""

# The demo guest, 64-bit, at 0x10000: print the string at 0x11100 on port 0x3f8, then hlt.
_DEMO_CODE = bytes.fromhex(
    "48c7c600110100"   # mov rsi, 0x11100
    "66baf803"         # mov dx, 0x3f8
    "ac"               # next: lodsb
    "84c0"             #       test al, al
    "7403"             #       jz done
    "ee"               #       out dx, al
    "ebf8"             #       jmp next
    "f4")              # done: hlt
_DEMO_ENTRY, _DEMO_MESSAGE = 0x10000, 0x11100


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pykvm gdb", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("demo", "probe"), help="what to do (see below)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="demo: UNIX socket path (default: a private one)")
    where.add_argument("--port", type=int, metavar="PORT",
                       help="demo: TCP port on 127.0.0.1 instead (needs 'monitor auth TOKEN')")
    p.add_argument("--message", default="hello from the pykvm gdb demo",
                   help="demo: the line the guest prints (ASCII, at most 200 characters)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="demo: stop waiting for gdb after this long (default 600)")
    return p


def _demo(args: argparse.Namespace) -> int:
    import pykvm

    from .. import x86
    from .stub import Exited, GdbStub

    message = args.message
    if not message.isascii() or not message.isprintable() or len(message) > 200:
        raise UsageError("--message must be at most 200 printable ASCII characters")
    if not 0 < args.timeout <= 86400:
        raise UsageError("--timeout must be a number of seconds in (0, 86400]")
    if args.port is not None and not 0 <= args.port <= 0xFFFF:
        raise UsageError("--port must be in 0..65535")
    out = sys.stdout

    def on_exit(ex: pykvm.Exit) -> Exited | None:
        if isinstance(ex, pykvm.IoOut) and ex.port == 0x3F8:
            out.write(ex.data.decode("ascii", "replace"))
            out.flush()
            return None
        if isinstance(ex, pykvm.Hlt):
            return Exited(0)
        raise RuntimeError(f"the demo guest stopped unexpectedly: {ex!r}")

    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 0x200000)
        vm.write(_DEMO_ENTRY, _DEMO_CODE)
        vm.write(_DEMO_MESSAGE, message.encode() + b"\n\0")
        vcpu = vm.create_vcpu()
        x86.setup_cpuid(kvm, vcpu)
        x86.setup_long_mode(vcpu, x86.Arena(vm, 0x1000, 0xE000), entry=_DEMO_ENTRY, stack=0xF000,
                            identity=(0, 0x200000))
        with GdbStub(vcpu, path=args.socket, port=args.port, on_exit=on_exit) as stub:
            cmd = " ".join(f"-ex '{c}'" for c in stub.gdb_commands())
            print(f"pykvm gdb: guest at {_DEMO_ENTRY:#x}; connect with:\n  gdb {cmd}",
                  file=sys.stderr, flush=True)
            try:
                end = stub.serve(accept_timeout=args.timeout)
            except TimeoutError:
                error(PROG, f"no gdb connected within {args.timeout:g} s")
                return EXIT_NO
        print(f"pykvm gdb: session ended: {end.reason}", file=sys.stderr)
        return EXIT_OK if end.reason in ("exited", "detached", "killed") else EXIT_NO


def _probe() -> int:
    from .support import debug_support

    sup = debug_support()
    print(f"single step of CPL3 code stops in user space: {'yes' if sup.step_cpl3 else 'no'}")
    print(f"int3 in CPL3 code exits to user space:       {'yes' if sup.sw_bp_cpl3 else 'no'}")
    print(f"KVM_CAP_SET_GUEST_DEBUG2:                    {sup.guest_debug_flags:#x}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``pykvm gdb ACTION ...``; returns the exit status (see ``--help``)."""
    def body() -> int:
        args = _parser().parse_args(argv)
        return _demo(args) if args.action == "demo" else _probe()

    return run_command(PROG, body)
