"""08 — Dirty-page tracking: live-migration pre-copy, then resume on a second VM.

What it shows
  * a memory slot created with ``KVM_MEM_LOG_DIRTY_PAGES``: KVM records each
    page the guest writes;
  * ``vm.get_dirty_log(slot)`` (``KVM_GET_DIRTY_LOG``): the pages written
    since the previous call, and the log starts again from empty;
  * the pre-copy algorithm of live migration, while the guest keeps running
    in its own thread: copy all memory once, then repeatedly copy only the
    pages dirtied meanwhile, until few remain; then pause the vCPU (a kick),
    copy the last dirty pages and the registers ("stop-and-copy");
  * checking the copy, then starting a second VM from it: the guest goes on
    where it was paused.

The guest runs directly at CPL3 (user mode: native speed on this host) with
all its memory mapped user-accessible.  It fills 2 MiB with a pattern (a
"cold" pass), raises a flag the host waits for, then increments a counter
(r8) forever and stores it into one of 16 "hot" pages in turn — a working set
much smaller than its memory, which is what makes pre-copy converge.  The
host waits for the flag and for the counter to move rather than for a fixed
time, so a slow or busy machine changes how long it takes, not what it prints.

Needs GNU binutils.   Run:  python examples/08_dirty_pages.py
"""

import threading
import time

import pykvm
from pykvm import uapi, x86

RAM = 4 * x86.MiB
PAGE = 4096
FLAG = 0x1F0000          # the guest sets this qword to 1 once its cold pass is done
WATCHDOG = 120           # seconds: a bound on each run, never reached normally
ROUND_SECONDS = 0.01
CONVERGED = 32           # stop pre-copy when a round finds this few dirty pages
MAX_ROUNDS = 10

GUEST = r"""
_start:                             # at CPL3
    mov  rdi, 0x200000              # cold pass: page i of 2..4 MiB gets i * 0x0101010101010101
    xor  edx, edx
1:  mov  rax, 0x0101010101010101
    imul rax, rdx
    mov  ecx, 512
    rep  stosq                      # 512 qwords = one page
    inc  edx
    cmp  edx, 512
    jb   1b

    mov  qword ptr [0x1f0000], 1    # flag: the cold pass is done
    xor  r8d, r8d                   # hot loop: 16 pages, written over and over
2:  inc  r8
    mov  rax, r8
    and  eax, 15
    shl  rax, 12
    mov  [rax + 0x300000], r8
    jmp  2b
"""


def boot(kvm: pykvm.Kvm, vm: pykvm.Vm, prog: x86.Program) -> pykvm.Vcpu:
    """Source VM set-up: tables, program, one vCPU at CPL3."""
    lm = x86.LongMode.build(x86.Arena(vm, 0x1000, 0xF000), identity=(0, RAM), user=True)
    prog.load(vm)
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    lm.load(vcpu, entry=prog.entry, stack=0x100000, cpl=3)
    return vcpu


def main() -> None:
    prog = x86.assemble(GUEST, base=0x10000)
    with pykvm.Kvm() as kvm, kvm.create_vm() as src:
        # Step 1: the source VM; its RAM is one slot with dirty logging on.
        mem = src.add_memory(0, RAM, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
        vcpu = boot(kvm, src, prog)
        loop = x86.RunLoop(vcpu)
        result = {}
        runner = threading.Thread(target=lambda: result.update(stop=loop.run(timeout=WATCHDOG)))

        # Step 2: round 0 — start the guest, wait for its cold pass, reset the
        # log and copy everything.
        dest = bytearray(RAM)
        runner.start()
        deadline = time.monotonic() + WATCHDOG
        while mem[FLAG:FLAG + 8] == bytes(8) and time.monotonic() < deadline:
            time.sleep(0.001)
        src.get_dirty_log(mem.slot)
        dest[:] = mem[:]
        print(f"round 0: copied all {RAM // PAGE} pages while the guest runs")

        # Step 3: copy what was dirtied during the previous round, until it is little.
        for rnd in range(1, MAX_ROUNDS + 1):
            time.sleep(ROUND_SECONDS)
            dirty = src.get_dirty_log(mem.slot)
            for p in dirty:
                dest[p * PAGE:(p + 1) * PAGE] = mem[p * PAGE:(p + 1) * PAGE]
            print(f"round {rnd}: {len(dirty)} dirty pages copied")
            if len(dirty) <= CONVERGED:
                break

        # Step 4: stop-and-copy — pause the vCPU, copy the last pages and the CPU state.
        loop.stop()                        # kicks the vCPU out of KVM_RUN
        runner.join()
        dirty = src.get_dirty_log(mem.slot)
        for p in dirty:
            dest[p * PAGE:(p + 1) * PAGE] = mem[p * PAGE:(p + 1) * PAGE]
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        print(f"stop-and-copy: vCPU paused ({result['stop'].reason}), {len(dirty)} dirty pages "
              f"copied, registers saved; counter r8 = {regs.r8}")
        same = dest == mem[:]
        print(f"destination memory identical to the source: {same}")

        # Step 5: a second VM from the copy: same memory, same registers, and go.
        with kvm.create_vm() as dst:
            dst.add_memory(0, RAM).write(0, dest)
            vcpu2 = dst.create_vcpu()
            x86.setup_cpuid(kvm, vcpu2)
            vcpu2.set_sregs(sregs)
            vcpu2.set_regs(regs)
            # Run it in slices of 20 ms (the run loop's timeout ends each one, no error
            # check) until the counter has moved: the guest got some CPU time.
            loop2 = x86.RunLoop(vcpu2)
            deadline = time.monotonic() + WATCHDOG
            after = regs.r8
            while after == regs.r8 and time.monotonic() < deadline:
                loop2.run(timeout=0.02, check=False)
                after = vcpu2.get_regs().r8
            print(f"resumed on a second VM: counter went on from {regs.r8} to {after} "
                  f"({'continues' if after > regs.r8 else 'did NOT continue'})")


if __name__ == "__main__":
    main()
