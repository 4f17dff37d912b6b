"""Intel 8259A programmable interrupt controller pair (0x20/0x21, 0xA0/0xA1) and the PIIX ELCR (0x4D0/0x4D1) (Intel 8259A datasheet; Intel PIIX3 datasheet, ELCR)."""

from __future__ import annotations

from dataclasses import dataclass

from devicemodel.bus import read_bytewise, write_bytewise
from devicemodel.irq import IrqLine

# ICW1 (offset 0, bit 4 set)
ICW1_IC4 = 0x01  # ICW4 will follow
ICW1_SNGL = 0x02  # single chip, no ICW3
ICW1_LTIM = 0x08  # level-triggered inputs
ICW1_INIT = 0x10
# ICW4
ICW4_UPM = 0x01  # 8086/88 mode
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10
# OCW3 (offset 0, bits 4:3 = 01)
OCW3_SELECT = 0x08
OCW3_RIS = 0x01  # with RR: 1 = read ISR, 0 = read IRR
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SMM = 0x20
OCW3_ESMM = 0x40
# OCW2 commands, bits 7:5 = R SL EOI
OCW2_ROTATE_AEOI_CLEAR = 0
OCW2_NONSPECIFIC_EOI = 1
OCW2_NOP = 2
OCW2_SPECIFIC_EOI = 3
OCW2_ROTATE_AEOI_SET = 4
OCW2_ROTATE_NONSPECIFIC_EOI = 5
OCW2_SET_PRIORITY = 6
OCW2_ROTATE_SPECIFIC_EOI = 7

CASCADE_IR = 2  # the slave's INT pin is wired to the master's IR2 on a PC/AT
SPURIOUS_IR = 7  # with no request at INTA, the 8259A answers with its IR7 vector
# PIIX ELCR: IRQ0, 1, 2 (master) and IRQ8, 13 (slave) are always edge-triggered.
ELCR_MASK = (0xF8, 0xDE)


