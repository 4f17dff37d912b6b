"""Device-model thread vs send_ioreq: PIO, string I/O, MMIO, PCI config, buffered, failures."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from devicemodel.server import (
    DeviceModelError,
    IoreqServer,
    IoreqTimeout,
    send_ioreq,
)
from hvm.bufioreq import BufferedIoPage
from hvm.evtchn import EventChannel, EventChannelTable
from hvm.ioreq import (
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_WRITE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    IoReq,
    SharedIoPage,
    pci_config_addr,
)

TIMEOUT_S = 5.0  # generous: a healthy device model answers in microseconds


class FakeGuestMemory:
    """Guest RAM as a bytearray at guest-physical 0."""

    def __init__(self, size: int = 0x10000) -> None:
        self.ram = bytearray(size)

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa:gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        self.ram[gpa:gpa + len(data)] = data


@dataclass
class LabHandler:
    """A few toy devices: a byte FIFO on port 0x60, a 32-bit MMIO register at 0xFEC00000,
    the host bridge's vendor/device ID in PCI config space, a port that fails on 0xBAD."""

    log: list[IoReq] = field(default_factory=list)
    fifo_out: bytearray = field(default_factory=bytearray)
    fifo_in: bytearray = field(default_factory=lambda: bytearray(b"ABCDEFGH"))
    mmio_reg: int = 0

    def handle(self, req: IoReq, mem: FakeGuestMemory) -> int:
        self.log.append(req)
        if req.type == IOREQ_TYPE_PIO and req.addr == 0xBAD:
            raise RuntimeError("device exploded")
        if req.type == IOREQ_TYPE_PIO and req.data_is_ptr:
            for gpa in req.element_addrs():
                if req.dir == IOREQ_WRITE:  # OUTS: guest memory -> device
                    self.fifo_out += mem.read(gpa, req.size)
                else:  # INS: device -> guest memory
                    chunk, self.fifo_in[:req.size] = self.fifo_in[:req.size], b""
                    mem.write(gpa, bytes(chunk))
            return 0
        if req.type == IOREQ_TYPE_PIO:
            if req.dir == IOREQ_WRITE:
                self.fifo_out += req.data.to_bytes(req.size, "little")
                return 0
            return 0x1234_5600 | req.addr & 0xFF  # wider than the access: the server masks
        if req.type == IOREQ_TYPE_COPY:
            if req.dir == IOREQ_WRITE:
                self.mmio_reg = req.data
                return 0
            return self.mmio_reg
        if req.type == IOREQ_TYPE_PCI_CONFIG and req.dir == IOREQ_READ:
            return 0x1237_8086 if req.addr == pci_config_addr(0, 0, 0, 0, 0) else 0xFFFF_FFFF
        return 0


@dataclass
class Rig:
    page: SharedIoPage
    hyp_ports: list[EventChannel]
    handler: LabHandler
    mem: FakeGuestMemory
    server: IoreqServer
    bufpage: BufferedIoPage
    buf_hyp: EventChannel

    def send(self, vcpu: int, req: IoReq, timeout_s: float = TIMEOUT_S) -> int:
        return send_ioreq(self.page, vcpu, req, self.hyp_ports[vcpu], timeout_s)


def make_rig(nr_vcpus: int = 2, **server_kw: object) -> tuple[Rig, EventChannelTable,
                                                              EventChannelTable]:
    guest, dom0 = EventChannelTable(domid=1), EventChannelTable(domid=0)
    pairs = [guest.bind_interdomain(dom0) for _ in range(nr_vcpus)]
    buf_hyp, buf_dm = guest.bind_interdomain(dom0)
    page, bufpage = SharedIoPage(), BufferedIoPage()
    handler, mem = LabHandler(), FakeGuestMemory()
    server = IoreqServer(page, [dm for _, dm in pairs], handler, mem, bufpage=bufpage,
                         buf_port=buf_dm, **server_kw)  # type: ignore[arg-type]
    rig = Rig(page, [hyp for hyp, _ in pairs], handler, mem, server, bufpage, buf_hyp)
    return rig, guest, dom0


@pytest.fixture
def rig() -> Iterator[Rig]:
    r, guest, dom0 = make_rig()
    r.server.start()
    yield r
    r.server.stop()
    assert not r.server.running
    assert r.server.name not in {t.name for t in threading.enumerate()}
    guest.close_all()
    dom0.close_all()


def ioreq(addr: int, data: int = 0, *, size: int = 1, dir: int = IOREQ_WRITE,
          type: int = IOREQ_TYPE_PIO, count: int = 1, data_is_ptr: bool = False,
          df: bool = False) -> IoReq:
    return IoReq(addr=addr, data=data, count=count, size=size, vp_eport=0,
                 state=STATE_IOREQ_NONE, data_is_ptr=data_is_ptr, dir=dir, df=df, type=type)


