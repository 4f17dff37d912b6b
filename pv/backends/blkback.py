"""Block backend: serves blkif rings from raw disk images, data through grant maps (Xen io/blkif.h, Linux xen-blkback)."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devicemodel.ide_disk import SECTOR_SIZE, BlockBackend, DiskError
from hvm.evtchn import EventChannel, EventChannelError
from hvm.memory import PAGE_SIZE
from pv.backends import (
    DOMID_DOM0,
    BackendLoop,
    ConnectError,
    FrontendLink,
    RingPushHook,
    SplitBackend,
    StepHook,
    grant_entry,
    status_name,
)
from pv.grant_table import GNTST_NAMES, GNTST_okay, GrantOps, HostFrame
from pv.layouts import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    Arch,
    arch_named,
    blkif_request,
    blkif_response,
)
from pv.ring import BackRing, RingError, SharedRing

if TYPE_CHECKING:
    from pv.backends.xenbus_glue import FrontendNodes

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE  # first_sect/last_sect index 512-byte sectors

# The "protocol" node a frontend writes (XEN_IO_PROTO_ABI_*), and the layout it means.
PROTOCOLS = {"x86_32-abi": "x86_32", "x86_64-abi": "x86_64"}
DEFAULT_PROTOCOL = "x86_32-abi"  # hvmlab's PV guests are 32-bit

OP_NAMES = {BLKIF_OP_READ: "read", BLKIF_OP_WRITE: "write", BLKIF_OP_WRITE_BARRIER: "barrier",
            BLKIF_OP_FLUSH_DISKCACHE: "flush"}
_FENCES = (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE)


@dataclass(frozen=True)
class Segment:
    gref: int
    first_sect: int
    last_sect: int

    @property
    def sectors(self) -> int:
        return self.last_sect - self.first_sect + 1


@dataclass(frozen=True)
class BlkRequest:
    """One request as copied out of the ring (the only copy the backend looks at)."""

    operation: int
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...]

    @property
    def sectors(self) -> int:
        return sum(s.sectors for s in self.segments)


@dataclass
class BlkStats:
    requests: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    barriers: int = 0
    errors: int = 0  # responses with BLKIF_RSP_ERROR
    unsupported: int = 0  # responses with BLKIF_RSP_EOPNOTSUPP
    sectors_read: int = 0
    sectors_written: int = 0
    grant_ops: int = 0  # map and unmap operations
    batches: int = 0  # groups of requests answered with one push
    notifications_sent: int = 0


class BlkifDevice:
    """One connected vbd: the mapped ring, Dom0's end of its event channel, its disk."""

    def __init__(self, domid: int, devid: int, ring: BackRing, ring_handle: int,
                 channel: EventChannel, disk: BlockBackend, grant_ops: GrantOps, arch: Arch,
                 on_disconnect: Callable[[str], None] | None) -> None:
        self.domid = domid
        self.devid = devid
        self.name = f"blkif/d{domid}/{devid}"
        self.ring = ring
        self.ring_handles = (ring_handle,)
        self.channel = channel
        self.disk = disk
        self.grant_ops = grant_ops
        self.arch = arch
        self.on_disconnect = on_disconnect
        self.request_type = blkif_request(arch)
        self.response_type = blkif_response(arch)
        self.stats = BlkStats()
        self.connected = True
        self.disconnect_reason = ""
        self.lock = threading.RLock()  # held while the ring is served or torn down

    @property
    def notifications_received(self) -> int:
        return self.channel.received

    def decode(self, raw: bytes) -> BlkRequest:
        req = self.request_type.from_buffer_copy(raw)
        count = min(req.nr_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST)
        segs = tuple(Segment(s.gref, s.first_sect, s.last_sect) for s in req.seg[:count])
        return BlkRequest(req.operation, req.nr_segments, req.handle, req.id, req.sector_number,
                          segs)

    def response(self, req_id: int, operation: int, status: int) -> bytes:
        rsp = self.response_type()
        rsp.id, rsp.operation, rsp.status = req_id, operation, status
        return bytes(rsp)


