"""Intel 8254 programmable interval timer (ports 0x40-0x43, IRQ0) and PC system control port B (0x61) (Intel 8254 datasheet, 231164)."""

from __future__ import annotations

from dataclasses import dataclass, field

from devicemodel.bus import read_bytewise, write_bytewise
from devicemodel.clock import Clock
from devicemodel.irq import IrqLine

PIT_HZ = 1_193_182  # the PC's 14.31818 MHz crystal divided by 12
NS_PER_S = 1_000_000_000

# Control word (offset 3): SC1 SC0 RW1 RW0 M2 M1 M0 BCD
RW_LATCH = 0  # counter latch command
RW_LSB = 1
RW_MSB = 2
RW_LSB_MSB = 3
SC_READ_BACK = 3

# Read-back status byte
STATUS_OUT = 0x80
STATUS_NULL_COUNT = 0x40

# Channel 1 refreshes DRAM: the BIOS programs it to mode 2 with a count of 18 (15.08 us);
# port 0x61 bit 4 toggles with it, and guests busy-wait on that toggle.
REFRESH_TICKS = 18

# run_timers pulses at most this many times per call; further expiries that a long
# stall left behind are counted in Pit8254.missed_ticks (an edge-triggered PIC would
# merge them into one request anyway).
MAX_PULSES_PER_RUN = 1024


def ticks_at(ns: int) -> int:
    """Input-clock edges seen by time ns (absolute, since clock zero)."""
    return ns * PIT_HZ // NS_PER_S


