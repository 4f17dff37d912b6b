"""ATA primary channel (0x1F0-0x1F7, 0x3F6, IRQ14) with one PIO hard disk over a raw image, as a port-level state machine (ATA/ATAPI-6, T13 1410D)."""

from __future__ import annotations

from devicemodel.ide_disk import SECTOR_SIZE, BlockBackend, DiskError, FileBlockBackend
from devicemodel.irq import IrqLine

__all__ = [
    "SECTOR_SIZE",
    "BlockBackend",
    "DiskError",
    "FileBlockBackend",
    "IdeChannel",
    "IdeControl",
    "identify_device_data",
]

WORDS_PER_SECTOR = SECTOR_SIZE // 2
LBA28_MAX_SECTORS = 0x0FFF_FFFF

# Command block register offsets (from 0x1F0).
ATA_REG_DATA = 0
ATA_REG_ERROR = ATA_REG_FEATURES = 1
ATA_REG_NSECTOR = 2
ATA_REG_LBA_LOW = 3
ATA_REG_LBA_MID = 4
ATA_REG_LBA_HIGH = 5
ATA_REG_DEVICE = 6
ATA_REG_STATUS = ATA_REG_COMMAND = 7

# Status register.
ATA_BSY = 0x80
ATA_DRDY = 0x40
ATA_DF = 0x20
ATA_DSC = 0x10
ATA_DRQ = 0x08
ATA_ERR = 0x01

# Error register.
ATA_UNC = 0x40  # uncorrectable data error
ATA_IDNF = 0x10  # address not found / out of range
ATA_ABRT = 0x04  # command aborted

# Device/head register.
ATA_DEV_LBA = 0x40
ATA_DEV_DEV = 0x10  # 0 selects device 0, 1 selects device 1
ATA_DEV_HEAD_MASK = 0x0F

# Device control register (0x3F6, write).
ATA_CTL_NIEN = 0x02
ATA_CTL_SRST = 0x04

# Commands.
ATA_CMD_READ_SECTORS = 0x20
ATA_CMD_READ_SECTORS_NORETRY = 0x21
ATA_CMD_WRITE_SECTORS = 0x30
ATA_CMD_WRITE_SECTORS_NORETRY = 0x31
ATA_CMD_EXECUTE_DEVICE_DIAGNOSTIC = 0x90
ATA_CMD_FLUSH_CACHE = 0xE7
ATA_CMD_IDENTIFY_DEVICE = 0xEC
ATA_CMD_SET_FEATURES = 0xEF

# SET FEATURES subcommands (Features register) this drive accepts: enable/disable write
# cache (02h/82h), set transfer mode (03h), disable/enable read look-ahead (55h/AAh),
# disable/enable reverting to power-on defaults (66h/CCh). Others are aborted, as ATA-6
# requires for an unsupported subcommand.
SET_FEATURES_ACCEPTED = frozenset({0x02, 0x03, 0x55, 0x66, 0x82, 0xAA, 0xCC})

# Diagnostic code in the Error register after EXECUTE DEVICE DIAGNOSTIC or a reset:
# device 0 passed, device 1 passed or not present.
ATA_DIAG_PASSED = 0x01

# Default translation geometry reported in IDENTIFY words 1/3/6 for CHS addressing.
DEFAULT_HEADS = 16
DEFAULT_SECTORS_PER_TRACK = 63
MAX_CHS_CYLINDERS = 16383


