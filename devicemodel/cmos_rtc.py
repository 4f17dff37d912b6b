"""Motorola MC146818A real-time clock and 128-byte CMOS RAM (ports 0x70/0x71, IRQ8), with the PC/AT CMOS memory-size bytes (MC146818A datasheet; IBM PC/AT Technical Reference)."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable

from devicemodel.bus import read_bytewise, write_bytewise
from devicemodel.clock import Clock
from devicemodel.irq import IrqLine

NS_PER_S = 1_000_000_000
CMOS_SIZE = 128

# Time and alarm registers
REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32  # IBM PC/AT convention
TIME_REGS = (
    REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH, REG_MONTH,
    REG_YEAR, REG_CENTURY,
)  # fmt: skip

# PC/AT memory size bytes
REG_BASE_MEM_LO = 0x15
REG_BASE_MEM_HI = 0x16
REG_EXT_MEM_LO = 0x17
REG_EXT_MEM_HI = 0x18
REG_EXT_MEM2_LO = 0x30  # same value, as POST measured it
REG_EXT_MEM2_HI = 0x31
REG_HIGH_MEM_LO = 0x34  # memory above 16 MiB in 64 KiB units
REG_HIGH_MEM_HI = 0x35
REG_CHECKSUM_HI = 0x2E  # sum of 0x10-0x2D, big-endian
REG_CHECKSUM_LO = 0x2F

# Register A
A_UIP = 0x80
A_DV_MASK = 0x70
A_DV_32KHZ = 0x20  # time base 32.768 kHz, divider running
A_RS_MASK = 0x0F
# Register B
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01
# Register C
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
# Register D
D_VRT = 0x80

HOUR_PM = 0x80  # 12-hour mode: bit 7 of the hours byte
ALARM_DONT_CARE = 0xC0  # an alarm byte of 0xC0-0xFF matches every value
UIP_WINDOW_NS = 244_000  # UIP rises 244 us before each update cycle
TIME_BASE_HZ = 32_768
SECONDS_PER_DAY = 86_400


def periodic_divisor(rs: int) -> int | None:
    """Register A rate select -> time-base cycles per periodic interrupt (None = off).
    RS 1 and 2 repeat RS 8 and 9 (256 and 128 Hz); RS 3..15 give 8192 Hz .. 2 Hz."""
    if rs == 0:
        return None
    if rs < 3:
        rs += 7
    return 1 << (rs - 1)


def to_bcd(value: int) -> int:
    return (value // 10 % 10) << 4 | value % 10


def from_bcd(value: int) -> int:
    """A nibble above 9 is taken at face value, giving an out-of-range (invalid) field."""
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    """The RTC keeps its time as fields (second .. century) that advance once per second
    of `clock` time from `epoch`; what the guest reads is those fields encoded per
    register B (BCD or binary, 12 or 24 hour). Fields the guest sets to an impossible
    date stop the clock until they are valid again. Daylight saving (DSE) is recorded,
    not applied.

    IRQ8 is a level: it rises when IRQF sets and falls only when register C is read,
    so a guest that never reads C sees no second interrupt, as on the chip.
    """

    def __init__(self, clock: Clock, irq8: IrqLine, mem_bytes: int, epoch: dt.datetime) -> None:
        self._clock = clock
        self._irq8 = irq8
        self.ram = bytearray(CMOS_SIZE)
        self.index = 0
        self.nmi_masked = False  # port 0x70 bit 7: NMI disabled
        self.bad_accesses = 0
        now = clock.now_ns()
        epoch = epoch.replace(tzinfo=None)
        self.second = epoch.second
        self.minute = epoch.minute
        self.hour = epoch.hour  # 0-23
        self.day = epoch.day
        self.month = epoch.month
        self.year = epoch.year  # full year; the century lives in register 0x32
        self.day_of_week = epoch.isoweekday() % 7 + 1  # 1 = Sunday
        self.reg_a = A_DV_32KHZ | 0x06  # 1024 Hz periodic rate, as a PC BIOS sets it
        self.reg_b = B_24H
        self.reg_c = 0
        self._irq_level = False
        self._update_origin = now  # updates happen at origin + k s
        self._updates_done = 0
        self._periodic_origin = now
        self._periodic_done = 0
        self._last_sync = now
        self.set_memory_size(mem_bytes)

    # -- CMOS memory-size bytes --------------------------------------------------------

    def set_memory_size(self, mem_bytes: int) -> None:
        """Fill the PC/AT memory-size bytes for `mem_bytes` of guest RAM."""
        kib = max(0, mem_bytes) // 1024
        base = min(kib, 640)
        ext = min(max(0, kib - 1024), 0xFFFF)
        high = min(max(0, mem_bytes - 16 * 1024 * 1024) // (64 * 1024), 0xFFFF)
        for lo_reg, hi_reg, value in (
            (REG_BASE_MEM_LO, REG_BASE_MEM_HI, base),
            (REG_EXT_MEM_LO, REG_EXT_MEM_HI, ext),
            (REG_EXT_MEM2_LO, REG_EXT_MEM2_HI, ext),
            (REG_HIGH_MEM_LO, REG_HIGH_MEM_HI, high),
        ):
            self.ram[lo_reg] = value & 0xFF
            self.ram[hi_reg] = value >> 8
        self._update_checksum()

    def _update_checksum(self) -> None:
        total = sum(self.ram[0x10:0x2E]) & 0xFFFF
        self.ram[REG_CHECKSUM_HI] = total >> 8
        self.ram[REG_CHECKSUM_LO] = total & 0xFF

    # -- time --------------------------------------------------------------------------

    def _running(self) -> bool:
        """The update cycle runs with the 32.768 kHz divider on and SET clear."""
        return (self.reg_a & A_DV_MASK) == A_DV_32KHZ and not self.reg_b & B_SET

    def _periodic_on(self) -> bool:
        # The periodic flag runs off the divider chain; only divider reset stops it.
        dv = self.reg_a & A_DV_MASK
        return dv not in (0x60, 0x70) and periodic_divisor(self.reg_a & A_RS_MASK) is not None

    def _datetime(self) -> dt.datetime | None:
        try:
            return dt.datetime(self.year, self.month, self.day, self.hour, self.minute, self.second)
        except (ValueError, OverflowError):
            return None

    def _set_datetime(self, when: dt.datetime) -> None:
        self.second, self.minute, self.hour = when.second, when.minute, when.hour
        self.day, self.month, self.year = when.day, when.month, when.year

    def _advance(self, seconds: int) -> None:
        """Run `seconds` update cycles: set UF, advance the fields, check the alarm."""
        if seconds <= 0:
            return
        self.reg_c |= C_UF
        start = self._datetime()
        if start is None:
            return  # invalid fields: the clock stands still
        alarm_hit = self._alarm_in_window(start, seconds)
        try:
            end = start + dt.timedelta(seconds=seconds)
        except OverflowError:
            return
        days = (end.date() - start.date()).days
        self.day_of_week = (self.day_of_week - 1 + days) % 7 + 1
        self._set_datetime(end)
        if alarm_hit:
            self.reg_c |= C_AF

    def _alarm_values(self, reg: int, limit: int, encode: Callable[[int], int]) -> list[int]:
        """Field values the alarm byte at `reg` matches, compared as encoded bytes."""
        alarm = self.ram[reg]
        if alarm & ALARM_DONT_CARE == ALARM_DONT_CARE:
            return list(range(limit))
        return [v for v in range(limit) if encode(v) == alarm]

    def _alarm_in_window(self, start: dt.datetime, seconds: int) -> bool:
        """Does the time of day match the alarm at any update in (start, start + seconds]?"""
        hours = self._alarm_values(REG_HOURS_ALARM, 24, self._encode_hour)
        minutes = self._alarm_values(REG_MINUTES_ALARM, 60, self._encode)
        secs = self._alarm_values(REG_SECONDS_ALARM, 60, self._encode)
        size = len(hours) * len(minutes) * len(secs)
        if size == 0:
            return False  # an alarm byte no time of day can equal
        if seconds >= SECONDS_PER_DAY or size == SECONDS_PER_DAY:
            return True
        start_sod = start.hour * 3600 + start.minute * 60 + start.second
        if seconds <= size:
            # Few updates: look at each one.
            hs, ms, ss = set(hours), set(minutes), set(secs)
            for k in range(1, seconds + 1):
                sod = (start_sod + k) % SECONDS_PER_DAY
                if sod // 3600 in hs and sod // 60 % 60 in ms and sod % 60 in ss:
                    return True
            return False
        for h, m, sec in itertools.product(hours, minutes, secs):
            # Seconds after `start` at which this time of day next comes round: 1..86400.
            wait = (h * 3600 + m * 60 + sec - start_sod - 1) % SECONDS_PER_DAY + 1
            if wait <= seconds:
                return True
        return False

    def _sync(self, now: int) -> None:
        """Bring flags and time up to `now`; raise IRQ8 if IRQF became set."""
        if now < self._last_sync:
            now = self._last_sync
        self._last_sync = now
        if self._running():
            total = (now - self._update_origin) // NS_PER_S
            self._advance(total - self._updates_done)
            self._updates_done = total
        if self._periodic_on():
            div = periodic_divisor(self.reg_a & A_RS_MASK)
            assert div is not None
            total = (now - self._periodic_origin) * TIME_BASE_HZ // (div * NS_PER_S)
            if total > self._periodic_done:
                self.reg_c |= C_PF
            self._periodic_done = total
        self._update_irq()

    def _update_irq(self) -> None:
        b = self.reg_b
        c = self.reg_c
        if (c & C_PF and b & B_PIE) or (c & C_AF and b & B_AIE) or (c & C_UF and b & B_UIE):
            self.reg_c |= C_IRQF
        level = bool(self.reg_c & C_IRQF)
        if level != self._irq_level:
            self._irq_level = level
            self._irq8.set_level(level)

    def next_deadline_ns(self) -> int | None:
        """When IRQF could next be set, or None (already set, or nothing enabled)."""
        if self.reg_c & C_IRQF:
            return None
        candidates = []
        if self.reg_b & B_PIE and self._periodic_on():
            div = periodic_divisor(self.reg_a & A_RS_MASK)
            assert div is not None
            k = self._periodic_done + 1
            candidates.append(self._periodic_origin - (-k * div * NS_PER_S // TIME_BASE_HZ))
        if self.reg_b & (B_UIE | B_AIE) and self._running():
            candidates.append(self._update_origin + (self._updates_done + 1) * NS_PER_S)
        return min(candidates) if candidates else None

    def run_timers(self, now_ns: int) -> None:
        self._sync(now_ns)

    # -- encoding ----------------------------------------------------------------------

    def _encode(self, value: int) -> int:
        value &= 0xFF
        if self.reg_b & B_DM_BINARY:
            return value
        return to_bcd(value) if value < 100 else 0xFF

    def _decode(self, raw: int) -> int:
        return raw if self.reg_b & B_DM_BINARY else from_bcd(raw)

    def _encode_hour(self, hour: int) -> int:
        if self.reg_b & B_24H:
            return self._encode(hour)
        h12 = hour % 12 or 12
        return self._encode(h12) | (HOUR_PM if hour >= 12 else 0)

    def _decode_hour(self, raw: int) -> int:
        if self.reg_b & B_24H:
            return self._decode(raw)
        h12 = self._decode(raw & 0x7F)
        return h12 % 12 + (12 if raw & HOUR_PM else 0)

    def _read_time(self, reg: int) -> int:
        if reg == REG_SECONDS:
            return self._encode(self.second)
        if reg == REG_MINUTES:
            return self._encode(self.minute)
        if reg == REG_HOURS:
            return self._encode_hour(self.hour)
        if reg == REG_DAY_OF_WEEK:
            return self._encode(self.day_of_week)
        if reg == REG_DAY_OF_MONTH:
            return self._encode(self.day)
        if reg == REG_MONTH:
            return self._encode(self.month)
        if reg == REG_YEAR:
            return self._encode(self.year % 100)
        return self._encode(self.year // 100)  # century

    def _write_time(self, reg: int, raw: int) -> None:
        if reg == REG_HOURS:
            self.hour = self._decode_hour(raw)
            return
        value = self._decode(raw)
        if reg == REG_SECONDS:
            self.second = value
        elif reg == REG_MINUTES:
            self.minute = value
        elif reg == REG_DAY_OF_WEEK:
            self.day_of_week = value
        elif reg == REG_DAY_OF_MONTH:
            self.day = value
        elif reg == REG_MONTH:
            self.month = value
        elif reg == REG_YEAR:
            self.year = self.year // 100 * 100 + value
        else:
            self.year = value * 100 + self.year % 100

    def _restart_updates(self, now: int) -> None:
        self._update_origin = now
        self._updates_done = 0

    # -- port interface ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read8, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write8, offset, size, value)

    def _read8(self, offset: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only
        if offset != 1:
            self.bad_accesses += 1
            return 0xFF
        now = self._clock.now_ns()
        self._sync(now)
        reg = self.index
        if reg in TIME_REGS:
            return self._read_time(reg)
        if reg == REG_A:
            uip = 0
            if self._running():
                into_second = (now - self._update_origin) % NS_PER_S
                if into_second >= NS_PER_S - UIP_WINDOW_NS:
                    uip = A_UIP
            return (self.reg_a & ~A_UIP) | uip
        if reg == REG_B:
            return self.reg_b
        if reg == REG_C:
            # Reading C returns the flags and clears them all, dropping IRQ8.
            value = self.reg_c
            self.reg_c = 0
            self._update_irq()
            return value
        if reg == REG_D:
            return D_VRT  # the battery is good
        return self.ram[reg]

    def _write8(self, offset: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_masked = bool(value & 0x80)
            return
        if offset != 1:
            self.bad_accesses += 1
            return
        now = self._clock.now_ns()
        self._sync(now)
        reg = self.index
        if reg in TIME_REGS:
            self._write_time(reg, value)
        elif reg == REG_A:
            was_running = self._running()
            old_rate = self.reg_a & (A_DV_MASK | A_RS_MASK)
            self.reg_a = value & ~A_UIP  # UIP is read-only
            if (self.reg_a & (A_DV_MASK | A_RS_MASK)) != old_rate:
                self._periodic_origin = now
                self._periodic_done = 0
            if self._running() and not was_running:
                self._restart_updates(now)  # leaving divider reset: first update in 1 s
        elif reg == REG_B:
            was_running = self._running()
            if value & B_SET:
                value &= ~B_UIE  # setting SET clears UIE
            self.reg_b = value
            if self._running() and not was_running:
                self._restart_updates(now)  # SET cleared: the time runs from what was set
        elif reg in (REG_C, REG_D):
            pass  # read-only
        else:
            self.ram[reg] = value
        self._update_irq()