def ns_of_tick(tick: int) -> int:
    """The first nanosecond at which `tick` input edges have been seen."""
    return -((-tick * NS_PER_S) // PIT_HZ)


def to_bcd16(value: int) -> int:
    value %= 10000
    return (value // 1000) << 12 | (value // 100 % 10) << 8 | (value // 10 % 10) << 4 | value % 10


def from_bcd16(value: int) -> int:
    """Digits as written; a nibble above 9 is taken at face value (the chip's result is undefined)."""
    return (
        ((value >> 12) & 0xF) * 1000
        + ((value >> 8) & 0xF) * 100
        + ((value >> 4) & 0xF) * 10
        + (value & 0xF)
    )


@dataclass
class PitChannel:
    """One counter. Its count is a function of time since `load_tick`, never stored."""

    index: int
    mode: int = 0
    rw: int = RW_LSB_MSB
    bcd: bool = False
    reload: int = 0  # count register as written (0 means the maximum)
    loaded: bool = False  # an initial count has been written since the control word
    null_count: bool = True
    gate: bool = True
    triggered: bool = False  # modes 1 and 5: a gate rising edge started the count
    load_tick: int = 0
    paused_ticks: int = 0  # modes 0/4: ticks spent with gate low
    pause_start: int | None = None
    frozen_count: int | None = None  # modes 2/3 with gate low: the count stands still
    write_msb_next: bool = False
    write_lsb: int = 0
    read_msb_next: bool = False
    count_latch: list[int] = field(default_factory=list)
    status_latch: int | None = None

    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 0x10000

    @property
    def period(self) -> int:
        """N: the initial count, with 0 meaning 2^16 (binary) or 10^4 (BCD)."""
        return self.reload if self.reload else self.modulus

    def running(self) -> bool:
        if not self.loaded:
            return False
        if self.mode in (1, 5):
            return self.triggered
        return True

    def elapsed(self, tick: int) -> int:
        paused = self.paused_ticks
        if self.pause_start is not None:
            paused += tick - self.pause_start
        return max(0, tick - self.load_tick - paused)

    def count(self, tick: int) -> int:
        """The counting element as the guest would read it at `tick`."""
        if not self.loaded:
            return 0
        n = self.period
        if self.mode in (1, 5) and not self.triggered:
            return self.reload
        if self.frozen_count is not None:
            return self.frozen_count
        e = self.elapsed(tick)
        if self.mode == 2:
            value = n - (e % n)
        elif self.mode == 3:
            # Decrements by two; OUT is high for the first ceil(N/2) counts of a period.
            p = e % n
            high = (n + 1) // 2
            value = n - 2 * p if p < high else n - 2 * (p - high)
        else:  # 0, 1, 4, 5: count down once, then wrap and keep counting
            value = (n - e) % self.modulus
        return value % self.modulus

    def out(self, tick: int) -> bool:
        """The OUT pin."""
        if not self.loaded:
            return self.mode != 0
        n = self.period
        if self.mode in (1, 5) and not self.triggered:
            return True
        e = self.elapsed(tick)
        if self.mode in (0, 1):
            return e >= n
        if self.mode in (4, 5):
            return e != n  # a one-clock low strobe at terminal count
        if not self.gate:
            return True  # modes 2/3: gate low forces OUT high
        if self.mode == 2:
            return e % n != n - 1  # low for the one clock when the count is 1
        return e % n < (n + 1) // 2

    def expiries(self, after: int, upto: int) -> tuple[int, int | None]:
        """Rising edges of OUT in (after, upto]: (how many, next one after upto or None)."""
        if not self.running() or self.frozen_count is not None or self.pause_start is not None:
            return 0, None
        n = self.period
        base = self.load_tick + self.paused_ticks
        if self.mode in (2, 3):
            # OUT rises again at every reload: base + k*N, k >= 1.
            def index(t: int) -> int:
                return max(0, (t - base) // n)

            count = index(upto) - index(after)
            return count, base + (index(upto) + 1) * n
        edge = base + (n if self.mode in (0, 1) else n + 1)
        count = 1 if after < edge <= upto else 0
        return count, edge if edge > upto else None


class Pit8254:
    """Three counters clocked at 1.193182 MHz; channel 0's OUT drives IRQ0.

    Offsets 0-2 are the counters' data ports, 3 the control word register (write only).
    A new count takes effect immediately (the chip would wait for the end of the current
    period in modes 2 and 3).
    """

    def __init__(self, clock: Clock, irq0: IrqLine) -> None:
        self.clock = clock
        self._irq0 = irq0
        self.channels = [PitChannel(i) for i in range(3)]
        # Channels 0 and 1 have GATE tied high; channel 2's gate is port 0x61 bit 0,
        # which is 0 after reset.
        self.channels[2].gate = False
        self._irq_done_tick = ticks_at(clock.now_ns())  # expiries up to here are delivered
        self.irq0_pulses = 0
        self.missed_ticks = 0
        self.bad_accesses = 0

    # -- time ----------------------------------------------------------------------------

    def _tick(self) -> int:
        return ticks_at(self.clock.now_ns())

    def next_deadline_ns(self) -> int | None:
        """When channel 0 next raises IRQ0, or None if it will not."""
        _, nxt = self.channels[0].expiries(self._irq_done_tick, self._irq_done_tick)
        return None if nxt is None else ns_of_tick(nxt)

    def run_timers(self, now_ns: int) -> None:
        """Pulse IRQ0 once for every channel-0 expiry up to now_ns."""
        tick = ticks_at(now_ns)
        if tick <= self._irq_done_tick:
            return
        count, _ = self.channels[0].expiries(self._irq_done_tick, tick)
        self._irq_done_tick = tick
        if count > MAX_PULSES_PER_RUN:
            self.missed_ticks += count - MAX_PULSES_PER_RUN
            count = MAX_PULSES_PER_RUN
        for _ in range(count):
            self._irq0.pulse()
        self.irq0_pulses += count

    def out(self, channel: int) -> bool:
        """The OUT pin of a channel now (channel 2 is readable at port 0x61 bit 5)."""
        return self.channels[channel].out(self._tick())

    def set_gate(self, channel: int, level: bool) -> None:
        """Drive a GATE input (on a PC only channel 2's gate is wired, to port 0x61 bit 0)."""
        ch = self.channels[channel]
        tick = self._tick()
        if channel == 0:
            self.run_timers(self.clock.now_ns())
        level = bool(level)
        if level == ch.gate:
            return
        if not level:
            if ch.mode in (0, 4):
                ch.pause_start = tick  # counting is suspended
            elif ch.mode in (2, 3):
                ch.frozen_count = ch.count(tick) if ch.loaded else None
        else:
            if ch.mode in (0, 4) and ch.pause_start is not None:
                ch.paused_ticks += tick - ch.pause_start
                ch.pause_start = None
            elif ch.mode in (1, 5, 2, 3):
                # A rising gate (re)triggers modes 1/5 and restarts the period in 2/3.
                ch.frozen_count = None
                ch.load_tick = tick
                ch.paused_ticks = 0
                ch.triggered = True
        ch.gate = level
        if channel == 0:
            self._irq_done_tick = max(self._irq_done_tick, tick)

    # -- port interface ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read8, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write8, offset, size, value)

    def _read8(self, offset: int) -> int:
        if offset == 3:
            return 0xFF  # the control word register cannot be read
        if not 0 <= offset < 3:
            self.bad_accesses += 1
            return 0xFF
        ch = self.channels[offset]
        # A latched status comes out first, then a latched count, then the live count.
        if ch.status_latch is not None:
            value = ch.status_latch
            ch.status_latch = None
            return value
        if ch.count_latch:
            return ch.count_latch.pop(0)
        count = ch.count(self._tick())
        if ch.bcd:
            count = to_bcd16(count)
        if ch.rw == RW_LSB:
            return count & 0xFF
        if ch.rw == RW_MSB:
            return (count >> 8) & 0xFF
        msb = ch.read_msb_next
        ch.read_msb_next = not msb
        return (count >> 8) & 0xFF if msb else count & 0xFF

    def _write8(self, offset: int, value: int) -> None:
        if offset == 3:
            self._write_control(value)
        elif 0 <= offset < 3:
            self._write_count(self.channels[offset], value)
        else:
            self.bad_accesses += 1

    def _latch_count(self, ch: PitChannel) -> None:
        if ch.count_latch:
            return  # a second latch before the first is read is ignored
        count = ch.count(self._tick())
        if ch.bcd:
            count = to_bcd16(count)
        lo, hi = count & 0xFF, (count >> 8) & 0xFF
        ch.count_latch = {RW_LSB: [lo], RW_MSB: [hi]}.get(ch.rw, [lo, hi])

    def _latch_status(self, ch: PitChannel) -> None:
        if ch.status_latch is not None:
            return
        ch.status_latch = (
            (STATUS_OUT if ch.out(self._tick()) else 0)
            | (STATUS_NULL_COUNT if ch.null_count else 0)
            | ch.rw << 4
            | ch.mode << 1
            | int(ch.bcd)
        )

    def _write_control(self, value: int) -> None:
        sc = value >> 6
        rw = (value >> 4) & 3
        if sc == SC_READ_BACK:
            # Read-back: bit 5 = /COUNT, bit 4 = /STATUS, bits 3:1 select counters 2..0.
            for i in range(3):
                if value & (2 << i):
                    ch = self.channels[i]
                    if not value & 0x10:
                        self._latch_status(ch)
                    if not value & 0x20:
                        self._latch_count(ch)
            return
        ch = self.channels[sc]
        if rw == RW_LATCH:
            self._latch_count(ch)
            return
        if sc == 0:
            self.run_timers(self.clock.now_ns())  # expiries under the old programming
        mode = (value >> 1) & 7
        ch.mode = mode - 4 if mode >= 6 else mode  # 110 and 111 are modes 2 and 3
        ch.rw = rw
        ch.bcd = bool(value & 1)
        ch.loaded = False  # counting stops until a new initial count is written
        ch.null_count = True
        ch.triggered = False
        ch.frozen_count = None
        ch.pause_start = None
        ch.paused_ticks = 0
        ch.write_msb_next = False
        ch.read_msb_next = False
        ch.count_latch = []
        ch.status_latch = None

    def _write_count(self, ch: PitChannel, value: int) -> None:
        if ch.rw == RW_LSB:
            self._load(ch, value)
        elif ch.rw == RW_MSB:
            self._load(ch, value << 8)
        elif not ch.write_msb_next:
            ch.write_lsb = value
            ch.write_msb_next = True
            if ch.mode == 0:
                ch.loaded = False  # mode 0: the first byte stops the count, OUT goes low
        else:
            ch.write_msb_next = False
            self._load(ch, ch.write_lsb | value << 8)

    def _load(self, ch: PitChannel, raw: int) -> None:
        if ch.index == 0:
            self.run_timers(self.clock.now_ns())
        tick = self._tick()
        ch.reload = from_bcd16(raw) if ch.bcd else raw
        ch.loaded = True
        ch.null_count = False
        ch.load_tick = tick
        ch.paused_ticks = 0
        ch.pause_start = tick if (ch.mode in (0, 4) and not ch.gate) else None
        ch.frozen_count = None
        if ch.mode in (1, 5):
            ch.triggered = False  # waits for a gate rising edge
        if ch.mode in (2, 3) and not ch.gate:
            ch.frozen_count = ch.count(tick)
        if ch.index == 0:
            self._irq_done_tick = max(self._irq_done_tick, tick)


class Port61:
    """PC/AT system control port B (0x61): channel 2 gate, speaker data, refresh toggle, OUT2.

    Bits 0-3 read back as written; bit 4 toggles with the DRAM refresh clock; bit 5 is
    the PIT channel 2 OUT pin; bits 6-7 (parity / I/O channel check) read 0.
    """

    def __init__(self, pit: Pit8254) -> None:
        self._pit = pit
        self.value = 0
        self.bad_accesses = 0

    @property
    def speaker_on(self) -> bool:
        return (self.value & 3) == 3

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read8, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write8, offset, size, value)

    def _read8(self, offset: int) -> int:
        if offset != 0:
            self.bad_accesses += 1
            return 0xFF
        refresh = (ticks_at(self._pit.clock.now_ns()) // REFRESH_TICKS) & 1
        out2 = self._pit.out(2)
        return (self.value & 0x0F) | refresh << 4 | int(out2) << 5

    def _write8(self, offset: int, value: int) -> None:
        if offset != 0:
            self.bad_accesses += 1
            return
        self.value = value & 0x0F
        self._pit.set_gate(2, bool(value & 1))
