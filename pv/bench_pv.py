"""`hvmlab bench pv`: what a request costs through blkback and netback, driven by Python frontends over guest memory, grants and rings, against an event-channel round trip measured in the same run (Xen io/ring.h, io/blkif.h, io/netif.h)."""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from devicemodel.ide_disk import SECTOR_SIZE, FileBlockBackend
from hvm.bench import _floor_round_trip
from hvm.evtchn import EventChannel
from hvm.memory import PAGE_SIZE, GuestMemory
from pv.backends import LocalFrontendLink
from pv.backends.blkback import BLKIF_OP_READ, BLKIF_RSP_OKAY, Blkback
from pv.backends.netback import RX_COPY, RX_FLIP, Dom0Pages, Netback, Vif
from pv.grant_table import Domain, GNTST_okay, GrantOps, GrantTable
from pv.layouts import (
    X86_32,
    blkif_request,
    blkif_response,
    netif_rx_request,
    netif_rx_response,
    netif_tx_request,
    netif_tx_response,
)
from pv.ring import FrontRing, SharedRing

REPEATS = 5
DEFAULT_IOS = 2000
BATCH = 32  # a full blkif ring (32 slots); netif rings hold 256
FRAME_BYTES = 1514  # a full Ethernet frame (MTU 1500 + header), without its FCS
WAIT_S = 5.0  # a backend that does not answer within this is a failure, not a slow figure

DOM0, DOMU = 0, 1
TABLE_GFNS = [8, 9, 10, 11]  # where the domain builder puts a PV guest's grant table
RING_GFN, RX_RING_GFN = 0x10, 0x11
RING_REF, RX_RING_REF = 1, 2
DATA_GFN, DATA_REF = 0x20, 16  # blk data pages / net tx pages: BATCH of them
RX_GFN, RX_REF = 0x80, 64  # net rx pages
DOMU_PAGES = 256
DOM0_POOL = range(1, 65)

BlkReq, BlkRsp = blkif_request(X86_32), blkif_response(X86_32)
TxReq, TxRsp = netif_tx_request(X86_32), netif_tx_response(X86_32)
RxReq, RxRsp = netif_rx_request(X86_32), netif_rx_response(X86_32)


class BenchError(RuntimeError):
    """A backend did not answer, or answered with an error: no figure can be given."""


@dataclass
class Sample:
    seconds: float
    items: int
    to_backend: int  # notifications the frontend sent (or, for rx, frames the bridge queued)
    to_frontend: int  # notifications the backend sent


def _domains() -> tuple[GrantOps, GuestMemory, GrantTable]:
    ops = GrantOps.of([Domain(DOM0, GuestMemory(len(DOM0_POOL) * PAGE_SIZE + PAGE_SIZE)),
                       Domain(DOMU, GuestMemory(DOMU_PAGES * PAGE_SIZE))])
    if ops.setup_table(DOMU, TABLE_GFNS) != GNTST_okay:  # pragma: no cover - fixed layout
        raise BenchError("cannot set up the frontend's grant table")
    return ops, ops.domains[DOMU], ops.tables[DOMU]


def _ring(memory: GuestMemory, gfn: int, req: Any, rsp: Any) -> FrontRing:
    sring = SharedRing(memory.p2m(gfn).view(), ctypes.sizeof(req), ctypes.sizeof(rsp))
    sring.init()
    return FrontRing(sring)


def _collect(ring: FrontRing, channel: EventChannel, want: int,
             check: Callable[[bytes], None]) -> int:
    """Take `want` responses, sleeping on `channel` between them with the final check, and
    re-arm rsp_event at the end (as Linux's frontends end their interrupt handler with
    RING_FINAL_CHECK_FOR_RESPONSES): the next response notifies. Returns the wake-ups."""
    got = woken = 0
    while True:
        while got < want and ring.unconsumed_responses():
            check(ring.take_response())
            got += 1
        if ring.final_check_for_responses():
            if got >= want:
                raise BenchError("the backend answered more than was asked")
            continue
        if got >= want:
            return woken
        if not channel.wait(WAIT_S):
            raise BenchError(f"the backend answered {got} of {want} within {WAIT_S:g} s")
        woken += 1


def _await_idle(ring: FrontRing) -> None:
    """Wait until the backend has re-armed req_event past everything published (its
    RING_FINAL_CHECK_FOR_REQUESTS: it is done and about to sleep), so the next push notifies:
    one notification each way per round. Without this wait a frontend that answers fast
    catches the backend still awake and pushes without a notification. The wait is idle
    time between rounds: it is not in the figures."""
    want = (ring.sring.req_prod + 1) & 0xFFFF_FFFF
    deadline = time.monotonic() + WAIT_S
    while ring.sring.req_event != want:
        if time.monotonic() > deadline:
            raise BenchError(f"the backend did not re-arm req_event within {WAIT_S:g} s")
        time.sleep(0)  # let the backend's thread have the GIL


