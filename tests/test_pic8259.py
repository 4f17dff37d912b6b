"""8259A pair at the port level: the ICW sequence a guest sends, then IRR/ISR/IMR, EOI, priority, cascade."""

from __future__ import annotations

import pytest

from devicemodel.irq import RecordingIrq
from devicemodel.pic8259 import Elcr, Pic8259, PicPair

CMD, DATA = 0, 1


def init_pair(pair: PicPair, master_base: int = 0x20, slave_base: int = 0x28) -> None:
    """The classic protected-mode remap: ICW1 0x11, ICW2 base, ICW3 cascade, ICW4 8086."""
    m, s = pair.master, pair.slave
    m.write(CMD, 1, 0x11)
    s.write(CMD, 1, 0x11)
    m.write(DATA, 1, master_base)
    s.write(DATA, 1, slave_base)
    m.write(DATA, 1, 0x04)  # slave on IR2
    s.write(DATA, 1, 0x02)  # slave identity 2
    m.write(DATA, 1, 0x01)
    s.write(DATA, 1, 0x01)
    m.write(DATA, 1, 0x00)  # OCW1: unmask all
    s.write(DATA, 1, 0x00)


def read_irr(chip: Pic8259) -> int:
    chip.write(CMD, 1, 0x0A)  # OCW3: read IRR
    return chip.read(CMD, 1)


def read_isr(chip: Pic8259) -> int:
    chip.write(CMD, 1, 0x0B)  # OCW3: read ISR
    return chip.read(CMD, 1)


def eoi(chip: Pic8259) -> None:
    chip.write(CMD, 1, 0x20)  # OCW2: non-specific EOI


def test_init_sequence_sets_vectors_and_clears_masks() -> None:
    intr = RecordingIrq()
    pair = PicPair(intr=intr)
    init_pair(pair)
    assert pair.master.read(DATA, 1) == 0x00
    assert pair.slave.read(DATA, 1) == 0x00
    assert read_irr(pair.master) == 0 and read_isr(pair.master) == 0
    pair.irq_line(1).pulse()
    assert intr.level is True
    assert pair.has_interrupt()
    assert pair.acknowledge() == 0x21
    assert intr.level is False


def test_default_state_masks_everything_until_the_guest_unmasks() -> None:
    pair = PicPair()
    pair.irq_line(0).pulse()
    assert not pair.has_interrupt()
    assert read_irr(pair.master) == 0x01  # requested, but masked
    pair.master.write(DATA, 1, 0xFE & ~0x04)
    assert pair.acknowledge() == 0x08  # the BIOS's real-mode timer vector


def test_irr_isr_and_eoi() -> None:
    pair = PicPair()
    init_pair(pair)
    pair.irq_line(3).pulse()
    assert read_irr(pair.master) == 0x08
    assert read_isr(pair.master) == 0x00
    assert pair.acknowledge() == 0x23
    assert read_irr(pair.master) == 0x00  # edge request consumed by INTA
    assert read_isr(pair.master) == 0x08
    eoi(pair.master)
    assert read_isr(pair.master) == 0x00
    assert pair.acknowledge() is None


def test_priority_and_nesting() -> None:
    pair = PicPair()
    init_pair(pair)
    pair.irq_line(5).pulse()
    pair.irq_line(3).pulse()
    assert pair.acknowledge() == 0x23  # IR3 beats IR5
    pair.irq_line(1).pulse()
    assert pair.acknowledge() == 0x21  # higher priority nests over IR3 in service
    assert not pair.has_interrupt()  # IR5 waits: lower than both in service
    assert read_isr(pair.master) == 0x0A
    eoi(pair.master)  # ends IR1, the highest in service
    assert read_isr(pair.master) == 0x08
    assert not pair.has_interrupt()
    pair.master.write(CMD, 1, 0x60 | 3)  # specific EOI for IR3
    assert pair.acknowledge() == 0x25


def test_imr_masks_a_request_without_losing_it() -> None:
    pair = PicPair()
    init_pair(pair)
    pair.master.write(DATA, 1, 0x10)
    pair.irq_line(4).pulse()
    assert not pair.has_interrupt()
    assert read_irr(pair.master) == 0x10
    pair.master.write(DATA, 1, 0x00)
    assert pair.acknowledge() == 0x24


