"""National Semiconductor PC16550D UART (COM1 at 0x3F8, IRQ4 on a PC) as a port-level state machine (PC16550D datasheet)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from devicemodel.bus import read_bytewise, write_bytewise
from devicemodel.irq import IrqLine

# Register offsets (DLAB = LCR bit 7 selects the divisor latch at 0 and 1).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
NUM_REGS = 8

# IER
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status

# IIR: bit 0 clear = an interrupt is pending; bits 3:1 name the highest-priority source.
IIR_NO_INT = 0x01
IIR_MSI = 0x00  # modem status (lowest)
IIR_THRI = 0x02  # THR empty
IIR_RDI = 0x04  # received data available
IIR_RLSI = 0x06  # receiver line status (highest)
IIR_CTI = 0x0C  # character timeout (FIFO mode)
IIR_FIFO_ENABLED = 0xC0

# FCR
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER_LEVELS = (1, 4, 8, 14)  # indexed by FCR bits 7:6

# LCR
LCR_DLAB = 0x80

# MCR
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

# LSR
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERR = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR: low nibble = deltas (cleared by reading MSR), high nibble = line states.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_FIFO_SIZE = 16


class Uart16550:
    """A 16550 whose transmitter is instantaneous: a byte written to THR is handed to
    `output` at once, so the guest always sees THRE and TEMT set again.

    Host input (`input`, `feed`) waits in an unbounded host queue and enters the
    receiver as room frees up, so host input is never lost: not to an overrun, and not
    to an FCR clear either (host bytes in the receiver go back to the head of the
    queue, as if the host had held them under flow control). In loopback a byte sent
    with the receiver full does overrun (LSR OE), and a clear drops looped bytes.

    The chip has no clock here, so the FIFO character-timeout interrupt (IIR 0x0C) is
    reported as soon as fewer bytes than the trigger level wait in the RX FIFO.

    The IRQ line follows "an enabled interrupt is pending". On a PC board the line is
    also gated by MCR OUT2; set `out2_gates_irq` to model that (QEMU does not).
    """

    def __init__(
        self,
        irq: IrqLine,
        output: Callable[[bytes], None],
        input: bytes | None = None,
        out2_gates_irq: bool = False,
    ) -> None:
        self._irq = irq
        self._output = output
        self.out2_gates_irq = out2_gates_irq
        self._host_input: deque[int] = deque(input or b"")
        self.rx_fifo: deque[int] = deque()
        self._rx_from_host: deque[bool] = deque()  # parallel to rx_fifo: origin of each byte
        self.ier = 0
        self.fcr = 0
        self.lcr = 0x03  # 8N1 after reset is what firmware usually leaves; guests rewrite it
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr_deltas = 0
        self.scr = 0
        self.divisor = 12  # 9600 baud from the 1.8432 MHz crystal
        self.thr_interrupt = False  # THRE interrupt armed (cleared by IIR read / THR write)
        self._msr_lines = self._modem_inputs()
        self._irq_level = False
        self.tx_bytes = 0
        self.rx_overruns = 0
        self.bad_accesses = 0
        self._refill_rx()
        self._update_irq()

    # -- host side ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes arriving on the serial line from the host."""
        self._host_input.extend(data)
        self._refill_rx()
        self._update_irq()

    @property
    def pending_input(self) -> int:
        """Host bytes not yet taken into the receiver."""
        return len(self._host_input)

    # -- helpers -----------------------------------------------------------------------

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_ENABLE)

    @property
    def loopback(self) -> bool:
        return bool(self.mcr & MCR_LOOP)

    def _rx_capacity(self) -> int:
        return RX_FIFO_SIZE if self.fifo_enabled else 1

    def _trigger_level(self) -> int:
        return FCR_TRIGGER_LEVELS[(self.fcr >> 6) & 3] if self.fifo_enabled else 1

    def _refill_rx(self) -> None:
        # In loopback the serial input pin is disconnected from the receiver.
        if self.loopback:
            return
        while self._host_input and len(self.rx_fifo) < self._rx_capacity():
            self.rx_fifo.append(self._host_input.popleft())
            self._rx_from_host.append(True)
        self._sync_dr()

    def _clear_rx(self) -> None:
        host_bytes = [b for b, h in zip(self.rx_fifo, self._rx_from_host, strict=True) if h]
        self._host_input.extendleft(reversed(host_bytes))
        self.rx_fifo.clear()
        self._rx_from_host.clear()

    def _sync_dr(self) -> None:
        if self.rx_fifo:
            self.lsr |= LSR_DR
        else:
            self.lsr &= ~LSR_DR

    def _receive(self, byte: int) -> None:
        """A byte arriving at the receiver shift register (loopback path)."""
        if len(self.rx_fifo) >= self._rx_capacity():
            # The shift register byte is lost (FIFO) or overwrites RBR (16450 mode).
            self.lsr |= LSR_OE
            self.rx_overruns += 1
            if not self.fifo_enabled:
                self.rx_fifo[-1] = byte
                self._rx_from_host[-1] = False
        else:
            self.rx_fifo.append(byte)
            self._rx_from_host.append(False)
        self._sync_dr()

    def _modem_inputs(self) -> int:
        """The four modem input lines as MSR bits 7:4."""
        if self.loopback:
            m = self.mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        # Nothing is attached: the host end is always ready (CTS, DSR, DCD asserted).
        return MSR_CTS | MSR_DSR | MSR_DCD

    def _update_modem_lines(self) -> None:
        new = self._modem_inputs()
        old = self._msr_lines
        changed = new ^ old
        if changed & MSR_CTS:
            self.msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self.msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self.msr_deltas |= MSR_DDCD
        if (old & MSR_RI) and not (new & MSR_RI):  # trailing edge of ring indicator
            self.msr_deltas |= MSR_TERI
        self._msr_lines = new

    def _pending_source(self) -> int:
        """IIR bits 3:0 for the highest-priority enabled interrupt, or IIR_NO_INT."""
        if self.ier & IER_ELSI and self.lsr & LSR_ERRORS:
            return IIR_RLSI
        if self.ier & IER_ERBFI and self.rx_fifo:
            if len(self.rx_fifo) >= self._trigger_level():
                return IIR_RDI
            return IIR_CTI  # FIFO mode, below trigger: the timeout has (always) elapsed
        if self.ier & IER_ETBEI and self.thr_interrupt:
            return IIR_THRI
        if self.ier & IER_EDSSI and self.msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending_source() != IIR_NO_INT
        if self.out2_gates_irq and not (self.mcr & MCR_OUT2):
            level = False
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    # -- port interface ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read8, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write8, offset, size, value)

    def _read8(self, offset: int) -> int:
        if not 0 <= offset < NUM_REGS:
            self.bad_accesses += 1
            return 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self.divisor & 0xFF
            return self._read_rbr()
        if offset == IER:
            if dlab:
                return (self.divisor >> 8) & 0xFF
            return self.ier
        if offset == IIR:
            source = self._pending_source()
            # Reading IIR while it reports THRE is what clears the THRE interrupt.
            if source == IIR_THRI:
                self.thr_interrupt = False
                self._update_irq()
            return source | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = self.lsr
            if self.fifo_enabled and self.lsr & (LSR_PE | LSR_FE | LSR_BI):
                value |= LSR_FIFO_ERR
            # Reading LSR clears the error bits and with them the line-status interrupt.
            self.lsr &= ~LSR_ERRORS
            self._update_irq()
            return value
        if offset == MSR:
            value = self._msr_lines | self.msr_deltas
            self.msr_deltas = 0
            self._update_irq()
            return value
        return self.scr

    def _read_rbr(self) -> int:
        if not self.rx_fifo:
            return 0
        byte = self.rx_fifo.popleft()
        self._rx_from_host.popleft()
        self._refill_rx()
        self._sync_dr()
        self._update_irq()
        return byte

    def _write8(self, offset: int, value: int) -> None:
        if not 0 <= offset < NUM_REGS:
            self.bad_accesses += 1
            return
        dlab = self.lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                old = self.ier
                self.ier = value & 0x0F
                # Enabling ETBEI while THR is empty raises a THRE interrupt at once.
                if (self.ier & IER_ETBEI) and not (old & IER_ETBEI):
                    self.thr_interrupt = True
                self._update_irq()
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            was_loop = self.loopback
            self.mcr = value & 0x1F
            self._update_modem_lines()
            if was_loop and not self.loopback:
                self._refill_rx()
            self._update_irq()
        elif offset == LSR:
            pass  # LSR is read-only (factory test register on some parts)
        elif offset == MSR:
            pass  # MSR is read-only
        else:
            self.scr = value

    def _transmit(self, value: int) -> None:
        self.tx_bytes += 1
        if self.loopback:
            # The transmitter output is looped to the receiver input inside the chip.
            self._receive(value)
        else:
            self._output(bytes([value]))
        # Transmission is instantaneous: THR and the shift register are empty again.
        self.lsr |= LSR_THRE | LSR_TEMT
        self.thr_interrupt = True
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self.fifo_enabled or (enable and value & FCR_CLEAR_RX):
            # Changing the FIFO mode, or CLEAR_RX, empties the receiver.
            self._clear_rx()
        if enable:
            self.fcr = value & 0xC9  # keep enable, DMA mode, trigger level
        else:
            self.fcr = 0
        # CLEAR_TX: the transmitter is always empty here.
        self._refill_rx()
        self._sync_dr()
        self._update_irq()