def test_pio_out_reaches_the_device_and_frees_the_slot(rig: Rig) -> None:
    rig.send(0, ioreq(0x60, 0x41))
    assert rig.handler.fifo_out == b"A"
    seen = rig.handler.log[-1]
    assert (seen.addr, seen.data, seen.size, seen.dir, seen.type) == (0x60, 0x41, 1, 0, 0)
    assert seen.state == STATE_IOREQ_READY  # the copy the device model took
    assert seen.vp_eport == rig.hyp_ports[0].port  # the hypervisor fills in its port
    assert rig.page.state(0) == STATE_IOREQ_NONE
    assert rig.server.served == 1


def test_pio_in_returns_the_value_masked_to_size(rig: Rig) -> None:
    assert rig.send(1, ioreq(0x64, size=1, dir=IOREQ_READ)) == 0x64
    assert rig.send(1, ioreq(0x64, size=2, dir=IOREQ_READ)) == 0x5664
    assert rig.send(0, ioreq(0x64, size=4, dir=IOREQ_READ)) == 0x1234_5664
    assert rig.server.served == 3


def test_device_model_writes_back_only_data_then_sets_iorespready(rig: Rig) -> None:
    # Drive the protocol by hand to look at the slot while it says IORESP_READY.
    req = ioreq(0x71, 0xFFFF_0000, size=2, dir=IOREQ_READ)
    rig.page.post(0, req)
    posted = rig.page.raw(0)
    rig.hyp_ports[0].notify()
    assert rig.hyp_ports[0].wait(TIMEOUT_S)
    answered = rig.page.raw(0)
    assert rig.page.state(0) == STATE_IORESP_READY
    assert answered[8:16] == (0x5671).to_bytes(8, "little")
    assert answered[:8] == posted[:8] and answered[16:30] == posted[16:30]
    assert answered[30] & 0xF0 == posted[30] & 0xF0 and answered[31] == posted[31]
    rig.page.set_state(0, STATE_IOREQ_NONE)


def test_string_out_reads_guest_memory_forwards(rig: Rig) -> None:
    rig.mem.write(0x1000, b"hello")
    ptr = rig.send(0, ioreq(0x60, 0x1000, count=5, data_is_ptr=True))
    assert rig.handler.fifo_out == b"hello"
    assert ptr == 0x1000  # data is the guest pointer: the device model left it alone


def test_string_out_with_df_walks_backwards(rig: Rig) -> None:
    rig.mem.write(0x2000, b"abcd")
    rig.send(0, ioreq(0x60, 0x2003, count=4, data_is_ptr=True, df=True))
    assert rig.handler.fifo_out == b"dcba"


def test_string_in_with_df_fills_guest_memory_downwards(rig: Rig) -> None:
    ptr = rig.send(1, ioreq(0x60, 0x3006, size=2, count=3, dir=IOREQ_READ,
                            data_is_ptr=True, df=True))
    assert rig.mem.read(0x3002, 6) == b"EFCDAB"
    assert ptr == 0x3006


def test_mmio_copy_write_then_read(rig: Rig) -> None:
    rig.send(0, ioreq(0xFEC0_0000, 0xCAFE_F00D, size=4, type=IOREQ_TYPE_COPY))
    assert rig.send(0, ioreq(0xFEC0_0000, size=4, dir=IOREQ_READ,
                             type=IOREQ_TYPE_COPY)) == 0xCAFE_F00D


def test_pci_config_read_of_host_bridge_id(rig: Rig) -> None:
    addr = pci_config_addr(0, 0, 0, 0, 0)
    assert rig.send(0, ioreq(addr, size=4, dir=IOREQ_READ, type=IOREQ_TYPE_PCI_CONFIG)) \
        == 0x1237_8086
    assert rig.handler.log[-1].addr == addr
    empty_slot = pci_config_addr(0, 0, 5, 0, 0)
    assert rig.send(0, ioreq(empty_slot, size=2, dir=IOREQ_READ,
                             type=IOREQ_TYPE_PCI_CONFIG)) == 0xFFFF


