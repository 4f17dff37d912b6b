"""ACPI power-management timer (PM_TMR, 0xB008 on this machine): a free-running 24-bit counter at 3.579545 MHz (ACPI 6.0 section 4.8.3.3)."""

from __future__ import annotations

from devicemodel.clock import Clock

PM_TIMER_HZ = 3_579_545
NS_PER_S = 1_000_000_000
COUNTER_MASK = 0xFFFFFF  # TMR_VAL_EXT = 0 in the FADT: 24 bits, bits 31:24 read 0
REGISTER_BYTES = 4


class PmTimer:
    """A read-only 32-bit register at offset 0; the count is derived from the clock at
    each read, so it is right whenever it is read. Narrow or unaligned reads return the
    matching bytes of the register; bytes past it read 0xFF; writes are ignored."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._origin_ns = clock.now_ns()
        self.ignored_writes = 0
        self.bad_accesses = 0

    def ticks(self) -> int:
        """Timer input edges since the device was created (not wrapped)."""
        return (self._clock.now_ns() - self._origin_ns) * PM_TIMER_HZ // NS_PER_S

    def value(self) -> int:
        """TMR_VAL as the guest reads it."""
        return self.ticks() & COUNTER_MASK

    def read(self, offset: int, size: int) -> int:
        register = self.value()
        result = 0
        for i in range(size):
            pos = offset + i
            if 0 <= pos < REGISTER_BYTES:
                byte = (register >> (8 * pos)) & 0xFF
            else:
                byte = 0xFF
                self.bad_accesses += 1
            result |= byte << (8 * i)
        return result

    def write(self, offset: int, size: int, value: int) -> None:
        self.ignored_writes += 1  # PM_TMR is read-only
