"""Interrupt wiring: an IrqLine protocol for devices, a recording line for tests, and the PIC's INTA protocol."""

from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    """One interrupt request wire, driven by a device."""

    def set_level(self, level: bool) -> None: ...

    def pulse(self) -> None:
        """An edge: raise the line, then lower it."""
        ...


class RecordingIrq:
    """Test helper: remembers the current level, how many rising edges, and every level set."""

    def __init__(self) -> None:
        self.level: bool = False
        self.raises: int = 0
        self.history: list[bool] = []

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level and not self.level:
            self.raises += 1
        self.level = level
        self.history.append(level)

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)


class InterruptController(Protocol):
    """What the hypervisor asks of an interrupt controller before a VM entry."""

    def has_interrupt(self) -> bool:
        """True if an unmasked request would be delivered to the CPU's INTR pin."""
        ...

    def acknowledge(self) -> int | None:
        """INTA cycle: return the vector and move the request from IRR to ISR.

        None if nothing is pending (a real PIC would answer with a spurious vector;
        implementations document which they do).
        """
        ...
