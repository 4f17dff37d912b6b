"""MC146818 RTC/CMOS at the port level: index 0x70, data 0x71; time, status registers, IRQ8, memory bytes."""

from __future__ import annotations

import datetime as dt

import pytest

from devicemodel.clock import ManualClock
from devicemodel.cmos_rtc import CmosRtc
from devicemodel.irq import RecordingIrq

INDEX, DATA = 0, 1
SEC, MIN, HOUR, DOW, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
SEC_ALARM, MIN_ALARM, HOUR_ALARM = 0x01, 0x03, 0x05
REG_A, REG_B, REG_C, REG_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
MiB = 1024 * 1024
S = 1_000_000_000
EPOCH = dt.datetime(2024, 2, 28, 23, 59, 58)


def make(mem: int = 16 * MiB, epoch: dt.datetime = EPOCH):
    clock = ManualClock(5 * S)
    irq = RecordingIrq()
    return CmosRtc(clock, irq, mem, epoch), clock, irq


def rd(rtc: CmosRtc, reg: int) -> int:
    rtc.write(INDEX, 1, reg)
    return rtc.read(DATA, 1)


def wr(rtc: CmosRtc, reg: int, value: int) -> None:
    rtc.write(INDEX, 1, reg)
    rtc.write(DATA, 1, value)


def bcd(n: int) -> int:
    return int(str(n), 16)


