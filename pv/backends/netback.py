"""Network backend: netif tx by grant copy, rx by grant copy or page flipping, one vif per frontend (Xen io/netif.h, grant_table.h)."""

from __future__ import annotations

import ctypes
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from hvm.evtchn import EventChannel, EventChannelError
from hvm.memory import PAGE_SIZE, GuestMemory
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
from pv.grant_table import (
    DOMID_SELF,
    GNTST_NAMES,
    Copy,
    CopyPtr,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_okay,
    GrantOps,
)
from pv.layouts import (
    X86_32,
    netif_rx_request,
    netif_rx_response,
    netif_tx_request,
    netif_tx_response,
)
from pv.ring import BackRing, RingError, SharedRing

if TYPE_CHECKING:
    from pv.backends.xenbus_glue import FrontendNodes
    from pv.bridge import Bridge, BridgePort

NETTXF_csum_blank = 1 << 0
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2
NETTXF_extra_info = 1 << 3

NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3

XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1  # the response to an extra-info slot

XEN_NETIF_NR_SLOTS_MIN = 18  # a frontend may use up to this many slots for one packet
ETH_HLEN = 14

RX_COPY = "copy"
RX_FLIP = "flip"
RX_MODES = (RX_COPY, RX_FLIP)

# The rings' entries have no word-sized members: one layout for x86_32 and x86_64.
TxRequest = netif_tx_request(X86_32)
TxResponse = netif_tx_response(X86_32)
RxRequest = netif_rx_request(X86_32)
RxResponse = netif_rx_response(X86_32)

Frame = bytes
TxSink = Callable[[bytes], None]


class Dom0Pages:
    """Pages of Domain 0's memory netback may use: bounce buffers for grant copies and the
    pages it flips to frontends. A flip gives Dom0 the frontend's old page back at the same
    frame, so the pool keeps its size."""

    def __init__(self, memory: GuestMemory, pfns: Iterable[int]) -> None:
        self.memory = memory
        self._free: deque[int] = deque(pfns)
        for pfn in self._free:
            memory.p2m(pfn)  # GuestMemoryError now, not on the first packet
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            return self._free.popleft() if self._free else None

    def give(self, pfn: int) -> None:
        with self._lock:
            self._free.append(pfn)

    def __len__(self) -> int:
        with self._lock:
            return len(self._free)


@dataclass
class VifStats:
    tx_frames: int = 0  # frames taken from the guest and handed on
    rx_frames: int = 0  # frames put into guest buffers
    tx_bytes: int = 0
    rx_bytes: int = 0
    bytes_copied: int = 0  # bytes moved between domains by grant copy
    flips: int = 0  # pages transferred to the guest
    grant_ops: int = 0  # copy and transfer operations issued
    notifications_sent: int = 0
    tx_errors: int = 0  # packets answered NETIF_RSP_ERROR
    rx_errors: int = 0  # rx buffers answered NETIF_RSP_ERROR (bad grant, failed flip)
    rx_dropped: int = 0  # frames dropped before reaching a buffer (queue full, too big)


class Vif:
    """One frontend's network interface: its tx and rx rings, Dom0's end of its port."""

    def __init__(self, backend: Netback, domid: int, devid: int, tx_ring: BackRing,
                 rx_ring: BackRing, ring_handles: tuple[int, int], channel: EventChannel,
                 grant_ops: GrantOps, rx_mode: str, tx_sink: TxSink | None,
                 on_disconnect: Callable[[str], None] | None, rx_queue_len: int) -> None:
        self.domid = domid
        self.devid = devid
        self.name = f"vif{domid}.{devid}"
        self.tx_ring = tx_ring
        self.rx_ring = rx_ring
        self.ring_handles = ring_handles
        self.channel = channel
        self.grant_ops = grant_ops
        self.rx_mode = rx_mode
        self.tx_sink = tx_sink
        self.on_disconnect = on_disconnect
        self.stats = VifStats()
        self.connected = True
        self.disconnect_reason = ""
        self.lock = threading.RLock()  # held while the rings are served or torn down
        self.bridge_port: BridgePort | None = None
        self._backend = backend
        self._rx_queue: deque[Frame] = deque()
        self._rx_queue_len = rx_queue_len
        self._rx_lock = threading.Lock()
        # Frames queued and frames taken for the rx ring, counted from 1: the queue is FIFO,
        # so the trace's bridge_rx and ring_take records with the same rx_seq are one frame.
        self.rx_queued_total = 0
        self.rx_taken_total = 0

    @property
    def notifications_received(self) -> int:
        return self.channel.received

    def deliver(self, frame: bytes) -> bool:
        """A frame for this guest (from the bridge, any thread): queue it for the rx ring.
        False if it was dropped (disconnected, or the guest is not taking frames)."""
        if not self.connected:
            return False
        step = self._backend.on_step
        with self._rx_lock:
            if len(self._rx_queue) >= self._rx_queue_len:
                self.stats.rx_dropped += 1
                if step is not None:
                    step("bridge_rx", self.domid, self._backend.frame_fields(
                        self, frame, {"queued": False, "rx_seq": None}))
                return False
            self._rx_queue.append(bytes(frame))
            self.rx_queued_total += 1
            if step is not None:  # under the lock: records in queue order
                step("bridge_rx", self.domid, self._backend.frame_fields(
                    self, frame, {"queued": True, "rx_seq": self.rx_queued_total}))
        self._backend.loop.request(self.service)
        return True

    @property
    def rx_pending(self) -> int:
        with self._rx_lock:
            return len(self._rx_queue)

    def service(self) -> None:
        self._backend.service(self)


