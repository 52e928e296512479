"""Dirty tracking of a 1 GiB slot (group ``dirty``): the dirty log at several
fractions, and the dirty ring.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable

import pykvm
from pykvm.dirty import bitmap_to_pages
from pykvm.exits import IoOut
from pykvm.fd import ioctl
from pykvm.uapi import ioctls, structs
from pykvm.uapi.enums import Cap

from .. import guest
from ..core import BenchError, interleave
from .base import NPAGES, SuiteBase, bad, wall


def dirty_pages(bitmap: ctypes.Array[ctypes.c_uint64] | bytes | bytearray | memoryview) -> list[int]:
    """Page numbers whose bit is set in a KVM dirty bitmap: pykvm's own decoder.

    The raw column pairs it with a bare ioctl, so it measures what
    ``get_dirty_log`` adds on top (buffer allocation, argument checks).
    """
    return bitmap_to_pages(bitmap)


class DirtyCases(SuiteBase):
    """The ``dirty`` cases (mixed into :class:`pykvm.bench.suite.Suite`)."""

    def case_dirty(self) -> None:
        for f in self.cfg.dirty_fractions:
            self._dirty_log(f)
        self._dirty_ring()

    @staticmethod
    def _count_stride(fraction: float):
        count = int(round(NPAGES * fraction))
        stride = (guest.DIRTY_SIZE // count) & ~(mmap.PAGESIZE - 1) if count else mmap.PAGESIZE
        return count, stride

    def _guest_pass(self, vcpu: pykvm.Vcpu) -> float:
        """Run the dirtying guest once (to its `out 0x11`); return the ns it took."""
        self.wd.arm(vcpu, 120)
        t0 = wall()
        e = vcpu.run()
        t1 = wall()
        self.wd.disarm()
        if not isinstance(e, IoOut) or e.port != guest.PORT_DONE:
            raise bad("out to the done port", e)
        return t1 - t0

    def _dirty_log(self, fraction: float) -> None:
        cfg = self.cfg
        count, stride = self._count_stride(fraction)
        pct = f"{fraction * 100:g}%"
        rows = {
            "harvest": self.row(f"dirty.log.{pct}.harvest", "dirty",
                                f"{pct} dirty: KVM_GET_DIRTY_LOG + list of dirty pages",
                                "pykvm: `vm.get_dirty_log(slot)`; raw: raw ioctl + `pykvm.bench.suite.dirty_pages` "
                                "(bytes.translate/find); C: ioctl + ctz loop"),
            "ioctl": self.row(f"dirty.log.{pct}.ioctl", "dirty", f"{pct} dirty: the KVM_GET_DIRTY_LOG ioctl alone",
                              "includes KVM write-protecting the dirty pages again"),
            "guest": self.row(f"dirty.log.{pct}.guest", "dirty", f"{pct} dirty: guest pass re-dirtying them",
                              "CPL3 guest writes one byte per page (a write-protection fault in KVM each)"),
        }
        spec = guest.Spec(guest.code_dirty(count, stride), cpl=3, dirty=True)
        m = spec.build(self.kvm)
        vm, vcpu, vmfd = m.vm, m.vcpu, m.vm.fileno()
        bitmap = bytearray(NPAGES // 8)
        holder = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
        dl = structs.kvm_dirty_log(slot=1, dirty_bitmap=ctypes.addressof(holder))
        REQ = ioctls.KVM_GET_DIRTY_LOG

        def typed() -> dict[str, float]:
            g = self._guest_pass(vcpu)
            t1 = wall()
            pages = vm.get_dirty_log(1)
            t2 = wall()
            if len(pages) < count:
                raise BenchError(f"{len(pages)} dirty pages, expected {count}")
            return {"harvest": t2 - t1, "guest": g}

        def raw() -> dict[str, float]:
            g = self._guest_pass(vcpu)
            t1 = wall()
            ioctl(vmfd, REQ, dl)
            t2 = wall()
            pages = dirty_pages(bitmap)
            t3 = wall()
            if len(pages) < count:
                raise BenchError(f"{len(pages)} dirty pages, expected {count}")
            return {"harvest": t3 - t1, "ioctl": t2 - t1, "guest": g}

        v: dict[str, Callable[[], dict[str, float]]] = {}
        if hasattr(vm, "get_dirty_log"):
            v["pykvm"] = typed
        v["raw"] = raw
        if self.c_load(spec):
            c = self.c

            def cb() -> dict[str, float]:
                ioc, walk, guest, npages = c.bench("dirty_log", 1, 1)
                if npages < count:
                    raise BenchError(f"C saw {npages:.0f} dirty pages, expected {count}")
                return {"harvest": ioc + walk, "ioctl": ioc, "guest": guest}
            v["c"] = cb
        try:
            interleave(cfg.rounds, v, rows, budget_s=cfg.variant_budget_s)
        finally:
            del holder
            m.close()
        rows["guest"].info["pages"] = count
        if count:
            med = rows["guest"].median("raw")
            if med:
                rows["guest"].info["ns_per_page"] = med / count

    def _dirty_ring(self) -> None:
        cfg, kvm = self.cfg, self.kvm
        cap = Cap.DIRTY_LOG_RING_ACQ_REL
        max_bytes = kvm.check_extension(cap) or kvm.check_extension(Cap.DIRTY_LOG_RING)
        if not max_bytes:
            r = self.row("dirty.ring", "dirty", "dirty ring")
            r.skipped = "KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) not supported on this host"
            return
        ring_bytes = min(max_bytes, 1 << 20)
        nent = ring_bytes // ctypes.sizeof(structs.kvm_dirty_gfn)
        self.info["dirty_ring_bytes"] = ring_bytes
        for fraction in cfg.ring_fractions:
            count, stride = self._count_stride(fraction)
            pct = f"{fraction * 100:g}%"
            if count >= nent // 2:
                r = self.row(f"dirty.ring.{pct}", "dirty", f"ring, {pct} dirty")
                r.skipped = f"{count} pages do not fit a {nent}-entry ring"
                continue
            rows = {
                "harvest": self.row(f"dirty.ring.{pct}.harvest", "dirty",
                                    f"ring, {pct} dirty: collect entries + KVM_RESET_DIRTY_RINGS",
                                    f"{nent}-entry ring per vCPU; pykvm: `ring.harvest()` + `vm.reset_dirty_rings()`;"
                                    " raw: a memoryview walk of the ring mmap + raw ioctl"),
                "reset": self.row(f"dirty.ring.{pct}.reset", "dirty",
                                  f"ring, {pct} dirty: the KVM_RESET_DIRTY_RINGS ioctl alone",
                                  "includes KVM write-protecting the pages again"),
            }
            spec = guest.Spec(guest.code_dirty(count, stride), cpl=3, dirty=True,
                          options={guest.OPT_DIRTY_RING: ring_bytes})
            try:
                m = spec.build(kvm)
            except pykvm.KvmError as e:
                rows["harvest"].skipped = f"dirty ring set-up failed: {e}"
                return
            vm, vcpu, vmfd = m.vm, m.vcpu, m.vm.fileno()
            ring = mmap.mmap(vcpu.fileno(), ring_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=64 * mmap.PAGESIZE)   # KVM_DIRTY_LOG_PAGE_OFFSET on x86
            u32 = memoryview(ring).cast("I")
            q = memoryview(ring).cast("Q")
            state = {"fetch": 0}
            mask = nent - 1
            RESET = ioctls.KVM_RESET_DIRTY_RINGS
            api_ring = None
            if hasattr(vm, "dirty_ring"):
                try:
                    vm._dirty_ring_size = ring_bytes   # enabled through the raw layer by Spec.build
                    api_ring = vm.dirty_ring(vcpu)
                except (pykvm.KvmError, AttributeError, ValueError):
                    api_ring = None

            def typed() -> dict[str, float]:
                self._guest_pass(vcpu)
                t1 = wall()
                got = api_ring.harvest()
                vm.reset_dirty_rings()
                t2 = wall()
                state["fetch"] += len(got)       # keep the raw walker in step
                if len(got) < count:
                    raise BenchError(f"{len(got)} ring entries, expected {count}")
                return {"harvest": t2 - t1}

            def raw() -> dict[str, float]:
                self._guest_pass(vcpu)
                t1 = wall()
                pages = []
                app = pages.append
                i = state["fetch"]
                j = i & mask
                while u32[j * 4] & 1:        # KVM_DIRTY_GFN_F_DIRTY
                    app(q[j * 2 + 1])         # offset: page number within the slot
                    u32[j * 4] = 2            # KVM_DIRTY_GFN_F_RESET
                    i += 1
                    j = i & mask
                if api_ring is not None:
                    api_ring._next += i - state["fetch"]
                state["fetch"] = i
                t2 = wall()
                ioctl(vmfd, RESET)
                t3 = wall()
                if len(pages) < count:
                    raise BenchError(f"{len(pages)} ring entries, expected {count}")
                return {"harvest": t3 - t1, "reset": t3 - t2}

            v: dict[str, Callable[[], dict[str, float]]] = {}
            if api_ring is not None:
                v["pykvm"] = typed
            v["raw"] = raw
            if self.c_load(spec):
                c = self.c

                def cb() -> dict[str, float]:
                    col, reset, _guest, npages = c.bench("dirty_ring", 1)
                    if npages < count:
                        raise BenchError(f"C saw {npages:.0f} ring entries, expected {count}")
                    return {"harvest": col + reset, "reset": reset}
                v["c"] = cb
            try:
                interleave(cfg.rounds, v, rows, budget_s=cfg.variant_budget_s)
            finally:
                if api_ring is not None:
                    api_ring.close()
                u32.release()
                q.release()
                ring.close()
                m.close()
