"""16550 UART at the port level: what a guest driver reads and writes at COM1 offsets 0-7."""

from __future__ import annotations

from devicemodel.irq import RecordingIrq
from devicemodel.uart16550 import Uart16550

THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7


def make(input_bytes: bytes | None = None) -> tuple[Uart16550, RecordingIrq, list[bytes]]:
    irq = RecordingIrq()
    out: list[bytes] = []
    return Uart16550(irq, out.append, input_bytes), irq, out


def rd(uart: Uart16550, reg: int) -> int:
    return uart.read(reg, 1)


def wr(uart: Uart16550, reg: int, value: int) -> None:
    uart.write(reg, 1, value)


def test_reset_state_as_a_driver_probes_it() -> None:
    uart, irq, _ = make()
    assert rd(uart, IIR) == 0x01  # no interrupt pending, FIFOs off
    assert rd(uart, LSR) == 0x60  # THRE | TEMT, no data
    assert rd(uart, IER) == 0x00
    assert rd(uart, MCR) == 0x00
    wr(uart, SCR, 0x5A)
    assert rd(uart, SCR) == 0x5A  # scratch register present: 16450 or later
    assert irq.level is False


def test_thr_bytes_go_to_output() -> None:
    uart, _, out = make()
    for b in b"hi\n":
        wr(uart, THR, b)
    assert b"".join(out) == b"hi\n"
    assert rd(uart, LSR) & 0x60 == 0x60


def test_divisor_latch_is_reached_through_dlab_and_does_not_transmit() -> None:
    uart, _, out = make()
    wr(uart, LCR, 0x83)  # DLAB, 8N1
    wr(uart, DLL, 0x01)
    wr(uart, DLM, 0x00)  # 115200 baud
    assert rd(uart, DLL) == 0x01
    assert rd(uart, DLM) == 0x00
    wr(uart, LCR, 0x03)
    assert rd(uart, LCR) == 0x03
    assert out == []
    assert rd(uart, IER) == 0x00  # the IER was untouched by the DLM write
    wr(uart, LCR, 0x80)
    assert uart.read(DLL, 2) == 0x0001  # a 16-bit read of DLL/DLM


def test_loopback_returns_thr_in_rbr_and_sends_nothing_out() -> None:
    uart, _, out = make()
    wr(uart, MCR, 0x10)
    wr(uart, THR, 0xAE)
    assert out == []
    assert rd(uart, LSR) & 0x01 == 0x01  # data ready
    assert rd(uart, RBR) == 0xAE
    assert rd(uart, LSR) & 0x01 == 0x00


def test_loopback_routes_mcr_outputs_to_msr_inputs() -> None:
    uart, _, _ = make()
    wr(uart, MCR, 0x10)
    rd(uart, MSR)  # clear the deltas from entering loopback
    # DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
    wr(uart, MCR, 0x10 | 0x01)
    assert rd(uart, MSR) & 0xF0 == 0x20
    wr(uart, MCR, 0x10 | 0x02)
    assert rd(uart, MSR) & 0xF0 == 0x10
    wr(uart, MCR, 0x10 | 0x04)
    assert rd(uart, MSR) & 0xF0 == 0x40
    wr(uart, MCR, 0x10 | 0x08)
    msr = rd(uart, MSR)
    assert msr & 0xF0 == 0x80
    assert msr & 0x04 == 0x04  # RI fell: trailing-edge ring indicator delta
    wr(uart, MCR, 0x10 | 0x0F)
    assert rd(uart, MSR) == 0xF0 | 0x01 | 0x02  # DCTS, DDSR set; DCD already up
    assert rd(uart, MSR) == 0xF0  # deltas cleared by the read


def test_host_input_with_fifo_and_rx_interrupt() -> None:
    uart, irq, _ = make()
    wr(uart, FCR, 0x07)  # enable and clear FIFOs, trigger level 1
    assert rd(uart, IIR) & 0xC0 == 0xC0
    wr(uart, IER, 0x01)  # received data available
    assert irq.level is False
    uart.feed(b"abc")
    assert irq.level is True
    assert rd(uart, IIR) == 0xC4  # RX data available, FIFOs enabled
    got = bytes(rd(uart, RBR) for _ in range(3))
    assert got == b"abc"
    assert irq.level is False
    assert rd(uart, IIR) == 0xC1
    assert rd(uart, LSR) & 0x01 == 0


def test_host_input_larger_than_fifo_is_delivered_without_loss() -> None:
    data = bytes(range(40))
    uart, _, _ = make(data)
    wr(uart, FCR, 0x01)
    got = bytearray()
    while rd(uart, LSR) & 0x01:
        got.append(rd(uart, RBR))
    assert bytes(got) == data
    assert rd(uart, LSR) & 0x02 == 0  # no overrun


