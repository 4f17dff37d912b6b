"""NE2000 ISA Ethernet card (DP8390 NIC, 16 KiB buffer RAM, station address PROM) as a port-level state machine (National Semiconductor DP8390D datasheet)."""

from __future__ import annotations

from collections.abc import Callable

from devicemodel.irq import IrqLine

# Port layout of the card (offsets from its base, e.g. 0x300): the NIC's 16 registers,
# the ASIC's data port (remote DMA window) at 0x10-0x17 and its reset port at 0x18-0x1F.
NE_NIC_REGS = 0x10
NE_DATAPORT = 0x10
NE_RESET = 0x1F
NE_IO_EXTENT = 0x20

# Command register (every page, offset 0).
CR_STP = 0x01
CR_STA = 0x02
CR_TXP = 0x04
CR_RD_MASK = 0x38
CR_RD_READ = 0x08
CR_RD_WRITE = 0x10
CR_RD_SEND = 0x18
CR_RD_ABORT = 0x20  # "abort/complete remote DMA" (any value with RD2 set)
CR_PS_MASK = 0xC0
CR_PS_SHIFT = 6

# Interrupt status / mask bits.
ISR_PRX = 0x01
ISR_PTX = 0x02
ISR_RXE = 0x04
ISR_TXE = 0x08
ISR_OVW = 0x10
ISR_CNT = 0x20
ISR_RDC = 0x40
ISR_RST = 0x80  # status only: never an interrupt, not cleared by writing it

# Receive configuration.
RCR_SEP = 0x01
RCR_AR = 0x02
RCR_AB = 0x04
RCR_AM = 0x08
RCR_PRO = 0x10
RCR_MON = 0x20

# Transmit configuration: loopback mode bits.
TCR_LB_MASK = 0x06

# Data configuration: word-wide transfers.
DCR_WTS = 0x01

# Transmit / receive status.
TSR_PTX = 0x01
RSR_PRX = 0x01
RSR_MPA = 0x10
RSR_PHY = 0x20  # destination was multicast or broadcast

# Page 0 register offsets (read names / write names where they differ).
P0_CLDA0 = P0_PSTART = 0x01
P0_CLDA1 = P0_PSTOP = 0x02
P0_BNRY = 0x03
P0_TSR = P0_TPSR = 0x04
P0_NCR = P0_TBCR0 = 0x05
P0_FIFO = P0_TBCR1 = 0x06
P0_ISR = 0x07
P0_CRDA0 = P0_RSAR0 = 0x08
P0_CRDA1 = P0_RSAR1 = 0x09
P0_RBCR0 = 0x0A
P0_RBCR1 = 0x0B
P0_RSR = P0_RCR = 0x0C
P0_CNTR0 = P0_TCR = 0x0D
P0_CNTR1 = P0_DCR = 0x0E
P0_CNTR2 = P0_IMR = 0x0F
# Page 1.
P1_PAR0 = 0x01
P1_CURR = 0x07
P1_MAR0 = 0x08
# Page 2 (read-only views of the page 0 write registers).
P2_PSTART = 0x01
P2_PSTOP = 0x02
P2_RNPP = 0x03
P2_TPSR = 0x04
P2_LNPP = 0x05
P2_ACU = 0x06
P2_ACL = 0x07
P2_RCR = 0x0C
P2_TCR = 0x0D
P2_DCR = 0x0E
P2_IMR = 0x0F

# Card memory: 32 KiB of NIC address space; the PROM answers below 0x4000, the 16 KiB
# of buffer RAM sit at 0x4000-0x7FFF (pages 0x40-0x7F).
PAGE_SIZE = 256
RAM_START = 0x4000
RAM_END = 0x8000
PROM_SIZE = 32
PROM_NE2000_SIGNATURE = 0x57  # 'W' in PROM bytes 14 and 15 marks a 16-bit NE2000

RX_HEADER_SIZE = 4
ETH_ZLEN = 60  # shortest frame on the wire without FCS; shorter ones arrive padded
ETH_ALEN = 6
BROADCAST = b"\xff" * ETH_ALEN


def ether_crc(data: bytes) -> int:
    """The Ethernet CRC-32 computed MSB-first as the DP8390's multicast filter does;
    bits 31:26 of the result index the 64-bit MAR hash."""
    crc = 0xFFFF_FFFF
    for byte in data:
        for bit in range(8):
            feedback = ((crc >> 31) ^ (byte >> bit)) & 1
            crc = (crc << 1) & 0xFFFF_FFFF
            if feedback:
                crc ^= 0x04C1_1DB7
    return crc