class Pic8259:
    """One 8259A. Its INT pin is the `int_out` line (the CPU's INTR, or the master's IR2).

    Before the guest sends ICW1 the chip is left as a PC BIOS leaves it: 8086 mode,
    vectors 0x08 (master) / 0x70 (slave), cascade on IR2, and every input masked except
    the master's cascade input, so nothing is delivered until the guest unmasks it.
    """

    def __init__(
        self,
        name: str,
        is_master: bool,
        int_out: IrqLine | None = None,
        vector_base: int | None = None,
    ) -> None:
        self.name = name
        self.is_master = is_master
        self.int_out = int_out
        self.irr = 0
        self.isr = 0
        self.imr = 0xFF & ~(1 << CASCADE_IR) if is_master else 0xFF
        self.lines = 0  # input pin levels, for edge detection
        self.elcr = 0  # per-input level-trigger mode (PIIX ELCR)
        self.ltim = False  # ICW1 LTIM: all inputs level-triggered
        if vector_base is None:
            vector_base = 0x08 if is_master else 0x70
        self.vector_base = vector_base & 0xF8
        self.single = False
        self.icw3 = 1 << CASCADE_IR if is_master else CASCADE_IR
        self.icw4_needed = True
        self.upm = True
        self.aeoi = False
        self.sfnm = False
        self.rotate_on_aeoi = False
        self.special_mask = False
        self.read_isr = False
        self.poll = False
        self.priority_add = 0  # the IR level that has the highest priority
        self.init_step = 0  # 0 = operational; 2, 3, 4 = expecting that ICW
        self.spurious = 0
        self.bad_accesses = 0
        self._int_level = False

    # -- inputs and resolution -------------------------------------------------------

    def level_triggered(self, ir: int) -> bool:
        return self.ltim or bool(self.elcr & (1 << ir))

    def set_irq(self, ir: int, level: bool) -> None:
        """Drive input IRn."""
        bit = 1 << ir
        if self.level_triggered(ir):
            if level:
                self.irr |= bit
            else:
                self.irr &= ~bit
        elif level and not self.lines & bit:
            self.irr |= bit  # a rising edge latches the request
        self.lines = (self.lines | bit) if level else (self.lines & ~bit)
        self.update_int()

    def _priority(self, ir: int) -> int:
        return (ir - self.priority_add) & 7  # 0 is the highest

    def _highest(self, mask: int) -> int | None:
        best = None
        for ir in range(8):
            if mask & (1 << ir) and (best is None or self._priority(ir) < self._priority(best)):
                best = ir
        return best

    def is_cascade(self, ir: int) -> bool:
        return self.is_master and not self.single and bool(self.icw3 & (1 << ir))

    def pending(self) -> int | None:
        """The IR level the chip would request the CPU for now, or None."""
        ir = self._highest(self.irr & ~self.imr)
        if ir is None:
            return None
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr  # masked in-service levels no longer block
        if self.sfnm:
            # Special fully nested mode: a slave's higher-priority request is let through
            # while its cascade input is in service.
            in_service &= ~(self.icw3 if self.is_master else 0)
        top = self._highest(in_service)
        if top is not None and self._priority(top) <= self._priority(ir):
            return None
        return ir

    def update_int(self) -> None:
        level = self.init_step == 0 and self.pending() is not None
        if level != self._int_level:
            self._int_level = level
            if self.int_out is not None:
                self.int_out.set_level(level)

    @property
    def int_level(self) -> bool:
        return self._int_level

    def intack(self) -> int | None:
        """The INTA pulses: move the winning request to ISR; None if there is none
        (the chip then answers with its IR7 vector without touching ISR)."""
        ir = self.pending()
        if ir is None:
            self.spurious += 1
            self.update_int()
            return None
        bit = 1 << ir
        if not self.level_triggered(ir):
            self.irr &= ~bit
        if self.aeoi:
            if self.rotate_on_aeoi:
                self.priority_add = (ir + 1) & 7
        else:
            self.isr |= bit
        self.update_int()
        return ir

    def vector(self, ir: int) -> int:
        return self.vector_base | ir

    # -- port interface --------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read8, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write8, offset, size, value)

    def _read8(self, offset: int) -> int:
        if offset == 0:
            if self.poll:
                # Poll: the read itself acknowledges, like an INTA cycle.
                self.poll = False
                ir = self.pending()
                if ir is None:
                    return 0
                self.intack()
                return 0x80 | ir
            return self.isr if self.read_isr else self.irr
        if offset == 1:
            return self.imr
        self.bad_accesses += 1
        return 0xFF

    def _write8(self, offset: int, value: int) -> None:
        if offset == 0:
            if value & ICW1_INIT:
                self._icw1(value)
            elif value & OCW3_SELECT:
                self._ocw3(value)
            else:
                self._ocw2(value)
        elif offset == 1:
            if self.init_step:
                self._icw234(value)
            else:
                self.imr = value  # OCW1
        else:
            self.bad_accesses += 1
            return
        self.update_int()

    def _icw1(self, value: int) -> None:
        # Initialization resets the edge-sense latches: an input already high must go
        # low and high again before it is seen; IMR and ISR are cleared.
        self.icw4_needed = bool(value & ICW1_IC4)
        self.single = bool(value & ICW1_SNGL)
        self.ltim = bool(value & ICW1_LTIM)
        self.imr = 0
        self.isr = 0
        self.irr = sum(
            1 << ir for ir in range(8) if self.level_triggered(ir) and self.lines >> ir & 1
        )
        self.priority_add = 0
        self.special_mask = False
        self.read_isr = False
        self.poll = False
        self.aeoi = False
        self.sfnm = False
        self.upm = False
        self.rotate_on_aeoi = False
        self.init_step = 2

    def _icw234(self, value: int) -> None:
        if self.init_step == 2:
            self.vector_base = value & 0xF8
            if not self.single:
                self.init_step = 3
            else:
                self.init_step = 4 if self.icw4_needed else 0
        elif self.init_step == 3:
            self.icw3 = value
            self.init_step = 4 if self.icw4_needed else 0
        else:
            self.upm = bool(value & ICW4_UPM)
            self.aeoi = bool(value & ICW4_AEOI)
            self.sfnm = bool(value & ICW4_SFNM)
            self.init_step = 0

    def _ocw2(self, value: int) -> None:
        command = value >> 5
        level = value & 7
        if command in (OCW2_NONSPECIFIC_EOI, OCW2_ROTATE_NONSPECIFIC_EOI):
            ir = self._highest(self.isr)
            if ir is not None:
                self.isr &= ~(1 << ir)
                if command == OCW2_ROTATE_NONSPECIFIC_EOI:
                    self.priority_add = (ir + 1) & 7
        elif command in (OCW2_SPECIFIC_EOI, OCW2_ROTATE_SPECIFIC_EOI):
            self.isr &= ~(1 << level)
            if command == OCW2_ROTATE_SPECIFIC_EOI:
                self.priority_add = (level + 1) & 7
        elif command == OCW2_SET_PRIORITY:
            self.priority_add = (level + 1) & 7  # level becomes the lowest priority
        elif command == OCW2_ROTATE_AEOI_SET:
            self.rotate_on_aeoi = True
        elif command == OCW2_ROTATE_AEOI_CLEAR:
            self.rotate_on_aeoi = False

    def _ocw3(self, value: int) -> None:
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)
        self.poll = bool(value & OCW3_POLL)

    def set_elcr(self, value: int) -> None:
        """Change per-input trigger modes; a level input already high requests at once."""
        self.elcr = value
        for ir in range(8):
            if self.level_triggered(ir):
                bit = 1 << ir
                self.irr = (self.irr | bit) if self.lines & bit else (self.irr & ~bit)
        self.update_int()


