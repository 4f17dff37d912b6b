"""Delivering an event into the guest as the CPU would: IVT in real mode, IDT gates in protected and long mode (Intel SDM Vol. 3A 6.12, 6.14; 20.1.4)."""

from __future__ import annotations

from dataclasses import dataclass

from .engine import Engine, Reg
from .memory import GuestMemory, GuestMemoryError

# Exceptions that push an error code (SDM Table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})
EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
    5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available",
    8: "#DF double fault", 10: "#TS invalid TSS", 11: "#NP segment not present",
    12: "#SS stack fault", 13: "#GP general protection", 14: "#PF page fault",
    16: "#MF x87 error", 17: "#AC alignment check", 18: "#MC machine check", 19: "#XM SIMD error",
}
FLAGS_IF, FLAGS_TF, FLAGS_NT, FLAGS_RF, FLAGS_VM, FLAGS_AC = 1 << 9, 1 << 8, 1 << 14, 1 << 16, 1 << 17, 1 << 18
GATE_INTERRUPT_32, GATE_TRAP_32 = 0xE, 0xF


class DeliveryFault(Exception):  # noqa: N818 - a fault during delivery, as the CPU raises one
    """Delivering the event raised another fault (then: #DF, then shutdown)."""

    def __init__(self, vector: int, error_code: int, why: str) -> None:
        super().__init__(why)
        self.vector = vector
        self.error_code = error_code
        self.why = why


class NoHandler(Exception):  # noqa: N818
    """Real mode: the IVT entry is 0000:0000, there is no handler (no BIOS installed one)."""


@dataclass(frozen=True)
class Delivered:
    vector: int
    cs: int
    ip: int


def deliver(engine: Engine, memory: GuestMemory, vector: int, return_ip: int,
            error_code: int | None = None) -> Delivered:
    """Vector the guest to the handler of `vector` (return address `return_ip`: the faulting
    instruction for faults, the next one for traps, interrupts and INT n)."""
    if engine.bits == 16 or not engine.reg(Reg.CR0) & 1:
        return _deliver_real(engine, memory, vector, return_ip)
    if engine.bits == 64:
        return _deliver_long(engine, memory, vector, return_ip, error_code)
    return _deliver_protected(engine, memory, vector, return_ip, error_code)


def _push(memory: GuestMemory, ss_base: int, sp: int, width: int, value: int, mask: int) -> int:
    sp = (sp - width) & mask
    try:
        memory.write_uint(ss_base + sp, width, value)
    except GuestMemoryError:
        raise DeliveryFault(12, 0, f"stack at {ss_base + sp:#x} is not guest RAM") from None
    return sp


def _deliver_real(engine: Engine, memory: GuestMemory, vector: int, return_ip: int) -> Delivered:
    ivt_base, _limit = engine.table("idtr")
    entry = ivt_base + vector * 4
    offset, segment = memory.read_uint(entry, 2), memory.read_uint(entry + 2, 2)
    if offset == 0 and segment == 0:
        raise NoHandler(f"no handler for vector {vector:#x}: IVT entry {entry:#x} is 0000:0000")
    flags = engine.reg(Reg.EFLAGS)
    ss_base = engine.reg(Reg.SS) << 4
    sp = engine.reg(Reg.ESP) & 0xFFFF
    sp = _push(memory, ss_base, sp, 2, flags & 0xFFFF, 0xFFFF)
    sp = _push(memory, ss_base, sp, 2, engine.reg(Reg.CS), 0xFFFF)
    sp = _push(memory, ss_base, sp, 2, return_ip & 0xFFFF, 0xFFFF)
    engine.set_reg(Reg.ESP, (engine.reg(Reg.ESP) & ~0xFFFF) | sp)
    engine.set_reg(Reg.EFLAGS, flags & ~(FLAGS_IF | FLAGS_TF | FLAGS_AC | FLAGS_RF))
    engine.set_segment("cs", segment)
    engine.set_reg(Reg.EIP, offset)
    return Delivered(vector, segment, offset)


def _gate(memory: GuestMemory, engine: Engine, vector: int, entry_size: int) -> tuple[int, int, int]:
    base, limit = engine.table("idtr")
    if vector * entry_size + entry_size - 1 > limit:
        raise DeliveryFault(13, vector * 8 + 2, f"vector {vector:#x} is beyond the IDT limit {limit:#x}")
    raw = memory.read(base + vector * entry_size, entry_size)
    low = int.from_bytes(raw[:8], "little")
    selector = (low >> 16) & 0xFFFF
    attributes = (low >> 40) & 0xFF
    offset = (low & 0xFFFF) | (((low >> 48) & 0xFFFF) << 16)
    if entry_size == 16:
        offset |= int.from_bytes(raw[8:12], "little") << 32
    if not attributes & 0x80:
        raise DeliveryFault(11, vector * 8 + 2, f"IDT gate {vector:#x} is not present")
    if attributes & 0xF not in (GATE_INTERRUPT_32, GATE_TRAP_32):
        raise DeliveryFault(13, vector * 8 + 2, f"IDT entry {vector:#x} is not an interrupt or trap gate")
    return selector, offset, attributes & 0xF


def _deliver_protected(engine: Engine, memory: GuestMemory, vector: int, return_ip: int,
                       error_code: int | None) -> Delivered:
    selector, offset, kind = _gate(memory, engine, vector, 8)
    flags = engine.reg(Reg.EFLAGS)
    ss_base = engine.segment("ss").base
    sp = engine.reg(Reg.ESP)
    mask = 0xFFFF_FFFF
    sp = _push(memory, ss_base, sp, 4, flags, mask)
    sp = _push(memory, ss_base, sp, 4, engine.reg(Reg.CS), mask)
    sp = _push(memory, ss_base, sp, 4, return_ip, mask)
    if error_code is not None:
        sp = _push(memory, ss_base, sp, 4, error_code, mask)
    engine.set_reg(Reg.ESP, sp)
    cleared = FLAGS_TF | FLAGS_NT | FLAGS_RF | FLAGS_VM | (FLAGS_IF if kind == GATE_INTERRUPT_32 else 0)
    engine.set_reg(Reg.EFLAGS, flags & ~cleared)
    engine.set_segment("cs", selector)
    engine.set_reg(Reg.EIP, offset)
    return Delivered(vector, selector, offset)


def _deliver_long(engine: Engine, memory: GuestMemory, vector: int, return_ip: int,
                  error_code: int | None) -> Delivered:
    selector, offset, kind = _gate(memory, engine, vector, 16)
    flags = engine.reg(Reg.RFLAGS)
    old_ss, old_rsp = engine.reg(Reg.SS), engine.reg(Reg.RSP)
    mask = 0xFFFF_FFFF_FFFF_FFFF
    sp = old_rsp & ~0xF  # the CPU aligns RSP to 16 bytes before pushing the frame
    for value in (old_ss, old_rsp, flags, engine.reg(Reg.CS), return_ip):
        sp = _push(memory, 0, sp, 8, value, mask)
    if error_code is not None:
        sp = _push(memory, 0, sp, 8, error_code, mask)
    engine.set_reg(Reg.RSP, sp)
    cleared = FLAGS_TF | FLAGS_NT | FLAGS_RF | (FLAGS_IF if kind == GATE_INTERRUPT_32 else 0)
    engine.set_reg(Reg.RFLAGS, flags & ~cleared)
    engine.set_segment("cs", selector)
    engine.set_reg(Reg.RIP, offset)
    return Delivered(vector, selector, offset)