def make_prom(mac: bytes) -> bytes:
    """The station address PROM as the 16-bit card presents it: each byte twice (the
    PROM sits on one byte lane), MAC in bytes 0-5, 0x57 0x57 in bytes 14-15."""
    content = bytearray(16)
    content[0:ETH_ALEN] = mac
    content[14] = content[15] = PROM_NE2000_SIGNATURE
    return bytes(b for byte in content for b in (byte, byte))


class Ne2000:
    """An NE2000: DP8390 registers in pages 0-2, remote DMA through the data port,
    transmit from card RAM to `tx`, receive into the PSTART..PSTOP ring.

    The IRQ line level is (ISR & IMR) != 0. Transmission and reception complete
    immediately (there is no wire timing).
    """

    def __init__(self, mac: bytes, irq: IrqLine, tx: Callable[[bytes], None]) -> None:
        if len(mac) != ETH_ALEN:
            raise ValueError(f"MAC must be {ETH_ALEN} bytes, got {len(mac)}")
        self.mac = bytes(mac)
        self.irq = irq
        self.tx = tx
        self.prom = make_prom(self.mac)
        self.ram = bytearray(RAM_END - RAM_START)
        self.par = bytearray(self.mac)  # drivers copy the PROM here; start with it
        self.mar = bytearray(8)
        self.pstart = 0
        self.pstop = 0
        self.bnry = 0
        self.curr = 0
        self.tpsr = 0
        self.tbcr = 0
        self.rsar = 0
        self.rbcr = 0
        self.rcr = 0
        self.tcr = 0
        self.dcr = 0
        self.imr = 0
        self.tsr = 0
        self.rsr = 0
        self.cntr = [0, 0, 0]  # CRC errors, frame alignment errors, missed packets
        self.frames_sent = 0
        self.frames_received = 0
        self.frames_dropped = 0
        self.ignored_accesses = 0
        self._irq_level = False
        self.reset()

    # -- reset and interrupts ---------------------------------------------------------

    def reset(self) -> None:
        """What a read of the reset port does: the NIC stops with RST set and remote
        DMA aborted; the ring and address registers keep their values."""
        self.cr = CR_STP | CR_RD_ABORT
        self.isr = ISR_RST
        self.imr = 0
        self.rbcr = 0
        self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self.isr & self.imr & 0x7F)
        if level != self._irq_level:
            self._irq_level = level
            self.irq.set_level(level)

    def _set_isr(self, bits: int) -> None:
        self.isr |= bits
        self._update_irq()

    @property
    def started(self) -> bool:
        return bool(self.cr & CR_STA) and not self.cr & CR_STP

    @property
    def page(self) -> int:
        return (self.cr & CR_PS_MASK) >> CR_PS_SHIFT

    # -- port interface ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if NE_DATAPORT <= offset < NE_DATAPORT + 8 and size in (1, 2, 4):
            return int.from_bytes(self._remote_read(size), "little")
        if offset >= NE_DATAPORT + 8 and offset < NE_IO_EXTENT and size == 1:
            # Reading the reset port resets the card (drivers write the value back).
            self.reset()
            return 0xFF
        if size != 1 or not 0 <= offset < NE_NIC_REGS:
            self.ignored_accesses += 1
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0xFF
        return self._read_reg(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        if NE_DATAPORT <= offset < NE_DATAPORT + 8 and size in (1, 2, 4):
            self._remote_write((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            return
        if offset >= NE_DATAPORT + 8 and offset < NE_IO_EXTENT and size == 1:
            return  # the write-back after a reset-port read has no further effect
        if size != 1 or not 0 <= offset < NE_NIC_REGS:
            self.ignored_accesses += 1
            return
        self._write_reg(offset, value & 0xFF)

    # -- registers --------------------------------------------------------------------

    def _read_reg(self, offset: int) -> int:
        if offset == 0:
            return self.cr
        page = self.page
        if page == 0:
            return self._read_page0(offset)
        if page == 1:
            if offset < P1_CURR:
                return self.par[offset - P1_PAR0]
            if offset == P1_CURR:
                return self.curr
            return self.mar[offset - P1_MAR0]
        if page == 2:
            return {
                P2_PSTART: self.pstart,
                P2_PSTOP: self.pstop,
                P2_RNPP: self.bnry,
                P2_TPSR: self.tpsr,
                P2_LNPP: self.curr,
                P2_ACU: self.curr,
                P2_ACL: 0,
                P2_RCR: self.rcr | 0xC0,  # unused bits read as 1
                P2_TCR: self.tcr | 0xE0,
                P2_DCR: self.dcr | 0x80,
                P2_IMR: self.imr | 0x80,
            }.get(offset, 0xFF)
        self.ignored_accesses += 1  # page 3 is the DP8390's test page
        return 0xFF

    def _read_page0(self, offset: int) -> int:
        if offset == P0_CLDA0:
            return 0
        if offset == P0_CLDA1:
            return self.curr
        if offset == P0_BNRY:
            return self.bnry
        if offset == P0_TSR:
            return self.tsr
        if offset in (P0_NCR, P0_FIFO):
            return 0
        if offset == P0_ISR:
            return self.isr
        if offset == P0_CRDA0:
            return self.rsar & 0xFF
        if offset == P0_CRDA1:
            return (self.rsar >> 8) & 0xFF
        if offset == P0_RSR:
            return self.rsr
        if offset in (P0_CNTR0, P0_CNTR1, P0_CNTR2):
            # Tally counters clear when read.
            index = offset - P0_CNTR0
            value = self.cntr[index]
            self.cntr[index] = 0
            return value
        return 0xFF  # 0x0A/0x0B are reserved on the DP8390

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == 0:
            self._write_cr(value)
            return
        page = self.page
        if page == 0:
            self._write_page0(offset, value)
        elif page == 1:
            if offset < P1_CURR:
                self.par[offset - P1_PAR0] = value
            elif offset == P1_CURR:
                self.curr = value
            else:
                self.mar[offset - P1_MAR0] = value
        else:
            self.ignored_accesses += 1  # page 2 and 3 registers are not written

    def _write_page0(self, offset: int, value: int) -> None:
        if offset == P0_PSTART:
            self.pstart = value
        elif offset == P0_PSTOP:
            self.pstop = value
        elif offset == P0_BNRY:
            self.bnry = value
            # The host has removed packets: an overflow's RST status goes away.
            if self.started:
                self.isr &= ~ISR_RST
        elif offset == P0_TPSR:
            self.tpsr = value
        elif offset == P0_TBCR0:
            self.tbcr = (self.tbcr & 0xFF00) | value
        elif offset == P0_TBCR1:
            self.tbcr = (self.tbcr & 0x00FF) | (value << 8)
        elif offset == P0_ISR:
            # Write 1 to clear; RST is status only and ignores writes.
            self.isr &= ~(value & 0x7F)
            self._update_irq()
        elif offset == P0_RSAR0:
            self.rsar = (self.rsar & 0xFF00) | value
        elif offset == P0_RSAR1:
            self.rsar = (self.rsar & 0x00FF) | (value << 8)
        elif offset == P0_RBCR0:
            self.rbcr = (self.rbcr & 0xFF00) | value
        elif offset == P0_RBCR1:
            self.rbcr = (self.rbcr & 0x00FF) | (value << 8)
        elif offset == P0_RCR:
            self.rcr = value & 0x3F
        elif offset == P0_TCR:
            self.tcr = value & 0x1F
        elif offset == P0_DCR:
            self.dcr = value & 0x7F
        elif offset == P0_IMR:
            self.imr = value & 0x7F
            self._update_irq()

    def _write_cr(self, value: int) -> None:
        if value & CR_STP:
            # Stop: reception and transmission halt, RST reports the stopped state.
            self.cr = value & ~(CR_STA | CR_TXP) | CR_STP
            self.isr |= ISR_RST
        elif value & CR_STA:
            self.cr = value & ~CR_TXP
            self.isr &= ~ISR_RST
        else:
            # Neither STP nor STA: only the page, remote DMA and TXP bits change.
            self.cr = (self.cr & (CR_STP | CR_STA)) | (value & ~(CR_STP | CR_STA | CR_TXP))
        rd = value & CR_RD_MASK
        if rd & CR_RD_ABORT:
            self.rbcr = 0
        elif rd == CR_RD_SEND:
            # Send Packet: remote read of the packet at BNRY, byte count from its header.
            self.rsar = self.bnry << 8
            header = self._mem_read_block(self.rsar, RX_HEADER_SIZE)
            self.rbcr = header[2] | (header[3] << 8)
        elif rd in (CR_RD_READ, CR_RD_WRITE) and self.rbcr == 0:
            self._set_isr(ISR_RDC)
        if value & CR_TXP and self.started:
            self._transmit()
        self._update_irq()

    # -- card memory and remote DMA ---------------------------------------------------

    def _mem_read(self, addr: int) -> int:
        if addr < RAM_START:
            return self.prom[addr % PROM_SIZE]
        if addr < RAM_END:
            return self.ram[addr - RAM_START]
        return 0xFF

    def _mem_write(self, addr: int, value: int) -> None:
        if RAM_START <= addr < RAM_END:
            self.ram[addr - RAM_START] = value

    def _mem_read_block(self, addr: int, length: int) -> bytes:
        return bytes(self._mem_read((addr + i) & 0xFFFF) for i in range(length))

    def _advance_rsar(self) -> None:
        self.rsar = (self.rsar + 1) & 0xFFFF
        # Remote DMA wraps inside the receive ring, so a packet that wraps reads out
        # in one piece.
        if self.pstart < self.pstop and self.rsar == self.pstop << 8:
            self.rsar = self.pstart << 8

    def _remote_active(self, write: bool) -> bool:
        rd = self.cr & CR_RD_MASK
        if rd & CR_RD_ABORT or self.rbcr == 0:
            return False
        return rd == CR_RD_WRITE if write else rd in (CR_RD_READ, CR_RD_SEND)

    def _remote_done(self) -> None:
        if self.rbcr == 0:
            self._set_isr(ISR_RDC)

    def _remote_read(self, size: int) -> bytes:
        if not self._remote_active(write=False):
            self.ignored_accesses += 1
            return b"\xff" * size
        out = bytearray()
        for _ in range(size):
            if self.rbcr == 0:
                out.append(0xFF)
                continue
            out.append(self._mem_read(self.rsar))
            self._advance_rsar()
            self.rbcr -= 1
        self._remote_done()
        return bytes(out)

    def _remote_write(self, data: bytes) -> None:
        if not self._remote_active(write=True):
            self.ignored_accesses += 1
            return
        for byte in data:
            if self.rbcr == 0:
                break
            self._mem_write(self.rsar, byte)
            self._advance_rsar()
            self.rbcr -= 1
        self._remote_done()

    def read_remote_block(self, nbytes: int) -> bytes:
        """A whole `rep insw` from the data port: same as nbytes/2 16-bit reads."""
        return self._remote_read(nbytes) if nbytes > 0 else b""

    def write_remote_block(self, data: bytes) -> None:
        """A whole `rep outsw` to the data port."""
        if data:
            self._remote_write(bytes(data))

    # -- transmit -----------------------------------------------------------------------

    def _transmit(self) -> None:
        start = self.tpsr << 8
        frame = self._mem_read_block(start, min(self.tbcr, 0x10000 - start))
        self.tsr = TSR_PTX
        if not frame:
            self.frames_dropped += 1  # TBCR of 0: nothing goes out
        elif self.tcr & TCR_LB_MASK:
            # Loopback: the frame goes back into our own receiver, never onto the wire.
            self._receive(frame, loopback=True)
        else:
            self.frames_sent += 1
            self.tx(frame)
        self._set_isr(ISR_PTX)

    # -- receive ------------------------------------------------------------------------

    def _accepts(self, frame: bytes) -> bool:
        if len(frame) < ETH_ALEN:
            return False
        dst = frame[:ETH_ALEN]
        if dst == BROADCAST:
            return bool(self.rcr & RCR_AB)
        if dst[0] & 1:
            if not self.rcr & RCR_AM:
                return False
            index = ether_crc(dst) >> 26
            return bool(self.mar[index >> 3] & (1 << (index & 7)))
        return bool(self.rcr & RCR_PRO) or dst == bytes(self.par)

    def receive(self, frame: bytes) -> bool:
        """A frame from the wire. True if it was stored in the ring (PRX raised);
        False if the card is stopped or in loopback, the address filter rejects it,
        or the ring has no room (OVW raised, missed-packet counter bumped)."""
        if not self.started or self.tcr & TCR_LB_MASK:
            self.frames_dropped += 1
            return False
        return self._receive(bytes(frame), loopback=False)

    def _receive(self, frame: bytes, loopback: bool) -> bool:
        if not self._accepts(frame):
            self.frames_dropped += 1
            return False
        if len(frame) < ETH_ZLEN:
            frame = frame.ljust(ETH_ZLEN, b"\x00")
        ring_pages = self.pstop - self.pstart
        if ring_pages <= 0 or not self.pstart <= self.curr < self.pstop:
            self.frames_dropped += 1
            return False
        total = RX_HEADER_SIZE + len(frame)
        pages = -(-total // PAGE_SIZE)
        free = (self.bnry - self.curr) % ring_pages or ring_pages
        # The local DMA must never reach the page BNRY points to (unread data), so a
        # packet fits only if it ends before BNRY; CURR == BNRY then always means empty.
        if pages >= free:
            self._overflow()
            return False
        status = RSR_PRX | (RSR_PHY if frame[0] & 1 else 0)
        next_page = self.curr + pages
        if next_page >= self.pstop:
            next_page -= ring_pages
        header = bytes((status, next_page, total & 0xFF, total >> 8))
        addr = self.curr << 8
        for byte in header + frame:
            self._mem_write(addr, byte)
            addr += 1
            if addr == self.pstop << 8:
                addr = self.pstart << 8
        self.curr = next_page
        self.rsr = status
        self.frames_received += 1
        self._set_isr(ISR_PRX)
        return True

    def _overflow(self) -> None:
        self.frames_dropped += 1
        self.rsr = RSR_MPA
        self.cntr[2] = min(self.cntr[2] + 1, 0xFF)
        self._set_isr(ISR_OVW | ISR_RST)