def chs_geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for CHS translation, at least one cylinder."""
    per_cylinder = DEFAULT_HEADS * DEFAULT_SECTORS_PER_TRACK
    cylinders = max(1, min(MAX_CHS_CYLINDERS, sectors // per_cylinder))
    return cylinders, DEFAULT_HEADS, DEFAULT_SECTORS_PER_TRACK


def ata_string(text: str, nwords: int) -> list[int]:
    """An IDENTIFY string field: ASCII padded with spaces, first character in the high
    byte of each word (so the bytes in memory come out swapped pairwise)."""
    raw = text.encode("ascii", "replace")[: 2 * nwords].ljust(2 * nwords, b" ")
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, 2 * nwords, 2)]


def identify_device_data(sectors: int, model: str, serial: str, firmware: str) -> bytes:
    """The 256 words IDENTIFY DEVICE returns, per ATA-6 section 8.15 (little-endian)."""
    w = [0] * WORDS_PER_SECTOR
    cylinders, heads, spt = chs_geometry(sectors)
    lba28 = min(sectors, LBA28_MAX_SECTORS)
    chs_capacity = min(cylinders * heads * spt, sectors)
    w[0] = 0x0040  # ATA device, fixed (not removable)
    w[1] = cylinders
    w[3] = heads
    w[6] = spt
    w[10:20] = ata_string(serial, 10)
    w[23:27] = ata_string(firmware, 4)
    w[27:47] = ata_string(model, 20)
    w[47] = 0x8000  # READ/WRITE MULTIPLE not supported (no sector count)
    w[49] = 0x0200  # LBA supported; no DMA
    w[50] = 0x4000
    w[51] = 0x0200  # PIO data transfer cycle timing mode 2 (obsolete field)
    w[53] = 0x0003  # words 54-58 and 64-70 are valid
    w[54], w[55], w[56] = cylinders, heads, spt
    w[57], w[58] = chs_capacity & 0xFFFF, chs_capacity >> 16
    w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
    w[64] = 0x0003  # PIO modes 3 and 4
    w[67] = 120  # minimum PIO cycle time without / with IORDY, ns
    w[68] = 120
    w[80] = 0x007E  # major version: ATA-1 .. ATA/ATAPI-6
    w[82] = 0x0020  # write cache supported
    w[83] = 0x4000 | 0x1000  # word valid; FLUSH CACHE supported (no 48-bit)
    w[84] = 0x4000
    w[85] = 0x0020  # write cache enabled
    w[86] = 0x1000  # FLUSH CACHE enabled
    w[87] = 0x4000
    # Word 255: signature A5h and a checksum byte making all 512 bytes sum to 0 mod 256.
    body = b"".join(x.to_bytes(2, "little") for x in w[:255]) + b"\xa5"
    checksum = (-sum(body)) & 0xFF
    w[255] = (checksum << 8) | 0xA5
    return b"".join(x.to_bytes(2, "little") for x in w)


class _Transfer:
    NONE = 0
    PIO_IN = 1  # device to host (DRQ, host reads the data register)
    PIO_OUT = 2  # host to device (DRQ, host writes the data register)


class IdeChannel:
    """The command block of the primary channel: device 0 = `disk`, device 1 absent.

    The task file registers are shared by both devices (a write reaches both); when the
    selected device is absent its Status reads 00h and commands to it are ignored. With
    no disk at all nothing drives the bus: Status and Alternate Status read 00h (BSY and
    DRDY clear, how drivers recognise an empty channel) and the other registers float
    (all-ones). Commands complete at once (BSY is never seen set except during SRST).
    INTRQ is driven by the selected device when nIEN is 0; reading Status acknowledges it.
    """

    def __init__(
        self,
        disk: BlockBackend | None,
        irq: IrqLine,
        *,
        model: str = "HVMLAB HARDDISK",
        serial: str = "HVMLAB0001",
        firmware: str = "0.1",
    ) -> None:
        self.disk = disk
        self.irq = irq
        self.model = model
        self.serial = serial
        self.firmware = firmware
        self.features = 0
        self.error = ATA_DIAG_PASSED
        self.nsector = 1
        self.lba_low = 1
        self.lba_mid = 0
        self.lba_high = 0
        self.device = 0
        self.status = ATA_DRDY | ATA_DSC if disk is not None else 0
        self.control = 0
        self.ignored_accesses = 0
        self.commands_ignored = 0
        self._transfer = _Transfer.NONE
        self._buffer = bytearray()
        self._pos = 0
        self._command = 0
        self._next_lba = 0
        self._remaining = 0  # sectors still to move after the one in the buffer
        self._irq_pending = False
        self._irq_level = False

    # -- who answers ----------------------------------------------------------------

    @property
    def selected(self) -> int:
        return 1 if self.device & ATA_DEV_DEV else 0

    def _selected_present(self) -> bool:
        return self.disk is not None and self.selected == 0

    @property
    def interrupt_pending(self) -> bool:
        return self._irq_pending

    def _update_irq(self) -> None:
        level = self._irq_pending and not (self.control & ATA_CTL_NIEN) and self._selected_present()
        if level != self._irq_level:
            self._irq_level = level
            self.irq.set_level(level)

    def _raise_irq(self) -> None:
        self._irq_pending = True
        self._update_irq()

    # -- port interface ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == ATA_REG_DATA and size in (2, 4):
            if not self._selected_present():
                self.ignored_accesses += 1
                return (1 << (8 * size)) - 1
            return int.from_bytes(self._pio_read(size), "little")
        if size != 1 or not 0 < offset <= ATA_REG_STATUS:
            self.ignored_accesses += 1
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0xFF
        if self.disk is None:
            return 0x00 if offset == ATA_REG_STATUS else 0xFF
        if offset == ATA_REG_STATUS:
            if not self._selected_present():
                return 0x00
            # Reading Status is the host's acknowledgement of the interrupt.
            self._irq_pending = False
            self._update_irq()
            return self.status
        return {
            ATA_REG_ERROR: self.error,
            ATA_REG_NSECTOR: self.nsector,
            ATA_REG_LBA_LOW: self.lba_low,
            ATA_REG_LBA_MID: self.lba_mid,
            ATA_REG_LBA_HIGH: self.lba_high,
            ATA_REG_DEVICE: self.device,
        }[offset]

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == ATA_REG_DATA and size in (2, 4):
            if not self._selected_present():
                self.ignored_accesses += 1
                return
            self._pio_write((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            return
        if size != 1 or not 0 < offset <= ATA_REG_COMMAND or self.disk is None:
            self.ignored_accesses += 1
            return
        value &= 0xFF
        if offset == ATA_REG_FEATURES:
            self.features = value
        elif offset == ATA_REG_NSECTOR:
            self.nsector = value
        elif offset == ATA_REG_LBA_LOW:
            self.lba_low = value
        elif offset == ATA_REG_LBA_MID:
            self.lba_mid = value
        elif offset == ATA_REG_LBA_HIGH:
            self.lba_high = value
        elif offset == ATA_REG_DEVICE:
            self.device = value
            self._update_irq()  # only the selected device drives INTRQ
        else:
            self._execute(value)

    def read_data_block(self, nbytes: int) -> bytes:
        """`nbytes` from the data register in one go (a `rep insw`), with the same state
        changes as nbytes/2 16-bit reads; bytes past the end of the transfer read 0xFF."""
        if nbytes <= 0:
            return b""
        if not self._selected_present():
            self.ignored_accesses += 1
            return b"\xff" * nbytes
        return self._pio_read(nbytes)

    def write_data_block(self, data: bytes) -> None:
        """`data` to the data register in one go (a `rep outsw`); bytes written when the
        device wants none are dropped."""
        if not data:
            return
        if not self._selected_present():
            self.ignored_accesses += 1
            return
        self._pio_write(bytes(data))

    # -- control block (0x3F6) ------------------------------------------------------

    def alternate_status(self) -> int:
        """Status without acknowledging the interrupt."""
        if not self._selected_present():
            return 0x00
        return self.status

    def write_device_control(self, value: int) -> None:
        old = self.control
        self.control = value & 0xFF
        if self.disk is not None:
            if value & ATA_CTL_SRST and not old & ATA_CTL_SRST:
                # SRST asserted: the device stops whatever it was doing and stays busy.
                self._stop_transfer()
                self._irq_pending = False
                self.status = ATA_BSY
            elif old & ATA_CTL_SRST and not value & ATA_CTL_SRST:
                # SRST released: the reset completes with the signature and no interrupt.
                self._set_signature()
                self.error = ATA_DIAG_PASSED
                self.status = ATA_DRDY | ATA_DSC
        self._update_irq()

    # -- PIO data movement ----------------------------------------------------------

    def _pio_read(self, nbytes: int) -> bytes:
        out = bytearray()
        while nbytes > 0:
            if self._transfer != _Transfer.PIO_IN:
                self.ignored_accesses += 1
                out += b"\xff" * nbytes
                break
            chunk = self._buffer[self._pos : self._pos + nbytes]
            self._pos += len(chunk)
            nbytes -= len(chunk)
            out += chunk
            if self._pos >= len(self._buffer):
                self._end_of_in_block()
        return bytes(out)

    def _pio_write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._transfer != _Transfer.PIO_OUT:
                self.ignored_accesses += 1
                return
            take = min(len(view), len(self._buffer) - self._pos)
            self._buffer[self._pos : self._pos + take] = view[:take]
            self._pos += take
            view = view[take:]
            if self._pos >= len(self._buffer):
                self._end_of_out_block()

    def _start_pio_in(self, data: bytes) -> None:
        self._buffer = bytearray(data)
        self._pos = 0
        self._transfer = _Transfer.PIO_IN
        self.status = ATA_DRDY | ATA_DSC | ATA_DRQ
        # PIO data-in: an interrupt for every data block that is ready.
        self._raise_irq()

    def _start_pio_out(self) -> None:
        self._buffer = bytearray(SECTOR_SIZE)
        self._pos = 0
        self._transfer = _Transfer.PIO_OUT
        self.status = ATA_DRDY | ATA_DSC | ATA_DRQ

    def _stop_transfer(self) -> None:
        self._transfer = _Transfer.NONE
        self._buffer = bytearray()
        self._pos = 0
        self._remaining = 0

    def _end_of_in_block(self) -> None:
        if self._remaining > 0:
            self._remaining -= 1
            self._load_read_sector()
            return
        # Last block read: DRQ drops, and PIO data-in gives no completion interrupt.
        self._stop_transfer()
        self.status = ATA_DRDY | ATA_DSC

    def _end_of_out_block(self) -> None:
        assert self.disk is not None
        try:
            self.disk.write(self._next_lba, bytes(self._buffer))
        except DiskError:
            self._fail(ATA_ABRT, self._next_lba)
            return
        self._next_lba += 1
        if self._remaining > 0:
            # Next block wanted: DRQ again, with an interrupt (PIO data-out).
            self._remaining -= 1
            self._start_pio_out()
            self._raise_irq()
            return
        self._stop_transfer()
        self._complete()

    def _load_read_sector(self) -> None:
        assert self.disk is not None
        try:
            data = self.disk.read(self._next_lba, 1)
        except DiskError:
            self._fail(ATA_UNC, self._next_lba)
            return
        self._next_lba += 1
        self._start_pio_in(data)

    # -- command execution ----------------------------------------------------------

    def _complete(self) -> None:
        self.status = ATA_DRDY | ATA_DSC
        self._raise_irq()

    def _fail(self, error: int, lba: int | None = None) -> None:
        """End the command with ERR; the error register says why."""
        self._stop_transfer()
        if lba is not None and self.device & ATA_DEV_LBA:
            # Error outputs: the LBA registers name the sector that failed.
            self.lba_low = lba & 0xFF
            self.lba_mid = (lba >> 8) & 0xFF
            self.lba_high = (lba >> 16) & 0xFF
            self.device = (self.device & ~ATA_DEV_HEAD_MASK) | ((lba >> 24) & ATA_DEV_HEAD_MASK)
        self.error = error
        self.status = ATA_DRDY | ATA_DSC | ATA_ERR
        self._raise_irq()

    def _set_signature(self) -> None:
        """The ATA (non-packet) device signature after reset or diagnostics."""
        self.nsector = 1
        self.lba_low = 1
        self.lba_mid = 0
        self.lba_high = 0
        self.device = 0

    def _address(self) -> tuple[int, int] | None:
        """(first LBA, sector count) of a READ/WRITE SECTORS command, or None if its
        CHS address does not exist. A sector count of 0 means 256."""
        assert self.disk is not None
        count = self.nsector or 256
        if self.device & ATA_DEV_LBA:
            lba = (
                ((self.device & ATA_DEV_HEAD_MASK) << 24)
                | (self.lba_high << 16)
                | (self.lba_mid << 8)
                | self.lba_low
            )
            return lba, count
        cylinders, heads, spt = chs_geometry(self.disk.sectors)
        cylinder = (self.lba_high << 8) | self.lba_mid
        head = self.device & ATA_DEV_HEAD_MASK
        sector = self.lba_low
        if sector == 0 or sector > spt or head >= heads or cylinder >= cylinders:
            return None
        return (cylinder * heads + head) * spt + sector - 1, count

    def _execute(self, command: int) -> None:
        if self.disk is None:
            self.commands_ignored += 1
            return
        if command == ATA_CMD_EXECUTE_DEVICE_DIAGNOSTIC:
            # Both devices run it whichever is selected; device 0 reports for the pair.
            self._stop_transfer()
            self._set_signature()
            self.error = ATA_DIAG_PASSED
            self._complete()
            return
        if self.selected != 0:
            self.commands_ignored += 1
            return
        # Writing the Command register clears a pending interrupt (INTRQ drops, so the
        # completion of this command is a fresh edge) and a previous error.
        self._stop_transfer()
        self._irq_pending = False
        self._update_irq()
        self._command = command
        self.error = 0
        if command == ATA_CMD_IDENTIFY_DEVICE:
            self._start_pio_in(
                identify_device_data(self.disk.sectors, self.model, self.serial, self.firmware)
            )
        elif command in (ATA_CMD_READ_SECTORS, ATA_CMD_READ_SECTORS_NORETRY):
            self._read_sectors()
        elif command in (ATA_CMD_WRITE_SECTORS, ATA_CMD_WRITE_SECTORS_NORETRY):
            self._write_sectors()
        elif command == ATA_CMD_FLUSH_CACHE:
            try:
                self.disk.flush()
            except DiskError:
                self._fail(ATA_ABRT)
                return
            self._complete()
        elif command == ATA_CMD_SET_FEATURES:
            if self.features in SET_FEATURES_ACCEPTED:
                self._complete()
            else:
                self._fail(ATA_ABRT)
        else:
            self._fail(ATA_ABRT)
        self._update_irq()

    def _checked_range(self) -> tuple[int, int] | None:
        assert self.disk is not None
        address = self._address()
        if address is None:
            self._fail(ATA_IDNF)
            return None
        lba, count = address
        if lba + count > min(self.disk.sectors, LBA28_MAX_SECTORS + 1):
            self._fail(ATA_IDNF)
            return None
        return lba, count

    def _read_sectors(self) -> None:
        checked = self._checked_range()
        if checked is None:
            return
        self._next_lba, count = checked
        self._remaining = count - 1
        self._load_read_sector()

    def _write_sectors(self) -> None:
        assert self.disk is not None
        if self.disk.read_only:
            self._fail(ATA_ABRT)
            return
        checked = self._checked_range()
        if checked is None:
            return
        self._next_lba, count = checked
        self._remaining = count - 1
        # PIO data-out: DRQ for the first block comes without an interrupt.
        self._start_pio_out()


class IdeControl:
    """The channel's control block as a one-port device (map it at 0x3F6): a read is
    Alternate Status (no interrupt acknowledge), a write is Device Control."""

    def __init__(self, channel: IdeChannel) -> None:
        self.channel = channel
        self.ignored_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if offset != 0 or size != 1:
            self.ignored_accesses += 1
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0xFF
        return self.channel.alternate_status()

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 1:
            self.ignored_accesses += 1
            return
        self.channel.write_device_control(value)
