"""I/O bitmaps and the processor-based controls (SDM Vol. 3C 25.6.2, 25.6.4). No Unicorn."""

import pytest

from hvm import vmcs as V
from hvm.controls import ExecutionControls, IoBitmaps, parse_ports


def test_bitmap_a_and_b_cover_their_halves():
    bitmaps = IoBitmaps(all_exit=False)
    bitmaps.set_exit(0x80, True)
    bitmaps.set_exit(0x8001, True)
    assert bitmaps.a[0x80 // 8] == 1 << (0x80 % 8)
    assert bitmaps.b[1 // 8] == 1 << 1
    assert bitmaps.exits(0x80) and bitmaps.exits(0x8001)
    assert not bitmaps.exits(0x81)


def test_a_wide_access_exits_if_any_of_its_ports_is_set():
    bitmaps = IoBitmaps(all_exit=False)
    bitmaps.set_exit(0x3FB, True)
    assert bitmaps.exits(0x3F8, 4)
    assert not bitmaps.exits(0x3F8, 2)
    assert bitmaps.exits(0xFFFF, 2)  # wraps past 0xFFFF: exits


def test_unconditional_io_exiting_only_counts_without_bitmaps():
    controls = ExecutionControls(use_io_bitmaps=False, unconditional_io_exiting=False)
    assert not controls.io_exits(0xE9, 1)
    controls.unconditional_io_exiting = True
    assert controls.io_exits(0xE9, 1)
    with_bitmaps = ExecutionControls(unconditional_io_exiting=False)
    assert with_bitmaps.io_exits(0xE9, 1)  # bitmaps all ones by default


def test_primary_controls_bits():
    controls = ExecutionControls(rdtsc_exiting=True)
    value = controls.primary()
    assert value & V.CPU_HLT_EXITING and value & V.CPU_RDTSC_EXITING and value & V.CPU_USE_IO_BITMAPS
    assert (V.CPU_HLT_EXITING, V.CPU_RDTSC_EXITING, V.CPU_UNCOND_IO_EXITING, V.CPU_USE_IO_BITMAPS) == \
        (1 << 7, 1 << 12, 1 << 24, 1 << 25)


def test_parse_ports():
    assert parse_ports("0x80,0x3F8-0x3FA") == [0x80, 0x3F8, 0x3F9, 0x3FA]
    with pytest.raises(ValueError):
        parse_ports("0x10000")
