"""Firmware tables that tell a kernel about its CPUs and interrupt routing.

Two descriptions of the same machine, in the reserved BIOS area (0xf0000),
where kernels search for them:

* an Intel MultiProcessor table (MP spec 1.4): floating pointer ``_MP_`` at
  :data:`MP_ADDR`, then the ``PCMP`` configuration table: one processor entry
  per vCPU (APIC id = index, vCPU 0 the BSP), an ISA bus, the IOAPIC (id 0 at
  0xfec00000), ISA IRQ 0-15 assignments (IRQ 0 on IOAPIC pin 2, the others
  on the pin of their number, the 8259's ExtINT on pin 0) and the local
  interrupt entries (LINT0 ExtINT, LINT1 NMI);
* ACPI 1.0 tables: ``RSD PTR `` at :data:`RSDP_ADDR`, an RSDT listing one
  MADT (``APIC``) with the same CPUs, the IOAPIC (GSI base 0), the
  interrupt source override IRQ 0 -> GSI 2 and the LINT1 NMI.  No FADT/DSDT:
  enough for CPU and interrupt discovery, not for ACPI power management.

The routing matches the VMM's GSI table (``Machine._set_gsi_routing``).
"""

from __future__ import annotations

import struct

from .layout import IOAPIC_ADDR, LAPIC_ADDR, MP_ADDR, RSDP_ADDR

__all__ = ["MP_ADDR", "RSDP_ADDR", "acpi_tables", "checksum", "mp_table"]

IOAPIC_ID = 0              # the in-kernel IOAPIC's ID register after reset (QEMU's MADT says 0 too)
_OEM = b"PYKVM "


def checksum(data: bytes) -> int:
    """The byte that makes *data* sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytearray, at: int) -> bytes:
    data[at] = 0
    data[at] = checksum(bytes(data))
    return bytes(data)


def mp_table(cpus: int, addr: int = MP_ADDR) -> bytes:
    """The MP floating pointer at *addr* followed by the configuration table."""
    entries: list[bytes] = []
    for i in range(cpus):
        flags = 1 | (2 if i == 0 else 0)                          # enabled, BSP
        entries.append(struct.pack("<BBBBIIQ", 0, i, 0x14, flags, 0x00000600, 0x00000201, 0))
    entries.append(struct.pack("<BB6s", 1, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, IOAPIC_ID, 0x11, 1, IOAPIC_ADDR))
    entries.append(struct.pack("<BBHBBBB", 3, 3, 0, 0, 0, IOAPIC_ID, 0))   # ExtINT -> pin 0
    for irq in range(16):
        if irq == 2:
            continue
        pin = 2 if irq == 0 else irq
        entries.append(struct.pack("<BBHBBBB", 3, 0, 0, 0, irq, IOAPIC_ID, pin))
    entries.append(struct.pack("<BBHBBBB", 4, 3, 0, 0, 0, 0xFF, 0))         # ExtINT -> LINT0
    entries.append(struct.pack("<BBHBBBB", 4, 1, 0, 0, 0, 0xFF, 1))         # NMI -> LINT1
    body = b"".join(entries)
    length = 44 + len(body)
    table = _with_checksum(bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", length, 4, 0,
                                                 b"PYKVM   ", b"PC          ", 0, 0, len(entries),
                                                 LAPIC_ADDR, 0, 0, 0) + body), 7)
    fp = bytearray(struct.pack("<4sIBBB5s", b"_MP_", addr + 16, 1, 4, 0, bytes(5)))
    return _with_checksum(fp, 10) + table


def _acpi_header(sig: bytes, length: int, revision: int, table_id: bytes) -> bytearray:
    return bytearray(struct.pack("<4sIBB6s8sI4sI", sig, length, revision, 0, _OEM,
                                 table_id.ljust(8), 1, b"PYKV", 1))


def acpi_tables(cpus: int, addr: int = RSDP_ADDR) -> bytes:
    """RSDP at *addr*, RSDT at +0x20, MADT at +0x50 (one blob to write at *addr*)."""
    rsdt_addr, madt_addr = addr + 0x20, addr + 0x50
    body = struct.pack("<II", LAPIC_ADDR, 1)                          # PCAT_COMPAT: 8259s present
    for i in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)                  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, IOAPIC_ID, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)                 # ISA IRQ 0 -> GSI 2
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)                   # NMI on LINT1, all CPUs
    madt = _with_checksum(bytearray(_acpi_header(b"APIC", 36 + len(body), 1, b"PYKVMADT") + body), 9)
    rsdt = _with_checksum(bytearray(_acpi_header(b"RSDT", 40, 1, b"PYKVRSDT")
                                    + struct.pack("<I", madt_addr)), 9)
    rsdp = _with_checksum(bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, _OEM, 0, rsdt_addr)), 8)
    out = bytearray(madt_addr - addr + len(madt))
    out[0:len(rsdp)] = rsdp
    out[rsdt_addr - addr:rsdt_addr - addr + len(rsdt)] = rsdt
    out[madt_addr - addr:] = madt
    return bytes(out)
