"""ATA primary channel at the port level: IDENTIFY, PIO sector reads/writes against a real image file, errors, interrupts."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from devicemodel import ide_disk
from devicemodel.bus import Bus
from devicemodel.ide import (
    ATA_ABRT,
    ATA_BSY,
    ATA_DRDY,
    ATA_DRQ,
    ATA_ERR,
    ATA_IDNF,
    SECTOR_SIZE,
    DiskError,
    FileBlockBackend,
    IdeChannel,
    IdeControl,
)
from devicemodel.irq import RecordingIrq

BASE = 0x1F0
DATA, ERROR, NSECT, LBA_LOW, LBA_MID, LBA_HIGH, DEVICE, STATUS = range(BASE, BASE + 8)
COMMAND = STATUS
CONTROL = 0x3F6
SECTORS = 300  # more than 256, so a count of 0 (= 256 sectors) fits


class Rig:
    def __init__(self, path: Path | None, read_only: bool = False, **kw: str) -> None:
        self.irq = RecordingIrq()
        self.disk = FileBlockBackend(path, read_only=read_only) if path else None
        self.channel = IdeChannel(self.disk, self.irq, **kw)
        self.io = Bus("io", 16)
        self.io.map(BASE, 8, self.channel, "ide0")
        self.io.map(CONTROL, 1, IdeControl(self.channel), "ide0-ctl")

    def inb(self, port: int) -> int:
        return self.io.read(port, 1)

    def outb(self, port: int, value: int) -> None:
        self.io.write(port, 1, value)

    def command_lba(self, command: int, lba: int, count: int, dev: int = 0) -> None:
        self.outb(NSECT, count & 0xFF)
        self.outb(LBA_LOW, lba & 0xFF)
        self.outb(LBA_MID, (lba >> 8) & 0xFF)
        self.outb(LBA_HIGH, (lba >> 16) & 0xFF)
        self.outb(DEVICE, 0xE0 | (dev << 4) | ((lba >> 24) & 0x0F))
        self.outb(COMMAND, command)

    def read_words(self, n: int) -> bytes:
        return b"".join(self.io.read(DATA, 2).to_bytes(2, "little") for _ in range(n))

    def write_words(self, data: bytes) -> None:
        for i in range(0, len(data), 2):
            self.io.write(DATA, 2, int.from_bytes(data[i : i + 2], "little"))


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(1234).randbytes(SECTORS * SECTOR_SIZE))
    return path


def sector_of(path: Path, lba: int, count: int = 1) -> bytes:
    return path.read_bytes()[lba * SECTOR_SIZE : (lba + count) * SECTOR_SIZE]


def test_power_on_state(image: Path) -> None:
    rig = Rig(image)
    assert rig.inb(STATUS) == 0x50  # DRDY | DSC
    assert rig.inb(ERROR) == 0x01
    assert (rig.inb(NSECT), rig.inb(LBA_LOW), rig.inb(LBA_MID), rig.inb(LBA_HIGH)) == (1, 1, 0, 0)


def test_identify_device(image: Path) -> None:
    rig = Rig(image, model="QEMU-LIKE TEST DISK 42", serial="SN-777")
    rig.outb(DEVICE, 0xA0)
    rig.outb(COMMAND, 0xEC)
    assert rig.irq.level
    assert rig.inb(CONTROL) & (ATA_DRQ | ATA_BSY | ATA_ERR) == ATA_DRQ
    raw = rig.read_words(256)
    words = [int.from_bytes(raw[i : i + 2], "little") for i in range(0, 512, 2)]

    def text(first: int, last: int) -> str:
        return "".join(chr(w >> 8) + chr(w & 0xFF) for w in words[first:last]).strip()

    assert text(27, 47) == "QEMU-LIKE TEST DISK 42"
    assert text(10, 20) == "SN-777"
    assert words[60] | (words[61] << 16) == image.stat().st_size // SECTOR_SIZE
    assert words[49] & 0x0200  # LBA supported
    assert words[80] & (1 << 6)  # ATA/ATAPI-6
    assert words[83] & 0xC000 == 0x4000 and words[83] & 0x1000  # FLUSH CACHE
    assert words[86] & 0x1000
    assert words[255] & 0xFF == 0xA5 and sum(raw) % 256 == 0
    assert rig.inb(STATUS) & ATA_DRQ == 0  # all 256 words taken


@pytest.mark.parametrize("lba", [0, 7, SECTORS - 1])
def test_read_sector_with_16_bit_reads(image: Path, lba: int) -> None:
    rig = Rig(image)
    rig.command_lba(0x20, lba, 1)
    assert rig.irq.level
    assert rig.inb(STATUS) == ATA_DRDY | 0x10 | ATA_DRQ
    assert not rig.irq.level  # reading Status acknowledged it
    assert rig.read_words(256) == sector_of(image, lba)
    assert rig.inb(STATUS) == ATA_DRDY | 0x10
    assert rig.irq.raises == 1  # PIO in: no interrupt after the last block


def test_multi_sector_read_interrupts_per_block(image: Path) -> None:
    rig = Rig(image)
    rig.command_lba(0x21, 40, 3)
    got = b""
    for block in range(3):
        assert rig.irq.raises == block + 1
        assert rig.inb(STATUS) & ATA_DRQ
        got += rig.read_words(256)
    assert got == sector_of(image, 40, 3)
    assert rig.inb(STATUS) & ATA_DRQ == 0


def test_read_with_32_bit_and_block_access(image: Path) -> None:
    rig = Rig(image)
    rig.command_lba(0x20, 9, 2)
    first = b"".join(rig.io.read(DATA, 4).to_bytes(4, "little") for _ in range(128))
    second = rig.channel.read_data_block(512)
    assert first + second == sector_of(image, 9, 2)
    # Past the end nothing is driven: all-ones and no state change.
    assert rig.channel.read_data_block(4) == b"\xff" * 4
    assert rig.inb(STATUS) == 0x50


def test_sector_count_zero_means_256(image: Path) -> None:
    rig = Rig(image)
    rig.command_lba(0x20, 3, 0)
    data = b"".join(rig.channel.read_data_block(SECTOR_SIZE) for _ in range(256))
    assert data == sector_of(image, 3, 256)
    assert rig.inb(STATUS) & ATA_DRQ == 0


def test_chs_addressing(image: Path) -> None:
    rig = Rig(image)
    rig.outb(NSECT, 1)
    rig.outb(LBA_LOW, 5)  # sector numbers start at 1: C/H/S 0/0/5 is LBA 4
    rig.outb(LBA_MID, 0)
    rig.outb(LBA_HIGH, 0)
    rig.outb(DEVICE, 0xA0)
    rig.outb(COMMAND, 0x20)
    assert rig.read_words(256) == sector_of(image, 4)


def test_write_sector_and_flush_changes_exactly_that_sector(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = image.read_bytes()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(ide_disk.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    rig = Rig(image)
    payload = bytes(range(256)) * 2
    rig.command_lba(0x30, 17, 1)
    assert rig.inb(CONTROL) & ATA_DRQ  # first block wanted, without an interrupt
    assert rig.irq.raises == 0
    rig.write_words(payload)
    assert rig.irq.raises == 1  # completion
    assert rig.inb(STATUS) == 0x50
    rig.outb(COMMAND, 0xE7)
    assert rig.inb(STATUS) == 0x50
    assert rig.irq.raises == 2
    assert synced, "FLUSH CACHE must fsync the image"
    after = image.read_bytes()
    assert after[17 * SECTOR_SIZE : 18 * SECTOR_SIZE] == payload
    assert after[: 17 * SECTOR_SIZE] == before[: 17 * SECTOR_SIZE]
    assert after[18 * SECTOR_SIZE :] == before[18 * SECTOR_SIZE :]


def test_multi_sector_write_with_block_access(image: Path) -> None:
    before = image.read_bytes()
    rig = Rig(image)
    payload = random.Random(5).randbytes(2 * SECTOR_SIZE)
    rig.command_lba(0x31, 100, 2)
    rig.channel.write_data_block(payload[:SECTOR_SIZE])
    assert rig.irq.raises == 1 and rig.inb(STATUS) & ATA_DRQ  # second block wanted
    for i in range(SECTOR_SIZE, 2 * SECTOR_SIZE, 4):
        rig.io.write(DATA, 4, int.from_bytes(payload[i : i + 4], "little"))
    assert rig.irq.raises == 2 and rig.inb(STATUS) == 0x50
    after = image.read_bytes()
    assert after[100 * SECTOR_SIZE : 102 * SECTOR_SIZE] == payload
    assert after[: 100 * SECTOR_SIZE] + after[102 * SECTOR_SIZE :] == (
        before[: 100 * SECTOR_SIZE] + before[102 * SECTOR_SIZE :]
    )


@pytest.mark.parametrize("command", [0xA1, 0x50, 0xC4, 0x00])
def test_unsupported_command_aborts_and_run_continues(image: Path, command: int) -> None:
    rig = Rig(image)
    rig.outb(DEVICE, 0xE0)
    rig.outb(COMMAND, command)
    assert rig.irq.level
    assert rig.inb(STATUS) == ATA_DRDY | 0x10 | ATA_ERR
    assert rig.inb(ERROR) == ATA_ABRT
    rig.command_lba(0x20, 1, 1)
    assert rig.inb(STATUS) & (ATA_ERR | ATA_DRQ) == ATA_DRQ
    assert rig.read_words(256) == sector_of(image, 1)


@pytest.mark.parametrize(
    ("command", "lba", "count"),
    [(0x20, SECTORS, 1), (0x20, SECTORS - 1, 2), (0x30, SECTORS + 5, 1)],
)
def test_out_of_range_lba(image: Path, command: int, lba: int, count: int) -> None:
    before = image.read_bytes()
    rig = Rig(image)
    rig.command_lba(command, lba, count)
    assert rig.irq.level
    status = rig.inb(STATUS)
    assert status & ATA_ERR and not status & ATA_DRQ
    assert rig.inb(ERROR) & ATA_IDNF
    assert image.read_bytes() == before


def test_irq_acknowledge_and_nien(image: Path) -> None:
    rig = Rig(image)
    rig.outb(DEVICE, 0xE0)
    rig.outb(COMMAND, 0xE7)
    assert rig.irq.level
    rig.inb(CONTROL)  # alternate status does not acknowledge
    assert rig.irq.level
    rig.inb(STATUS)
    assert not rig.irq.level
    rig.outb(CONTROL, 0x02)  # nIEN: INTRQ stays released
    rig.outb(COMMAND, 0xE7)
    assert not rig.irq.level and rig.channel.interrupt_pending
    rig.outb(CONTROL, 0x00)  # re-enabled: the pending interrupt shows
    assert rig.irq.level
    rig.outb(COMMAND, 0xE7)  # a new command: INTRQ drops, then rises again (a new edge)
    assert rig.irq.history[-2:] == [False, True]


def test_software_reset(image: Path) -> None:
    rig = Rig(image)
    rig.command_lba(0x20, 2, 4)
    rig.outb(CONTROL, 0x04)
    assert rig.inb(CONTROL) & ATA_BSY
    rig.outb(CONTROL, 0x00)
    assert rig.inb(STATUS) == 0x50  # transfer abandoned, ready again
    assert rig.inb(ERROR) == 0x01
    assert (rig.inb(NSECT), rig.inb(LBA_LOW), rig.inb(LBA_MID), rig.inb(LBA_HIGH)) == (1, 1, 0, 0)


def test_execute_device_diagnostic_and_set_features(image: Path) -> None:
    rig = Rig(image)
    rig.outb(NSECT, 0x55)
    rig.outb(DEVICE, 0xF0)  # works with device 1 selected too
    rig.outb(COMMAND, 0x90)
    assert rig.irq.level
    assert rig.inb(STATUS) == 0x50
    assert rig.inb(ERROR) == 0x01
    assert (rig.inb(NSECT), rig.inb(LBA_LOW), rig.inb(DEVICE)) == (1, 1, 0)
    rig.outb(ERROR, 0x03)  # features: set transfer mode
    rig.outb(NSECT, 0x0C)  # PIO mode 4
    rig.outb(COMMAND, 0xEF)
    assert rig.inb(STATUS) == 0x50
    rig.outb(ERROR, 0x99)  # not a subcommand this drive knows
    rig.outb(COMMAND, 0xEF)
    assert rig.inb(STATUS) & ATA_ERR and rig.inb(ERROR) == ATA_ABRT


def test_absent_device_1(image: Path) -> None:
    rig = Rig(image)
    rig.outb(DEVICE, 0xB0)
    assert rig.inb(STATUS) == 0x00
    rig.outb(COMMAND, 0xEC)
    assert not rig.irq.level and rig.inb(CONTROL) == 0x00
    rig.outb(DEVICE, 0xA0)
    assert rig.inb(STATUS) == 0x50  # device 0 untouched


def test_channel_without_disk() -> None:
    rig = Rig(None)
    assert rig.inb(STATUS) == 0x00
    assert rig.inb(CONTROL) == 0x00
    rig.outb(NSECT, 0x55)
    assert rig.inb(NSECT) == 0xFF  # nothing latches it
    rig.outb(COMMAND, 0xEC)
    assert not rig.irq.level
    assert rig.io.read(DATA, 2) == 0xFFFF
    assert rig.channel.read_data_block(8) == b"\xff" * 8


def test_bad_accesses_do_not_raise(image: Path) -> None:
    rig = Rig(image)
    assert rig.io.read(DATA, 1) == 0xFF
    assert rig.io.read(STATUS, 2) == 0xFFFF
    assert rig.io.read(CONTROL, 4) == 0xFFFF_FFFF
    rig.io.write(NSECT, 8, 1)
    assert rig.channel.read(99, 1) == 0xFF
    rig.channel.write(99, 1, 0)
    assert rig.inb(STATUS) == 0x50


def test_missing_image_raises_disk_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    with pytest.raises(DiskError, match="nope.img"):
        FileBlockBackend(missing)
    with pytest.raises(DiskError, match=tmp_path.name):
        FileBlockBackend(tmp_path)
    with pytest.raises(DiskError, match="not a regular file"):
        FileBlockBackend(tmp_path, read_only=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can open a read-only file for writing")
def test_read_only_file_opened_for_write_raises(image: Path) -> None:
    image.chmod(0o444)
    with pytest.raises(DiskError, match=str(image.name)):
        FileBlockBackend(image)


def test_read_only_backend_aborts_writes(image: Path) -> None:
    before = image.read_bytes()
    rig = Rig(image, read_only=True)
    rig.command_lba(0x30, 0, 1)
    assert rig.inb(STATUS) & ATA_ERR and rig.inb(ERROR) == ATA_ABRT
    rig.write_words(b"\x00" * 512)
    assert image.read_bytes() == before
    rig.command_lba(0x20, 0, 1)
    assert rig.read_words(256) == sector_of(image, 0)
