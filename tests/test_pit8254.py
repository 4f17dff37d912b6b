"""8254 PIT at the port level: program counters through 0x43, read counts back through 0x40-0x42."""

from __future__ import annotations

import pytest

from devicemodel.clock import ManualClock
from devicemodel.irq import RecordingIrq
from devicemodel.pit8254 import Pit8254, Port61

PIT_HZ = 1_193_182  # the PIT input clock, from the datasheet / PC/AT reference
CH0, CH1, CH2, MODE = 0, 1, 2, 3


def ticks(ns: int) -> int:
    """Oscillator edges by clock time ns (the oscillator free-runs from clock zero)."""
    return ns * PIT_HZ // 1_000_000_000


LOAD_NS = 1_000_000  # every test loads its counts at this clock time


def since_load(now_ns: int) -> int:
    """Input-clock edges a counter loaded at LOAD_NS has seen by now_ns."""
    return ticks(now_ns) - ticks(LOAD_NS)


def make() -> tuple[Pit8254, ManualClock, RecordingIrq]:
    clock = ManualClock(LOAD_NS)  # not zero: counts must be relative to the load
    irq = RecordingIrq()
    return Pit8254(clock, irq), clock, irq


def program(pit: Pit8254, channel: int, mode: int, count: int, bcd: bool = False) -> None:
    pit.write(MODE, 1, channel << 6 | 0x30 | mode << 1 | int(bcd))  # lobyte/hibyte
    pit.write(channel, 1, count & 0xFF)
    pit.write(channel, 1, count >> 8)


def latched_count(pit: Pit8254, channel: int) -> int:
    pit.write(MODE, 1, channel << 6)  # counter latch command
    lo = pit.read(channel, 1)
    hi = pit.read(channel, 1)
    return hi << 8 | lo


def status(pit: Pit8254, channel: int) -> int:
    pit.write(MODE, 1, 0xC0 | 0x20 | (2 << channel))  # read-back, status only
    return pit.read(channel, 1)


def test_mode2_latched_count_follows_the_clock() -> None:
    pit, clock, _ = make()
    divisor = 1193
    program(pit, CH0, 2, divisor)
    assert latched_count(pit, CH0) == divisor
    for step in (400_000, 123_456, 700_001, 5_000_000):
        clock.advance(step)
        assert latched_count(pit, CH0) == divisor - since_load(clock.now_ns()) % divisor


def test_latch_freezes_the_value_until_read() -> None:
    pit, clock, _ = make()
    program(pit, CH0, 2, 50000)
    clock.advance(10_000_000)
    pit.write(MODE, 1, 0x00)
    expected = 50000 - since_load(clock.now_ns()) % 50000
    clock.advance(3_000_000)
    pit.write(MODE, 1, 0x00)  # a second latch before reading is ignored
    assert pit.read(CH0, 1) | pit.read(CH0, 1) << 8 == expected
    # After the latch is read, reads follow the live counter again.
    live = pit.read(CH0, 1) | pit.read(CH0, 1) << 8
    assert live == 50000 - since_load(clock.now_ns()) % 50000


