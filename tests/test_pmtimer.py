"""ACPI PM timer at the port level: a 24-bit count at 3.579545 MHz read from PM_TMR."""

from __future__ import annotations

from devicemodel.clock import ManualClock
from devicemodel.pmtimer import PmTimer

PM_HZ = 3_579_545  # ACPI: the PM timer runs off the 14.31818 MHz crystal / 4
S = 1_000_000_000


def ticks(ns: int) -> int:
    return ns * PM_HZ // S


def test_counts_at_3_579545_mhz_between_two_reads() -> None:
    clock = ManualClock(123_456_789)
    pm = PmTimer(clock)
    first = pm.read(0, 4)
    assert first == 0
    clock.advance(10_000_000)  # 10 ms
    second = pm.read(0, 4)
    assert second - first == ticks(10_000_000)
    clock.advance(1_000_000_000 - 10_000_000)
    assert pm.read(0, 4) == PM_HZ  # exactly one second later


def test_the_counter_wraps_at_2_to_the_24() -> None:
    clock = ManualClock()
    pm = PmTimer(clock)
    period_ns = -(-(1 << 24) * S // PM_HZ)  # first ns at which 2^24 ticks have passed
    clock.set(period_ns - 1_000)
    before = pm.read(0, 4)
    assert before > 0xFF0000
    assert before <= 0xFFFFFF
    clock.set(period_ns + 1_000)
    after = pm.read(0, 4)
    assert after < 0x10000
    # What a guest does across a wrap: (after - before) mod 2^24 is the elapsed count.
    assert (after - before) & 0xFFFFFF == ticks(period_ns + 1_000) - ticks(period_ns - 1_000)


def test_bits_31_to_24_read_zero_and_narrow_reads_return_bytes() -> None:
    clock = ManualClock()
    pm = PmTimer(clock)
    clock.set(3 * S + 777)
    value = pm.read(0, 4)
    assert value == ticks(3 * S + 777) & 0xFFFFFF
    assert value >> 24 == 0
    assert pm.read(0, 1) == value & 0xFF
    assert pm.read(1, 1) == (value >> 8) & 0xFF
    assert pm.read(2, 2) == value >> 16
    assert pm.read(3, 1) == 0
    assert pm.read(0, 2) == value & 0xFFFF


def test_writes_are_ignored_and_bad_offsets_read_ones() -> None:
    clock = ManualClock()
    pm = PmTimer(clock)
    clock.advance(S)
    pm.write(0, 4, 0)
    assert pm.read(0, 4) == ticks(S)
    assert pm.ignored_writes == 1
    assert pm.read(4, 1) == 0xFF
    assert pm.read(2, 4) == 0xFFFF0000 | (ticks(S) >> 16)
