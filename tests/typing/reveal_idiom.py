# ruff: noqa: F821  (reveal_type is mypy's, not a run-time name)
# Type-checked only (never run): tests/typing/test_user_script.py runs mypy on
# it and compares each reveal_type line with the type written after "# ->".
from __future__ import annotations

import pykvm

with pykvm.Kvm() as kvm, kvm.create_vm() as vm:
    reveal_type(kvm)  # -> pykvm.system.Kvm
    reveal_type(vm)  # -> pykvm.vm.Vm
    mem = vm.add_memory(0x1000, 0x1000)
    reveal_type(mem)  # -> pykvm.vm.memory.GuestMemory
    vcpu = vm.create_vcpu()
    reveal_type(vcpu)  # -> pykvm.vcpu.Vcpu
    regs = vcpu.get_regs()
    reveal_type(regs.rip)  # -> int
    sregs = vcpu.get_sregs()
    reveal_type(sregs.cr0)  # -> int
    reveal_type(sregs.cs)  # -> pykvm.uapi.x86.kvm_segment
    reveal_type(sregs.cs.base)  # -> int
    reveal_type(vcpu.kvm_run.exit_reason)  # -> int
    reveal_type(vcpu.kvm_run.io.port)  # -> int
    exit_ = vcpu.run()
    reveal_type(exit_)  # -> pykvm.vcpu.exits.Exit
    if isinstance(exit_, pykvm.IoOut):
        reveal_type(exit_)  # -> pykvm.vcpu.exits.IoOut
        reveal_type(exit_.port)  # -> int
        reveal_type(exit_.data)  # -> bytes
    with vcpu.kick_after(1.0) as watchdog:
        reveal_type(watchdog.fired)  # -> bool
    report = pykvm.probe.probe()
    reveal_type(report)  # -> pykvm.probe.model.ProbeReport
    reveal_type(report.usable)  # -> bool
