"""Guest compute (group ``compute``): one guest loop under pykvm, C and Unicorn.
"""

from __future__ import annotations

from pykvm.exits import IoOut

from .. import guest, uc
from ..core import interleave
from .base import EXIT_IO, SuiteBase, bad


class ComputeCases(SuiteBase):
    """The ``compute`` cases (mixed into :class:`pykvm.bench.suite.Suite`)."""

    def case_compute(self) -> None:
        pc = self.pc
        cfg = self.cfg
        for cpl, iters in ((3, cfg.compute3_iters), (0, cfg.compute0_iters)):
            r = self.row(f"compute.cpl{cpl}", "compute",
                         f"CPL{cpl}: {iters:,} iterations then `out`" + (" (native)" if cpl == 3 else
                                                                          " (KVM's emulator here)"),
                         "pykvm: one `vcpu.run()`; raw: one `run_raw()`; Unicorn: emu_start over the "
                         f"same bytes ({cfg.unicorn_iters:,} iterations)")
            spec = guest.Spec(guest.code_compute(iters), cpl=cpl)
            m = spec.build(self.kvm)
            vcpu = m.vcpu

            def typed(vcpu=vcpu, iters=iters) -> float:
                self.wd.arm(vcpu, 120)
                t0 = pc()
                e = vcpu.run()
                dt = pc() - t0
                self.wd.disarm()
                if e.__class__ is not IoOut or e.port != guest.PORT_DONE:
                    raise bad("out to the done port", e)
                return dt / iters

            def raw(vcpu=vcpu, iters=iters) -> float:
                self.wd.arm(vcpu, 120)
                t0 = pc()
                x = vcpu.run_raw()
                dt = pc() - t0
                self.wd.disarm()
                if x != EXIT_IO:
                    raise bad("IO exit", x)
                return dt / iters

            v = {"pykvm": typed, "raw": raw}
            if self.c_load(spec):
                v["c"] = self.c_batch("until", 1, guest.PORT_DONE, per=iters)
            if self.unicorn:
                v["unicorn"] = uc.compute_batch(cfg.unicorn_iters)
            try:
                interleave(cfg.rounds, v, r)
            finally:
                m.close()
