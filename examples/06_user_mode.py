"""06 — A tiny kernel that drops to user mode (CPL3) and serves system calls.

What it shows
  * page tables with user/supervisor bits: 0..2 MiB is kernel-only, 2..4 MiB
    is user memory (``lm.page_tables.map(..., user=True)``);
  * the GDT/TSS layout that SYSCALL/SYSRET need (``x86.LongMode``, ``STAR``);
  * a kernel that sets ``STAR``/``LSTAR``/``SYSCALL_MASK`` with ``wrmsr``
    and enters user mode with ``sysretq``;
  * a user program that makes system calls: ``write(fd, buf, len)`` (the
    kernel checks the buffer is user memory, then sends it to the UART with
    one ``rep outsb``) and ``exit(code)``;
  * speed: the same loop timed with ``rdtsc`` in the kernel and in user mode.
    On this project's host (a PVM KVM: no VMX/SVM) CPL0 code is run by
    KVM's instruction emulator (~1 µs per instruction) while CPL3 code runs
    natively; on ordinary VMX/SVM hosts both run natively.

PVM hosts deliver SYSCALL from user mode only to PVM-aware kernels: the
instruction is left half done (see ``pykvm.x86.quirks``) and the vCPU shuts
down.  The run loop's shutdown handler then finishes the SYSCALL
(``x86.quirks.complete_syscall``), so this unmodified x86 kernel runs on both
kinds of host; the host prints which path was taken.

Needs GNU binutils.   Run:  python examples/06_user_mode.py
"""

from pathlib import Path

import pykvm
from pykvm import x86

GUESTS = Path(__file__).resolve().parent / "guests"
USER_BASE, USER_END = 0x200000, 0x400000
KERNEL_LOOPS = 20_000
USER_LOOPS = 100_000_000

KERNEL = rf"""
.equ KSTACK, 0x80000
_start:
    lea  rdi, [rip + s_hello]
    call serial_puts

    rdtsc                               # the loop at CPL0, timed
    shl  rdx, 32
    or   rax, rdx
    mov  r12, rax
    mov  rcx, {KERNEL_LOOPS}
    xor  eax, eax
1:  add  rax, rcx
    dec  rcx
    jnz  1b
    rdtsc
    shl  rdx, 32
    or   rax, rdx
    sub  rax, r12
    lea  rdi, [rip + s_kloop]
    call serial_puts
    mov  rdi, rax
    xor  edx, edx
    mov  rcx, {KERNEL_LOOPS}
    div  rcx
    mov  rdi, rax
    call serial_dec
    lea  rdi, [rip + s_cycles]
    call serial_puts

    mov  ecx, 0xc0000081                # STAR: kernel CS 0x08 / user base 0x18
    mov  edx, 0x001b0008
    xor  eax, eax
    wrmsr
    mov  ecx, 0xc0000082                # LSTAR: where SYSCALL enters the kernel
    lea  rax, [rip + syscall_entry]
    mov  rdx, rax
    shr  rdx, 32
    wrmsr
    mov  ecx, 0xc0000084                # SYSCALL_MASK: clear IF and DF on entry
    mov  eax, 0x600
    xor  edx, edx
    wrmsr

    lea  rdi, [rip + s_drop]
    call serial_puts
    mov  rcx, {USER_BASE:#x}            # sysretq: RIP <- rcx, RFLAGS <- r11, CPL 3
    mov  r11, 0x202
    mov  rsp, {USER_END:#x}
    sysretq

syscall_entry:                          # rax = number; rdi, rsi, rdx = arguments
    mov  [rip + user_rsp], rsp
    mov  rsp, KSTACK
    push rcx                            # user RIP
    push r11                            # user RFLAGS
    cmp  rax, 1
    je   sys_write
    cmp  rax, 60
    je   sys_exit
    mov  rax, -38                       # -ENOSYS
    jmp  sys_return

sys_write:                              # write(fd, buf, len): buf must be user memory
    mov  rax, -14                       # -EFAULT
    cmp  rsi, {USER_BASE:#x}
    jb   sys_return
    lea  rcx, [rsi + rdx]
    cmp  rcx, {USER_END:#x}
    ja   sys_return
    mov  rcx, rdx
    mov  rax, rdx                       # return the length written
    mov  dx, 0x3f8
    rep  outsb                          # the whole buffer in one exit
    jmp  sys_return

sys_exit:                               # exit(code): tell the host, which ends the run
    mov  eax, edi
    out  0xf4, al

sys_return:
    pop  r11
    pop  rcx
    mov  rsp, [rip + user_rsp]
    sysretq

.include "serial.s"
user_rsp: .quad 0
s_hello:  .asciz "kernel: booted at CPL0\n"
s_kloop:  .asciz "kernel: CPL0 loop: "
s_cycles: .asciz " TSC cycles per iteration\n"
s_drop:   .asciz "kernel: dropping to user mode\n"
"""

