"""How much does ``x86.RunLoop`` cost over a hand-written loop?  (A measurement, not a test.)

A 64-bit guest executes ``out 0xe9, al`` N times, then ``hlt``.  The same
guest runs under four loops, interleaved and repeated, and the median time
per exit is printed:

* ``run()``     — hand-written: ``vcpu.run()`` returns typed exits, ``isinstance`` dispatch;
* ``run_raw()`` — hand-written, lowest level: ``vcpu.run_raw()`` and one
  ``struct.unpack_from`` of the run page;
* ``RunLoop``   — ``x86.RunLoop`` with an ``on_out`` handler;
* ``RunLoop+UART`` — the same with the guest's bytes going to ``x86.Uart16550``.

Each handler counts the bytes.  Run:  python examples/measure_runloop.py [N] [repeats]
"""

import statistics
import struct
import sys
import time

import pykvm
from pykvm import x86

GUEST = """
_start:
    mov  ecx, {n}
1:  out  0xe9, al
    dec  ecx
    jnz  1b
    hlt
"""


def make(kvm: pykvm.Kvm, n: int):
    vm = kvm.create_vm()
    vm.add_memory(0, 2 * x86.MiB)
    prog = x86.assemble(GUEST.format(n=n), base=0x10000)
    prog.load(vm)
    vcpu = vm.create_vcpu()
    x86.setup_cpuid(kvm, vcpu)
    lm = x86.LongMode.build(x86.Arena(vm, 0x1000, 0xF000))
    return vm, vcpu, lm, prog


def reset(vcpu, lm, prog) -> None:
    lm.load(vcpu, entry=prog.entry, stack=0x80000)


def loop_run(vcpu, n: int) -> int:
    count = 0
    while True:
        ex = vcpu.run()
        if isinstance(ex, pykvm.IoOut):
            if ex.port == 0xE9:
                count += len(ex.data)
        elif isinstance(ex, pykvm.Hlt):
            return count
        else:
            raise RuntimeError(repr(ex))


_io = struct.Struct("<BBHIQ")


def loop_run_raw(vcpu, n: int) -> int:
    count = 0
    mm = vcpu.run_mmap
    run = vcpu.run_raw
    unpack = _io.unpack_from
    while True:
        reason = run()
        if reason == 2:
            direction, size, port, cnt, _off = unpack(mm, 32)
            if direction and port == 0xE9:
                count += size * cnt
        elif reason == 5:
            return count
        else:
            raise RuntimeError(reason)


def loop_runloop(vcpu, n: int) -> int:
    count = 0

    def out(port, data):
        nonlocal count
        count += len(data)

    loop = x86.RunLoop(vcpu)
    loop.on_out(0xE9, out)
    loop.run()
    return count


def loop_runloop_uart(vcpu, n: int) -> int:
    loop = x86.RunLoop(vcpu)
    uart = loop.add(x86.Uart16550(base=0xE9))  # its THR register at port 0xe9
    loop.run()
    return len(uart.output)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    loops = {"run()": loop_run, "run_raw()": loop_run_raw, "RunLoop": loop_runloop,
             "RunLoop+UART": loop_runloop_uart}
    times = {k: [] for k in loops}
    with pykvm.Kvm() as kvm:
        vm, vcpu, lm, prog = make(kvm, n)
        with vm:
            for _ in range(repeats):
                for name, fn in loops.items():
                    reset(vcpu, lm, prog)
                    t0 = time.perf_counter()
                    got = fn(vcpu, n)
                    dt = time.perf_counter() - t0
                    assert got == n, (name, got)
                    times[name].append(dt / n * 1e6)
    base = statistics.median(times["run()"])
    print(f"{n} exits per run, {repeats} runs each, median microseconds per exit:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<13} {med:7.2f} us   {100 * (med / base - 1):+6.1f}% vs run()   "
              f"(min {min(ts):.2f}, max {max(ts):.2f})")


if __name__ == "__main__":
    main()