class BlkBench:
    """blkback serving a raw image in a temporary file to one Python blkfront."""

    def __init__(self, directory: Path) -> None:
        ops, self.memory, table = _domains()
        path = directory / "bench.img"
        with open(path, "wb") as f:
            f.truncate(BATCH * PAGE_SIZE)
        self.disk = FileBlockBackend(path)
        self.link = LocalFrontendLink(DOMU, self.memory, ops)
        self.ring = _ring(self.memory, RING_GFN, BlkReq, BlkRsp)
        table.grant_foreign_access(RING_REF, DOM0, RING_GFN)
        for i in range(BATCH):  # reads write into these pages: writable grants
            table.grant_foreign_access(DATA_REF + i, DOM0, DATA_GFN + i)
        port = self.link.alloc_unbound()
        self.channel = self.link.guest_end(port)
        self.blkback = Blkback()
        self.blkback.start()
        self.device = self.blkback.connect(self.link, 0, RING_REF, port, self.disk)
        self._next_id = 0

    def run(self, rounds: int, batch: int) -> Sample:
        """`rounds` times: queue `batch` 4 KiB reads, push once, wait for every response.
        Timed from the push to the last response taken (see _await_idle)."""
        sent = 0
        before = self.device.stats.notifications_sent
        elapsed = 0.0
        for _ in range(rounds):
            for i in range(batch):
                req = BlkReq()
                req.operation, req.nr_segments, req.id = BLKIF_OP_READ, 1, self._next_id
                req.sector_number = i * (PAGE_SIZE // SECTOR_SIZE)
                req.seg[0].gref, req.seg[0].first_sect, req.seg[0].last_sect = DATA_REF + i, 0, 7
                self._next_id += 1
                self.ring.put_request(bytes(req))
            _await_idle(self.ring)
            start = time.perf_counter()
            if self.ring.push_requests():
                self.channel.notify()
                sent += 1
            _collect(self.ring, self.channel, batch, _blk_ok)
            elapsed += time.perf_counter() - start
        # The backend counts a notification just after sending it, and the last response can
        # be taken before that: wait until it is idle, so this sample gets its own count.
        _await_idle(self.ring)
        return Sample(elapsed, rounds * batch, sent,
                      self.device.stats.notifications_sent - before)

    def close(self) -> None:
        self.blkback.stop()
        self.link.close()
        self.disk.close()


def _blk_ok(raw: bytes) -> None:
    if BlkRsp.from_buffer_copy(raw).status != BLKIF_RSP_OKAY:
        raise BenchError("blkback answered a read with an error")


class NetBench:
    """netback serving one Python netfront: tx from granted pages, rx into offered pages
    (copy: writable grants; flip: GTF_accept_transfer offers, renewed after each flip)."""

    def __init__(self, rx_mode: str) -> None:
        ops, self.memory, self.table = _domains()
        self.rx_mode = rx_mode
        self.link = LocalFrontendLink(DOMU, self.memory, ops)
        self.tx = _ring(self.memory, RING_GFN, TxReq, TxRsp)
        self.rx = _ring(self.memory, RX_RING_GFN, RxReq, RxRsp)
        self.table.grant_foreign_access(RING_REF, DOM0, RING_GFN)
        self.table.grant_foreign_access(RX_RING_REF, DOM0, RX_RING_GFN)
        self.frame = bytes([0xFF] * 6 + [0x00, 0x16, 0x3E, 0, 0, DOMU, 0x88, 0xB5]) + \
            bytes(i & 0xFF for i in range(FRAME_BYTES - 14))
        for i in range(BATCH):  # tx pages: the frame, granted read-only
            self.memory.write((DATA_GFN + i) * PAGE_SIZE, self.frame)
            self.table.grant_foreign_access(DATA_REF + i, DOM0, DATA_GFN + i, readonly=True)
        port = self.link.alloc_unbound()
        self.channel = self.link.guest_end(port)
        self.sent_frames = 0
        self.netback = Netback(Dom0Pages(ops.domains[DOM0], DOM0_POOL))
        self.netback.start()
        self.vif: Vif = self.netback.connect(self.link, 0, RING_REF, RX_RING_REF, port,
                                             rx_mode=rx_mode, tx_sink=self._sink)
        for i in range(BATCH):
            self._post(i)
        if self.rx.push_requests():
            self.channel.notify()
        self._tx_id = 0

    def _sink(self, frame: bytes) -> None:
        self.sent_frames += 1

    def _post(self, i: int) -> None:
        """Offer rx buffer i (its page, by the mode's kind of grant) with an rx request."""
        ref, gfn = RX_REF + i, RX_GFN + i
        if self.rx_mode == RX_FLIP:
            self.table.grant_foreign_transfer(ref, DOM0, gfn)
        else:
            self.table.grant_foreign_access(ref, DOM0, gfn)
        req = RxReq()
        req.id, req.gref = i, ref
        self.rx.put_request(bytes(req))

    def run_tx(self, rounds: int, batch: int) -> Sample:
        """`rounds` times: `batch` tx requests of one frame each, pushed once; timed from the
        push to the last tx response taken."""
        sent = 0
        before = self.vif.stats.notifications_sent
        elapsed = 0.0
        for _ in range(rounds):
            for i in range(batch):
                req = TxReq()
                req.gref, req.offset, req.flags, req.id, req.size = (
                    DATA_REF + i, 0, 0, self._tx_id & 0xFFFF, FRAME_BYTES)
                self._tx_id += 1
                self.tx.put_request(bytes(req))
            _await_idle(self.tx)
            start = time.perf_counter()
            if self.tx.push_requests():
                self.channel.notify()
                sent += 1
            _collect(self.tx, self.channel, batch, _tx_ok)
            elapsed += time.perf_counter() - start
        return Sample(elapsed, rounds * batch, sent, self.vif.stats.notifications_sent - before)

    def run_rx(self, rounds: int, batch: int) -> Sample:
        """`rounds` times: the bridge's side queues `batch` frames for the vif (as a frame from
        another vif arrives), the frontend takes the responses and offers each buffer again.
        Timed from the first frame queued to the last rx response taken."""
        before = self.vif.stats.notifications_sent
        reposted: list[int] = []
        elapsed = 0.0

        def take(raw: bytes) -> None:
            reposted.append(self._rx_ok(raw))
        for _ in range(rounds):
            reposted.clear()
            start = time.perf_counter()
            for _ in range(batch):
                if not self.vif.deliver(self.frame):
                    raise BenchError("netback dropped a frame (its rx queue is full)")
            _collect(self.rx, self.channel, batch, take)
            elapsed += time.perf_counter() - start
            for i in reposted:
                self._post(i)
            if self.rx.push_requests():
                self.channel.notify()
        return Sample(elapsed, rounds * batch, rounds * batch,
                      self.vif.stats.notifications_sent - before)

    def _rx_ok(self, raw: bytes) -> int:
        rsp = RxRsp.from_buffer_copy(raw)
        if rsp.status != len(self.frame):
            raise BenchError(f"netback answered an rx buffer with status {rsp.status}")
        if self.rx_mode == RX_FLIP and self.table.end_foreign_transfer(RX_REF + rsp.id) is None:
            raise BenchError("an rx response came but no page was transferred")
        return int(rsp.id)

    def close(self) -> None:
        self.netback.stop()
        self.link.close()


def _tx_ok(raw: bytes) -> None:
    if TxRsp.from_buffer_copy(raw).status != 0:
        raise BenchError("netback answered a tx request with an error")


def _figure(label: str, samples: list[Sample], per: str) -> dict[str, Any]:
    values = [s.seconds / s.items * 1e6 for s in samples]
    items = sum(s.items for s in samples)
    return {"label": label, "median": statistics.median(values), "min": min(values),
            "max": max(values), "unit": "us", "per": per,
            "notifications_to_backend_per_item": sum(s.to_backend for s in samples) / items,
            "notifications_to_frontend_per_item": sum(s.to_frontend for s in samples) / items}


def _repeat(measure: Callable[[], Sample]) -> list[Sample]:
    measure()  # warm-up: first-touch of pages, thread start, caches
    return [measure() for _ in range(REPEATS)]


def measure(ios: int, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every figure of `bench pv`, in one run: ios requests (or packets) per measurement."""
    say = progress or (lambda _text: None)
    n = max(1, ios)
    batches = max(1, n // BATCH)
    figures: dict[str, dict[str, Any]] = {}
    say("event-channel round trip between two threads (the floor)")
    floor = [Sample(_floor_round_trip(n), n, n, n) for _ in range(REPEATS + 1)][1:]
    figures["floor"] = _figure("event-channel round trip between two threads (the floor)",
                               floor, "round trip")
    with tempfile.TemporaryDirectory(prefix="hvmlab-bench-pv-") as tmp:
        blk = BlkBench(Path(tmp))
        try:
            say("blkif: one request, one notification each way")
            figures["blk_single"] = _figure(
                "blkif 4 KiB read, one request per notification (round trip)",
                _repeat(partial(blk.run, n, 1)), "request")
            say(f"blkif: {BATCH} requests per notification")
            figures["blk_batch"] = _figure(
                f"blkif 4 KiB read, {BATCH} requests per notification (per request)",
                _repeat(partial(blk.run, batches, BATCH)), "request")
        finally:
            blk.close()
    for mode in (RX_COPY, RX_FLIP):
        net = NetBench(mode)
        try:
            if mode == RX_COPY:
                say("netback tx by grant copy")
                figures["net_tx_copy"] = _figure(
                    f"netback tx by grant copy, {FRAME_BYTES}-byte frame (round trip)",
                    _repeat(partial(net.run_tx, n, 1)), "packet")
                figures["net_tx_copy_batch"] = _figure(
                    f"netback tx by grant copy, {BATCH} per notification (per packet)",
                    _repeat(partial(net.run_tx, batches, BATCH)), "packet")
            what = "grant copy" if mode == RX_COPY else "page flip (GNTTABOP_transfer)"
            say(f"netback rx by {what}")
            figures[f"net_rx_{mode}"] = _figure(
                f"netback rx by {what}, {FRAME_BYTES}-byte frame (round trip)",
                _repeat(partial(net.run_rx, n, 1)), "packet")
            figures[f"net_rx_{mode}_batch"] = _figure(
                f"netback rx by {what}, {BATCH} queued at once (per packet)",
                _repeat(partial(net.run_rx, batches, BATCH)), "packet")
        finally:
            net.close()
    base = figures["floor"]["median"]
    ratios = {f"{key}_vs_floor": fig["median"] / base for key, fig in figures.items()
              if key != "floor"}
    ratios["rx_flip_vs_rx_copy"] = figures["net_rx_flip"]["median"] / figures["net_rx_copy"]["median"]
    ratios["rx_flip_vs_rx_copy_batched"] = (figures["net_rx_flip_batch"]["median"]
                                            / figures["net_rx_copy_batch"]["median"])
    ratios["blk_batch_vs_single"] = figures["blk_batch"]["median"] / figures["blk_single"]["median"]
    batch = figures["blk_batch"]
    per_notification = {
        "blk_batch_requests_per_notification_to_backend":
            1 / batch["notifications_to_backend_per_item"]
            if batch["notifications_to_backend_per_item"] else None,
        "blk_batch_responses_per_notification_to_frontend":
            1 / batch["notifications_to_frontend_per_item"]
            if batch["notifications_to_frontend_per_item"] else None,
    }
    return {"figures": figures, "ratios": ratios, "batching": per_notification,
            "repeats": REPEATS, "ios_per_measurement": n, "batch": BATCH,
            "batches_per_measurement": batches, "frame_bytes": FRAME_BYTES,
            "driven_by": "Python frontends in the benchmark process (pv.backends."
                         "LocalFrontendLink, FrontRing over GuestMemory), no guest code: timed "
                         "from the push (or the first frame queued) to the last response taken, "
                         "so the backend's work and two thread hand-offs per round trip; the "
                         "frontend pushes only once the backend re-armed req_event (one "
                         "notification each way); no vCPU runs, so a flip never waits for one",
            "disk": "raw image in a temporary file (page cache)"}


def bench_pv(ios: int, as_json: bool) -> int:
    """The `hvmlab bench pv` command."""
    status = Console(stderr=True)
    try:
        if as_json:
            result = measure(ios)
        else:
            with status.status("bench pv") as spinner:
                result = measure(ios, lambda text: spinner.update(text))
    except BenchError as exc:
        print(f"hvmlab: error: bench pv: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result))
        return 0
    out = Console()
    figures = result["figures"]
    base = figures["floor"]["median"]
    table = Table(title=f"hvmlab bench pv (median of {REPEATS}; {result['ios_per_measurement']:,} "
                        f"requests or packets per measurement, batches of {BATCH})")
    for col in ("figure", "median", "min", "max", "x floor", "notifies in/out per item"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for fig in figures.values():
        table.add_row(str(fig["label"]), f"{fig['median']:.2f} us", f"{fig['min']:.2f}",
                      f"{fig['max']:.2f}", f"{fig['median'] / base:.2f}x",
                      f"{fig['notifications_to_backend_per_item']:.2f} / "
                      f"{fig['notifications_to_frontend_per_item']:.2f}")
    out.print(table)
    for key, value in result["batching"].items():
        if value is not None:
            out.print(f"{key}: {value:.1f}")
    for key in ("blk_batch_vs_single", "rx_flip_vs_rx_copy", "rx_flip_vs_rx_copy_batched"):
        out.print(f"{key}: {result['ratios'][key]:.2f}")
    out.print(f"Driven by {result['driven_by']}. Disk: {result['disk']}. For rx, 'notifies in' "
              "counts the frames the bridge's side queued (each kicks netback's thread).")
    return 0