def test_bcd_time_at_epoch_and_status_defaults() -> None:
    rtc, _, _ = make()
    assert rd(rtc, SEC) == bcd(EPOCH.second)
    assert rd(rtc, MIN) == bcd(EPOCH.minute)
    assert rd(rtc, HOUR) == bcd(EPOCH.hour)
    assert rd(rtc, DAY) == bcd(EPOCH.day)
    assert rd(rtc, MONTH) == bcd(EPOCH.month)
    assert rd(rtc, YEAR) == bcd(EPOCH.year % 100)
    assert rd(rtc, CENTURY) == bcd(EPOCH.year // 100)
    assert rd(rtc, DOW) == EPOCH.isoweekday() % 7 + 1  # Sunday = 1
    assert rd(rtc, REG_B) & 0x06 == 0x02  # BCD, 24-hour
    assert rd(rtc, REG_D) == 0x80  # VRT: valid RAM and time


def test_time_advances_with_the_clock_across_a_leap_day() -> None:
    rtc, clock, _ = make()
    clock.advance(3 * S)  # 23:59:58 + 3 s
    now = EPOCH + dt.timedelta(seconds=3)
    assert (rd(rtc, HOUR), rd(rtc, MIN), rd(rtc, SEC)) == (0, 0, bcd(now.second))
    assert rd(rtc, DAY) == bcd(29)  # 2024 is a leap year
    assert rd(rtc, MONTH) == bcd(2)
    assert rd(rtc, DOW) == now.isoweekday() % 7 + 1
    clock.advance(S // 2)
    assert rd(rtc, SEC) == bcd(now.second)  # no update within the second


def test_binary_mode_and_12_hour_mode() -> None:
    epoch = dt.datetime(2031, 7, 4, 15, 42, 9)
    rtc, _, _ = make(epoch=epoch)
    wr(rtc, REG_B, 0x02 | 0x04)  # binary, 24-hour
    assert rd(rtc, HOUR) == 15 and rd(rtc, MIN) == 42 and rd(rtc, SEC) == 9
    assert rd(rtc, YEAR) == 31 and rd(rtc, CENTURY) == 20
    wr(rtc, REG_B, 0x04)  # binary, 12-hour
    assert rd(rtc, HOUR) == 0x80 | 3  # 3 PM
    wr(rtc, REG_B, 0x00)  # BCD, 12-hour
    assert rd(rtc, HOUR) == 0x80 | 0x03
    assert rd(rtc, MIN) == 0x42


def test_setting_the_time_with_the_set_bit() -> None:
    rtc, clock, _ = make()
    wr(rtc, REG_B, 0x80 | 0x02)  # SET: updates stop
    for reg, value in ((SEC, 0x30), (MIN, 0x15), (HOUR, 0x09), (DAY, 0x31), (MONTH, 0x12)):
        wr(rtc, reg, value)
    wr(rtc, YEAR, 0x99)
    wr(rtc, CENTURY, 0x19)
    clock.advance(10 * S)
    assert rd(rtc, SEC) == 0x30  # frozen while SET
    wr(rtc, REG_B, 0x02)
    clock.advance(S)
    assert rd(rtc, SEC) == 0x31
    # Run over the new year: 1999-12-31 09:15:31 + 15 h -> 2000-01-01 00:15:31
    clock.advance(15 * 3600 * S)
    assert (rd(rtc, CENTURY), rd(rtc, YEAR), rd(rtc, MONTH), rd(rtc, DAY)) == (0x20, 0, 1, 1)
    assert (rd(rtc, HOUR), rd(rtc, MIN), rd(rtc, SEC)) == (0x00, 0x15, 0x31)


def test_12_hour_write_is_understood() -> None:
    rtc, _, _ = make()
    wr(rtc, REG_B, 0x80 | 0x04)  # SET, binary, 12-hour
    wr(rtc, HOUR, 0x80 | 12)  # 12 PM = noon
    wr(rtc, REG_B, 0x04 | 0x02)  # binary, 24-hour
    assert rd(rtc, HOUR) == 12
    wr(rtc, REG_B, 0x80 | 0x04)
    wr(rtc, HOUR, 12)  # 12 AM = midnight
    wr(rtc, REG_B, 0x06)
    assert rd(rtc, HOUR) == 0


def test_periodic_interrupt_rate_and_register_c() -> None:
    rtc, clock, irq = make()
    wr(rtc, REG_A, 0x20 | 0x06)  # 32.768 kHz base, RS=6: 1024 Hz
    wr(rtc, REG_B, 0x02 | 0x40)  # PIE
    period = -(-S // 1024)  # 976562.5 ns, rounded up to a whole ns
    deadline = rtc.next_deadline_ns()
    assert deadline is not None and deadline - clock.now_ns() == period
    rtc.run_timers(deadline - 1)
    assert irq.raises == 0
    count = 0
    for _ in range(5):
        clock.advance(period)
        rtc.run_timers(clock.now_ns())
        assert irq.level is True
        c = rd(rtc, REG_C)
        assert c & 0xC0 == 0xC0  # IRQF | PF
        assert irq.level is False  # reading C lowered IRQ8
        assert rd(rtc, REG_C) == 0  # and cleared the flags
        count += 1
    assert irq.raises == count


def test_without_reading_c_there_is_no_second_interrupt() -> None:
    rtc, clock, irq = make()
    wr(rtc, REG_B, 0x02 | 0x40)
    clock.advance(10 * S // 1024)
    rtc.run_timers(clock.now_ns())
    clock.advance(10 * S // 1024)
    rtc.run_timers(clock.now_ns())
    assert irq.raises == 1
    assert rtc.next_deadline_ns() is None


@pytest.mark.parametrize("rs,hz", [(3, 8192), (6, 1024), (15, 2), (1, 256), (2, 128)])
def test_rate_select_table(rs: int, hz: int) -> None:
    rtc, clock, _ = make()
    wr(rtc, REG_A, 0x20 | rs)
    wr(rtc, REG_B, 0x02 | 0x40)
    deadline = rtc.next_deadline_ns()
    assert deadline is not None
    assert abs((deadline - clock.now_ns()) - S / hz) < 1


def test_pf_is_set_even_without_pie_and_rate_zero_is_off() -> None:
    rtc, clock, irq = make()
    clock.advance(S // 100)
    assert rd(rtc, REG_C) & 0x40 == 0x40  # PF without PIE, no IRQF
    wr(rtc, REG_A, 0x20)  # RS = 0
    rd(rtc, REG_C)
    clock.advance(S // 10)
    assert rd(rtc, REG_C) & 0x40 == 0
    assert irq.raises == 0


def test_update_ended_and_alarm_interrupts() -> None:
    rtc, clock, irq = make(epoch=dt.datetime(2024, 5, 1, 10, 0, 0))
    wr(rtc, REG_A, 0x20)  # no periodic interrupt
    wr(rtc, SEC_ALARM, 0x05)
    wr(rtc, MIN_ALARM, 0xC0)  # don't care
    wr(rtc, HOUR_ALARM, 0xFF)  # don't care
    wr(rtc, REG_B, 0x02 | 0x20)  # AIE
    clock.advance(4 * S)
    rtc.run_timers(clock.now_ns())
    assert irq.raises == 0
    clock.advance(S)
    rtc.run_timers(clock.now_ns())
    assert irq.raises == 1
    assert rd(rtc, REG_C) == 0x80 | 0x20 | 0x10  # IRQF, AF, UF
    wr(rtc, REG_B, 0x02 | 0x10)  # UIE
    clock.advance(S)
    rtc.run_timers(clock.now_ns())
    assert rd(rtc, REG_C) == 0x80 | 0x10


def test_uip_is_set_just_before_an_update() -> None:
    rtc, clock, _ = make()
    assert rd(rtc, REG_A) & 0x80 == 0
    clock.advance(S - 100_000)
    assert rd(rtc, REG_A) & 0x80 == 0x80
    clock.advance(200_000)
    assert rd(rtc, REG_A) & 0x80 == 0
    wr(rtc, REG_A, 0xA6)  # UIP is read-only
    assert rd(rtc, REG_A) & 0x7F == 0x26


def memory_word(rtc: CmosRtc, lo: int) -> int:
    return rd(rtc, lo) | rd(rtc, lo + 1) << 8


@pytest.mark.parametrize("mem_mib", [16, 64])
def test_memory_size_bytes(mem_mib: int) -> None:
    rtc, _, _ = make(mem=mem_mib * MiB)
    assert memory_word(rtc, 0x15) == 640
    ext_kib = mem_mib * 1024 - 1024
    assert memory_word(rtc, 0x17) == ext_kib
    assert memory_word(rtc, 0x30) == ext_kib
    assert memory_word(rtc, 0x34) == max(0, mem_mib - 16) * 1024 // 64
    checksum = sum(rd(rtc, r) for r in range(0x10, 0x2E)) & 0xFFFF
    assert rd(rtc, 0x2E) << 8 | rd(rtc, 0x2F) == checksum


def test_extended_memory_is_capped() -> None:
    rtc, _, _ = make(mem=8192 * MiB)
    assert memory_word(rtc, 0x17) == 0xFFFF
    assert memory_word(rtc, 0x34) == 0xFFFF


def test_nmi_mask_bit_is_recorded_and_not_part_of_the_index() -> None:
    rtc, _, _ = make()
    rtc.write(INDEX, 1, 0x80 | 0x40)
    rtc.write(DATA, 1, 0x5A)
    assert rtc.nmi_masked
    rtc.write(INDEX, 1, 0x40)
    assert not rtc.nmi_masked
    assert rtc.read(DATA, 1) == 0x5A  # plain CMOS RAM


def test_read_only_registers_and_bad_offsets() -> None:
    rtc, _, _ = make()
    wr(rtc, REG_D, 0x00)
    assert rd(rtc, REG_D) == 0x80
    wr(rtc, REG_C, 0xFF)
    assert rd(rtc, REG_C) & 0x30 == 0  # C is not writable
    assert rtc.read(2, 1) == 0xFF
    rtc.write(5, 4, 0xFFFFFFFF)
    assert rtc.bad_accesses > 0


def test_invalid_date_stops_the_clock_without_errors() -> None:
    rtc, clock, _ = make()
    wr(rtc, REG_B, 0x82)
    wr(rtc, DAY, 0x31)
    wr(rtc, MONTH, 0x02)  # 31 February
    wr(rtc, REG_B, 0x02)
    clock.advance(5 * S)
    sec = rd(rtc, SEC)
    clock.advance(5 * S)
    assert rd(rtc, SEC) == sec
    wr(rtc, DAY, 0x01)
    clock.advance(S)
    assert rd(rtc, SEC) != sec


def test_alarm_seen_across_a_long_stall_and_an_impossible_alarm_never_fires() -> None:
    rtc, clock, irq = make(epoch=dt.datetime(2024, 5, 1, 10, 0, 0))
    wr(rtc, REG_A, 0x20)
    wr(rtc, HOUR_ALARM, 0x09)  # 09:30:00, an hour that has already passed today
    wr(rtc, MIN_ALARM, 0x30)
    wr(rtc, SEC_ALARM, 0x00)
    wr(rtc, REG_B, 0x02 | 0x20)
    clock.advance(23 * 3600 * S)  # 09:00 next day: not yet
    rtc.run_timers(clock.now_ns())
    assert irq.raises == 0
    clock.advance(3600 * S)  # 10:00 next day: 09:30 passed during the stall
    rtc.run_timers(clock.now_ns())
    assert irq.raises == 1
    assert rd(rtc, REG_C) & 0x20
    wr(rtc, MIN_ALARM, 0x7A)  # not a BCD minute
    clock.advance(3 * 86400 * S)
    rtc.run_timers(clock.now_ns())
    assert rd(rtc, REG_C) & 0x20 == 0


def encode(value: int, binary: bool) -> int:
    return value if binary else bcd(value)


def decode(raw: int, binary: bool) -> int:
    return raw if binary else (raw >> 4) * 10 + (raw & 0xF)


def read_datetime(rtc: CmosRtc, binary: bool, h24: bool) -> dt.datetime:
    hour_raw = rd(rtc, HOUR)
    if h24:
        hour = decode(hour_raw, binary)
    else:
        hour = decode(hour_raw & 0x7F, binary) % 12 + (12 if hour_raw & 0x80 else 0)
    return dt.datetime(
        decode(rd(rtc, CENTURY), binary) * 100 + decode(rd(rtc, YEAR), binary),
        decode(rd(rtc, MONTH), binary),
        decode(rd(rtc, DAY), binary),
        hour,
        decode(rd(rtc, MIN), binary),
        decode(rd(rtc, SEC), binary),
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_settings_read_back_as_a_wall_clock_would(seed: int) -> None:
    """A guest sets random times in random formats; after random delays every field
    reads as set-time + whole seconds elapsed since SET was cleared."""
    import random

    rng = random.Random(seed)
    rtc, clock, _ = make()
    for _ in range(40):
        binary, h24 = rng.random() < 0.5, rng.random() < 0.5
        fmt = (0x04 if binary else 0) | (0x02 if h24 else 0)
        when = dt.datetime(1990, 1, 1) + dt.timedelta(seconds=rng.randrange(110 * 365 * 86400))
        wr(rtc, REG_B, 0x80 | fmt)
        hour = when.hour if h24 else (when.hour % 12 or 12)
        hour_raw = encode(hour, binary) | (0x80 if not h24 and when.hour >= 12 else 0)
        for reg, value in (
            (SEC, encode(when.second, binary)),
            (MIN, encode(when.minute, binary)),
            (HOUR, hour_raw),
            (DAY, encode(when.day, binary)),
            (MONTH, encode(when.month, binary)),
            (YEAR, encode(when.year % 100, binary)),
            (CENTURY, encode(when.year // 100, binary)),
        ):
            wr(rtc, reg, value)
        clock.advance(rng.randrange(S))  # time passes while SET holds the clock
        wr(rtc, REG_B, fmt)
        set_at = clock.now_ns()
        for _ in range(3):
            clock.advance(rng.choice((rng.randrange(2 * S), rng.randrange(40 * 86400 * S))))
            elapsed_s = (clock.now_ns() - set_at) // S
            read_binary, read_h24 = rng.random() < 0.5, rng.random() < 0.5
            wr(rtc, REG_B, (0x04 if read_binary else 0) | (0x02 if read_h24 else 0))
            assert read_datetime(rtc, read_binary, read_h24) == when + dt.timedelta(
                seconds=elapsed_s
            )
            wr(rtc, REG_B, fmt)