def test_mode2_one_irq0_pulse_per_period() -> None:
    pit, clock, irq = make()
    divisor = 11932  # ~100 Hz
    program(pit, CH0, 2, divisor)
    start = clock.now_ns()
    first = pit.next_deadline_ns()
    assert first is not None
    assert since_load(first) == divisor
    assert since_load(first - 1) == divisor - 1
    pit.run_timers(first - 1)
    assert irq.raises == 0
    clock.set(start + 10 * divisor * 1_000_000_000 // PIT_HZ + 1000)
    pit.run_timers(clock.now_ns())
    assert irq.raises == 10
    assert irq.level is False  # pulses, not a held level
    pit.run_timers(clock.now_ns())
    assert irq.raises == 10  # already delivered
    nxt = pit.next_deadline_ns()
    assert nxt is not None and nxt > clock.now_ns()


def test_mode3_square_wave_counts_by_two_and_interrupts_per_period() -> None:
    pit, clock, irq = make()
    n = 1000
    program(pit, CH0, 3, n)
    assert status(pit, CH0) & 0x80  # OUT starts high
    clock.advance(100 * 1_000_000_000 // PIT_HZ + 1)  # 100 ticks into the first half
    count = latched_count(pit, CH0)
    assert count == n - 2 * since_load(clock.now_ns())
    assert count % 2 == 0
    clock.advance(500 * 1_000_000_000 // PIT_HZ)  # now in the second (low) half
    assert not status(pit, CH0) & 0x80
    clock.set(LOAD_NS + 3 * n * 1_000_000_000 // PIT_HZ + 10)
    pit.run_timers(clock.now_ns())
    assert irq.raises == 3


def test_mode0_interrupt_on_terminal_count_fires_once() -> None:
    pit, clock, irq = make()
    n = 5000
    pit.write(MODE, 1, 0x30)  # channel 0, lobyte/hibyte, mode 0
    assert not status(pit, CH0) & 0x80  # mode 0: OUT low after the control word
    pit.write(CH0, 1, n & 0xFF)
    pit.write(CH0, 1, n >> 8)
    deadline = pit.next_deadline_ns()
    assert deadline is not None
    clock.set(deadline - 1)
    assert not status(pit, CH0) & 0x80
    pit.run_timers(clock.now_ns())
    assert irq.raises == 0
    clock.set(deadline)
    assert status(pit, CH0) & 0x80
    clock.advance(1_000_000_000)
    pit.run_timers(clock.now_ns())
    assert irq.raises == 1
    assert pit.next_deadline_ns() is None
    # The counter keeps counting down past zero and wraps.
    assert latched_count(pit, CH0) == (n - since_load(clock.now_ns())) % 0x10000


def test_lobyte_and_hibyte_only_access_modes() -> None:
    pit, clock, _ = make()
    pit.write(MODE, 1, 0x40 | 0x10 | 2 << 1)  # channel 1, lobyte only, mode 2
    pit.write(CH1, 1, 200)
    clock.advance(50 * 1_000_000_000 // PIT_HZ + 1)
    assert pit.read(CH1, 1) == 200 - 50
    assert pit.read(CH1, 1) == 200 - 50  # every read is the low byte
    pit.write(MODE, 1, 0x40 | 0x20 | 2 << 1)  # hibyte only: count = 0x0300
    pit.write(CH1, 1, 0x03)
    clock.advance(0x100 * 1_000_000_000 // PIT_HZ + 1)
    assert pit.read(CH1, 1) == (0x300 - 0x100) >> 8


def test_read_back_latches_status_then_count() -> None:
    pit, clock, _ = make()
    program(pit, CH2, 2, 0x1234)
    pit.write(MODE, 1, 0xC0 | (2 << 2))  # read-back: count and status of ch2
    st = pit.read(CH2, 1)
    # Status: OUT (gate low in mode 2 keeps OUT high), RW=3, mode 2, binary
    assert st == 0x80 | 0x30 | 2 << 1
    assert pit.read(CH2, 1) | pit.read(CH2, 1) << 8 == 0x1234


def test_null_count_until_a_count_is_written() -> None:
    pit, _, _ = make()
    pit.write(MODE, 1, 0x40 | 0x30 | 2 << 1)
    assert status(pit, CH1) & 0x40
    pit.write(CH1, 1, 0x10)
    pit.write(CH1, 1, 0x00)
    assert not status(pit, CH1) & 0x40


def test_bcd_counting() -> None:
    pit, clock, _ = make()
    program(pit, CH0, 2, 0x1000, bcd=True)  # 1000 decimal
    clock.advance(1_000_000)
    expected = 1000 - since_load(clock.now_ns()) % 1000
    bcd = int(str(expected), 16)
    assert latched_count(pit, CH0) == bcd


def test_port61_gate_starts_channel2_and_out2_is_bit5() -> None:
    pit, clock, _ = make()
    port61 = Port61(pit)
    pit.write(MODE, 1, 0x80 | 0x30)  # channel 2, mode 0
    pit.write(CH2, 1, 100)
    pit.write(CH2, 1, 0)
    clock.advance(1_000_000)  # far more than 100 ticks, but the gate is low
    assert port61.read(0, 1) & 0x20 == 0
    assert latched_count(pit, CH2) == 100
    port61.write(0, 1, 0x01)  # gate on, speaker off
    assert port61.read(0, 1) & 0x0F == 0x01
    clock.advance(99 * 1_000_000_000 // PIT_HZ)
    assert port61.read(0, 1) & 0x20 == 0
    clock.advance(2 * 1_000_000_000 // PIT_HZ)
    assert port61.read(0, 1) & 0x20 == 0x20
    assert not port61.speaker_on
    port61.write(0, 1, 0x03)
    assert port61.speaker_on


def test_port61_refresh_bit_toggles_with_time() -> None:
    pit, clock, _ = make()
    port61 = Port61(pit)
    seen = set()
    for _ in range(8):
        seen.add(port61.read(0, 1) & 0x10)
        clock.advance(7_000)  # about half of the 15 us refresh period
    assert seen == {0x00, 0x10}


def test_bad_offsets_are_harmless() -> None:
    pit, _, _ = make()
    assert pit.read(MODE, 1) == 0xFF  # the control word register is write-only
    assert pit.read(7, 1) == 0xFF
    pit.write(9, 4, 0xFFFFFFFF)
    assert pit.bad_accesses > 0


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_random_programming_matches_the_datasheet_model(seed: int) -> None:
    """Random reprogramming of channel 0 in modes 0, 2 and 3 at random times: every
    latched count and the total number of IRQ0 pulses agree with a model built from
    the datasheet (mode 2 counts N..1, mode 3 counts down by two, mode 0 fires once)."""
    import random

    rng = random.Random(seed)
    pit, clock, irq = make()
    expected_pulses = 0
    mode, n, load = None, 0, 0

    def pulses_between(start_ns: int, end_ns: int) -> int:
        e = ticks(end_ns) - ticks(start_ns)
        if mode in (2, 3):
            return e // n
        if mode == 0:
            return 1 if e >= n else 0
        return 0

    for _ in range(60):
        if mode is not None:
            expected_pulses += pulses_between(load, clock.now_ns())
        mode = rng.choice((0, 2, 3))
        raw = rng.choice((0, rng.randrange(2, 0x10000), rng.randrange(2, 300)))
        n = raw or 0x10000
        program(pit, CH0, mode, raw)
        load = clock.now_ns()
        for _ in range(rng.randrange(1, 5)):
            clock.advance(rng.choice((rng.randrange(1000), rng.randrange(200_000_000))))
            if rng.random() < 0.7:
                pit.run_timers(clock.now_ns())
            e = ticks(clock.now_ns()) - ticks(load)
            count = latched_count(pit, CH0)
            if mode == 2:
                assert count == (n - e % n) % 0x10000
            elif mode == 3:
                assert 1 <= (count or 0x10000) <= n
                if n % 2 == 0:
                    assert count % 2 == 0
            else:
                assert count == (n - e) % 0x10000
                assert bool(status(pit, CH0) & 0x80) == (e >= n)
    expected_pulses += pulses_between(load, clock.now_ns())
    pit.run_timers(clock.now_ns())
    assert irq.raises + pit.missed_ticks == expected_pulses