def test_cascade_delivers_slave_vectors_and_needs_two_eois() -> None:
    intr = RecordingIrq()
    pair = PicPair(intr=intr)
    init_pair(pair)
    pair.irq_line(14).pulse()
    assert read_irr(pair.slave) == 0x40
    assert read_irr(pair.master) == 0x04  # the slave's INT raised master IR2
    assert pair.acknowledge() == 0x2E
    assert read_isr(pair.master) == 0x04
    assert read_isr(pair.slave) == 0x40
    pair.irq_line(8).pulse()
    assert not pair.has_interrupt()  # IR2 is in service on the master
    eoi(pair.slave)
    assert not pair.has_interrupt()  # still blocked until the master's EOI
    eoi(pair.master)
    assert pair.has_interrupt()
    assert pair.acknowledge() == 0x28


def test_slave_masked_request_does_not_reach_the_master() -> None:
    pair = PicPair()
    init_pair(pair)
    pair.slave.write(DATA, 1, 0xFF)
    pair.irq_line(12).pulse()
    assert read_irr(pair.master) == 0
    pair.slave.write(DATA, 1, 0x00)
    assert pair.acknowledge() == 0x2C


def test_edge_triggered_input_needs_a_new_rising_edge() -> None:
    pair = PicPair()
    init_pair(pair)
    line = pair.irq_line(6)
    line.set_level(True)
    assert pair.acknowledge() == 0x26
    eoi(pair.master)
    assert not pair.has_interrupt()  # still high, but no new edge
    line.set_level(False)
    line.set_level(True)
    assert pair.acknowledge() == 0x26


def test_level_mode_via_elcr_rerequests_while_high_and_spurious_irq7() -> None:
    pair = PicPair()
    init_pair(pair)
    elcr = Elcr(pair)
    elcr.write(0, 2, 0xFFFF)
    assert elcr.read(0, 1) == 0xF8  # IRQ0-2 are always edge on the PIIX
    assert elcr.read(1, 1) == 0xDE  # so are IRQ8 and IRQ13
    line = pair.irq_line(5)
    line.set_level(True)
    assert pair.acknowledge() == 0x25
    eoi(pair.master)
    assert pair.acknowledge() == 0x25  # still high: requested again after EOI
    eoi(pair.master)
    # The line drops between INTR and INTA: the CPU gets IR7 and ISR stays clear.
    assert pair.has_interrupt()
    line.set_level(False)
    assert pair.inta() == 0x27
    assert read_isr(pair.master) == 0x00
    assert pair.master.spurious == 1


def test_spurious_irq15_sets_master_isr_bit2_only() -> None:
    pair = PicPair()
    init_pair(pair)
    Elcr(pair).write(1, 1, 0x02)  # IRQ9 level-triggered
    line = pair.irq_line(9)
    line.set_level(True)
    assert pair.has_interrupt()
    # The slave's request goes away after the master latched its IR2 edge.
    line.set_level(False)
    assert pair.inta() == 0x2F
    assert read_isr(pair.slave) == 0x00
    assert read_isr(pair.master) == 0x04  # the handler must still EOI the master
    assert pair.slave.spurious == 1


def test_poll_command_acknowledges_by_reading() -> None:
    pair = PicPair()
    init_pair(pair)
    pair.irq_line(4).pulse()
    pair.master.write(CMD, 1, 0x0C)  # OCW3 poll
    assert pair.master.read(CMD, 1) == 0x84
    assert read_isr(pair.master) == 0x10
    pair.master.write(CMD, 1, 0x0C)
    assert pair.master.read(CMD, 1) == 0x00  # nothing else pending


def test_rotate_on_eoi_makes_the_served_level_lowest() -> None:
    pair = PicPair()
    init_pair(pair)
    pair.irq_line(1).pulse()
    assert pair.acknowledge() == 0x21
    pair.master.write(CMD, 1, 0xA0)  # rotate on non-specific EOI
    pair.irq_line(1).pulse()
    pair.irq_line(4).pulse()
    assert pair.acknowledge() == 0x24  # IR1 is now the lowest priority


def test_auto_eoi_mode_leaves_isr_clear() -> None:
    pair = PicPair()
    m = pair.master
    m.write(CMD, 1, 0x13)  # ICW1: single, ICW4 needed
    m.write(DATA, 1, 0x40)
    m.write(DATA, 1, 0x03)  # ICW4: 8086, AEOI
    m.write(DATA, 1, 0x00)
    pair.irq_line(3).pulse()
    assert pair.acknowledge() == 0x43
    assert read_isr(m) == 0
    pair.irq_line(3).pulse()
    assert pair.acknowledge() == 0x43  # no EOI was needed


def test_irq2_is_the_cascade_and_bad_offsets_are_harmless() -> None:
    pair = PicPair()
    with pytest.raises(ValueError):
        pair.irq_line(2)
    with pytest.raises(ValueError):
        pair.irq_line(16)
    assert pair.master.read(5, 1) == 0xFF
    pair.master.write(7, 2, 0xFFFF)
    assert pair.master.bad_accesses == 3
