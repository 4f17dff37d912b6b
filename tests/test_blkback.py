"""blkback against Python blkfronts over guest memory, grants and rings: data, flush, reorder, hostile frontends, xenbus."""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devicemodel.ide_disk import SECTOR_SIZE, FileBlockBackend
from hvm.memory import PAGE_SIZE, GuestMemory
from pv.backends import LocalFrontendLink
from pv.backends.blkback import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    Blkback,
    BlkifDevice,
)
from pv.backends.xenbus_glue import XenbusGlue
from pv.grant_table import Domain, GNTST_okay, GrantOps
from pv.layouts import X86_32, blkif_request, blkif_response
from pv.ring import FrontRing, SharedRing
from pv.xenbus import XenbusState, XsClient, make_domain_home, read_state, wait_for_state
from pv.xenstored import Xenstored

DOM0 = 0
TABLE_GFNS = [8, 9, 10, 11]  # where the domain builder puts a PV guest's grant table
RING_GFN, RING_REF = 0x10, 1
DISK_SECTORS = 128
TIMEOUT = 3.0
BlkReq = blkif_request(X86_32)
BlkRsp = blkif_response(X86_32)

Seg = tuple[int, int, int]  # (gref, first_sect, last_sect)


def sector_pattern(sector: int) -> bytes:
    """What the fresh image holds in `sector`: its number and a filler that differs per sector."""
    return sector.to_bytes(4, "little") + bytes([(sector * 7 + 3) & 0xFF]) * (SECTOR_SIZE - 4)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(sector_pattern(s) for s in range(DISK_SECTORS)))
    return path


@pytest.fixture
def ops() -> GrantOps:
    grants = GrantOps.of([Domain(DOM0, GuestMemory(16 * PAGE_SIZE)),
                          Domain(1, GuestMemory(256 * PAGE_SIZE)),
                          Domain(2, GuestMemory(256 * PAGE_SIZE))])
    for domid in (1, 2):
        assert grants.setup_table(domid, TABLE_GFNS) == GNTST_okay
    return grants


