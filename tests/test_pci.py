"""PCI configuration mechanism #1 at the port level: what a guest reads through 0xCF8/0xCFC."""

from __future__ import annotations

import pytest

from devicemodel.bus import Bus
from devicemodel.pci import (
    CONFIG_ADDRESS_ENABLE,
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_HEADER_TYPE,
    PCI_STATUS,
    PCI_STATUS_REC_MASTER_ABORT,
    PCI_VENDOR_ID,
    BarKind,
    PciBar,
    PciBus,
    PciConfigFunction,
    PciConfigPorts,
    decode_config_address,
    encode_config_address,
    make_i440fx_bus,
    make_sbdf,
)

CF8 = 0xCF8
CFC = 0xCFC


@pytest.fixture()
def io() -> Bus:
    bus = Bus("io", 16)
    bus.map(CF8, 8, PciConfigPorts(make_i440fx_bus()), "pci-config")
    return bus


def cfg_read(io: Bus, dev: int, fn: int, reg: int, size: int, bus: int = 0) -> int:
    io.write(CF8, 4, encode_config_address(bus, dev, fn, reg))
    return io.read(CFC + (reg & 3), size)


def cfg_write(io: Bus, dev: int, fn: int, reg: int, size: int, value: int) -> None:
    io.write(CF8, 4, encode_config_address(0, dev, fn, reg))
    io.write(CFC + (reg & 3), size, value)


def test_host_bridge_ids_by_dword_word_and_byte(io: Bus) -> None:
    assert cfg_read(io, 0, 0, 0x00, 4) == 0x1237_8086
    assert cfg_read(io, 0, 0, 0x00, 2) == 0x8086
    assert cfg_read(io, 0, 0, 0x02, 2) == 0x1237  # word at 0xCFE
    assert [cfg_read(io, 0, 0, r, 1) for r in range(4)] == [0x86, 0x80, 0x37, 0x12]
    # Class code host bridge 06/00/00 in the top three bytes of dword 0x08.
    assert cfg_read(io, 0, 0, 0x08, 4) >> 8 == 0x060000
    assert cfg_read(io, 0, 0, PCI_HEADER_TYPE, 1) == 0x00


def test_piix3_functions(io: Bus) -> None:
    assert cfg_read(io, 1, 0, 0x00, 4) == 0x7000_8086
    assert cfg_read(io, 1, 0, 0x0A, 2) == 0x0601  # ISA bridge
    assert cfg_read(io, 1, 0, PCI_HEADER_TYPE, 1) == 0x80  # multi-function
    assert cfg_read(io, 1, 1, 0x00, 4) == 0x7010_8086
    assert cfg_read(io, 1, 1, 0x08, 4) >> 8 == 0x010180  # IDE, legacy, bus master


def test_enumeration_finds_exactly_the_shipped_functions(io: Bus) -> None:
    found = []
    for dev in range(32):
        if cfg_read(io, dev, 0, PCI_VENDOR_ID, 2) == 0xFFFF:
            continue
        multi = cfg_read(io, dev, 0, PCI_HEADER_TYPE, 1) & 0x80
        for fn in range(8 if multi else 1):
            ids = cfg_read(io, dev, fn, 0, 4)
            if ids & 0xFFFF != 0xFFFF:
                found.append((dev, fn, ids))
    assert found == [(0, 0, 0x1237_8086), (1, 0, 0x7000_8086), (1, 1, 0x7010_8086)]


def test_absent_function_reads_all_ones_at_every_width(io: Bus) -> None:
    assert cfg_read(io, 5, 0, 0x00, 4) == 0xFFFF_FFFF
    assert cfg_read(io, 5, 0, 0x02, 2) == 0xFFFF
    assert cfg_read(io, 5, 0, 0x03, 1) == 0xFF
    assert cfg_read(io, 0, 0, 0x00, 4, bus=1) == 0xFFFF_FFFF
    cfg_write(io, 5, 0, 0x04, 2, 0x0007)  # a write that master-aborts goes nowhere
    assert cfg_read(io, 5, 0, 0x04, 2) == 0xFFFF


def test_config_address_latch_and_enable(io: Bus) -> None:
    value = encode_config_address(0, 1, 1, 0x3C) | 0x7F00_0003  # reserved bits set
    io.write(CF8, 4, value)
    assert io.read(CF8, 4) == value & 0x80FF_FFFC
    # Byte and word writes do not touch CONFIG_ADDRESS.
    io.write(CF8, 1, 0x00)
    io.write(CF8 + 2, 2, 0x0000)
    assert io.read(CF8, 4) == value & 0x80FF_FFFC
    # Enable bit clear: CONFIG_DATA is not a configuration access.
    io.write(CF8, 4, encode_config_address(0, 0, 0, 0, enable=False))
    assert io.read(CFC, 4) == 0xFFFF_FFFF
    io.write(CFC, 2, 0x1234)
    assert cfg_read(io, 0, 0, 0, 2) == 0x8086


def test_byte_lanes_and_bad_widths(io: Bus) -> None:
    io.write(CF8, 4, encode_config_address(0, 0, 0, 0x00))
    assert io.read(CFC + 1, 1) == 0x80
    assert io.read(CFC + 3, 1) == 0x12
    assert io.read(CFC + 2, 2) == 0x1237
    assert io.read(CFC + 3, 2) == 0xFFFF  # would cross the dword: not decoded
    assert io.read(CFC, 8) == (1 << 64) - 1


