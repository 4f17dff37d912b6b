"""netback against Python netfronts: tx by grant copy, rx by copy or page flip, hostile rings and grants, bridge, xenbus."""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devicemodel.clock import ManualClock
from devicemodel.pcap import PcapWriter, read_pcap
from hvm.memory import PAGE_SIZE, GuestMemory
from pv.backends import LocalFrontendLink
from pv.backends.netback import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    RX_COPY,
    RX_FLIP,
    Dom0Pages,
    Netback,
    NETTXF_extra_info,
    NETTXF_more_data,
    Vif,
)
from pv.backends.xenbus_glue import XenbusGlue
from pv.bridge import Bridge
from pv.grant_table import Domain, GNTST_okay, GrantOps, GTF_transfer_completed
from pv.layouts import (
    X86_32,
    netif_rx_request,
    netif_rx_response,
    netif_tx_request,
    netif_tx_response,
)
from pv.ring import FrontRing, SharedRing
from pv.xenbus import XenbusState, XsClient, make_domain_home, wait_for_state
from pv.xenstored import Xenstored

DOM0 = 0
TABLE_GFNS = [8, 9, 10, 11]
TX_RING_GFN, RX_RING_GFN = 0x10, 0x11
TX_REF, RX_REF = 1, 2
DOM0_POOL = list(range(1, 9))
TIMEOUT = 3.0
TxReq, TxRsp = netif_tx_request(X86_32), netif_tx_response(X86_32)
RxReq, RxRsp = netif_rx_request(X86_32), netif_rx_response(X86_32)


def mac(domid: int) -> bytes:
    return bytes([0x00, 0x16, 0x3E, 0x00, 0x00, domid])