class BlkFront:
    """What blkfront does, in Python, on the guest's own pages and grant entries."""

    def __init__(self, ops: GrantOps, domid: int) -> None:
        self.domid = domid
        self.memory = ops.domains[domid]
        self.table = ops.tables[domid]
        self.link = LocalFrontendLink(domid, self.memory, ops)
        sring = SharedRing(self.memory.p2m(RING_GFN).view(), ctypes.sizeof(BlkReq),
                           ctypes.sizeof(BlkRsp))
        sring.init()
        self.sring = sring
        self.ring = FrontRing(sring)
        self.table.grant_foreign_access(RING_REF, DOM0, RING_GFN)
        self.port = self.link.alloc_unbound()
        self.evtchn = self.link.guest_end(self.port)

    def grant(self, ref: int, gfn: int, readonly: bool = False, to: int = DOM0) -> int:
        self.table.grant_foreign_access(ref, to, gfn, readonly)
        return ref

    def page(self, gfn: int) -> bytes:
        return self.memory.read(gfn * PAGE_SIZE, PAGE_SIZE)

    def fill(self, gfn: int, data: bytes) -> None:
        self.memory.write(gfn * PAGE_SIZE, data)

    def queue(self, op: int, req_id: int, sector: int = 0, segs: list[Seg] | None = None,
              nr_segments: int | None = None) -> None:
        req = BlkReq()
        segs = segs or []
        req.operation, req.handle, req.id, req.sector_number = op, 0, req_id, sector
        req.nr_segments = len(segs) if nr_segments is None else nr_segments
        for i, (gref, first, last) in enumerate(segs[:11]):
            req.seg[i].gref, req.seg[i].first_sect, req.seg[i].last_sect = gref, first, last
        self.ring.put_request(bytes(req))

    def push(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, and the send if it says so."""
        notify = self.ring.push_requests()
        if notify:
            self.evtchn.notify()
        return notify

    def responses(self, count: int) -> list[tuple[int, int, int]]:
        """(id, operation, status) of the next `count` responses, in ring order; blocks on
        the event channel with the final check, as blkfront's interrupt handler does."""
        out: list[tuple[int, int, int]] = []
        while len(out) < count:
            while len(out) < count and self.ring.unconsumed_responses():
                rsp = BlkRsp.from_buffer_copy(self.ring.take_response())
                out.append((rsp.id, rsp.operation, rsp.status))
            if len(out) >= count or self.ring.final_check_for_responses():
                continue
            if not self.evtchn.wait(TIMEOUT):
                raise TimeoutError(f"{len(out)} of {count} responses after {TIMEOUT} s")
        return out

    def do(self, op: int, req_id: int, sector: int = 0,
           segs: list[Seg] | None = None, **kw: int) -> tuple[int, int, int]:
        self.queue(op, req_id, sector, segs, **kw)
        self.push()
        return self.responses(1)[0]


@pytest.fixture
def blkback() -> Iterator[Blkback]:
    backend = Blkback(idle_wait_s=0.2)
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture
def disk(image: Path) -> Iterator[FileBlockBackend]:
    with FileBlockBackend(image) as d:
        yield d


def attach(backend: Blkback, front: BlkFront, disk: FileBlockBackend,
           on_disconnect: Callable[[str], None] | None = None) -> BlkifDevice:
    return backend.connect(front.link, 51712, RING_REF, front.port, disk,
                           on_disconnect=on_disconnect)


def on_disk(image: Path, sector: int, count: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(sector * SECTOR_SIZE)
        return f.read(count * SECTOR_SIZE)


# -- data ----------------------------------------------------------------------------------------

def test_write_then_read_moves_sectors_between_granted_pages_and_the_image(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, image: Path) -> None:
    front = BlkFront(ops, 1)
    attach(blkback, front, disk)
    data = bytes(range(256)) * 16 + b"second page!" * 100
    front.fill(0x20, data[:PAGE_SIZE])
    front.fill(0x21, bytes(2 * SECTOR_SIZE) + data[PAGE_SIZE:PAGE_SIZE + 2 * SECTOR_SIZE])
    # 8 sectors from page 0x20, then sectors 2-3 of page 0x21: 10 sectors from sector 10.
    write_id = 0x1122_3344_5566_7788  # ids are u64: they must come back whole
    segs = [(front.grant(10, 0x20), 0, 7), (front.grant(11, 0x21), 2, 3)]
    assert front.do(BLKIF_OP_WRITE, write_id, 10, segs) == (write_id, BLKIF_OP_WRITE,
                                                            BLKIF_RSP_OKAY)
    expected = data[:PAGE_SIZE + 2 * SECTOR_SIZE]
    assert on_disk(image, 10, 10) == expected
    assert on_disk(image, 9, 1) == sector_pattern(9) and on_disk(image, 20, 1) == sector_pattern(20)
    # Read them back into other pages, the second segment at sectors 5-6 of its page.
    front.fill(0x31, b"\xee" * PAGE_SIZE)
    segs = [(front.grant(12, 0x30), 0, 7), (front.grant(13, 0x31), 5, 6)]
    assert front.do(BLKIF_OP_READ, 7, 10, segs) == (7, BLKIF_OP_READ, BLKIF_RSP_OKAY)
    assert front.page(0x30) == expected[:PAGE_SIZE]
    page = front.page(0x31)
    assert page[5 * SECTOR_SIZE:7 * SECTOR_SIZE] == expected[PAGE_SIZE:]
    assert page[:5 * SECTOR_SIZE] == b"\xee" * 5 * SECTOR_SIZE  # outside the segment: untouched
    assert page[7 * SECTOR_SIZE:] == b"\xee" * SECTOR_SIZE
    # Grants are unmapped once each request is done: the guest can revoke them.
    assert all(front.table.end_foreign_access(ref) for ref in (10, 11, 12, 13))


def test_flush_and_barrier_fsync_the_image(ops: GrantOps, blkback: Blkback,
                                           disk: FileBlockBackend, image: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    front = BlkFront(ops, 1)
    dev = attach(blkback, front, disk)
    assert front.do(BLKIF_OP_FLUSH_DISKCACHE, 1) == (1, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)
    assert len(synced) == 1
    image_fd = synced[0]
    assert os.path.samefile(f"/proc/self/fd/{image_fd}", image)
    front.fill(0x20, b"B" * SECTOR_SIZE)
    assert front.do(BLKIF_OP_WRITE_BARRIER, 2, 3, [(front.grant(10, 0x20), 0, 0)]) == (
        2, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_OKAY)
    assert synced == [image_fd, image_fd]
    assert on_disk(image, 3, 1) == b"B" * SECTOR_SIZE
    assert (dev.stats.flushes, dev.stats.barriers) == (1, 1)


def test_unknown_operations_get_eopnotsupp_with_their_id(ops: GrantOps, blkback: Blkback,
                                                         disk: FileBlockBackend) -> None:
    front = BlkFront(ops, 1)
    attach(blkback, front, disk)
    for op in (BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, 0x7F):
        front.queue(op, 500 + op, 0, [(front.grant(10, 0x20), 0, 0)])
    front.push()
    assert front.responses(3) == [(500 + op, op, BLKIF_RSP_EOPNOTSUPP)
                                  for op in (BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, 0x7F)]


def test_malformed_or_out_of_range_requests_get_error_and_leave_the_image_alone(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, image: Path) -> None:
    front = BlkFront(ops, 1)
    dev = attach(blkback, front, disk)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    ref = front.grant(10, 0x20)
    front.fill(0x20, b"X" * PAGE_SIZE)
    bad: list[tuple[int, int, list[Seg], dict[str, int]]] = [
        (DISK_SECTORS - 1, 1, [(ref, 0, 1)], {}),  # runs one sector past the end
        (DISK_SECTORS, 2, [(ref, 0, 0)], {}),  # starts past the end
        (2**63, 3, [(ref, 0, 0)], {}),  # absurd sector number
        (0, 4, [], {}),  # a write with no segment
        (0, 5, [(ref, 0, 0)] * 11, {"nr_segments": 12}),  # more than 11 segments
        (0, 6, [(ref, 4, 3)], {}),  # first_sect after last_sect
        (0, 7, [(ref, 0, 8)], {}),  # last_sect outside the page
    ]
    for sector, req_id, segs, kw in bad:
        front.queue(BLKIF_OP_WRITE, req_id, sector, segs, **kw)
    front.push()
    assert front.responses(len(bad)) == [(i, BLKIF_OP_WRITE, BLKIF_RSP_ERROR)
                                         for i in range(1, 8)]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    assert dev.stats.errors == len(bad) and dev.connected
    # The ring still works after all that.
    assert front.do(BLKIF_OP_READ, 8, 0, [(ref, 0, 0)])[2] == BLKIF_RSP_OKAY


def test_grant_refs_out_of_range_or_not_granted_to_dom0_get_error(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, image: Path) -> None:
    front = BlkFront(ops, 1)
    dev = attach(blkback, front, disk)
    front.fill(0x20, b"secret" * 600)
    other = front.grant(20, 0x20, to=2)  # granted, but to domain 2
    never = 21  # never granted
    out_of_range = 4 * PAGE_SIZE // 8 + 5  # past the 4-frame table
    good = front.grant(22, 0x21)
    for req_id, gref in ((1, other), (2, never), (3, out_of_range), (4, 0xFFFF_FFFF)):
        front.queue(BLKIF_OP_READ, req_id, 0, [(gref, 0, 0)])
    # A request whose second segment is bad moves nothing, not even its first segment.
    front.queue(BLKIF_OP_READ, 5, 0, [(good, 0, 0), (never, 0, 0)])
    front.push()
    assert [r[2] for r in front.responses(5)] == [BLKIF_RSP_ERROR] * 5
    assert front.page(0x20) == (b"secret" * 600)[:3600] + bytes(PAGE_SIZE - 3600)
    assert front.page(0x21) == bytes(PAGE_SIZE)
    assert not ops.mapped(1, good)  # the first segment's mapping was undone
    assert front.do(BLKIF_OP_READ, 6, 4, [(good, 0, 0)]) == (6, BLKIF_OP_READ, BLKIF_RSP_OKAY)
    assert front.page(0x21)[:SECTOR_SIZE] == sector_pattern(4)
    assert dev.connected


def test_readonly_grant_refused_for_a_read_into_the_guest_but_fine_for_a_write(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, image: Path) -> None:
    front = BlkFront(ops, 1)
    attach(blkback, front, disk)
    front.fill(0x20, b"R" * PAGE_SIZE)
    ro = front.grant(10, 0x20, readonly=True)
    assert front.do(BLKIF_OP_READ, 1, 0, [(ro, 0, 7)]) == (1, BLKIF_OP_READ, BLKIF_RSP_ERROR)
    assert front.page(0x20) == b"R" * PAGE_SIZE  # the backend wrote nothing into it
    assert front.do(BLKIF_OP_WRITE, 2, 40, [(ro, 0, 1)]) == (2, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)
    assert on_disk(image, 40, 2) == b"R" * 2 * SECTOR_SIZE


# -- batching and ordering ----------------------------------------------------------------------

def test_a_batch_costs_one_notification_each_way_and_the_push_is_reported(
        ops: GrantOps, disk: FileBlockBackend) -> None:
    pushes: list[tuple[str, int, int, bool]] = []
    backend = Blkback(idle_wait_s=0.2, on_ring_push=lambda *a: pushes.append(a))
    try:
        front = BlkFront(ops, 1)
        dev = attach(backend, front, disk)
        for i in range(8):
            front.queue(BLKIF_OP_READ, i, i, [(front.grant(10 + i, 0x20 + i), 0, 0)])
        assert front.push() is True  # one send for 8 requests
        backend.start()
        got = front.responses(8)
        assert sorted(r[0] for r in got) == list(range(8))
        assert all(front.page(0x20 + i)[:SECTOR_SIZE] == sector_pattern(i) for i in range(8))
        if front.evtchn.received == 0:  # the guest found the responses before it waited
            assert front.evtchn.wait(TIMEOUT)
        backend.loop.stop()  # the backend thread is done: all it did is visible
        assert front.evtchn.consume() == 0 and front.evtchn.received == 1
        assert front.evtchn.notifications == 1 and dev.notifications_received == 1
        assert dev.stats.notifications_sent == 1 and dev.stats.batches == 1
        assert pushes == [("blkif/d1/51712", 8, 1, True)]
        # The backend re-armed req_event at req_cons + 1: the next request notifies again.
        assert front.sring.req_event == 9
    finally:
        backend.stop()


def read_batch(front: BlkFront, sectors: list[int]) -> None:
    for i, sector in enumerate(sectors):
        front.queue(BLKIF_OP_READ, 100 + i, sector, [(front.grant(10 + i, 0x20 + i), 0, 1)])
    front.push()


@pytest.mark.parametrize("reorder", [False, True])
def test_reorder_serves_a_batch_by_sector_and_each_id_completes_once_with_its_data(
        ops: GrantOps, disk: FileBlockBackend, reorder: bool) -> None:
    backend = Blkback(idle_wait_s=0.2, reorder=reorder)
    backend.start()
    try:
        front = BlkFront(ops, 1)
        attach(backend, front, disk)
        sectors = [50, 10, 40, 20, 60, 30]
        read_batch(front, sectors)
        got = front.responses(len(sectors))
        ids = [r[0] for r in got]
        by_sector = [100 + sectors.index(s) for s in sorted(sectors)]
        assert ids == (by_sector if reorder else [100 + i for i in range(len(sectors))])
        assert sorted(ids) == [100 + i for i in range(len(sectors))]  # each exactly once
        assert all(r[1:] == (BLKIF_OP_READ, BLKIF_RSP_OKAY) for r in got)
        for i, sector in enumerate(sectors):  # the frontend matches data by id, not order
            page = front.page(0x20 + i)
            assert page[:2 * SECTOR_SIZE] == sector_pattern(sector) + sector_pattern(sector + 1)
    finally:
        backend.stop()


def test_reorder_keeps_flush_as_a_fence(ops: GrantOps, disk: FileBlockBackend) -> None:
    backend = Blkback(idle_wait_s=0.2, reorder=True)
    backend.start()
    try:
        front = BlkFront(ops, 1)
        attach(backend, front, disk)
        plan = [(BLKIF_OP_READ, 30), (BLKIF_OP_READ, 10), (BLKIF_OP_FLUSH_DISKCACHE, 0),
                (BLKIF_OP_READ, 20), (BLKIF_OP_READ, 5)]
        for i, (op, sector) in enumerate(plan):
            segs = [(front.grant(10 + i, 0x20 + i), 0, 0)] if op == BLKIF_OP_READ else []
            front.queue(op, i, sector, segs)
        front.push()
        assert [r[0] for r in front.responses(len(plan))] == [1, 0, 2, 4, 3]
    finally:
        backend.stop()


# -- hostile frontends --------------------------------------------------------------------------

def test_indices_past_the_ring_disconnect_that_frontend_only(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, image: Path) -> None:
    hostile, honest = BlkFront(ops, 1), BlkFront(ops, 2)
    reasons: list[str] = []
    told = threading.Event()

    def on_disconnect(reason: str) -> None:
        reasons.append(reason)
        told.set()

    bad = attach(blkback, hostile, disk, on_disconnect=on_disconnect)
    good = attach(blkback, honest, disk)
    hostile.sring.req_prod = 1000  # 1000 requests published on a ring of 32
    hostile.evtchn.notify()
    assert told.wait(TIMEOUT)
    # The backend closed its end: the guest's end was woken and sees it.
    assert hostile.evtchn.peer_closed
    assert not bad.connected and "hostile req_prod" in bad.disconnect_reason
    assert reasons == [bad.disconnect_reason]
    assert not ops.mapped(1, RING_REF)  # its ring is unmapped: the guest may take it back
    assert hostile.sring.rsp_prod == 0  # nothing was answered from the garbage
    honest.fill(0x20, b"still served" * 300)
    ref = honest.grant(10, 0x20)
    assert honest.do(BLKIF_OP_WRITE, 9, 100, [(ref, 0, 0)]) == (9, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)
    assert on_disk(image, 100, 1) == (b"still served" * 300)[:SECTOR_SIZE]
    assert good.connected


def test_a_port_closed_under_the_backend_disconnects_that_device(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend) -> None:
    """Domain teardown may close Dom0's end of a port: the backend lets go of that device."""
    gone, honest = BlkFront(ops, 1), BlkFront(ops, 2)
    told = threading.Event()
    dev = attach(blkback, gone, disk, on_disconnect=lambda _reason: told.set())
    attach(blkback, honest, disk)
    dev.channel.close()
    assert told.wait(TIMEOUT)
    assert not dev.connected and "closed" in dev.disconnect_reason
    assert not ops.mapped(1, RING_REF)
    assert honest.do(BLKIF_OP_READ, 1, 3, [(honest.grant(10, 0x20), 0, 0)])[2] == BLKIF_RSP_OKAY
    assert blkback.loop.service_errors == 0


class RacingDisk:
    """A disk that, during the first write, lets the frontend rewrite the slot being served and
    publish one more request: what a guest on another vCPU could do at that instant."""

    def __init__(self, inner: FileBlockBackend, front: BlkFront) -> None:
        self.inner = inner
        self.front = front
        self.raced = False

    @property
    def sectors(self) -> int:
        return self.inner.sectors

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def read(self, lba: int, count: int) -> bytes:
        return self.inner.read(lba, count)

    def write(self, lba: int, data: bytes) -> None:
        if not self.raced:
            self.raced = True
            evil = BlkReq()
            evil.operation, evil.nr_segments, evil.id, evil.sector_number = BLKIF_OP_WRITE, 1, 999, 0
            evil.seg[0].gref, evil.seg[0].first_sect, evil.seg[0].last_sect = 10, 0, 7
            self.front.sring.slot(0)[:ctypes.sizeof(BlkReq)] = bytes(evil)
            self.front.queue(0xEE, 777)  # req_prod moves while the backend is busy
            self.front.ring.push_requests()  # no send: the backend's final check must find it
        self.inner.write(lba, data)

    def flush(self) -> None:
        self.inner.flush()


def test_request_rewritten_and_req_prod_moved_while_served(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, image: Path) -> None:
    front = BlkFront(ops, 1)
    racing = RacingDisk(disk, front)
    blkback.connect(front.link, 51712, RING_REF, front.port, racing)
    front.fill(0x20, b"W" * PAGE_SIZE)
    assert front.do(BLKIF_OP_WRITE, 42, 7, [(front.grant(10, 0x20), 0, 0)]) == (
        42, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)
    assert racing.raced
    # The request was served as it was when copied out: sector 7, one sector, id 42.
    assert on_disk(image, 7, 1) == b"W" * SECTOR_SIZE
    assert on_disk(image, 0, 1) == sector_pattern(0)  # the rewritten slot was never read again
    assert on_disk(image, 8, 1) == sector_pattern(8)
    # The request published meanwhile was found by the final check and answered.
    assert front.responses(1) == [(777, 0xEE, BLKIF_RSP_EOPNOTSUPP)]


def test_a_silent_frontend_costs_nothing_and_stop_is_prompt(
        ops: GrantOps, disk: FileBlockBackend) -> None:
    before = set(threading.enumerate())
    backend = Blkback(idle_wait_s=0.2)
    backend.start()
    front = BlkFront(ops, 1)
    dev = attach(backend, front, disk)
    front.queue(BLKIF_OP_READ, 1, 0, [(front.grant(10, 0x20), 0, 0)])
    front.ring.push_requests()  # published, never notified, never collected
    backend.stop(timeout_s=TIMEOUT)
    assert set(threading.enumerate()) <= before
    assert not dev.connected and not ops.mapped(1, RING_REF)
    assert front.evtchn.peer_closed or front.evtchn.wait(TIMEOUT)


# -- xenbus ---------------------------------------------------------------------------------------

@pytest.fixture
def xenstore() -> Iterator[Xenstored]:
    daemon = Xenstored(idle_wait_s=0.2)  # Dom0 and these frontends use local connections
    yield daemon


@pytest.fixture
def glue(xenstore: Xenstored) -> Iterator[XenbusGlue]:
    dom0 = XsClient(xenstore.connect_local(0))
    for domid in (1, 2):
        make_domain_home(dom0, domid)
    g = XenbusGlue(XsClient(xenstore.connect_local(0)), "vbd", idle_wait_s=0.1)
    g.start()
    yield g
    g.stop()


def fe_publish(xs: XsClient, fe: str, front: BlkFront, ring_ref: int = RING_REF) -> None:
    be = xs.read_text(f"{fe}/backend")
    xs.watch(f"{be}/state", "otherend")
    wait_for_state(xs, f"{be}/state", {XenbusState.InitWait}, TIMEOUT, "otherend")
    xs.write(f"{fe}/ring-ref", str(ring_ref))
    xs.write(f"{fe}/event-channel", str(front.port))
    xs.write(f"{fe}/protocol", "x86_32-abi")
    xs.write(f"{fe}/state", str(int(XenbusState.Initialised)))


def test_xenbus_handshake_connects_serves_and_closes(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, xenstore: Xenstored,
        glue: XenbusGlue) -> None:
    front = BlkFront(ops, 1)
    dev = glue.add_device(1, 51712, blkback.vbd(front.link, 51712, disk),
                          backend_entries={"params": "disk.img", "mode": "w"})
    xs = XsClient(xenstore.connect_local(1))
    fe, be = "/local/domain/1/device/vbd/51712", "/local/domain/0/backend/vbd/1/51712"
    assert (dev.frontend_path, dev.backend_path) == (fe, be)
    fe_publish(xs, fe, front)
    assert xs.read(f"{be}/feature-flush-cache") == b"1"
    wait_for_state(xs, f"{be}/state", {XenbusState.Connected}, TIMEOUT, "otherend")
    assert glue.wait_connected(dev, TIMEOUT)
    assert xs.read(f"{be}/sectors") == str(DISK_SECTORS).encode()
    assert xs.read(f"{be}/sector-size") == b"512"
    assert xs.read(f"{be}/info") == b"0"
    xs.write(f"{fe}/state", str(int(XenbusState.Connected)))
    front.fill(0x20, b"via xenbus" * 400)
    ref = front.grant(10, 0x20)
    assert front.do(BLKIF_OP_WRITE, 1, 64, [(ref, 0, 7)])[2] == BLKIF_RSP_OKAY
    assert front.do(BLKIF_OP_READ, 2, 64, [(front.grant(11, 0x21), 0, 7)])[2] == BLKIF_RSP_OKAY
    assert front.page(0x21) == front.page(0x20)
    assert ops.mapped(1, RING_REF)
    # blkfront closes: the backend unmaps, unbinds and follows to Closing, then Closed.
    xs.write(f"{fe}/state", str(int(XenbusState.Closing)))
    wait_for_state(xs, f"{be}/state", {XenbusState.Closing}, TIMEOUT, "otherend")
    assert not ops.mapped(1, RING_REF)
    assert front.evtchn.peer_closed or front.evtchn.wait(TIMEOUT)
    xs.write(f"{fe}/state", str(int(XenbusState.Closed)))
    wait_for_state(xs, f"{be}/state", {XenbusState.Closed}, TIMEOUT, "otherend")
    assert not glue.is_connected(dev)


def test_xenbus_bad_ring_ref_or_hostile_ring_is_fatal_for_that_device_only(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, xenstore: Xenstored,
        glue: XenbusGlue) -> None:
    bad_front, good_front = BlkFront(ops, 1), BlkFront(ops, 2)
    bad = glue.add_device(1, 51712, blkback.vbd(bad_front.link, 51712, disk))
    good = glue.add_device(2, 51712, blkback.vbd(good_front.link, 51712, disk))
    bad_xs, good_xs = XsClient(xenstore.connect_local(1)), XsClient(xenstore.connect_local(2))
    dom0 = XsClient(xenstore.connect_local(0))
    # Domain 1 publishes a ring-ref it never granted.
    fe_publish(bad_xs, bad.frontend_path, bad_front, ring_ref=300)
    wait_for_state(bad_xs, f"{bad.backend_path}/state", {XenbusState.Closing}, TIMEOUT,
                   "otherend")
    error = dom0.read_text(f"/local/domain/0/error{bad.backend_path}/error")
    assert "ring-ref 300" in error and error == glue.error(bad)
    # Domain 2 connects, then breaks its ring: the backend reports it and closes.
    fe_publish(good_xs, good.frontend_path, good_front)
    assert glue.wait_connected(good, TIMEOUT)
    assert read_state(dom0, f"{good.backend_path}/state") == XenbusState.Connected
    good_front.sring.req_prod = 0x8000_0000
    good_front.evtchn.notify()
    wait_for_state(good_xs, f"{good.backend_path}/state", {XenbusState.Closing}, TIMEOUT,
                   "otherend")
    assert "ring error" in glue.error(good)
    assert not ops.mapped(2, RING_REF)


def test_xenbus_frontend_that_never_publishes_stays_in_initwait(
        ops: GrantOps, blkback: Blkback, disk: FileBlockBackend, xenstore: Xenstored,
        glue: XenbusGlue) -> None:
    silent, live = BlkFront(ops, 1), BlkFront(ops, 2)
    quiet = glue.add_device(1, 51712, blkback.vbd(silent.link, 51712, disk))
    busy = glue.add_device(2, 51712, blkback.vbd(live.link, 51712, disk))
    fe_publish(XsClient(xenstore.connect_local(2)), busy.frontend_path, live)
    assert glue.wait_connected(busy, TIMEOUT)
    assert not glue.wait_connected(quiet, 0.3)  # bounded: returns, does not hang
    dom0 = XsClient(xenstore.connect_local(0))
    assert read_state(dom0, f"{quiet.backend_path}/state") == XenbusState.InitWait
    assert live.do(BLKIF_OP_READ, 1, 2, [(live.grant(10, 0x20), 0, 0)])[2] == BLKIF_RSP_OKAY