def test_read_only_ids_and_writable_command(io: Bus) -> None:
    cfg_write(io, 0, 0, PCI_VENDOR_ID, 4, 0xDEAD_BEEF)
    assert cfg_read(io, 0, 0, PCI_VENDOR_ID, 4) == 0x1237_8086
    # PIIX3 IDE: only I/O space and bus master are implemented in PCICMD.
    cfg_write(io, 1, 1, PCI_COMMAND, 2, 0xFFFF)
    assert cfg_read(io, 1, 1, PCI_COMMAND, 2) == 0x0005
    cfg_write(io, 1, 1, PCI_COMMAND, 2, 0x0000)
    assert cfg_read(io, 1, 1, PCI_COMMAND, 2) == 0x0000


def test_status_error_bits_are_write_one_to_clear() -> None:
    fn = PciConfigFunction(0x1234, 0x5678, 0xFF0000, status=0x0200 | PCI_STATUS_REC_MASTER_ABORT)
    bus = PciBus()
    bus.add(0, 3, 0, fn)
    sbdf = make_sbdf(0, 3, 0)
    bus.config_write(sbdf, PCI_STATUS, 2, 0x0000)
    assert bus.config_read(sbdf, PCI_STATUS, 2) == 0x0200 | PCI_STATUS_REC_MASTER_ABORT
    bus.config_write(sbdf, PCI_STATUS, 2, 0xFFFF)
    assert bus.config_read(sbdf, PCI_STATUS, 2) == 0x0200  # DEVSEL timing is read-only


def test_ide_bus_master_bar_size_probe(io: Bus) -> None:
    bar4 = PCI_BASE_ADDRESS_0 + 4 * 4
    assert cfg_read(io, 1, 1, bar4, 4) == 0x0000_0001  # I/O BAR, unassigned
    cfg_write(io, 1, 1, bar4, 4, 0xFFFF_FFFF)
    probed = cfg_read(io, 1, 1, bar4, 4)
    assert probed & 1 == 1
    size = (~(probed & ~0x3) & 0xFFFF) + 1  # 16-bit I/O decode
    assert size == 16
    cfg_write(io, 1, 1, bar4, 4, 0xC001)
    assert cfg_read(io, 1, 1, bar4, 4) == 0xC001
    # BAR0-3 are not implemented in legacy mode: all-ones reads back 0.
    cfg_write(io, 1, 1, PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert cfg_read(io, 1, 1, PCI_BASE_ADDRESS_0, 4) == 0


def test_bar_address_follows_command_register() -> None:
    bus = make_i440fx_bus()
    ide = bus.function(0, 1, 1)
    assert ide is not None
    sbdf = make_sbdf(0, 1, 1)
    bus.config_write(sbdf, 0x20, 4, 0xC040)
    assert ide.bar_address(4) is None  # I/O decoding still off
    bus.config_write(sbdf, PCI_COMMAND, 2, PCI_COMMAND_IO)
    assert ide.bar_address(4) == 0xC040
    assert ide.bar_address(0) is None


def test_memory_bar_probe_shows_size_and_type() -> None:
    fn = PciConfigFunction(
        0x1234, 0x1111, 0x020000, bars=(PciBar(1, 0x1000, BarKind.MEM32, prefetchable=True),)
    )
    fn.write(0x14, 4, 0xFFFF_FFFF)
    assert fn.read(0x14, 4) == 0xFFFF_F008
    # Byte-wide probing works the same on each lane.
    fn.write(0x14, 1, 0x00)
    assert fn.read(0x14, 4) == 0xFFFF_F008  # low byte: address bits are all read-only here
    fn.write(0x15, 1, 0x00)
    assert fn.read(0x14, 4) == 0xFFFF_0008


def test_sbdf_form_of_xen_pci_config_ioreq() -> None:
    bus = make_i440fx_bus()
    sbdf = make_sbdf(0, 1, 1)
    assert sbdf == 0x0009
    ioreq_addr = sbdf << 32 | 0x0A
    assert bus.config_read(ioreq_addr >> 32, ioreq_addr & 0xFFF, 2) == 0x0101
    assert bus.config_read(make_sbdf(0, 1, 0, segment=1), 0, 4) == 0xFFFF_FFFF
    assert bus.config_read(sbdf, 0x100, 4) == 0xFFFF_FFFF  # no extended space
    assert bus.config_read(sbdf, 0xFE, 4) == 0xFFFF_FFFF  # runs off the end


def test_decode_config_address() -> None:
    value = CONFIG_ADDRESS_ENABLE | (2 << 16) | (3 << 11) | (5 << 8) | 0x44
    sbdf, reg = decode_config_address(value)
    assert sbdf == make_sbdf(2, 3, 5)
    assert reg == 0x44
    assert decode_config_address(value | 0x3)[1] == 0x44


def test_duplicate_function_rejected() -> None:
    bus = make_i440fx_bus()
    with pytest.raises(ValueError):
        bus.add(0, 0, 0, PciConfigFunction(0x8086, 0x1237, 0x060000))
