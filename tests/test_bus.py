"""Port/MMIO bus: mapping, overlap rejection, dispatch by offset, unassigned accesses."""

from __future__ import annotations

import pytest

from devicemodel.bus import Bus, BusError, read_bytewise, write_bytewise
from devicemodel.clock import ManualClock, MonotonicClock
from devicemodel.irq import RecordingIrq


class Scratch:
    """A device that remembers every access and reads back offset-dependent bytes."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return 0x1122334455667788 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_dispatch_passes_offsets_relative_to_base() -> None:
    bus = Bus("pio", 16)
    com1 = Scratch()
    bus.map(0x3F8, 8, com1, "com1")
    bus.write(0x3FB, 1, 0x83)
    assert com1.writes == [(3, 1, 0x83)]
    assert bus.read(0x3FD, 1) == (0x1122334455667788 + 5) & 0xFF
    assert com1.reads == [(5, 1)]
    assert bus.accesses["com1"] == 2


def test_read_result_and_write_value_are_masked_to_size() -> None:
    bus = Bus("pio", 16)
    dev = Scratch()
    bus.map(0x40, 4, dev, "pit")
    assert bus.read(0x40, 2) == 0x7788
    bus.write(0x41, 1, 0x1FF)
    assert dev.writes[-1] == (1, 1, 0xFF)


def test_unassigned_port_reads_all_ones_and_writes_are_dropped_and_counted() -> None:
    bus = Bus("pio", 16)
    dev = Scratch()
    bus.map(0x80, 1, dev, "post")
    assert bus.read(0x81, 1) == 0xFF
    assert bus.read(0x1234, 2) == 0xFFFF
    assert bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x79, 1, 0)
    assert bus.unassigned_reads == 3
    assert bus.unassigned_writes == 1
    assert dev.reads == [] and dev.writes == []
    assert bus.accesses["post"] == 0


@pytest.mark.parametrize(
    "base,length",
    [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3FA, 2), (0x3F0, 0x20)],
)
def test_overlapping_map_is_rejected(base: int, length: int) -> None:
    bus = Bus("pio", 16)
    bus.map(0x3F8, 8, Scratch(), "com1")
    with pytest.raises(BusError):
        bus.map(base, length, Scratch(), "other")
    assert bus.ranges() == [(0x3F8, 8, "com1")]


def test_adjacent_ranges_are_allowed_and_listed_in_order() -> None:
    bus = Bus("pio", 16)
    bus.map(0x3F8, 8, Scratch(), "com1")
    bus.map(0x3F0, 8, Scratch(), "fdc")
    bus.map(0x400, 1, Scratch(), "next")
    assert bus.ranges() == [(0x3F0, 8, "fdc"), (0x3F8, 8, "com1"), (0x400, 1, "next")]


@pytest.mark.parametrize("base,length", [(-1, 2), (0xFFFF, 2), (0x10000, 1), (0x10, 0)])
def test_bad_ranges_are_rejected(base: int, length: int) -> None:
    bus = Bus("pio", 16)
    with pytest.raises(BusError):
        bus.map(base, length, Scratch(), "bad")


def test_mmio_bus_has_64_bit_addresses() -> None:
    bus = Bus("mmio", 64)
    dev = Scratch()
    bus.map(0xFEBF_0000, 0x1000, dev, "ne2k-bar")
    bus.write(0xFEBF_0010, 4, 0xDEADBEEF)
    assert dev.writes == [(0x10, 4, 0xDEADBEEF)]
    assert bus.read(0xFEBF_1000, 8) == 0xFFFF_FFFF_FFFF_FFFF
    bus.map(0xFFFF_FFFF_FFFF_F000, 0x1000, Scratch(), "top")
    with pytest.raises(BusError):
        bus.map(0xFFFF_FFFF_FFFF_F000, 0x1001, Scratch(), "past-top")


def test_find_and_unmap() -> None:
    bus = Bus("pio", 16)
    dev = Scratch()
    bus.map(0x70, 2, dev, "rtc")
    found = bus.find(0x71)
    assert found is not None and found[0] == 0x70 and found[1] is dev and found[2] == "rtc"
    assert bus.find(0x72) is None
    assert bus.find(0x6F) is None
    bus.unmap(0x70)
    assert bus.find(0x70) is None
    assert bus.read(0x70, 1) == 0xFF
    with pytest.raises(BusError):
        bus.unmap(0x70)
    bus.map(0x70, 2, dev, "rtc-again")  # the range is free again


@pytest.mark.parametrize("size", [0, 3, 5, 16])
def test_bad_access_size_is_a_host_error(size: int) -> None:
    bus = Bus("pio", 16)
    with pytest.raises(BusError):
        bus.read(0x80, size)
    with pytest.raises(BusError):
        bus.write(0x80, size, 0)


def test_bytewise_helpers_split_little_endian() -> None:
    regs = {0: 0x11, 1: 0x22, 2: 0x33}
    assert read_bytewise(lambda off: regs.get(off, 0xFF), 0, 4) == 0xFF332211
    seen: list[tuple[int, int]] = []
    write_bytewise(lambda off, v: seen.append((off, v)), 2, 2, 0xABCD)
    assert seen == [(2, 0xCD), (3, 0xAB)]


def test_manual_clock_moves_only_forward() -> None:
    clock = ManualClock()
    assert clock.now_ns() == 0
    clock.advance(1500)
    clock.set(2000)
    assert clock.now_ns() == 2000
    with pytest.raises(ValueError):
        clock.set(1999)
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_monotonic_clock_starts_near_zero_and_never_goes_back() -> None:
    clock = MonotonicClock()
    a = clock.now_ns()
    b = clock.now_ns()
    assert 0 <= a <= b


def test_recording_irq_counts_rising_edges() -> None:
    irq = RecordingIrq()
    irq.pulse()
    irq.set_level(True)
    irq.set_level(True)
    irq.set_level(False)
    assert irq.raises == 2
    assert irq.history == [True, False, True, True, False]
    assert irq.level is False
