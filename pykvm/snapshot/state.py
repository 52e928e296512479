"""The state of a live VM as snapshot items, and back: capture from a paused VM, apply to a new one.

Only the public :class:`~pykvm.vm.Vm` / :class:`~pykvm.vcpu.Vcpu` API is used,
plus the checked :func:`pykvm.fd.ioctl` for ``KVM_SET_MSRS`` (whose count
tells which MSR KVM refused).  Items are ``(name, bytes)`` pairs in the
kernel's x86-64 uapi layouts (``docs/snapshot.md``, "File format"); apply
functions get items that :mod:`.fileformat` already checked.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .. import fd as kvmfd
from ..errors import KvmError
from ..uapi import ioctls, structs
from ..vcpu import Vcpu
from ..vm import Vm
from .fileformat import (
    IRQCHIPS,
    MSR_ENTRY,
    U32,
    ZERO_BLOCK,
    SnapshotError,
    SnapshotRestoreError,
    cpuid_entries,
    from_bytes,
    msr_values,
)

__all__ = [
    "apply_clock",
    "apply_devices",
    "apply_vcpu",
    "complete_pending_io",
    "foreign_slots",
    "has_irqchip",
    "has_lapic",
    "has_pit",
    "lock_vcpus",
    "struct_bytes",
    "vcpu_state",
    "vm_state",
    "zero_runs",
]

_MSR_TSC_DEADLINE = 0x6E0
_ZEROS = bytes(ZERO_BLOCK)


def struct_bytes(obj: Any) -> bytes:
    """The bytes of a ctypes structure (exactly ``sizeof``)."""
    return bytes(memoryview(obj).cast("B"))


def foreign_slots(vm: Vm) -> list[int]:
    """Memory slots registered with ``set_user_memory_region`` (not ``add_memory``)."""
    known = {m.slot for m in vm.memory}
    return sorted(s for s in vm.memslots if s not in known)


# ---------------------------------------------------------------------------
# capture

def _read_msrs(vcpu: Vcpu, indices: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """All readable MSRs of *indices*: ([(index, value)], [unreadable indices])."""
    values: list[tuple[int, int]] = []
    skipped: list[int] = []
    todo = list(indices)
    while todo:
        got = vcpu.get_msrs(todo)        # KVM stops at the first MSR it cannot read
        n = len(got)
        values += [(i, got[i]) for i in todo[:n]]
        if n >= len(todo):
            break
        skipped.append(todo[n])
        todo = todo[n + 1:]
    return values, skipped


def complete_pending_io(vcpu: Vcpu) -> None:
    """Let KVM finish the last exit's I/O before the state is read.

    The KVM selftests do the same (``vcpu_run_complete_io`` before
    ``vcpu_save_state``); see :meth:`pykvm.vcpu.Vcpu.complete_pending_exit`.
    """
    ex = vcpu.complete_pending_exit()
    if ex is None:
        return
    err = SnapshotError(f"vCPU {vcpu.id}: completing the last exit produced another one "
                        f"({ex!r}); handle it (it is in .exit) and save again")
    err.exit = ex  # type: ignore[attr-defined]
    raise err


def _absent(e: KvmError) -> bool:
    return e.errno in (errno.EINVAL, errno.ENXIO, errno.ENOTTY)


def vcpu_state(vcpu: Vcpu, caps: dict[str, int], msr_list: Sequence[int],
                skipped_msrs: dict[str, list[str]]) -> list[tuple[str, bytes]]:
    items: list[tuple[str, bytes]] = [("regs", struct_bytes(vcpu.get_regs()))]
    if caps.get("SREGS2"):
        items.append(("sregs2", struct_bytes(vcpu.get_sregs2())))
    else:
        items.append(("sregs", struct_bytes(vcpu.get_sregs())))
    if caps.get("XSAVE2"):
        items.append(("xsave", struct_bytes(vcpu.get_xsave2())))
    elif caps.get("XSAVE"):
        items.append(("xsave", struct_bytes(vcpu.get_xsave())))
    else:
        items.append(("fpu", struct_bytes(vcpu.get_fpu())))
    if caps.get("XCRS"):
        items.append(("xcrs", struct_bytes(vcpu.get_xcrs())))
    try:
        items.append(("lapic", struct_bytes(vcpu.get_lapic())))
    except KvmError as e:
        if not _absent(e):             # no in-kernel LAPIC: nothing to save
            raise
    values, skipped = _read_msrs(vcpu, msr_list)
    if skipped:
        skipped_msrs[str(vcpu.id)] = [f"{i:#x}" for i in skipped]
    items.append(("msrs", b"".join(MSR_ENTRY.pack(i, 0, v) for i, v in values)))
    items.append(("cpuid", b"".join(struct_bytes(e) for e in vcpu.get_cpuid2())))
    items.append(("mp_state", U32.pack(vcpu.get_mp_state())))
    if caps.get("DEBUGREGS"):
        items.append(("debugregs", struct_bytes(vcpu.get_debug_regs())))
    if caps.get("NESTED_STATE"):
        try:
            ns = vcpu.get_nested_state()
            items.append(("nested", struct_bytes(ns)[:max(ns.size, ctypes.sizeof(structs.kvm_nested_state))]))
        except KvmError as e:
            if not _absent(e):
                raise
    if caps.get("GET_TSC_KHZ"):
        try:
            items.append(("tsc_khz", U32.pack(vcpu.get_tsc_khz())))
        except KvmError:
            pass
    if caps.get("VCPU_EVENTS"):
        items.append(("events", struct_bytes(vcpu.get_vcpu_events())))
    return items


def vm_state(vm: Vm) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    items: list[tuple[str, bytes]] = []
    desc: dict[str, Any] = {"irqchip": False, "pit": False}
    try:
        for chip in IRQCHIPS:
            items.append((f"irqchip.{chip}", struct_bytes(vm.get_irqchip(chip))))
        desc["irqchip"] = True
    except KvmError as e:              # ENXIO: no (full) in-kernel irqchip
        if not _absent(e):
            raise
    try:
        items.append(("pit2", struct_bytes(vm.get_pit2())))
        desc["pit"] = True
    except KvmError as e:
        if not _absent(e):
            raise
    try:
        items.append(("clock", struct_bytes(vm.get_clock())))
    except KvmError as e:
        if not _absent(e):
            raise
    return items, desc



_PAGE = mmap.PAGESIZE
# ---------------------------------------------------------------------------
# memory

# Top byte of a /proc/self/pagemap entry: bit 63 present, bit 62 swapped.
_PAGEMAP_USED = bytes(1 if x & 0xC0 else 0 for x in range(256))


def _used_pages(addr: int, size: int) -> bytes | None:
    """One byte per page of ``[addr, addr+size)``: 1 if present or swapped, 0 if never touched.

    Pages of a private anonymous mapping that were never touched (neither
    present nor in swap) read as zeros, so the zero scan can skip them without
    faulting them in.  Returns None if ``/proc/self/pagemap`` is unreadable.
    """
    if addr % _PAGE or size % _PAGE:
        return None
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        want = size // _PAGE * 8
        buf = bytearray(want)
        mv = memoryview(buf)
        got = 0
        while got < want:
            n = os.preadv(fd, [mv[got:]], addr // _PAGE * 8 + got)
            if n <= 0:
                return None
            got += n
    except OSError:
        return None
    finally:
        os.close(fd)
    return bytes(buf[7::8]).translate(_PAGEMAP_USED)


def zero_runs(mv: memoryview, addr: int, block: int = ZERO_BLOCK) -> Iterator[tuple[int, int, bool]]:
    """Split ``[0, size)`` of host memory at *addr* into maximal (offset, length, is_zero) runs.

    Blocks of *block* bytes are compared with zeros (``memcmp``); blocks with
    no page ever touched (see :func:`_used_pages`) are zero without a look.
    """
    size = len(mv)
    used = _used_pages(addr, size)
    per = block // _PAGE
    start, cur_zero = 0, None
    off = 0
    while off < size:
        n = min(block, size - off)
        if used is not None and used.find(1, off // _PAGE, off // _PAGE + per) < 0:
            z = True
            nxt = used.find(1, off // _PAGE)          # jump over the untouched stretch
            n = (size if nxt < 0 else nxt * _PAGE // block * block) - off
            n = max(n, min(block, size - off))
        else:
            z = _ZEROS.startswith(mv[off:off + n])    # a memcmp, no copy
        if cur_zero is None:
            cur_zero = z
        elif z != cur_zero:
            yield start, off - start, cur_zero
            start, cur_zero = off, z
        off += n
    if size:
        yield start, size - start, bool(cur_zero)


def lock_vcpus(vm: Vm) -> list[Any]:
    """Hold every vCPU (``Vcpu.hold()``: no ``run()`` meanwhile), or raise.

    Returns the holds; the caller releases them.
    """
    held: list[Any] = []
    for vcpu in vm.vcpus:
        try:
            held.append(vcpu.hold())
        except KvmError:
            for h in held:
                h.release()
            raise SnapshotError(f"vCPU {vcpu.id} is inside run() in another thread: stop it "
                                "(vcpu.kick() and let run() return) before saving") from None
    return held



# ---------------------------------------------------------------------------
# apply

def _set(what: str, fn: Callable[..., Any], *args: Any) -> None:
    """Call a ``Vcpu``/``Vm`` setter; a refusal becomes a :class:`SnapshotRestoreError`.

    (The setters' own argument checks, ``ValueError``/``OverflowError``, count
    as refusals too: the values come from the file.)
    """
    try:
        fn(*args)
    except (KvmError, ValueError, OverflowError) as e:
        raise SnapshotRestoreError(f"restoring {what}: {e}") from None


def apply_vcpu(vcpu: Vcpu, items: dict[str, bytes], tag: str) -> None:
    """Load one vCPU's state in the order KVM needs (see docs/snapshot.md, "Restore order")."""
    # 1. CPUID first: KVM derives valid MSRs, CR4 bits and XSAVE features from it.
    entries = cpuid_entries(items.get("cpuid", b""), f"{tag} cpuid")
    if entries:
        _set(f"{tag} CPUID", vcpu.set_cpuid2, entries)
    # 2. TSC frequency (only if this host differs; refusal was checked or allowed before).
    if "tsc_khz" in items:
        (khz,) = U32.unpack(items["tsc_khz"])
        try:
            if khz and vcpu.get_tsc_khz() != khz:
                vcpu.set_tsc_khz(khz)
        except (KvmError, ValueError):   # checked (or allowed) by compat: keep this host's rate
            pass
    # 3. Segments, control registers, EFER, APIC base.
    if "sregs2" in items:
        _set(f"{tag} sregs2", vcpu.set_sregs2, from_bytes(structs.kvm_sregs2, items["sregs2"], f"{tag} sregs2"))
    elif "sregs" in items:
        _set(f"{tag} sregs", vcpu.set_sregs, from_bytes(structs.kvm_sregs, items["sregs"], f"{tag} sregs"))
    # 4. MSRs (after CPUID and EFER; the TSC deadline waits for the LAPIC).
    msrs = msr_values(items.get("msrs", b""), f"{tag} msrs")
    _write_msrs(vcpu, [(i, v) for i, v in msrs if i != _MSR_TSC_DEADLINE], tag)
    # 5. XCRs before the XSAVE area whose components XCR0 enables.
    if "xcrs" in items:
        _set(f"{tag} XCRs", vcpu.set_xcrs, from_bytes(structs.kvm_xcrs, items["xcrs"], f"{tag} xcrs"))
    if "xsave" in items:
        data = items["xsave"]
        extra = max(0, (len(data) - ctypes.sizeof(structs.kvm_xsave) + 3) // 4)
        xs = structs.flex(structs.kvm_xsave, extra) if extra else structs.kvm_xsave()
        ctypes.memmove(ctypes.addressof(xs), data, len(data))
        _set(f"{tag} XSAVE area", vcpu.set_xsave, xs)
    elif "fpu" in items:
        _set(f"{tag} FPU", vcpu.set_fpu, from_bytes(structs.kvm_fpu, items["fpu"], f"{tag} fpu"))
    # 6. LAPIC (after sregs set the APIC base), then the TSC deadline it arms.
    if "lapic" in items:
        _set(f"{tag} LAPIC", vcpu.set_lapic, from_bytes(structs.kvm_lapic_state, items["lapic"], f"{tag} lapic"))
    _write_msrs(vcpu, [(i, v) for i, v in msrs if i == _MSR_TSC_DEADLINE], tag)
    # 7. MP state, debug registers, general registers.
    if "mp_state" in items:
        (mp,) = U32.unpack(items["mp_state"])
        _set(f"{tag} MP state", vcpu.set_mp_state, mp)
    if "debugregs" in items:
        _set(f"{tag} debug registers", vcpu.set_debug_regs,
             from_bytes(structs.kvm_debugregs, items["debugregs"], f"{tag} debugregs"))
    _set(f"{tag} registers", vcpu.set_regs, from_bytes(structs.kvm_regs, items["regs"], f"{tag} regs"))
    # 8. Nested state, then pending events last (KVM_SET_REGS drops a pending exception).
    if "nested" in items:
        data = items["nested"]
        ns = structs.flex(structs.kvm_nested_state, len(data) - ctypes.sizeof(structs.kvm_nested_state))
        ctypes.memmove(ctypes.addressof(ns), data, len(data))
        if ns.size > ctypes.sizeof(structs.kvm_nested_state) or ns.flags:
            _set(f"{tag} nested state", vcpu.set_nested_state, ns)
    if "events" in items:
        _set(f"{tag} pending events", vcpu.set_vcpu_events,
             from_bytes(structs.kvm_vcpu_events, items["events"], f"{tag} events"))


def _write_msrs(vcpu: Vcpu, values: list[tuple[int, int]], tag: str) -> None:
    """KVM_SET_MSRS; an MSR KVM refuses is fine only if the new vCPU already holds the value.

    (The raw ioctl, not ``Vcpu.set_msrs``: the count KVM wrote tells which MSR it refused.)

    (Example: ``MSR_KVM_ASYNC_PF_INT`` reads 0 without an in-kernel LAPIC but
    cannot be written then, not even with 0.)
    """
    todo = list(values)
    while todo:
        buf = structs.flex(structs.kvm_msrs, len(todo))
        for k, (i, v) in enumerate(todo):
            buf.entries[k].index, buf.entries[k].data = i, v
        try:
            n = kvmfd.ioctl(vcpu.fileno(), ioctls.KVM_SET_MSRS, buf)
        except KvmError as e:
            raise SnapshotRestoreError(f"restoring {tag} MSRs: {e}") from None
        if n >= len(todo):
            return
        i, v = todo[n]
        cur, _ = _read_msrs(vcpu, [i])
        if cur != [(i, v)]:
            now = f"{cur[0][1]:#x}" if cur else "unreadable"
            raise SnapshotRestoreError(f"restoring {tag} MSRs: KVM refused MSR {i:#x} = {v:#x} "
                                       f"(the new vCPU holds {now})")
        todo = todo[n + 1:]


def apply_devices(vm: Vm, items: dict[str, bytes]) -> None:
    if "pit2" in items:
        _set("PIT state", vm.set_pit2, from_bytes(structs.kvm_pit_state2, items["pit2"], "PIT"))
    for chip in IRQCHIPS:
        key = f"irqchip.{chip}"
        if key in items:
            _set(f"irqchip {chip}", vm.set_irqchip, from_bytes(structs.kvm_irqchip, items[key], key))


def apply_clock(vm: Vm, items: dict[str, bytes], clock: str, saved_at: float | None) -> None:
    if "clock" not in items:
        return
    c = from_bytes(structs.kvm_clock_data, items["clock"], "clock")
    if clock == "realtime" and saved_at is not None:
        # Advance kvmclock by the wall time that passed since the snapshot.
        c.clock += max(0, int((time.time() - saved_at) * 1e9))
    c.flags = 0
    c.realtime = c.host_tsc = 0
    _set("kvmclock", vm.set_clock, c)


def _present(get: Callable[..., Any], *args: Any) -> bool:
    """Whether a getter of an optional in-kernel device works (EINVAL/ENXIO/ENOTTY: absent)."""
    try:
        get(*args)
        return True
    except KvmError as e:
        if _absent(e):
            return False
        raise


def has_irqchip(vm: Vm) -> bool:
    """Whether *vm* has a full in-kernel irqchip (PIC + IOAPIC)."""
    return _present(vm.get_irqchip, structs.KVM_IRQCHIP_PIC_MASTER)


def has_pit(vm: Vm) -> bool:
    """Whether *vm* has an in-kernel PIT."""
    return _present(vm.get_pit2)


def has_lapic(vcpu: Vcpu) -> bool:
    """Whether *vcpu* has an in-kernel LAPIC."""
    return _present(vcpu.get_lapic)