@dataclass(frozen=True)
class _TxSlot:
    gref: int
    offset: int
    flags: int
    id: int
    size: int


class Netback(SplitBackend):
    """The network backend: one thread serving every vif's rings.

    tx: each packet (one slot, or a NETTXF_more_data chain) is validated, its fragments are
    grant-copied into Dom0 pages and the frame goes to the vif's tx_sink (the bridge); every
    slot gets a response with its id. rx: frames queued by deliver() are matched with the rx
    requests the frontend posted; "copy" grant-copies the frame into the offered page,
    "flip" writes it into a Dom0 page and transfers that page onto the frontend's
    GTF_accept_transfer grant (no byte is copied into guest memory).
    """

    def __init__(self, pages: Dom0Pages, *, on_ring_push: RingPushHook | None = None,
                 on_step: StepHook | None = None,
                 idle_wait_s: float = 0.5, rx_queue_len: int = 256,
                 max_packets_per_wakeup: int = 256, name: str = "netback") -> None:
        self.pages = pages
        self.on_ring_push = on_ring_push
        self.on_step = on_step
        self.tx_packets_total = 0  # tx packets taken off any ring: the trace's "packet" number
        self._sending = threading.local()  # the packet being handed to the bridge, per thread
        self.rx_queue_len = rx_queue_len
        self.max_packets_per_wakeup = max_packets_per_wakeup
        self.loop = BackendLoop(name, idle_wait_s)
        self.vifs: list[Vif] = []
        self.sink_errors = 0
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------------
    def connect(self, link: FrontendLink, devid: int, tx_ring_ref: int, rx_ring_ref: int,
                evtchn: int, *, rx_mode: str = RX_COPY, tx_sink: TxSink | None = None,
                on_disconnect: Callable[[str], None] | None = None) -> Vif:
        """Map both ring grants, bind the port, and start serving the vif."""
        if rx_mode not in RX_MODES:
            raise ConnectError(f"unknown rx mode {rx_mode!r}; expected one of {RX_MODES}")
        ops = link.grant_ops
        if ops.domains.get(DOMID_DOM0) is not self.pages.memory:
            raise ConnectError("netback's pages are not Domain 0's memory in this GrantOps")
        handles: list[int] = []
        srings: list[SharedRing] = []
        for what, ref, req, rsp in (("tx-ring-ref", tx_ring_ref, TxRequest, TxResponse),
                                    ("rx-ring-ref", rx_ring_ref, RxRequest, RxResponse)):
            status, handle, frame = ops.map(DOMID_DOM0, link.domid, ref)
            if status != GNTST_okay or frame is None:
                for h in handles:
                    ops.unmap(DOMID_DOM0, h)
                raise ConnectError(f"domain {link.domid}: {what} {ref}: "
                                   f"{GNTST_NAMES.get(status, status)} ({status})")
            handles.append(handle)
            srings.append(SharedRing(frame.view(), ctypes.sizeof(req), ctypes.sizeof(rsp)))
        try:
            channel = link.bind_evtchn(evtchn)
        except (EventChannelError, ValueError) as exc:
            for h in handles:
                ops.unmap(DOMID_DOM0, h)
            raise ConnectError(f"domain {link.domid}: event-channel {evtchn}: {exc}") from exc
        tx = BackRing(srings[0], srings[0].rsp_prod)
        rx = BackRing(srings[1], srings[1].rsp_prod)
        vif = Vif(self, link.domid, devid, tx, rx, (handles[0], handles[1]), channel, ops,
                  rx_mode, tx_sink, on_disconnect, self.rx_queue_len)
        vif.stats.grant_ops += 2
        with self._lock:
            self.vifs.append(vif)
        self.loop.watch(channel, vif.service)
        self.loop.request(vif.service)
        return vif

    def _devices(self) -> list[Vif]:
        with self._lock:
            return list(self.vifs)

    def _torn_down(self, vif: Vif) -> None:
        with vif._rx_lock:
            vif._rx_queue.clear()

    def stats(self) -> VifStats:
        """The counters of every vif, summed."""
        total = VifStats()
        with self._lock:
            vifs = list(self.vifs)
        for vif in vifs:
            for f in fields(VifStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(vif.stats, f.name))
        return total

    # -- serving -------------------------------------------------------------------------------
    def service(self, vif: Vif) -> None:
        with vif.lock:
            if not vif.connected:
                return
            if vif.channel.peer_closed or vif.channel.closed:
                self._fail(vif, "the event channel was closed")
                return
            try:
                frames, tx_notify = self._tx(vif)
                rx_notify = self._rx(vif)
            except (RingError, _ProtocolError) as exc:
                self._fail(vif, f"ring error: {exc}")
                return
            if tx_notify or rx_notify:
                self._notify(vif)
        # Hand the frames on outside the vif's lock: the bridge may deliver into another vif.
        for packet, frame in frames:
            self._send(vif, frame, packet)

    def _notify(self, vif: Vif) -> None:
        try:
            vif.channel.notify()
            vif.stats.notifications_sent += 1
        except EventChannelError:
            return
        if self.on_step is not None:
            self.on_step("event_send", vif.domid, {
                "backend": self.loop.name, "port": vif.channel.port,
                "remote_dom": vif.domid, "remote_port": vif.channel.remote_port})

    def _push(self, vif: Vif, ring: BackRing, which: str) -> bool:
        notify = ring.push_responses()
        name = f"netif_{which}/d{vif.domid}/{vif.devid}"
        if self.on_ring_push is not None:
            self.on_ring_push(name, ring.rsp_prod_pvt, ring.sring.rsp_event, notify)
        if self.on_step is not None:
            self.on_step("ring_push", vif.domid, {
                "backend": self.loop.name, "ring": name, "prod": ring.rsp_prod_pvt,
                "event": ring.sring.rsp_event, "notify": notify, "req_cons": ring.req_cons})
        return notify

    def _send(self, vif: Vif, frame: bytes, packet: int) -> None:
        if vif.tx_sink is None:
            return
        if self.on_step is not None:
            self.on_step("bridge_tx", vif.domid, self.frame_fields(vif, frame, {"packet": packet}))
        # The bridge delivers on this thread: a vif it delivers to learns the packet number.
        self._sending.packet = packet
        try:
            vif.tx_sink(frame)
        except Exception:  # a failing sink loses the frame, never the backend
            self.sink_errors += 1
        finally:
            self._sending.packet = None

    def frame_fields(self, vif: Vif, frame: bytes, extra: dict[str, Any]) -> dict[str, Any]:
        """What the trace says of a frame at the bridge: its vif, length, addresses, type."""
        return {"backend": self.loop.name, "vif": vif.name,
                "packet": getattr(self._sending, "packet", None), **extra, "len": len(frame),
                "dst": frame[:6].hex(":"), "src": frame[6:12].hex(":"),
                "ethertype": frame[12:14].hex(), "crc32": zlib.crc32(frame)}

    def _step_ring(self, kind: str, vif: Vif, which: str, ring: BackRing, raw: bytes,
                   decoded: Any, extra: dict[str, Any]) -> None:
        """A ring_take (req_cons just advanced) or ring_response record with the slot's bytes."""
        assert self.on_step is not None
        fields: dict[str, Any] = {"backend": self.loop.name,
                                  "ring": f"netif_{which}/d{vif.domid}/{vif.devid}",
                                  "frontend_port": vif.channel.remote_port}
        if kind == "ring_take":
            fields.update(index=(ring.req_cons - 1) & 0xFFFF_FFFF, req_cons=ring.req_cons,
                          req_prod=ring.sring.req_prod)
        else:
            fields.update(index=(ring.rsp_prod_pvt - 1) & 0xFFFF_FFFF)
        fields.update(struct=type(decoded).__name__, hex=raw.hex(),
                      fields={name: getattr(decoded, name) for name, *_ in decoded._fields_},
                      **extra)
        self.on_step(kind, vif.domid, fields)

    # -- tx ------------------------------------------------------------------------------------
    def _tx(self, vif: Vif) -> tuple[list[tuple[int, bytes]], bool]:
        ring = vif.tx_ring
        frames: list[tuple[int, bytes]] = []
        notify = False
        packets = 0
        while True:
            answered = False
            while ring.unconsumed_requests() and packets < self.max_packets_per_wakeup:
                self.tx_packets_total += 1
                packet = self.tx_packets_total
                frame = self._tx_packet(vif, packet)
                packets += 1
                answered = True
                if frame is not None:
                    frames.append((packet, frame))
            if answered:
                notify = self._push(vif, ring, "tx") or notify
            if packets >= self.max_packets_per_wakeup:
                self.loop.request(vif.service)  # more later: let other vifs in
                return frames, notify
            if not ring.final_check_for_requests():
                return frames, notify

    def _take_tx(self, vif: Vif, packet: int) -> _TxSlot:
        raw = vif.tx_ring.take_request()
        req = TxRequest.from_buffer_copy(raw)
        if self.on_step is not None:
            self._step_ring("ring_take", vif, "tx", vif.tx_ring, raw, req, {"packet": packet})
        return _TxSlot(req.gref, req.offset, req.flags, req.id, req.size)

    def _tx_packet(self, vif: Vif, packet: int) -> bytes | None:
        """Take one packet's slots, copy its data, answer every slot; the frame or None."""
        ring = vif.tx_ring
        first = self._take_tx(vif, packet)
        slots = [first]
        extras = 0
        if first.flags & NETTXF_extra_info:
            # netif_extra_info slots (GSO, multicast) follow; hvmlab takes no offloads, so
            # they are skipped, answered NETIF_RSP_NULL as Xen's netback answers them.
            while True:
                if not ring.unconsumed_requests():
                    raise _ProtocolError("packet ends inside its extra-info slots")
                extra = ring.take_request()
                extras += 1
                if not extra[1] & XEN_NETIF_EXTRA_FLAG_MORE:  # netif_extra_info.flags
                    break
                if extras >= XEN_NETIF_NR_SLOTS_MIN:
                    raise _ProtocolError("too many extra-info slots")
        while slots[-1].flags & NETTXF_more_data:
            if len(slots) >= XEN_NETIF_NR_SLOTS_MIN:
                raise _ProtocolError(f"packet of more than {XEN_NETIF_NR_SLOTS_MIN} slots")
            if not ring.unconsumed_requests():
                raise _ProtocolError("packet ends in a slot with NETTXF_more_data")
            slots.append(self._take_tx(vif, packet))
        frame = self._tx_copy(vif, slots, packet)
        status = NETIF_RSP_OKAY if frame is not None else NETIF_RSP_ERROR
        # One response per slot, in slot order: the first, its extras, then the fragments.
        for i, slot in enumerate(slots):
            rsp = TxResponse()
            rsp.id, rsp.status = slot.id, status
            ring.put_response(bytes(rsp))
            if self.on_step is not None:
                self._step_ring("ring_response", vif, "tx", ring, bytes(rsp), rsp,
                                {"packet": packet})
            if i == 0:
                for _ in range(extras):
                    null = TxResponse()
                    null.status = NETIF_RSP_NULL
                    ring.put_response(bytes(null))
        if frame is None:
            vif.stats.tx_errors += 1
            return None
        vif.stats.tx_frames += 1
        vif.stats.tx_bytes += len(frame)
        return frame

    def _tx_copy(self, vif: Vif, slots: list[_TxSlot], packet: int) -> bytes | None:
        # The first slot's size is the whole packet's; each further slot carries its own part.
        rest = sum(s.size for s in slots[1:])
        first_len = slots[0].size - rest
        if slots[0].size < ETH_HLEN or first_len < 0:
            return None
        lengths = [first_len] + [s.size for s in slots[1:]]
        if any(s.offset + n > PAGE_SIZE for s, n in zip(slots, lengths, strict=True)):
            return None  # a fragment may not cross its page
        frame = bytearray()
        for slot, length in zip(slots, lengths, strict=True):
            if length == 0:
                continue
            data = self._copy_from_guest(vif, slot.gref, slot.offset, length, packet)
            if data is None:
                return None
            frame += data
        return bytes(frame)

    def _copy_from_guest(self, vif: Vif, gref: int, offset: int, length: int,
                         packet: int) -> bytes | None:
        pfn = self.pages.take()
        if pfn is None:
            return None
        try:
            op = Copy(CopyPtr(gref, vif.domid, offset), CopyPtr(pfn, DOMID_SELF, 0), length,
                      GNTCOPY_source_gref)
            before = grant_entry(vif.grant_ops, vif.domid, gref) if self.on_step else None
            status = vif.grant_ops.copy(DOMID_DOM0, [op])[0]
            vif.stats.grant_ops += 1
            if self.on_step is not None:
                self._step_grant(vif, "copy", gref, status, before, {
                    "packet": packet, "from": "guest", "offset": offset, "len": length,
                    "dom0_pfn": pfn})
            if status != GNTST_okay:
                return None
            vif.stats.bytes_copied += length
            return self.pages.memory.read(pfn * PAGE_SIZE, length)
        finally:
            self.pages.give(pfn)

    # -- rx ------------------------------------------------------------------------------------
    def _rx(self, vif: Vif) -> bool:
        ring = vif.rx_ring
        answered = False
        while True:
            with vif._rx_lock:
                if not vif._rx_queue:
                    break
            if not ring.unconsumed_requests():
                # No buffer posted: ask to be notified when the next one is (req_event),
                # then look again; the frames wait in the queue meanwhile.
                if ring.final_check_for_requests():
                    continue
                break
            raw = ring.take_request()
            req = RxRequest.from_buffer_copy(raw)
            with vif._rx_lock:
                frame = vif._rx_queue.popleft()
                vif.rx_taken_total += 1
                seq = vif.rx_taken_total
            if self.on_step is not None:
                self._step_ring("ring_take", vif, "rx", ring, raw, req, {
                    "rx_seq": seq, "vif": vif.name, "rx_mode": vif.rx_mode, "len": len(frame),
                    "crc32": zlib.crc32(frame)})
            status = self._rx_one(vif, req.gref, frame, seq)
            rsp = RxResponse()
            rsp.id, rsp.offset, rsp.flags, rsp.status = req.id, 0, 0, status
            ring.put_response(bytes(rsp))
            if self.on_step is not None:
                self._step_ring("ring_response", vif, "rx", ring, bytes(rsp), rsp,
                                {"rx_seq": seq})
            answered = True
        return self._push(vif, ring, "rx") if answered else False

    def _rx_one(self, vif: Vif, gref: int, frame: bytes, seq: int = 0) -> int:
        """Put `frame` into the buffer of grant `gref`: its length, or NETIF_RSP_ERROR."""
        if len(frame) > PAGE_SIZE:
            vif.stats.rx_dropped += 1
            return NETIF_RSP_ERROR
        pfn = self.pages.take()
        if pfn is None:
            vif.stats.rx_dropped += 1
            return NETIF_RSP_ERROR
        try:
            # The frame goes into a Dom0 page first (as it sits in Dom0's socket buffer)...
            page = self.pages.memory.p2m(pfn).view()
            page[:len(frame)] = frame
            before = grant_entry(vif.grant_ops, vif.domid, gref) if self.on_step else None
            if vif.rx_mode == RX_FLIP:
                # ...and the page itself becomes the guest's (the rest zeroed: no Dom0 data).
                page[len(frame):] = bytes(PAGE_SIZE - len(frame))
                status = vif.grant_ops.transfer(DOMID_DOM0, pfn, vif.domid, gref)
                vif.stats.grant_ops += 1
                if status == GNTST_okay:
                    vif.stats.flips += 1
                if self.on_step is not None:
                    self._step_grant(vif, "transfer", gref, status, before, {
                        "rx_seq": seq, "dom0_pfn": pfn, "len": len(frame)})
            else:
                op = Copy(CopyPtr(pfn, DOMID_SELF, 0), CopyPtr(gref, vif.domid, 0), len(frame),
                          GNTCOPY_dest_gref)
                status = vif.grant_ops.copy(DOMID_DOM0, [op])[0]
                vif.stats.grant_ops += 1
                if status == GNTST_okay:
                    vif.stats.bytes_copied += len(frame)
                if self.on_step is not None:
                    self._step_grant(vif, "copy", gref, status, before, {
                        "rx_seq": seq, "to": "guest", "offset": 0, "len": len(frame),
                        "dom0_pfn": pfn})
        finally:
            # After a flip Dom0's frame `pfn` is backed by the guest's old page: still ours.
            self.pages.give(pfn)
        if status != GNTST_okay:
            vif.stats.rx_errors += 1
            return NETIF_RSP_ERROR
        vif.stats.rx_frames += 1
        vif.stats.rx_bytes += len(frame)
        return len(frame)

    def _step_grant(self, vif: Vif, op: str, gref: int, status: int,
                    before: dict[str, Any] | None, extra: dict[str, Any]) -> None:
        """A grant_op record: the op on `vif`'s domain's grant `gref`, its status, the entry
        before and after; into the guest (rx), the first bytes of the page the entry names."""
        assert self.on_step is not None
        after = grant_entry(vif.grant_ops, vif.domid, gref)
        fields: dict[str, Any] = {"backend": self.loop.name, "op": op, "grantee": DOMID_DOM0,
                                  "granter": vif.domid, "ref": gref, "status": status,
                                  "status_name": status_name(status), "entry_before": before,
                                  "entry_after": after, **extra}
        if extra.get("rx_seq") is not None and status == GNTST_okay and after is not None:
            memory = vif.grant_ops.domains.get(vif.domid)
            if memory is not None:
                fields["page_head"] = memory.read(after["frame"] * PAGE_SIZE, 16).hex()
        self.on_step("grant_op", vif.domid, fields)

    # -- xenbus --------------------------------------------------------------------------------
    def vif_driver(self, link: FrontendLink, devid: int,
                   bridge: Bridge | None = None) -> VifDriver:
        """The xenbus driver for one vif of `link`'s domain, plugged into `bridge`."""
        return VifDriver(self, link, devid, bridge)


