"""Reading the guest-state area from the CPU: registers, segments with their hidden parts, descriptor tables (Intel SDM Vol. 3C 25.4)."""

from __future__ import annotations

from . import vmcs as V
from .engine import MSR_EFER, Engine, Reg

_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")


def load_guest_field(engine: Engine, vmcs: V.Vmcs, encoding: int) -> int | None:
    """The value of one guest-state field now. A segment loads all four of its fields into the
    VMCS at once (one descriptor read); None for fields hvmlab does not model."""
    wide = engine.bits == 64
    simple = {V.GUEST_RIP: Reg.RIP if wide else Reg.EIP, V.GUEST_RSP: Reg.RSP if wide else Reg.ESP,
              V.GUEST_RFLAGS: Reg.EFLAGS, V.GUEST_CR0: Reg.CR0, V.GUEST_CR3: Reg.CR3,
              V.GUEST_CR4: Reg.CR4, V.GUEST_DR7: Reg.DR7}
    if encoding in simple:
        return engine.reg(simple[encoding])
    for seg in _SEGMENTS:
        up = seg.upper()
        fields = (getattr(V, f"GUEST_{up}_SELECTOR"), getattr(V, f"GUEST_{up}_BASE"),
                  getattr(V, f"GUEST_{up}_LIMIT"), getattr(V, f"GUEST_{up}_AR_BYTES"))
        if encoding in fields:
            state = engine.segment(seg)
            values = (state.selector, state.base, state.limit & 0xFFFF_FFFF, state.flags)
            for field, value in zip(fields, values, strict=True):
                vmcs._fields[field] = value
            return vmcs._fields[encoding]
    if encoding in (V.GUEST_GDTR_BASE, V.GUEST_GDTR_LIMIT, V.GUEST_IDTR_BASE, V.GUEST_IDTR_LIMIT):
        which = "gdtr" if encoding in (V.GUEST_GDTR_BASE, V.GUEST_GDTR_LIMIT) else "idtr"
        base, limit = engine.table(which)
        return base if encoding in (V.GUEST_GDTR_BASE, V.GUEST_IDTR_BASE) else limit
    if encoding == V.GUEST_IA32_EFER:
        return engine.msr(MSR_EFER) if engine.bits != 16 else 0
    if encoding == V.GUEST_ACTIVITY_STATE:
        return 0
    return None
