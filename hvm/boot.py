"""Putting a vCPU in the mode a guest expects: real mode, flat protected mode, or identity-mapped long mode (Intel SDM Vol. 3A ch. 9-10)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .engine import MSR_EFER, Engine, Reg
from .memory import GuestMemory

# Where the loader puts the structures it builds; guests in protected/long mode must not overlap.
GDT_BASE = 0x0800
PAGE_TABLES_BASE = 0x1000          # PML4, then PDPT, then 4 page directories (2 MiB pages)
SYSTEM_AREA = (GDT_BASE, 0x7000)   # [start, end)
PROTECTED_STACK = 0x80000          # initial ESP/RSP in protected and long mode (grows down)

SEL_CODE32, SEL_DATA, SEL_CODE64 = 0x08, 0x10, 0x18
# Flat 4 GiB descriptors: base 0, limit 0xFFFFF with G=1; code 0x9A (present, ring 0, exec/read),
# data 0x92 (present, ring 0, read/write); D/B=1 for 32-bit, L=1 for 64-bit code.
GDT_ENTRIES = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF)

CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_PRESENT, PTE_WRITE, PDE_LARGE = 1 << 0, 1 << 1, 1 << 7


@dataclass(frozen=True)
class BootState:
    bits: int
    entry: int
    stack: int


def real_mode_stack(entry: int) -> int:
    """SP for a real-mode guest: just below a boot sector at 0x7C00, else the top of segment 0."""
    return entry if 0x500 <= entry <= 0xFFFF else 0xFFFE


def build_gdt(memory: GuestMemory) -> tuple[int, int]:
    table = struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)
    memory.write(GDT_BASE, table)
    return GDT_BASE, len(table) - 1


def build_identity_page_tables(memory: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; returns CR3. Addresses beyond guest RAM
    stay mapped in the page tables, so touching them is an EPT violation, not a #PF."""
    pml4, pdpt = PAGE_TABLES_BASE, PAGE_TABLES_BASE + 0x1000
    memory.write_uint(pml4, 8, pdpt | PTE_PRESENT | PTE_WRITE)
    for gib in range(4):
        pd = PAGE_TABLES_BASE + 0x2000 + gib * 0x1000
        memory.write_uint(pdpt + 8 * gib, 8, pd | PTE_PRESENT | PTE_WRITE)
        entries = [((gib * 512 + i) << 21) | PTE_PRESENT | PTE_WRITE | PDE_LARGE for i in range(512)]
        memory.write(pd, struct.pack("<512Q", *entries))
    return pml4


def boot(engine: Engine, memory: GuestMemory, bits: int, entry: int) -> BootState:
    """Set registers (and build the GDT / page tables) so the first instruction runs at `entry`."""
    if bits == 16:
        cs = (entry >> 4) & 0xF000 if entry > 0xFFFF else 0
        for seg in ("ds", "es", "ss", "fs", "gs"):
            engine.set_segment(seg, 0)
        engine.set_segment("cs", cs)
        stack = real_mode_stack(entry)
        engine.set_reg(Reg.ESP, stack)
        engine.set_reg(Reg.EFLAGS, 0x2)
        engine.set_reg(Reg.EIP, entry - (cs << 4))
        return BootState(16, entry, stack)
    gdt_base, gdt_limit = build_gdt(memory)
    engine.set_table("gdtr", gdt_base, gdt_limit)
    engine.set_table("idtr", 0, 0)  # no IDT until the guest loads one: a fault then shuts down
    if bits == 64:
        engine.set_reg(Reg.CR3, build_identity_page_tables(memory))
        engine.set_reg(Reg.CR4, CR4_PAE)
        engine.set_msr(MSR_EFER, EFER_LME | EFER_LMA)
        engine.set_reg(Reg.CR0, CR0_PE | CR0_ET | CR0_PG)
        engine.set_segment("cs", SEL_CODE64)
    else:
        engine.set_reg(Reg.CR0, CR0_PE | CR0_ET)
        engine.set_segment("cs", SEL_CODE32)
    for seg in ("ds", "es", "ss", "fs", "gs"):
        engine.set_segment(seg, SEL_DATA)
    engine.set_reg(Reg.RSP if bits == 64 else Reg.ESP, PROTECTED_STACK)
    engine.set_reg(Reg.EFLAGS, 0x2)
    engine.set_reg(Reg.RIP if bits == 64 else Reg.EIP, entry)
    return BootState(bits, entry, PROTECTED_STACK)
