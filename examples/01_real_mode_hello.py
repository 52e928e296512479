"""01 — Hello from real mode: the smallest useful hypervisor.

What it shows
  * create a VM, give it memory, put code in it, create a vCPU;
  * start the vCPU in real mode (16-bit, segment:offset addressing);
  * run it and handle its exits by hand: ``out`` to a port exits to us with
    the byte, ``hlt`` exits with ``Hlt``.

The guest prints a string, then computes 1 + 2 + ... + 10 with the ``loop``
instruction and sends the sum to port 0x10.  It is 26 bytes of machine code,
written out below with its assembly, so this example needs no assembler.

Run:  python examples/01_real_mode_hello.py
"""

import pykvm
from pykvm import x86

CODE_ADDR = 0x1000   # where the code goes (guest physical = real-mode linear, CS=0)
MSG_ADDR = 0x1100    # where the string goes

CODE = bytes([
    0xBE, 0x00, 0x11,  # 1000: mov  si, 0x1100     ; si -> message
    0xBA, 0xE9, 0x00,  # 1003: mov  dx, 0xe9       ; the "console" port
    0xAC,              # 1006: lodsb               ; al = [si], si += 1
    0x84, 0xC0,        # 1007: test al, al
    0x74, 0x03,        # 1009: jz   100e           ; end of string
    0xEE,              # 100b: out  dx, al         ; -> exit IoOut(port=0xe9)
    0xEB, 0xF8,        # 100c: jmp  1006
    0x31, 0xC0,        # 100e: xor  ax, ax
    0xB9, 0x0A, 0x00,  # 1010: mov  cx, 10
    0x01, 0xC8,        # 1013: add  ax, cx         ; ax += cx
    0xE2, 0xFC,        # 1015: loop 1013           ; cx -= 1, repeat while cx != 0
    0xE6, 0x10,        # 1017: out  0x10, al       ; -> exit IoOut(port=0x10)
    0xF4,              # 1019: hlt                 ; -> exit Hlt
])


def main() -> None:
    # Step 1: /dev/kvm, a VM, and 64 KiB of guest RAM at guest physical 0.
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        x86.prepare_vm(vm)            # VM-wide x86 set-up (the TSS pages Intel needs)
        mem = vm.add_memory(0, 0x10000)

        # Step 2: the program and its data, copied into guest RAM.
        mem.write(CODE_ADDR, CODE)
        mem.write(MSG_ADDR, b"Hello from real mode!\n\0")

        # Step 3: a vCPU in real mode at 0000:1000 (after reset a vCPU would start at
        # f000:fff0, the BIOS entry point; we set CS:IP directly).
        vcpu = vm.create_vcpu()
        x86.setup_real_mode(vcpu, cs=0, ip=CODE_ADDR, sp=0x8000)

        # Step 4: run until HLT.  Each exit is a typed object; a hand-written loop is
        # fine for a guest this small (pykvm.x86.RunLoop does this for bigger ones).
        text = bytearray()
        while True:
            exit_ = vcpu.run()
            if isinstance(exit_, pykvm.IoOut) and exit_.port == 0xE9:
                text += exit_.data
            elif isinstance(exit_, pykvm.IoOut) and exit_.port == 0x10:
                total = exit_.data[0]
            elif isinstance(exit_, pykvm.Hlt):
                break
            else:
                raise SystemExit(f"unexpected exit: {exit_!r}")

        print(f"guest says: {text.decode().strip()}")
        print(f"guest computed 1+2+...+10 = {total}")


if __name__ == "__main__":
    main()
