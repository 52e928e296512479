"""Whole-VM snapshot and restore: save a paused VM to a file, rebuild it in a fresh VM.

::

    from pykvm import snapshot

    snapshot.save(vm, "guest.snap")                 # vm paused: no vCPU inside run()
    ...
    vm2 = snapshot.restore("guest.snap")            # any process on a compatible host
    vm2.vcpus[0].run()                              # carries on where vm stopped

What is saved
    every vCPU's registers, ``sregs2`` (or ``sregs``), XSAVE area (``XSAVE2``
    size, else ``XSAVE``, else ``FPU``), XCRs, in-kernel LAPIC, every MSR of
    the host's ``KVM_GET_MSR_INDEX_LIST`` that KVM lets us read, CPUID table,
    MP state, pending events, debug registers, nested state where the host has
    it, TSC frequency; the in-kernel PIC/IOAPIC, PIT and kvmclock; and every
    memory region added with :meth:`Vm.add_memory <pykvm.vm.Vm.add_memory>`,
    streamed in chunks with all-zero runs left out.

What is not saved
    VM settings KVM cannot report (``KVM_SET_TSS_ADDR``, identity map,
    ``KVM_ENABLE_CAP`` on the VM, the PIT's creation flags, a split irqchip):
    redo them in the *prepare* hook of :func:`restore`.  Device models that
    live in your program (a serial port, virtio queues) are yours to save; the
    header's ``metadata`` (any JSON) can carry small ones.

File format (version 1, little endian, documented in ``docs/snapshot.md``)
    ``b"PYKVMSNP"``, u32 version, u32 header length, the JSON header, u32
    CRC32 of all that; then records, each a 24-byte header
    ``<4sIQII`` (tag, arg, payload length, payload CRC32, CRC32 of the first
    20 header bytes) and its payload.  Tags: ``VMST`` (VM devices), ``VCPU``
    (one vCPU), ``MEMR`` (a region), ``MEMD`` (region data), ``MEMZ`` (a zero
    run), ``b"END "`` (record count and memory total: detects truncation).

Layout of this package
    :mod:`.fileformat` (errors, records, the bounded reader, :func:`verify`),
    :mod:`.atomic` (the exclusive-temp-file, fsync and rename of a save),
    :mod:`.state` (capture from a paused VM, apply to a new one, through the
    public ``Vm``/``Vcpu`` API), :mod:`.compat` (host fingerprint and
    comparison), :mod:`.ops` (:func:`save`, :func:`restore`,
    :func:`check_compatible`), :mod:`.cli` (``pykvm snapshot`` /
    ``python -m pykvm.snapshot``).

Safety
    Files are hostile input: every length and count is checked against the
    file's real size before anything is allocated or looped over, and every
    malformed file ends in :class:`SnapshotError` (or a subclass) naming the
    file and the field.  :func:`restore` checks the header, every state record and the host
    fingerprint before it creates anything, streams memory while checking each
    chunk's CRC, and sets vCPU state only once the whole file is proven
    intact.  On any failure it closes the half-built VM and raises
    :class:`SnapshotCorrupt`, :class:`SnapshotIncompatible` or
    :class:`SnapshotRestoreError`; it never returns a VM that is not fully
    restored.
"""

from __future__ import annotations

from .compat import host_fingerprint
from .fileformat import (
                         DEFAULT_CHUNK,
                         FORMAT_VERSION,
                         MAGIC,
                         MAX_CHUNK,
                         MAX_HEADER,
                         ZERO_BLOCK,
                         SnapshotCorrupt,
                         SnapshotError,
                         SnapshotIncompatible,
                         SnapshotInfo,
                         SnapshotRestoreError,
                         read_info,
                         verify,
)
from .ops import SaveStats, check_compatible, restore, save

__all__ = [
                         "DEFAULT_CHUNK",
                         "FORMAT_VERSION",
                         "MAGIC",
                         "MAX_CHUNK",
                         "MAX_HEADER",
                         "ZERO_BLOCK",
                         "SaveStats",
                         "SnapshotCorrupt",
                         "SnapshotError",
                         "SnapshotIncompatible",
                         "SnapshotInfo",
                         "SnapshotRestoreError",
                         "check_compatible",
                         "host_fingerprint",
                         "read_info",
                         "restore",
                         "save",
                         "verify",
]