class Blkback(SplitBackend):
    """The block backend: one thread serving every connected vbd's ring.

    A notification wakes the thread; it copies every published request out of the ring
    (once), validates it, serves the batch (in ring order, or sorted by sector with
    `reorder`; barriers and flushes stay fences), writes one response per request with the
    request's id, pushes them with the notify check and re-arms req_event with the final
    check. A frontend that breaks the ring protocol is disconnected; the others go on.
    """

    def __init__(self, *, reorder: bool = False, on_ring_push: RingPushHook | None = None,
                 on_step: StepHook | None = None,
                 idle_wait_s: float = 0.5, max_batches_per_wakeup: int = 4,
                 name: str = "blkback") -> None:
        self.reorder = reorder
        self.on_ring_push = on_ring_push
        self.on_step = on_step
        self.max_batches_per_wakeup = max_batches_per_wakeup
        self.loop = BackendLoop(name, idle_wait_s)
        self.devices: list[BlkifDevice] = []
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------------
    def connect(self, link: FrontendLink, devid: int, ring_ref: int, evtchn: int,
                disk: BlockBackend, *, protocol: str = DEFAULT_PROTOCOL,
                on_disconnect: Callable[[str], None] | None = None) -> BlkifDevice:
        """Map the frontend's ring grant, bind its port, and start serving the ring."""
        arch_name = PROTOCOLS.get(protocol)
        if arch_name is None:
            raise ConnectError(f"unknown blkif protocol {protocol!r}")
        arch = arch_named(arch_name)
        ops = link.grant_ops
        status, handle, frame = ops.map(DOMID_DOM0, link.domid, ring_ref)
        if status != GNTST_okay or frame is None:
            raise ConnectError(f"domain {link.domid}: ring-ref {ring_ref}: "
                               f"{GNTST_NAMES.get(status, status)} ({status})")
        sring = SharedRing(frame.view(), ctypes.sizeof(blkif_request(arch)),
                           ctypes.sizeof(blkif_response(arch)))
        try:
            channel = link.bind_evtchn(evtchn)
        except (EventChannelError, ValueError) as exc:
            ops.unmap(DOMID_DOM0, handle)
            raise ConnectError(f"domain {link.domid}: event-channel {evtchn}: {exc}") from exc
        # BACK_RING_ATTACH at the frontend's current producer (0 after SHARED_RING_INIT).
        ring = BackRing(sring, sring.rsp_prod)
        dev = BlkifDevice(link.domid, devid, ring, handle, channel, disk, ops, arch,
                          on_disconnect)
        dev.stats.grant_ops += 1
        with self._lock:
            self.devices.append(dev)
        self.loop.watch(channel, lambda: self.service(dev))
        self.loop.request(lambda: self.service(dev))  # requests queued before we bound
        return dev

    def _devices(self) -> list[BlkifDevice]:
        with self._lock:
            return list(self.devices)

    # -- the ring ------------------------------------------------------------------------------
    def service(self, dev: BlkifDevice) -> None:
        """Serve `dev`'s ring until it is empty and re-armed (or the batch budget is spent)."""
        with dev.lock:
            if not dev.connected:
                return
            if dev.channel.peer_closed or dev.channel.closed:
                self._fail(dev, "the event channel was closed")
                return
            try:
                self._serve(dev)
            except RingError as exc:
                self._fail(dev, f"ring error: {exc}")

    def _serve(self, dev: BlkifDevice) -> None:
        ring = dev.ring
        for _ in range(self.max_batches_per_wakeup):
            batch: list[bytes] = []
            while ring.unconsumed_requests():
                batch.append(ring.take_request())  # copied out of the slot, once
                if self.on_step is not None:
                    self._step_take(dev, batch[-1])
            if not batch:
                # RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event, then look again.
                if ring.final_check_for_requests():
                    continue
                return
            self._answer(dev, [dev.decode(raw) for raw in batch])
        self.loop.request(lambda: self.service(dev))  # let other devices in, then go on

    def _answer(self, dev: BlkifDevice, requests: list[BlkRequest]) -> None:
        order = _reordered(requests) if self.reorder else requests
        for req in order:
            status = self._execute(dev, req)
            raw = dev.response(req.id, req.operation, status)
            dev.ring.put_response(raw)
            if self.on_step is not None:
                rsp = dev.response_type.from_buffer_copy(raw)
                self.on_step("ring_response", dev.domid, {
                    "backend": self.loop.name, "ring": dev.name,
                    "index": (dev.ring.rsp_prod_pvt - 1) & 0xFFFF_FFFF,
                    "struct": "blkif_response", "hex": raw.hex(),
                    "fields": {"id": rsp.id, "operation": rsp.operation, "status": rsp.status},
                    "id": req.id})
        dev.stats.batches += 1
        notify = dev.ring.push_responses()
        if self.on_ring_push is not None:
            self.on_ring_push(dev.name, dev.ring.rsp_prod_pvt, dev.ring.sring.rsp_event, notify)
        if self.on_step is not None:
            self.on_step("ring_push", dev.domid, {
                "backend": self.loop.name, "ring": dev.name, "prod": dev.ring.rsp_prod_pvt,
                "event": dev.ring.sring.rsp_event, "notify": notify, "req_cons": dev.ring.req_cons,
                "batch": len(requests)})
        if notify:
            try:
                dev.channel.notify()
                dev.stats.notifications_sent += 1
            except EventChannelError:
                return
            if self.on_step is not None:
                self.on_step("event_send", dev.domid, {
                    "backend": self.loop.name, "port": dev.channel.port,
                    "remote_dom": dev.domid, "remote_port": dev.channel.remote_port})

    def _step_take(self, dev: BlkifDevice, raw: bytes) -> None:
        """A ring_take record: the request as copied out, req_cons just advanced."""
        assert self.on_step is not None
        req = dev.decode(raw)
        fields = {"operation": req.operation, "nr_segments": req.nr_segments,
                  "handle": req.handle, "id": req.id, "sector_number": req.sector_number,
                  "seg": [{"gref": s.gref, "first_sect": s.first_sect, "last_sect": s.last_sect}
                          for s in req.segments]}
        self.on_step("ring_take", dev.domid, {
            "backend": self.loop.name, "ring": dev.name, "frontend_port": dev.channel.remote_port,
            "index": (dev.ring.req_cons - 1) & 0xFFFF_FFFF, "req_cons": dev.ring.req_cons,
            "req_prod": dev.ring.sring.req_prod, "struct": "blkif_request",
            "hex": raw[:ctypes.sizeof(dev.request_type)].hex(), "fields": fields,
            "id": req.id, "op": OP_NAMES.get(req.operation, str(req.operation))})

    def _step_grant(self, dev: BlkifDevice, req: BlkRequest, op: str, ref: int, status: int,
                    before: dict[str, Any] | None, extra: dict[str, Any]) -> None:
        assert self.on_step is not None
        self.on_step("grant_op", dev.domid, {
            "backend": self.loop.name, "op": op, "grantee": DOMID_DOM0, "granter": dev.domid,
            "ref": ref, "status": status, "status_name": status_name(status),
            "entry_before": before, "entry_after": grant_entry(dev.grant_ops, dev.domid, ref),
            "id": req.id, **extra})

    def _execute(self, dev: BlkifDevice, req: BlkRequest) -> int:
        dev.stats.requests += 1
        status = self._dispatch(dev, req)
        if status == BLKIF_RSP_ERROR:
            dev.stats.errors += 1
        elif status == BLKIF_RSP_EOPNOTSUPP:
            dev.stats.unsupported += 1
        return status

    def _dispatch(self, dev: BlkifDevice, req: BlkRequest) -> int:
        op = req.operation
        if op not in OP_NAMES:
            return BLKIF_RSP_EOPNOTSUPP  # discard, indirect, and anything unknown
        if op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            # A read or write moves at least one segment; never more than the ring entry holds.
            if not 1 <= req.nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
                return BLKIF_RSP_ERROR
        elif req.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return BLKIF_RSP_ERROR
        if not all(s.first_sect <= s.last_sect < SECTORS_PER_PAGE for s in req.segments):
            return BLKIF_RSP_ERROR
        if req.segments and req.sector_number + req.sectors > dev.disk.sectors:
            return BLKIF_RSP_ERROR
        if op != BLKIF_OP_READ and req.segments and dev.disk.read_only:
            return BLKIF_RSP_ERROR
        try:
            if op == BLKIF_OP_READ:
                return self._read(dev, req)
            status = self._write(dev, req) if req.segments else BLKIF_RSP_OKAY
            if status == BLKIF_RSP_OKAY and op in _FENCES:
                # Barrier: the write above and everything before it reach stable storage
                # before anything after it starts. Flush: commit the disk's cache (fsync).
                dev.disk.flush()
                if op == BLKIF_OP_FLUSH_DISKCACHE:
                    dev.stats.flushes += 1
                else:
                    dev.stats.barriers += 1
            return status
        except DiskError:
            return BLKIF_RSP_ERROR

    def _map_all(self, dev: BlkifDevice, req: BlkRequest,
                 readonly: bool) -> list[tuple[int, HostFrame]] | None:
        """Map every segment's grant, or none: a failure unmaps what was mapped."""
        mapped: list[tuple[int, HostFrame]] = []
        for seg in req.segments:
            before = grant_entry(dev.grant_ops, dev.domid, seg.gref) if self.on_step else None
            status, handle, frame = dev.grant_ops.map(DOMID_DOM0, dev.domid, seg.gref, readonly)
            dev.stats.grant_ops += 1
            if self.on_step is not None:
                self._step_grant(dev, req, "map", seg.gref, status, before,
                                 {"readonly": readonly, "handle": handle})
            if status != GNTST_okay or frame is None:
                self._unmap_all(dev, mapped, req)
                return None
            mapped.append((handle, frame))
        return mapped

    def _unmap_all(self, dev: BlkifDevice, mapped: list[tuple[int, HostFrame]],
                   req: BlkRequest | None = None) -> None:
        for i, (handle, _) in enumerate(mapped):
            status = dev.grant_ops.unmap(DOMID_DOM0, handle)
            dev.stats.grant_ops += 1
            if self.on_step is not None and req is not None:
                ref = req.segments[i].gref
                self._step_grant(dev, req, "unmap", ref, status, None, {"handle": handle})

    def _read(self, dev: BlkifDevice, req: BlkRequest) -> int:
        # The backend writes into guest memory: the grants must be writable.
        mapped = self._map_all(dev, req, readonly=False)
        if mapped is None:
            return BLKIF_RSP_ERROR
        try:
            data = dev.disk.read(req.sector_number, req.sectors)
            pos = 0
            for seg, (_, frame) in zip(req.segments, mapped, strict=True):
                length = seg.sectors * SECTOR_SIZE
                start = seg.first_sect * SECTOR_SIZE
                frame.view()[start:start + length] = data[pos:pos + length]
                pos += length
        finally:
            self._unmap_all(dev, mapped, req)
        dev.stats.reads += 1
        dev.stats.sectors_read += req.sectors
        return BLKIF_RSP_OKAY

    def _write(self, dev: BlkifDevice, req: BlkRequest) -> int:
        # The backend only reads guest memory: a read-only grant is enough.
        mapped = self._map_all(dev, req, readonly=True)
        if mapped is None:
            return BLKIF_RSP_ERROR
        try:
            data = b"".join(
                bytes(frame.view()[seg.first_sect * SECTOR_SIZE:(seg.last_sect + 1) * SECTOR_SIZE])
                for seg, (_, frame) in zip(req.segments, mapped, strict=True))
        finally:
            self._unmap_all(dev, mapped, req)
        dev.disk.write(req.sector_number, data)
        dev.stats.writes += 1
        dev.stats.sectors_written += req.sectors
        return BLKIF_RSP_OKAY

    # -- xenbus --------------------------------------------------------------------------------
    def vbd(self, link: FrontendLink, devid: int, disk: BlockBackend) -> VbdDriver:
        """The xenbus driver for one vbd of `link`'s domain on `disk` (for XenbusGlue)."""
        return VbdDriver(self, link, devid, disk)