def test_fifo_trigger_level_and_character_timeout_identification() -> None:
    uart, irq, _ = make()
    wr(uart, FCR, 0x81)  # FIFO on, trigger level 8
    wr(uart, IER, 0x01)
    uart.feed(b"1234")
    assert rd(uart, IIR) == 0xCC  # below the trigger level: character timeout
    uart.feed(b"5678")
    assert rd(uart, IIR) == 0xC4  # trigger level reached
    assert irq.level is True


def test_loopback_overrun_sets_oe_and_line_status_interrupt_has_priority() -> None:
    uart, irq, _ = make()
    wr(uart, IER, 0x07)  # RX data, THRE, line status
    wr(uart, MCR, 0x10)
    wr(uart, THR, 0x41)
    wr(uart, THR, 0x42)  # FIFO off: the holding register is full, this overruns
    assert rd(uart, IIR) == 0x06  # receiver line status is the highest priority
    lsr = rd(uart, LSR)
    assert lsr & 0x02 == 0x02
    assert rd(uart, LSR) & 0x02 == 0  # reading LSR clears OE
    assert rd(uart, IIR) == 0x04  # then received data
    assert rd(uart, RBR) == 0x42  # the 16450-mode holding register was overwritten
    assert rd(uart, IIR) == 0x02  # then THR empty
    assert rd(uart, IIR) == 0x01  # reading IIR cleared the THRE interrupt
    assert irq.level is False


def test_thre_interrupt_on_enable_and_after_each_write() -> None:
    uart, irq, _ = make()
    wr(uart, IER, 0x02)
    assert irq.level is True  # THR is empty the moment ETBEI is enabled
    assert rd(uart, IIR) == 0x02
    assert irq.level is False
    wr(uart, THR, ord("x"))
    assert irq.level is True
    assert irq.raises == 2
    wr(uart, IER, 0x00)
    assert irq.level is False


def test_modem_status_interrupt_is_lowest_priority_and_cleared_by_msr_read() -> None:
    uart, irq, _ = make()
    wr(uart, IER, 0x08)
    wr(uart, MCR, 0x10 | 0x02)  # loopback, RTS -> CTS changes
    assert irq.level is True
    assert rd(uart, IIR) == 0x00
    rd(uart, MSR)
    assert rd(uart, IIR) == 0x01
    assert irq.level is False


def test_out2_gating_when_asked_for() -> None:
    irq = RecordingIrq()
    uart = Uart16550(irq, lambda b: None, None, out2_gates_irq=True)
    wr(uart, IER, 0x02)
    assert irq.level is False  # pending, but OUT2 is low
    assert rd(uart, IIR) == 0x02
    wr(uart, IER, 0x00)
    wr(uart, IER, 0x02)
    wr(uart, MCR, 0x08)
    assert irq.level is True


def test_bad_offsets_and_wide_accesses_do_not_raise() -> None:
    uart, _, out = make()
    assert uart.read(8, 1) == 0xFF
    assert uart.read(0x100, 4) == 0xFFFFFFFF
    uart.write(9, 2, 0x1234)
    assert uart.bad_accesses >= 3
    uart.write(SCR, 2, 0xBEEF)  # SCR gets 0xEF; offset 8 is nothing
    assert rd(uart, SCR) == 0xEF
    assert out == []


def test_fcr_clear_drops_looped_bytes_but_host_input_survives() -> None:
    uart, _, _ = make()
    wr(uart, FCR, 0x01)
    wr(uart, MCR, 0x10)
    for b in b"xyz":
        wr(uart, THR, b)
    wr(uart, FCR, 0x03)  # clear RX FIFO
    assert rd(uart, LSR) & 0x01 == 0
    wr(uart, MCR, 0x00)
    uart.feed(b"host")
    wr(uart, FCR, 0x03)  # a driver flushing at open time
    got = bytearray()
    while rd(uart, LSR) & 0x01:
        got.append(rd(uart, RBR))
    assert bytes(got) == b"host"


def test_fifo_holds_16_bytes_in_loopback_then_overruns() -> None:
    uart, _, _ = make()
    wr(uart, FCR, 0x01)
    wr(uart, MCR, 0x10)
    for i in range(17):
        wr(uart, THR, i)
    assert rd(uart, LSR) & 0x03 == 0x03  # data ready and overrun
    got = []
    while rd(uart, LSR) & 0x01:
        got.append(rd(uart, RBR))
    assert got == list(range(16))  # the 17th byte was lost
