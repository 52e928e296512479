"""The README's first guest, as a user with ``mypy --strict`` writes it.

tests/typing/test_user_script.py type-checks this file with ``mypy --strict``
and runs it on the real /dev/kvm: it prints ``A`` (what the guest wrote to
port 0xe9) and the vCPU's rip after ``hlt``.
"""

from __future__ import annotations

import pykvm

CODE = bytes([0xB0, 0x41,   # mov al, 'A'
              0xE6, 0xE9,   # out 0xe9, al
              0xF4])        # hlt


def main() -> int:
    out = bytearray()
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        mem = vm.add_memory(0x1000, 0x1000)
        mem.write(0, CODE)
        vcpu = vm.create_vcpu()
        sregs = vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip = 0x1000
        regs.rflags = 2
        vcpu.set_regs(regs)
        with vcpu.kick_after(10):
            while True:
                exit_ = vcpu.run()
                if isinstance(exit_, pykvm.IoOut):
                    port: int = exit_.port
                    if port == 0xE9:
                        out += exit_.data
                elif isinstance(exit_, pykvm.Hlt):
                    break
                else:
                    print(f"unexpected exit: {exit_!r}")
                    return 1
        rip: int = vcpu.get_regs().rip
    print(out.decode(), hex(rip))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