def _reordered(requests: list[BlkRequest]) -> list[BlkRequest]:
    """Sort each run between fences (barrier, flush) by sector; fences stay where they are."""
    out: list[BlkRequest] = []
    run: list[BlkRequest] = []
    for req in requests:
        if req.operation in _FENCES:
            out += sorted(run, key=lambda r: r.sector_number)
            out.append(req)
            run = []
        else:
            run.append(req)
    return out + sorted(run, key=lambda r: r.sector_number)


class VbdDriver:
    """xenbus side of one vbd: features at probe, ring-ref/event-channel at connect, the disk's
    size when connected (what Linux's xen-blkback writes)."""

    def __init__(self, blkback: Blkback, link: FrontendLink, devid: int,
                 disk: BlockBackend) -> None:
        self.blkback = blkback
        self.link = link
        self.devid = devid
        self.disk = disk
        self.device: BlkifDevice | None = None

    def probe(self) -> Mapping[str, str]:
        return {"feature-flush-cache": "1", "feature-barrier": "1"}

    def connect(self, frontend: FrontendNodes, fatal: Callable[[str], None]) -> Mapping[str, str]:
        ring_ref = frontend.read_int("ring-ref")
        evtchn = frontend.read_int("event-channel")
        protocol = frontend.read("protocol") or DEFAULT_PROTOCOL
        self.device = self.blkback.connect(self.link, self.devid, ring_ref, evtchn, self.disk,
                                           protocol=protocol, on_disconnect=fatal)
        info = VDISK_READONLY if self.disk.read_only else 0
        return {"sectors": str(self.disk.sectors), "sector-size": str(SECTOR_SIZE),
                "info": str(info)}

    def disconnect(self, reason: str) -> None:
        if self.device is not None:
            self.blkback.disconnect(self.device, reason)
            self.device = None