USER = rf"""
_start:
    lea  rsi, [rip + s_hello]
    call puts

    rdtsc                               # the same loop at CPL3, 5000 times longer
    shl  rdx, 32
    or   rax, rdx
    mov  r12, rax
    mov  rcx, {USER_LOOPS}
    xor  r13d, r13d
1:  add  r13, rcx
    dec  rcx
    jnz  1b
    rdtsc
    shl  rdx, 32
    or   rax, rdx
    sub  rax, r12
    mov  r14, rax

    lea  rsi, [rip + s_sum]
    call puts
    mov  rax, r13
    call put_dec
    lea  rsi, [rip + s_loop]
    call puts
    mov  rax, r14                       # cycles per iteration, two decimals
    imul rax, rax, 100
    xor  edx, edx
    mov  rcx, {USER_LOOPS}
    div  rcx
    xor  edx, edx
    mov  rcx, 100
    div  rcx
    push rdx
    call put_dec
    lea  rsi, [rip + s_dot]
    call puts
    pop  rax
    cmp  rax, 10
    jae  2f
    lea  rsi, [rip + s_zero]
    call puts
2:  call put_dec
    lea  rsi, [rip + s_cycles]
    call puts

    mov  eax, 1                         # write(1, <a kernel address>, 4): refused
    mov  edi, 1
    mov  esi, 0x10000
    mov  edx, 4
    syscall
    push rax
    lea  rsi, [rip + s_efault]
    call puts
    pop  rax
    neg  rax
    call put_dec
    lea  rsi, [rip + s_nl]
    call puts

    mov  eax, 60                        # exit(42)
    mov  edi, 42
    syscall

puts:                                   # rsi -> NUL-terminated string: one write()
    mov  rdx, rsi
1:  cmp  byte ptr [rdx], 0
    je   2f
    inc  rdx
    jmp  1b
2:  sub  rdx, rsi
    mov  eax, 1
    mov  edi, 1
    syscall
    ret

put_dec:                                # rax -> decimal, built backwards in a buffer
    lea  rsi, [rip + numbuf + 31]
    mov  byte ptr [rsi], 0
    mov  rcx, 10
1:  xor  edx, edx
    div  rcx
    add  dl, '0'
    dec  rsi
    mov  [rsi], dl
    test rax, rax
    jnz  1b
    jmp  puts

s_hello:  .asciz "user: hello from CPL3\n"
s_sum:    .asciz "user: sum 1..{USER_LOOPS} = "
s_loop:   .asciz "\nuser: CPL3 loop: "
s_dot:    .asciz "."
s_zero:   .asciz "0"
s_cycles: .asciz " TSC cycles per iteration\n"
s_efault: .asciz "user: write(kernel address) refused with -"
s_nl:     .asciz "\n"
numbuf:   .space 32
"""


def main() -> None:
    with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_memory(0, 4 * x86.MiB)
        kernel = x86.assemble(KERNEL, base=0x10000, include_dirs=[GUESTS])
        user = x86.assemble(USER, base=USER_BASE)
        kernel.load(vm)
        user.load(vm)

        # Kernel-only identity map of the low 4 GiB, then 2..4 MiB re-mapped for user mode.
        lm = x86.LongMode.build(x86.Arena(vm, 0x1000, 0xF000))
        lm.page_tables.map(USER_BASE, USER_BASE, USER_END - USER_BASE, user=True)

        vcpu = vm.create_vcpu()
        x86.setup_cpuid(kvm, vcpu)
        lm.load(vcpu, entry=kernel.entry, stack=0x80000)

        loop = x86.RunLoop(vcpu)
        loop.add(x86.Uart16550(on_output=lambda b: print(b.decode(), end="", flush=True)))
        loop.on_out(0xF4, lambda port, data: loop.stop(data[0]))
        completed_by_vmm = 0

        def on_shutdown(exit_: pykvm.Exit) -> bool:
            nonlocal completed_by_vmm
            if x86.quirks.complete_syscall(vcpu):   # a PVM host left a SYSCALL half done
                completed_by_vmm += 1
                return True
            return False                          # a real triple fault: report it

        loop.on_exit(pykvm.ExitReason.SHUTDOWN, on_shutdown)
        stop = loop.run(timeout=60)
        how = (f"{completed_by_vmm} SYSCALLs finished by the VMM (this host delivers SYSCALL "
               "from user mode only to PVM kernels)" if completed_by_vmm
               else "all SYSCALLs handled by the CPU")
        print(f"[host] user program exited with code {stop.value}; {how}")


if __name__ == "__main__":
    main()