def ether(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x08\x00" + payload


@pytest.fixture
def ops() -> GrantOps:
    grants = GrantOps.of([Domain(DOM0, GuestMemory(16 * PAGE_SIZE)),
                          Domain(1, GuestMemory(256 * PAGE_SIZE)),
                          Domain(2, GuestMemory(256 * PAGE_SIZE))])
    for domid in (1, 2):
        assert grants.setup_table(domid, TABLE_GFNS) == GNTST_okay
    return grants


@pytest.fixture
def pages(ops: GrantOps) -> Dom0Pages:
    return Dom0Pages(ops.domains[DOM0], DOM0_POOL)


class NetFront:
    """What netfront does, in Python: two rings, one event channel, grants for each buffer."""

    def __init__(self, ops: GrantOps, domid: int) -> None:
        self.domid = domid
        self.memory = ops.domains[domid]
        self.table = ops.tables[domid]
        self.link = LocalFrontendLink(domid, self.memory, ops)
        self.tx_sring = SharedRing(self.memory.p2m(TX_RING_GFN).view(), ctypes.sizeof(TxReq),
                                   ctypes.sizeof(TxRsp))
        self.rx_sring = SharedRing(self.memory.p2m(RX_RING_GFN).view(), ctypes.sizeof(RxReq),
                                   ctypes.sizeof(RxRsp))
        self.tx_sring.init()
        self.rx_sring.init()
        self.tx = FrontRing(self.tx_sring)
        self.rx = FrontRing(self.rx_sring)
        self.table.grant_foreign_access(TX_REF, DOM0, TX_RING_GFN)
        self.table.grant_foreign_access(RX_REF, DOM0, RX_RING_GFN)
        self.port = self.link.alloc_unbound()
        self.evtchn = self.link.guest_end(self.port)

    def connect(self, netback: Netback, rx_mode: str = RX_COPY,
                tx_sink: Callable[[bytes], None] | None = None, **kw: object) -> Vif:
        return netback.connect(self.link, 0, TX_REF, RX_REF, self.port, rx_mode=rx_mode,
                               tx_sink=tx_sink, **kw)  # type: ignore[arg-type]

    def page(self, gfn: int) -> bytes:
        return self.memory.read(gfn * PAGE_SIZE, PAGE_SIZE)

    def queue_tx(self, gref: int, offset: int, size: int, req_id: int, flags: int = 0) -> None:
        req = TxReq()
        req.gref, req.offset, req.flags, req.id, req.size = gref, offset, flags, req_id, size
        self.tx.put_request(bytes(req))

    def send(self, frame: bytes, gfn: int, ref: int, req_id: int, offset: int = 0) -> None:
        """Put `frame` in a page, grant it read-only to Dom0, queue one tx slot."""
        self.memory.write(gfn * PAGE_SIZE + offset, frame)
        self.table.grant_foreign_access(ref, DOM0, gfn, readonly=True)
        self.queue_tx(ref, offset, len(frame), req_id)

    def post_rx(self, req_id: int, gref: int) -> None:
        req = RxReq()
        req.id, req.gref = req_id, gref
        self.rx.put_request(bytes(req))

    def push(self, ring: FrontRing) -> bool:
        notify = ring.push_requests()
        if notify:
            self.evtchn.notify()
        return notify

    def _collect(self, ring: FrontRing, decode: Callable[[bytes], tuple[int, ...]],
                 count: int) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        while len(out) < count:
            while len(out) < count and ring.unconsumed_responses():
                out.append(decode(ring.take_response()))
            if len(out) >= count or ring.final_check_for_responses():
                continue
            if not self.evtchn.wait(TIMEOUT):
                raise TimeoutError(f"{len(out)} of {count} responses after {TIMEOUT} s")
        return out

    def tx_responses(self, count: int) -> list[tuple[int, ...]]:
        def decode(raw: bytes) -> tuple[int, ...]:
            rsp = TxRsp.from_buffer_copy(raw)
            return rsp.id, rsp.status
        return self._collect(self.tx, decode, count)

    def rx_responses(self, count: int) -> list[tuple[int, ...]]:
        def decode(raw: bytes) -> tuple[int, ...]:
            rsp = RxRsp.from_buffer_copy(raw)
            return rsp.id, rsp.offset, rsp.flags, rsp.status
        return self._collect(self.rx, decode, count)


@pytest.fixture
def netback(pages: Dom0Pages) -> Iterator[Netback]:
    backend = Netback(pages, idle_wait_s=0.2)
    backend.start()
    yield backend
    backend.stop()


class Sink:
    """A tx sink the test can block on (the backend hands frames on from its thread)."""

    def __init__(self) -> None:
        self.q: queue.Queue[bytes] = queue.Queue()

    def __call__(self, frame: bytes) -> None:
        self.q.put(frame)

    def get(self) -> bytes:
        return self.q.get(timeout=TIMEOUT)

    def empty(self) -> bool:
        return self.q.empty()


# -- tx -----------------------------------------------------------------------------------------

def test_tx_copies_the_frame_out_of_the_granted_page(ops: GrantOps, pages: Dom0Pages,
                                                     netback: Netback) -> None:
    front, sink = NetFront(ops, 1), Sink()
    vif = front.connect(netback, tx_sink=sink)
    frame = ether(b"\xff" * 6, mac(1), b"hello from domain 1" * 3)
    front.send(frame, gfn=0x20, ref=10, req_id=33, offset=100)
    assert front.push(front.tx)
    assert front.tx_responses(1) == [(33, NETIF_RSP_OKAY)]
    assert sink.get() == frame
    assert (vif.stats.tx_frames, vif.stats.tx_bytes) == (1, len(frame))
    assert vif.stats.bytes_copied == len(frame) and vif.stats.flips == 0
    assert len(pages) == len(DOM0_POOL)  # the bounce page went back to the pool
    assert front.table.end_foreign_access(10)  # copied, not left mapped


def test_tx_packet_spread_over_slots_with_more_data(ops: GrantOps, netback: Netback) -> None:
    front, sink = NetFront(ops, 1), Sink()
    front.connect(netback, tx_sink=sink)
    frame = ether(mac(2), mac(1), bytes(range(256)) * 11)  # 2830 bytes
    head, tail = frame[:1000], frame[1000:]
    front.memory.write(0x20 * PAGE_SIZE + PAGE_SIZE - 1000, head)  # ends exactly at the page end
    front.memory.write(0x21 * PAGE_SIZE, tail)
    front.table.grant_foreign_access(10, DOM0, 0x20, readonly=True)
    front.table.grant_foreign_access(11, DOM0, 0x21, readonly=True)
    # The first slot's size is the whole packet's; the next one carries its own part.
    front.queue_tx(10, PAGE_SIZE - 1000, len(frame), 1, NETTXF_more_data)
    front.queue_tx(11, 0, len(tail), 2)
    front.push(front.tx)
    assert front.tx_responses(2) == [(1, NETIF_RSP_OKAY), (2, NETIF_RSP_OKAY)]
    assert sink.get() == frame


def test_tx_extra_info_slots_are_answered_null(ops: GrantOps, netback: Netback) -> None:
    front, sink = NetFront(ops, 1), Sink()
    front.connect(netback, tx_sink=sink)
    frame = ether(mac(2), mac(1), b"with an extra")
    front.memory.write(0x20 * PAGE_SIZE, frame)
    front.table.grant_foreign_access(10, DOM0, 0x20, readonly=True)
    front.queue_tx(10, 0, len(frame), 7, NETTXF_extra_info)
    front.tx.put_request(bytes([1, 0]) + bytes(10))  # netif_extra_info: GSO, no MORE flag
    front.push(front.tx)
    assert front.tx_responses(2) == [(7, NETIF_RSP_OKAY), (0, NETIF_RSP_NULL)]
    assert sink.get() == frame


def test_tx_bad_slots_and_grants_get_error_and_nothing_leaves(ops: GrantOps,
                                                              netback: Netback) -> None:
    front, sink = NetFront(ops, 1), Sink()
    vif = front.connect(netback, tx_sink=sink)
    frame = ether(mac(2), mac(1), b"x" * 100)
    front.memory.write(0x20 * PAGE_SIZE, frame)
    ok = 10
    front.table.grant_foreign_access(ok, DOM0, 0x20, readonly=True)
    front.table.grant_foreign_access(11, 2, 0x20, readonly=True)  # granted to domain 2
    front.queue_tx(ok, PAGE_SIZE - 50, 100, 1)  # crosses the end of its page
    front.queue_tx(ok, 0, 10, 2)  # shorter than an Ethernet header
    front.queue_tx(11, 0, len(frame), 3)  # not granted to Dom0
    front.queue_tx(12, 0, len(frame), 4)  # never granted
    front.queue_tx(5000, 0, len(frame), 5)  # past the grant table
    front.queue_tx(ok, 0, 20, 6, NETTXF_more_data)  # parts bigger than the whole packet
    front.queue_tx(ok, 0, 30, 7)
    front.queue_tx(ok, 0, len(frame), 8)  # and one good packet after all that
    front.push(front.tx)
    assert front.tx_responses(8) == [(i, NETIF_RSP_ERROR) for i in range(1, 8)] + [
        (8, NETIF_RSP_OKAY)]
    assert sink.get() == frame and sink.empty()
    assert vif.stats.tx_errors == 6 and vif.stats.tx_frames == 1 and vif.connected


@pytest.mark.parametrize("attack", ["index jump", "unfinished chain"])
def test_tx_ring_abuse_disconnects_that_vif_only(ops: GrantOps, netback: Netback,
                                                 attack: str) -> None:
    hostile, honest = NetFront(ops, 1), NetFront(ops, 2)
    told = threading.Event()
    bad = hostile.connect(netback, on_disconnect=lambda _reason: told.set())
    sink = Sink()
    good = honest.connect(netback, tx_sink=sink)
    if attack == "index jump":
        hostile.tx_sring.req_prod = 5000  # far past a 256-slot ring
    else:
        hostile.queue_tx(10, 0, 60, 1, NETTXF_more_data)  # and no slot after it
        hostile.tx.push_requests()
    hostile.evtchn.notify()
    assert told.wait(TIMEOUT)
    assert not bad.connected and "ring error" in bad.disconnect_reason
    assert not ops.mapped(1, TX_REF) and not ops.mapped(1, RX_REF)
    assert hostile.evtchn.peer_closed
    frame = ether(mac(1), mac(2), b"life goes on")
    honest.send(frame, 0x20, 10, 1)
    honest.push(honest.tx)
    assert honest.tx_responses(1) == [(1, NETIF_RSP_OKAY)]
    assert sink.get() == frame and good.connected


# -- rx -----------------------------------------------------------------------------------------

def test_rx_by_copy_fills_the_offered_page(ops: GrantOps, pages: Dom0Pages,
                                           netback: Netback) -> None:
    front = NetFront(ops, 1)
    vif = front.connect(netback, RX_COPY)
    old_frame = front.memory.p2m(0x30)
    front.table.grant_foreign_access(20, DOM0, 0x30)
    front.post_rx(5, 20)
    front.push(front.rx)
    frame = ether(mac(1), mac(2), b"for domain 1" * 10)
    assert vif.deliver(frame)
    assert front.rx_responses(1) == [(5, 0, 0, len(frame))]
    assert front.page(0x30)[:len(frame)] == frame
    assert front.memory.p2m(0x30) == old_frame  # same page, bytes copied into it
    assert vif.stats.bytes_copied == len(frame) and vif.stats.flips == 0
    assert vif.stats.rx_frames == 1 and len(pages) == len(DOM0_POOL)


def test_rx_by_flip_gives_the_guest_dom0s_page_and_copies_nothing(
        ops: GrantOps, pages: Dom0Pages, netback: Netback) -> None:
    front = NetFront(ops, 1)
    vif = front.connect(netback, RX_FLIP)
    front.memory.write(0x30 * PAGE_SIZE, b"\xaa" * PAGE_SIZE)
    guest_old = front.memory.p2m(0x30)
    dom0 = ops.domains[DOM0]
    dom0_before = {pfn: dom0.p2m(pfn) for pfn in DOM0_POOL}
    front.table.grant_foreign_transfer(20, DOM0, 0x30)
    front.post_rx(6, 20)
    front.push(front.rx)
    frame = ether(mac(1), mac(2), b"flipped" * 20)
    assert vif.deliver(frame)
    assert front.rx_responses(1) == [(6, 0, 0, len(frame))]
    # The guest's frame 0x30 is now backed by what was a Dom0 page, holding the frame...
    new = front.memory.p2m(0x30)
    assert new != guest_old and new in dom0_before.values()
    assert front.page(0x30) == frame + bytes(PAGE_SIZE - len(frame))
    # ...and the guest's old page (still full of 0xAA) went to Dom0 in exchange.
    moved = [pfn for pfn in DOM0_POOL if dom0.p2m(pfn) != dom0_before[pfn]]
    assert len(moved) == 1 and dom0.p2m(moved[0]) == guest_old
    assert dom0.read(moved[0] * PAGE_SIZE, 16) == b"\xaa" * 16
    assert front.table.entry(20).flags & GTF_transfer_completed
    assert front.table.end_foreign_transfer(20) == 0x30
    assert vif.stats.flips == 1 and vif.stats.bytes_copied == 0
    assert len(pages) == len(DOM0_POOL)


@pytest.mark.parametrize("mode,offer", [
    (RX_FLIP, "access grant, not a transfer offer"),
    (RX_FLIP, "transfer offered to domain 2"),
    (RX_FLIP, "never offered"),
    (RX_COPY, "read-only grant"),
    (RX_COPY, "transfer offer, not an access grant"),
])
def test_rx_into_a_buffer_not_offered_gets_error(ops: GrantOps, netback: Netback, mode: str,
                                                 offer: str) -> None:
    front = NetFront(ops, 1)
    vif = front.connect(netback, mode)
    front.memory.write(0x30 * PAGE_SIZE, b"\x55" * PAGE_SIZE)
    before = front.memory.p2m(0x30)
    dom0 = ops.domains[DOM0]
    dom0_before = [dom0.p2m(pfn) for pfn in DOM0_POOL]
    if offer.startswith("access grant"):
        front.table.grant_foreign_access(20, DOM0, 0x30)
    elif offer == "transfer offered to domain 2":
        front.table.grant_foreign_transfer(20, 2, 0x30)
    elif offer == "read-only grant":
        front.table.grant_foreign_access(20, DOM0, 0x30, readonly=True)
    elif offer.startswith("transfer offer"):
        front.table.grant_foreign_transfer(20, DOM0, 0x30)
    front.post_rx(9, 20)
    front.push(front.rx)
    assert vif.deliver(ether(mac(1), mac(2), b"nowhere to go"))
    assert front.rx_responses(1) == [(9, 0, 0, NETIF_RSP_ERROR)]
    assert front.memory.p2m(0x30) == before and front.page(0x30) == b"\x55" * PAGE_SIZE
    assert [dom0.p2m(pfn) for pfn in DOM0_POOL] == dom0_before  # no page changed hands
    assert vif.stats.rx_errors == 1 and vif.connected


def test_rx_frames_wait_for_buffers_and_the_backend_asks_to_be_told(
        ops: GrantOps, netback: Netback) -> None:
    front = NetFront(ops, 1)
    vif = front.connect(netback, RX_COPY)
    front.table.grant_foreign_access(20, DOM0, 0x30)
    front.post_rx(1, 20)
    assert front.push(front.rx)  # the first buffer always notifies (req_event starts at 1)
    first = ether(mac(1), mac(2), b"first")
    vif.deliver(first)
    assert front.rx_responses(1) == [(1, 0, 0, len(first))]
    # With no frame waiting, the backend does not need to hear about new buffers.
    front.table.grant_foreign_access(21, DOM0, 0x31)
    front.post_rx(2, 21)
    assert front.push(front.rx) is False
    # Two frames, one buffer: the second waits, and the backend re-arms req_event...
    second, third = ether(mac(1), mac(2), b"second"), ether(mac(1), mac(2), b"third")
    with vif.lock:  # both arrive before the backend looks (it serves under this lock)
        vif.deliver(second)
        vif.deliver(third)
    assert front.rx_responses(1) == [(2, 0, 0, len(second))]
    front.table.grant_foreign_access(22, DOM0, 0x32)
    front.post_rx(3, 22)
    # ...so this buffer is announced, and the third frame lands in it.
    assert front.push(front.rx) is True
    assert front.rx_responses(1) == [(3, 0, 0, len(third))]
    assert [front.page(g)[:len(f)] for g, f in ((0x30, first), (0x31, second), (0x32, third))] == [
        first, second, third]


def test_a_frontend_that_never_posts_buffers_loses_frames_not_the_backend(
        ops: GrantOps, pages: Dom0Pages) -> None:
    before = set(threading.enumerate())
    backend = Netback(pages, idle_wait_s=0.2, rx_queue_len=16)
    backend.start()
    try:
        deaf, live = NetFront(ops, 1), NetFront(ops, 2)
        deaf_vif = deaf.connect(backend)
        live_vif = live.connect(backend)
        frame = ether(mac(1), mac(2), b"unheard")
        accepted = sum(deaf_vif.deliver(frame) for _ in range(300))
        assert accepted == 16 and deaf_vif.stats.rx_dropped == 284
        assert deaf_vif.rx_pending == 16
        live.table.grant_foreign_access(20, DOM0, 0x30)
        live.post_rx(1, 20)
        live.push(live.rx)
        heard = ether(mac(2), mac(1), b"heard")
        live_vif.deliver(heard)
        assert live.rx_responses(1) == [(1, 0, 0, len(heard))]
    finally:
        backend.stop(timeout_s=TIMEOUT)
    assert set(threading.enumerate()) <= before
    assert not deaf_vif.connected and deaf_vif.rx_pending == 0


# -- through the bridge, and the xenbus handshake ------------------------------------------------

def test_two_vifs_talk_through_the_bridge_and_every_frame_is_captured(
        ops: GrantOps, netback: Netback, tmp_path: Path) -> None:
    pcap_path = tmp_path / "bridge.pcap"
    pcap = PcapWriter(pcap_path, ManualClock())
    bridge = Bridge(pcap)
    one, two = NetFront(ops, 1), NetFront(ops, 2)
    port1, port2 = bridge.add_port("vif1.0"), bridge.add_port("vif2.0")
    vif1 = one.connect(netback, RX_FLIP, tx_sink=port1.transmit)
    vif2 = two.connect(netback, RX_COPY, tx_sink=port2.transmit)
    port1.connect(vif1.deliver)
    port2.connect(vif2.deliver)
    one.table.grant_foreign_transfer(20, DOM0, 0x30)
    one.post_rx(1, 20)
    one.push(one.rx)
    two.table.grant_foreign_access(20, DOM0, 0x30)
    two.post_rx(1, 20)
    two.push(two.rx)
    ping = ether(mac(2), mac(1), b"ping")
    one.send(ping, 0x20, 10, 1)
    one.push(one.tx)
    assert two.rx_responses(1) == [(1, 0, 0, len(ping))]
    assert two.page(0x30)[:len(ping)] == ping
    pong = ether(mac(1), mac(2), b"pong")
    two.send(pong, 0x20, 10, 1)
    two.push(two.tx)
    assert one.rx_responses(1) == [(1, 0, 0, len(pong))]
    assert one.page(0x30)[:len(pong)] == pong  # arrived by page flip
    assert vif1.stats.flips == 1 and vif2.stats.flips == 0
    assert one.tx_responses(1) == [(1, NETIF_RSP_OKAY)] and two.tx_responses(1) == [
        (1, NETIF_RSP_OKAY)]
    pcap.close()
    assert [data for _, data in read_pcap(pcap_path)] == [ping, pong]
    assert bridge.fdb() == {"00:16:3e:00:00:01": "vif1.0", "00:16:3e:00:00:02": "vif2.0"}


@pytest.mark.parametrize("rx_copy,mode", [("1", RX_COPY), ("0", RX_FLIP), (None, RX_FLIP)])
def test_xenbus_handshake_picks_the_rx_mode_and_plugs_the_vif_into_the_bridge(
        ops: GrantOps, netback: Netback, rx_copy: str | None, mode: str) -> None:
    daemon = Xenstored()
    dom0 = XsClient(daemon.connect_local(0))
    make_domain_home(dom0, 1)
    glue = XenbusGlue(XsClient(daemon.connect_local(0)), "vif", idle_wait_s=0.1)
    glue.start()
    try:
        bridge = Bridge()
        heard = Sink()
        bridge.add_port("tap", heard)
        front = NetFront(ops, 1)
        driver = netback.vif_driver(front.link, 0, bridge)
        dev = glue.add_device(1, 0, driver, frontend_entries={"mac": "00:16:3e:00:00:01"})
        xs = XsClient(daemon.connect_local(1))
        fe, be = dev.frontend_path, dev.backend_path
        assert fe == "/local/domain/1/device/vif/0" and be == "/local/domain/0/backend/vif/1/0"
        xs.watch(f"{be}/state", "otherend")
        wait_for_state(xs, f"{be}/state", {XenbusState.InitWait}, TIMEOUT, "otherend")
        assert xs.read(f"{be}/feature-rx-copy") == b"1"
        assert xs.read(f"{be}/feature-rx-flip") == b"1"
        xs.write(f"{fe}/tx-ring-ref", str(TX_REF))
        xs.write(f"{fe}/rx-ring-ref", str(RX_REF))
        xs.write(f"{fe}/event-channel", str(front.port))
        if rx_copy is not None:
            xs.write(f"{fe}/request-rx-copy", rx_copy)
        xs.write(f"{fe}/state", str(int(XenbusState.Connected)))
        wait_for_state(xs, f"{be}/state", {XenbusState.Connected}, TIMEOUT, "otherend")
        assert driver.vif is not None and driver.vif.rx_mode == mode
        frame = ether(b"\xff" * 6, mac(1), b"hello bridge")
        front.send(frame, 0x20, 10, 1)
        front.push(front.tx)
        assert front.tx_responses(1) == [(1, NETIF_RSP_OKAY)]
        assert glue.wait_connected(dev, TIMEOUT)
        vif = driver.vif
        xs.write(f"{fe}/state", str(int(XenbusState.Closed)))
        wait_for_state(xs, f"{be}/state", {XenbusState.Closed}, TIMEOUT, "otherend")
        assert heard.get() == frame and heard.empty()
        assert not vif.connected and [p.name for p in bridge.ports] == ["tap"]
    finally:
        glue.stop()