@dataclass
class PicInput:
    """An IrqLine wired to one input pin of one chip."""

    chip: Pic8259
    ir: int

    def set_level(self, level: bool) -> None:
        self.chip.set_irq(self.ir, bool(level))

    def pulse(self) -> None:
        self.chip.set_irq(self.ir, True)
        self.chip.set_irq(self.ir, False)


class PicPair:
    """Master and slave cascaded on IR2, as on every PC/AT: IRQ0-7 and IRQ8-15.

    `intr` (optional) is the CPU's INTR pin; it follows `has_interrupt()` so a halted
    vCPU can be woken. Map `master` at 0x20 and `slave` at 0xA0 (2 ports each).
    """

    def __init__(
        self,
        master: Pic8259 | None = None,
        slave: Pic8259 | None = None,
        intr: IrqLine | None = None,
    ) -> None:
        self.master = master = master or Pic8259("pic-master", True)
        self.slave = slave = slave or Pic8259("pic-slave", False)
        master.int_out = intr
        slave.int_out = PicInput(master, CASCADE_IR)
        self._inputs: dict[int, PicInput] = {}
        master.update_int()
        slave.update_int()

    def irq_line(self, n: int) -> IrqLine:
        """The IrqLine for ISA IRQn (0-15, not 2: IR2 is the cascade)."""
        if not 0 <= n < 16 or n == CASCADE_IR:
            raise ValueError(f"no ISA IRQ line {n} on a cascaded 8259 pair")
        if n not in self._inputs:
            chip = self.master if n < 8 else self.slave
            self._inputs[n] = PicInput(chip, n & 7)
        return self._inputs[n]

    def has_interrupt(self) -> bool:
        return self.master.int_level

    def inta(self) -> int:
        """A full INTA cycle, as the CPU runs it once INTR is seen: always a vector,
        the spurious IR7 (vector base + 7, ISR untouched) when nothing is requesting."""
        ir = self.master.intack()
        if ir is None:
            return self.master.vector(SPURIOUS_IR)
        if not self.master.is_cascade(ir):
            return self.master.vector(ir)
        # The master has put IR2 in service; the slave supplies the vector. If the slave's
        # request went away meanwhile it answers IR7 (IRQ15): the guest must still EOI
        # the master.
        sir = self.slave.intack()
        if sir is None:
            return self.slave.vector(SPURIOUS_IR)
        return self.slave.vector(sir)

    def acknowledge(self) -> int | None:
        """InterruptController.acknowledge: None when INTR is not asserted."""
        if not self.has_interrupt():
            return None
        return self.inta()


class Elcr:
    """PIIX edge/level control registers: offset 0 = IRQ0-7, offset 1 = IRQ8-15; 1 = level."""

    def __init__(self, pair: PicPair) -> None:
        self._chips = (pair.master, pair.slave)
        self.bad_accesses = 0

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read8, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write8, offset, size, value)

    def _read8(self, offset: int) -> int:
        if offset in (0, 1):
            return self._chips[offset].elcr
        self.bad_accesses += 1
        return 0xFF

    def _write8(self, offset: int, value: int) -> None:
        if offset in (0, 1):
            self._chips[offset].set_elcr(value & ELCR_MASK[offset])
        else:
            self.bad_accesses += 1


Pic8259Pair = PicPair  # the name used in the project brief