def test_two_vcpus_each_get_their_own_answers(rig: Rig) -> None:
    results: dict[int, list[int]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def vcpu(n: int) -> None:
        try:
            for i in range(40):
                port = 0x10 * (n + 1) + (i % 16)
                results[n].append(rig.send(n, ioreq(port, dir=IOREQ_READ)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=vcpu, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 4)
    assert not errors
    for n in (0, 1):
        assert results[n] == [0x10 * (n + 1) + (i % 16) for i in range(40)]
    assert rig.server.served == 80


def test_buffered_writes_are_served_in_order_before_a_later_read(rig: Rig) -> None:
    writes = [(IOREQ_TYPE_PIO, 0x60, 1, 0x30 + i) for i in range(10)]
    writes.append((IOREQ_TYPE_COPY, 0xA0000, 8, 0x0102_0304_0506_0708))
    for w in writes:
        assert rig.bufpage.try_put(*w)
    # No notification on the buffered port: the synchronous read that follows the posted
    # writes must still see them first, so the device model drains the page before it.
    rig.send(0, ioreq(0x64, dir=IOREQ_READ))
    log = rig.handler.log
    assert [(r.type, r.addr, r.size, r.data) for r in log[:-1]] == writes
    assert all(r.dir == IOREQ_WRITE for r in log[:-1])
    assert log[-1].dir == IOREQ_READ
    assert rig.server.buffered_served == len(writes)
    assert rig.handler.fifo_out == bytes(range(0x30, 0x3A))


def test_buffered_port_notification_alone_drains_the_page(rig: Rig) -> None:
    done = threading.Event()
    handle = rig.handler.handle

    def counting_handle(req: IoReq, mem: FakeGuestMemory) -> int:
        result = handle(req, mem)
        if len(rig.handler.log) == 3:
            done.set()
        return result

    rig.handler.handle = counting_handle  # type: ignore[method-assign]
    for value in (7, 8, 9):
        assert rig.bufpage.try_put(IOREQ_TYPE_PIO, 0x60, 1, value)
    rig.buf_hyp.notify()
    assert done.wait(TIMEOUT_S)
    assert rig.handler.fifo_out == bytes([7, 8, 9])
    assert rig.server.served == 0


def test_buffered_writes_across_the_wrap_and_a_full_page(rig: Rig) -> None:
    total = 0
    for _ in range(3):
        while rig.bufpage.try_put(IOREQ_TYPE_PIO, 0x60, 1, total & 0xFF):
            total += 1
        # the page is full: a write that does not fit goes synchronously instead, as Xen does
        rig.send(0, ioreq(0x60, total & 0xFF))
        total += 1
        rig.buf_hyp.notify()
        rig.send(0, ioreq(0x64, dir=IOREQ_READ))
        assert rig.bufpage.free_slots() == 511
        assert rig.bufpage.read_pointer < 2 * 511  # pulled back by 511s, never running away
    assert rig.handler.fifo_out == bytes(i & 0xFF for i in range(total))
    assert total > 3 * 511


def test_handler_exception_fails_the_waiting_vcpu_at_once(rig: Rig) -> None:
    with pytest.raises(DeviceModelError) as info:
        rig.send(0, ioreq(0xBAD, dir=IOREQ_READ), timeout_s=60.0)
    message = str(info.value)
    assert "IOREQ_TYPE_PIO read addr=0xbad" in message
    assert "STATE_IOREQ_INPROCESS" in message
    assert isinstance(info.value, IoreqTimeout)  # callers that catch timeouts catch this too
    assert isinstance(rig.server.error, RuntimeError)
    assert "device exploded" in str(rig.server.error)
    assert rig.page.state(0) == STATE_IOREQ_INPROCESS
    rig.server.stop()
    assert not rig.server.running


def test_no_device_model_gives_a_bounded_timeout() -> None:
    r, guest, dom0 = make_rig()  # never started
    with pytest.raises(IoreqTimeout) as info:
        r.send(0, ioreq(0x3F8, dir=IOREQ_READ, size=1), timeout_s=0.05)
    assert not isinstance(info.value, DeviceModelError)
    assert "STATE_IOREQ_READY" in str(info.value)
    assert "device-model thread running" in str(info.value)
    assert r.page.state(0) == STATE_IOREQ_READY
    r.server.stop()
    guest.close_all()
    dom0.close_all()


def test_stopped_device_model_gives_a_bounded_timeout(rig: Rig) -> None:
    assert rig.send(0, ioreq(0x64, dir=IOREQ_READ)) == 0x64
    rig.server.stop()
    assert not rig.server.running
    with pytest.raises(IoreqTimeout, match="no answer"):
        rig.send(1, ioreq(0x64, dir=IOREQ_READ), timeout_s=0.05)


def test_stray_notification_does_not_confuse_the_server(rig: Rig) -> None:
    rig.hyp_ports[1].notify()  # nothing posted
    assert rig.send(1, ioreq(0x64, dir=IOREQ_READ)) == 0x64
    assert rig.server.served == 1 and rig.server.error is None


def test_step_times_record_each_ioreq_in_order() -> None:
    class TickClock:
        def __init__(self) -> None:
            self._ticks = itertools.count(1)

        def now_ns(self) -> int:
            return next(self._ticks)

    r, guest, dom0 = make_rig(clock=TickClock(), history=2)
    with r.server:
        for port in (0x61, 0x62, 0x63):
            r.send(0, ioreq(port, dir=IOREQ_READ))
    times = r.server.step_times()
    assert [t.addr for t in times] == [0x62, 0x63]  # only the last `history`
    for t in times:
        assert t.t_wake < t.t_fetched < t.t_done
        assert (t.vcpu, t.dir) == (0, IOREQ_READ)
    guest.close_all()
    dom0.close_all()


def test_server_refuses_inconsistent_wiring() -> None:
    page = SharedIoPage()
    table = EventChannelTable()
    with pytest.raises(ValueError):
        IoreqServer(page, [], LabHandler(), FakeGuestMemory(), buf_port=table.alloc())
    table.close_all()