class _ProtocolError(Exception):
    """A tx packet whose slots break netif's rules (unfinished chain, too many slots)."""


class VifDriver:
    """xenbus side of one vif: features at probe; tx-ring-ref, rx-ring-ref, event-channel and
    request-rx-copy at connect (1: rx by copy, 0 or absent: rx by page flipping, as Xen's
    netback read it); a bridge port while connected."""

    def __init__(self, netback: Netback, link: FrontendLink, devid: int,
                 bridge: Bridge | None) -> None:
        self.netback = netback
        self.link = link
        self.devid = devid
        self.bridge = bridge
        self.vif: Vif | None = None

    def probe(self) -> Mapping[str, str]:
        return {"feature-rx-copy": "1", "feature-rx-flip": "1"}

    def connect(self, frontend: FrontendNodes, fatal: Callable[[str], None]) -> Mapping[str, str]:
        tx_ref = frontend.read_int("tx-ring-ref")
        rx_ref = frontend.read_int("rx-ring-ref")
        evtchn = frontend.read_int("event-channel")
        copy = (frontend.read("request-rx-copy") or "0").strip() == "1"
        port = None
        if self.bridge is not None:
            port = self.bridge.add_port(f"vif{self.link.domid}.{self.devid}")
        try:
            vif = self.netback.connect(self.link, self.devid, tx_ref, rx_ref, evtchn,
                                       rx_mode=RX_COPY if copy else RX_FLIP,
                                       tx_sink=port.transmit if port is not None else None,
                                       on_disconnect=fatal)
        except ConnectError:
            if port is not None and self.bridge is not None:
                self.bridge.remove_port(port)
            raise
        if port is not None:
            port.connect(vif.deliver)
            vif.bridge_port = port
        self.vif = vif
        return {}

    def disconnect(self, reason: str) -> None:
        vif, self.vif = self.vif, None
        if vif is None:
            return
        self.netback.disconnect(vif, reason)
        if vif.bridge_port is not None and self.bridge is not None:
            self.bridge.remove_port(vif.bridge_port)
