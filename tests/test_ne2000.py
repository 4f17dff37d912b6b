"""NE2000 (DP8390) at the port level: PROM, remote DMA, transmit, receive ring, wrap and overflow."""

from __future__ import annotations

import random

import pytest

from devicemodel.bus import Bus
from devicemodel.irq import RecordingIrq
from devicemodel.ne2000 import Ne2000, ether_crc

BASE = 0x300
CR = BASE + 0x00
PSTART, PSTOP, BNRY, TPSR, TBCR0, TBCR1, ISR = (BASE + r for r in range(1, 8))
RSAR0, RSAR1, RBCR0, RBCR1, RCR, TCR, DCR, IMR = (BASE + r for r in range(8, 16))
CNTR0, CNTR2 = BASE + 0x0D, BASE + 0x0F
CURR = BASE + 0x07  # page 1
DATA = BASE + 0x10
RESET = BASE + 0x1F

MAC = bytes.fromhex("525400123456")
RX_START, RX_STOP, TX_PAGE = 0x46, 0x80, 0x40


class Rig:
    def __init__(self) -> None:
        self.irq = RecordingIrq()
        self.sent: list[bytes] = []
        self.nic = Ne2000(MAC, self.irq, self.sent.append)
        self.io = Bus("io", 16)
        self.io.map(BASE, 0x20, self.nic, "ne2000")

    def inb(self, port: int) -> int:
        return self.io.read(port, 1)

    def outb(self, port: int, value: int) -> None:
        self.io.write(port, 1, value)

    def bring_up(self, rcr: int = 0x04, pstart: int = RX_START, pstop: int = RX_STOP) -> None:
        """The usual 8390 driver init: stop, configure, ring, station address, start."""
        self.inb(RESET)
        self.outb(CR, 0x21)  # page 0, stop, abort remote DMA
        self.outb(DCR, 0x49)  # word-wide, normal operation
        self.outb(RBCR0, 0)
        self.outb(RBCR1, 0)
        self.outb(RCR, rcr)
        self.outb(TCR, 0x02)  # internal loopback while setting up
        self.outb(TPSR, TX_PAGE)
        self.outb(PSTART, pstart)
        self.outb(BNRY, pstart)
        self.outb(PSTOP, pstop)
        self.outb(ISR, 0xFF)
        self.outb(IMR, 0x3F)
        self.outb(CR, 0x61)  # page 1
        for i, b in enumerate(MAC):
            self.outb(BASE + 1 + i, b)
        self.outb(CURR, pstart)
        self.outb(CR, 0x22)  # page 0, start
        self.outb(TCR, 0x00)

    def remote_read(self, addr: int, count: int, word: bool = True) -> bytes:
        self.outb(RBCR0, count & 0xFF)
        self.outb(RBCR1, count >> 8)
        self.outb(RSAR0, addr & 0xFF)
        self.outb(RSAR1, addr >> 8)
        self.outb(CR, 0x0A)  # remote read, start
        if not word:
            return bytes(self.inb(DATA) for _ in range(count))
        out = b"".join(self.io.read(DATA, 2).to_bytes(2, "little") for _ in range(count // 2))
        if count & 1:
            out += bytes([self.inb(DATA)])
        return out

    def remote_write(self, addr: int, data: bytes) -> None:
        self.outb(RBCR0, len(data) & 0xFF)
        self.outb(RBCR1, len(data) >> 8)
        self.outb(RSAR0, addr & 0xFF)
        self.outb(RSAR1, addr >> 8)
        self.outb(CR, 0x12)  # remote write, start
        for i in range(0, len(data) - 1, 2):
            self.io.write(DATA, 2, int.from_bytes(data[i : i + 2], "little"))
        if len(data) & 1:
            self.outb(DATA, data[-1])

    def curr(self) -> int:
        cr = self.inb(CR)
        self.outb(CR, (cr & 0x3F) | 0x40)  # page 1, same start/stop state
        value = self.inb(CURR)
        self.outb(CR, cr)
        return value


def frame_to(dst: bytes, length: int, seed: int = 0) -> bytes:
    body = random.Random(seed).randbytes(length - 14)
    return dst + bytes.fromhex("020000000001") + b"\x08\x00" + body


def test_prom_holds_doubled_mac_and_signature() -> None:
    rig = Rig()
    rig.bring_up()
    prom = rig.remote_read(0x0000, 32, word=False)
    assert all(prom[i] == prom[i + 1] for i in range(0, 32, 2))  # 16-bit card
    compact = prom[::2]
    assert compact[:6] == MAC
    assert compact[14] == compact[15] == 0x57
    assert rig.inb(ISR) & 0x40  # RDC once the count ran out
    words = rig.remote_read(0x0000, 12)
    assert words == bytes(b for m in MAC for b in (m, m))


def test_reset_port_stops_the_nic() -> None:
    rig = Rig()
    rig.bring_up()
    rig.outb(ISR, 0xFF)
    assert rig.inb(ISR) & 0x80 == 0  # started: no RST
    value = rig.inb(RESET)
    rig.outb(RESET, value)
    assert rig.inb(ISR) & 0x80
    assert rig.inb(CR) & 0x03 == 0x01  # STP


def test_transmit_via_remote_dma() -> None:
    rig = Rig()
    rig.bring_up()
    frame = frame_to(b"\xff" * 6, 75, seed=3)  # odd length: last byte by an 8-bit write
    rig.remote_write(TX_PAGE << 8, frame)
    assert rig.inb(ISR) & 0x40  # RDC
    rig.outb(ISR, 0x40)
    rig.outb(TPSR, TX_PAGE)
    rig.outb(TBCR0, len(frame) & 0xFF)
    rig.outb(TBCR1, len(frame) >> 8)
    assert not rig.irq.level
    rig.outb(CR, 0x26)  # TXP
    assert rig.sent == [frame]
    assert rig.inb(ISR) & 0x02  # PTX
    assert rig.inb(BASE + 0x04) & 0x01  # TSR PTX
    assert rig.inb(CR) & 0x04 == 0  # TXP done
    assert rig.irq.level
    rig.outb(ISR, 0x02)
    assert not rig.irq.level


def test_receive_and_read_out_with_header() -> None:
    rig = Rig()
    rig.bring_up()
    start = rig.curr()
    frame = frame_to(MAC, 300, seed=7)
    assert rig.nic.receive(frame)
    assert rig.inb(ISR) & 0x01 and rig.irq.level
    header = rig.remote_read(start << 8, 4)
    status, next_page, length = header[0], header[1], header[2] | header[3] << 8
    assert status & 0x01  # PRX
    assert length == len(frame) + 4
    assert next_page == start + (len(frame) + 4 + 255) // 256
    assert rig.curr() == next_page
    assert rig.remote_read((start << 8) + 4, len(frame)) == frame
    # The driver frees the packet and acknowledges.
    rig.outb(BNRY, next_page)
    rig.outb(ISR, 0x01 | 0x40)
    assert not rig.irq.level


def test_address_filter() -> None:
    rig = Rig()
    rig.bring_up(rcr=0x00)
    other = bytes.fromhex("525400999999")
    assert not rig.nic.receive(frame_to(b"\xff" * 6, 60))  # broadcast needs AB
    assert not rig.nic.receive(frame_to(other, 60))
    rig.outb(RCR, 0x04)
    assert rig.nic.receive(frame_to(b"\xff" * 6, 60))
    rig.outb(RCR, 0x10)  # promiscuous
    assert rig.nic.receive(frame_to(other, 60))
    group = bytes.fromhex("01005e000001")
    rig.outb(RCR, 0x08)
    assert not rig.nic.receive(frame_to(group, 60))  # hash bit not set
    index = ether_crc(group) >> 26
    rig.outb(CR, 0x62)
    rig.outb(BASE + 0x08 + (index >> 3), 1 << (index & 7))
    rig.outb(CR, 0x22)
    assert rig.nic.receive(frame_to(group, 60))


def test_short_frame_is_padded() -> None:
    rig = Rig()
    rig.bring_up()
    start = rig.curr()
    short = MAC + bytes.fromhex("0200000000010806") + b"arp!"
    assert rig.nic.receive(short)
    header = rig.remote_read(start << 8, 4)
    assert header[2] | header[3] << 8 == 60 + 4
    assert rig.remote_read((start << 8) + 4, 60) == short.ljust(60, b"\x00")


def test_ring_wraps_at_pstop() -> None:
    rig = Rig()
    rig.bring_up()
    rig.outb(BNRY, 0x7C)
    rig.outb(CR, 0x62)
    rig.outb(CURR, 0x7E)
    rig.outb(CR, 0x22)
    frame = frame_to(MAC, 600, seed=11)  # 604 bytes: pages 0x7E, 0x7F, then 0x46
    assert rig.nic.receive(frame)
    header = rig.remote_read(0x7E00, 4)
    assert header[1] == RX_START + 1
    assert rig.curr() == RX_START + 1
    # Remote DMA wraps from PSTOP to PSTART, so the packet reads out in one piece.
    assert rig.remote_read(0x7E04, len(frame)) == frame
    # And the tail really sits at the start of the ring.
    tail = rig.remote_read(RX_START << 8, 604 - 512)
    assert tail == frame[512 - 4 :]


def test_overflow_keeps_old_packets() -> None:
    rig = Rig()
    rig.bring_up(pstart=0x46, pstop=0x4C)  # six pages
    first = frame_to(MAC, 1000, seed=1)  # four pages
    assert rig.nic.receive(first)
    second = frame_to(MAC, 1000, seed=2)
    assert not rig.nic.receive(second)
    isr = rig.inb(ISR)
    assert isr & 0x10  # OVW
    assert rig.inb(CNTR2) == 1  # missed packet
    assert rig.inb(CNTR2) == 0  # tally counters clear when read
    assert rig.curr() == 0x4A
    assert rig.remote_read(0x4604, len(first)) == first  # not overwritten
    # The host removes the packet: now the ring is empty and the next one fits.
    rig.outb(BNRY, 0x4A)
    rig.outb(ISR, 0xFF)
    assert rig.nic.receive(second)
    header = rig.remote_read(0x4A00, 4)
    assert header[1] == 0x48  # 0x4A, 0x4B, wrap to 0x46, 0x47 -> next 0x48
    assert rig.remote_read(0x4A04, len(second)) == second


def test_stopped_card_drops_frames() -> None:
    rig = Rig()
    rig.bring_up()
    rig.outb(CR, 0x21)
    before = rig.curr()
    assert not rig.nic.receive(frame_to(MAC, 100))
    assert rig.inb(ISR) & 0x01 == 0
    assert rig.curr() == before


def test_loopback_transmit_stays_on_the_card() -> None:
    rig = Rig()
    rig.bring_up()
    start = rig.curr()
    rig.outb(TCR, 0x02)
    frame = frame_to(MAC, 64, seed=4)
    rig.remote_write(TX_PAGE << 8, frame)
    rig.outb(TBCR0, len(frame))
    rig.outb(TBCR1, 0)
    rig.outb(CR, 0x26)
    assert rig.sent == []
    assert rig.inb(ISR) & 0x03 == 0x03  # PTX and PRX
    assert rig.remote_read((start << 8) + 4, len(frame)) == frame


def test_isr_and_imr_drive_the_irq_line() -> None:
    rig = Rig()
    rig.bring_up()
    rig.outb(IMR, 0x00)
    rig.nic.receive(frame_to(MAC, 60))
    assert not rig.irq.level
    rig.outb(IMR, 0x01)
    assert rig.irq.level
    rig.outb(ISR, 0x02)  # clearing another bit leaves PRX
    assert rig.irq.level and rig.inb(ISR) & 0x01
    rig.outb(ISR, 0x01)
    assert not rig.irq.level


def test_probe_sequence_of_8390_drivers() -> None:
    rig = Rig()
    assert rig.inb(CR) != 0xFF
    rig.outb(CR, 0x61)
    rig.outb(BASE + 0x0D, 0xFF)  # MAR5
    rig.outb(CR, 0x21)
    rig.inb(CNTR0)
    assert rig.inb(CNTR0) == 0
    rig.outb(CR, 0x61)
    assert rig.inb(BASE + 0x0D) == 0xFF


def test_bad_accesses_do_not_raise() -> None:
    rig = Rig()
    rig.bring_up()
    assert rig.io.read(ISR, 2) == 0xFFFF
    assert rig.inb(DATA) == 0xFF  # no remote DMA running
    rig.outb(DATA, 0x12)
    rig.outb(CR, 0xE2)  # page 3
    assert rig.inb(BASE + 0x05) == 0xFF
    rig.outb(BASE + 0x05, 0)
    assert rig.nic.read(0x40, 1) == 0xFF
    rig.nic.write(0x40, 1, 0)
    assert not rig.nic.receive(b"\x01\x02")


def test_bad_mac_rejected() -> None:
    with pytest.raises(ValueError):
        Ne2000(b"\x00" * 5, RecordingIrq(), lambda frame: None)
