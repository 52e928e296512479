"""The small PC's address map: every guest physical address and port the VMM uses.

Guest physical layout::

    0x0000_0000  RAM (low)   0x7c00 boot stack top, 0x9000 memory map, 0x9400 GDT,
                             0x9500 multiboot info, strings and module list below 0xa000
    0x0009_fc00  reserved    (EBDA; 0xa0000-0xfffff is RAM too, so VGA text writes land)
    0x000f_0000  reserved    MP table (0xf0000), ACPI RSDP/RSDT/MADT (0xf8000)
    0x0010_0000  RAM         kernel, then modules, page aligned
    low_end      PCI hole    low_end = memory, or 3 GiB when memory > 3.5 GiB
    0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC (in KVM)
    0xfffb_c000  reserved    (KVM's identity map and TSS pages)
    0x1_0000_0000 RAM (rest, when memory > 3.5 GiB)

Ports: COM1 0x3f8 (IRQ 4), fw_cfg 0x510/0x511, CMOS 0x70/0x71, PCI 0xcf8-0xcff,
debug exit 0xf4, debug console 0xe9, POST 0x80, A20/reset 0x92, keyboard
controller 0x60/0x64, VGA 0x3c0-0x3df.  The PIC, PIT (and port 0x61) live in KVM.
"""

from __future__ import annotations

__all__ = [
    "BIOS_ADDR",
    "BOOT_STACK",
    "CMOS_PORT",
    "COM1",
    "COM1_IRQ",
    "DEBUG_CONSOLE_PORT",
    "DEBUG_EXIT_PORT",
    "EBDA_ADDR",
    "FW_CFG_PORT",
    "GDT_ADDR",
    "HIGH_MEMORY",
    "HIGH_RAM_BASE",
    "IDENTITY_MAP_ADDR",
    "INFO_ADDR",
    "INFO_AREA_END",
    "IOAPIC_ADDR",
    "KERNEL_AREA",
    "LAPIC_ADDR",
    "LOW_RAM_LIMIT",
    "MMAP_ADDR",
    "MP_ADDR",
    "PCI_CONFIG_PORT",
    "PCI_HOLE_START",
    "RSDP_ADDR",
    "TSS_ADDR",
    "VMM_AREAS",
    "GiB",
    "MiB",
    "split_ram",
]

MiB = 1 << 20
GiB = 1 << 30

# -- KVM's own pages (x86.prepare_vm's defaults): never RAM --------------------------------
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

# -- low memory the VMM writes --------------------------------------------------------------
BOOT_STACK = 0x7C00          #: ESP of the boot CPU (multiboot leaves it undefined)
MMAP_ADDR = 0x9000           #: multiboot memory map (QEMU puts it here too)
GDT_ADDR = 0x9400            #: the flat GDT of the boot CPU (null, code 0x08, data 0x10)
INFO_ADDR = 0x9500           #: struct multiboot_info (ditto)
INFO_AREA_END = 0xA000       #: strings and the module list go below this if they fit
EBDA_ADDR = 0x9FC00          #: reserved, as on a PC
BIOS_ADDR = 0xF0000          #: reserved 64 KiB holding the firmware tables
MP_ADDR = 0xF0000            #: MP floating pointer; the configuration table follows at +16
RSDP_ADDR = 0xF8000          #: ACPI RSDP; RSDT and MADT follow
HIGH_MEMORY = 0x100000       #: 1 MiB: modules start here at the lowest
KERNEL_AREA = HIGH_MEMORY

#: Low memory the VMM writes itself: a kernel image must not overlap it.
VMM_AREAS: list[tuple[int, int, str]] = [
    (MMAP_ADDR, INFO_AREA_END, "the boot information and GDT"),
    (MP_ADDR, HIGH_MEMORY, "the MP and ACPI tables"),
]

# -- the PCI hole and RAM above 4 GiB ---------------------------------------------------------
LOW_RAM_LIMIT = 0xE0000000   #: up to 3.5 GiB of RAM stays below 4 GiB ...
PCI_HOLE_START = 0xC0000000  #: ... more is split here and continues at 4 GiB
HIGH_RAM_BASE = 4 * GiB
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000


def split_ram(memory: int) -> tuple[int, int]:
    """``(low_end, high_size)``: RAM below the PCI hole and RAM from 4 GiB."""
    low = memory if memory <= LOW_RAM_LIMIT else PCI_HOLE_START
    return low, memory - low


# -- ports ---------------------------------------------------------------------------------------
COM1 = 0x3F8
COM1_IRQ = 4
FW_CFG_PORT = 0x510          #: selector; data at +1
CMOS_PORT = 0x70             #: index; data at +1
PCI_CONFIG_PORT = 0xCF8      #: address 0xcf8, reset control 0xcf9, data 0xcfc-0xcff
DEBUG_EXIT_PORT = 0xF4
DEBUG_CONSOLE_PORT = 0xE9
