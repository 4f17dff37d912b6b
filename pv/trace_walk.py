"""Reading a PV trace back: the records of one network packet or blkif request, from the frontend's notify through the backend's steps to the receiver's wake-up, found by packet number, rx_seq, request id and ring (the records pv.trace_pv writes)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class TraceWalkError(Exception):
    """The trace cannot be read, or what was asked for is not in it."""


def read_records(trace: Path) -> list[Record]:
    """The records of a PV trace in seq order (header and footer lines skipped). Read here
    rather than with hvm.trace_summary.read_trace, whose checks are for exit records: a PV
    record may say "port": null (a BLOCK that timed out)."""
    records: list[Record] = []
    try:
        with trace.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if isinstance(obj, dict) and "seq" in obj:
                    records.append(obj)
                elif not (isinstance(obj, dict) and ("trace" in obj or "summary" in obj)):
                    raise TraceWalkError(f"{trace}:{lineno}: not a trace record")
    except (OSError, ValueError) as exc:
        raise TraceWalkError(f"{trace}: cannot read the trace: {exc}") from None
    records.sort(key=lambda r: r["seq"])
    return records


def _is(r: Record, reason: str, **fields: Any) -> bool:
    return r.get("reason") == reason and all(r.get(k) == v for k, v in fields.items())


def _first(records: Iterable[Record], reason: str, after: int = -1, **fields: Any) -> Record | None:
    """The first record (in trace order, seq > `after`) of `reason` whose fields match."""
    for r in records:
        if r["seq"] > after and _is(r, reason, **fields):
            return r
    return None


def _guest_sends(records: list[Record], domid: int, port: int) -> list[Record]:
    """EVTCHNOP_send hypercalls of `domid` on `port`: each HYPERCALL record (t_ns = when the
    guest trapped) paired with the EVENT_SEND "out" record written while it was served."""
    sends: list[Record] = []
    last_out: Record | None = None
    for r in records:
        if r.get("domid") != domid or r.get("handled_by") != "hypervisor":
            continue
        if _is(r, "EVENT_SEND", direction="out"):
            last_out = r
        elif _is(r, "HYPERCALL", op="EVTCHNOP_send"):
            if last_out is not None and last_out.get("port") == port and r.get("result") == 0:
                sends.append({**r, "port": port, "remote_port": last_out.get("remote_port"),
                              "remote_dom": last_out.get("remote_dom")})
            last_out = None
    return sends


def _notify_for(records: list[Record], take: Record) -> Record | None:
    """The frontend's notification that woke the backend for `take`: its latest EVTCHNOP_send
    on the ring's port made before the take and after the ring's previous take. None if the
    backend found the request without one (same batch, or req_event not reached)."""
    ring = take["ring"]
    previous = [r for r in records if _is(r, "RING_TAKE", ring=ring) and r["seq"] < take["seq"]]
    since = previous[-1]["t_ns"] if previous else -1
    port = take.get("frontend_port")
    if port is None:
        return None
    candidates = [s for s in _guest_sends(records, take["domid"], port)
                  if since < s["t_ns"] <= take["t_ns"]]
    return candidates[-1] if candidates else None


def _push_after(records: list[Record], ring: str, seq: int) -> Record | None:
    return _first(records, "RING_PUSH", seq, ring=ring)


def _event_after(records: list[Record], push: Record | None, domid: int) -> Record | None:
    """Dom0's notification to `domid` that followed `push` (before the backend's next push or
    take for that domain), if the backend sent one."""
    if push is None:
        return None
    for r in records:
        if r["seq"] <= push["seq"]:
            continue
        if _is(r, "EVENT_SEND", domid=0, remote_dom=domid):
            return r
        if r.get("handled_by") == "dom0" and r.get("domid") == domid and \
                r.get("reason") in ("RING_PUSH", "RING_TAKE"):
            return None
    return None


@dataclass
class Wake:
    """How the frontend's domain learned of Dom0's event."""

    event_in: Record | None = None  # EVENT_SEND "in": the port set pending in shared_info
    block: Record | None = None  # the SCHEDOP_block / poll it slept in, if it was asleep
    upcall: Record | None = None  # the upcall into its event callback
    next: Record | None = None  # else: what the domain did next

    @property
    def t_ns(self) -> int | None:
        times = [r["t_ns"] for r in (self.event_in, self.upcall) if r is not None]
        if self.block is not None:
            times.append(self.block["t_ns"] + self.block["latency_ns"])
        return min(times) if times else None


def _wake_after(records: list[Record], event: Record | None, domid: int) -> Wake:
    wake = Wake()
    if event is None:
        return wake
    t, port = event["t_ns"], event.get("remote_port")
    for r in records:
        if r.get("domid") != domid or r.get("handled_by") != "hypervisor":
            continue
        if wake.next is None and r["t_ns"] >= t:
            wake.next = r
        if wake.event_in is None and _is(r, "EVENT_SEND", direction="in", port=port) \
                and r["t_ns"] >= t:
            wake.event_in = r
        elif wake.block is None and _is(r, "BLOCK") and r["t_ns"] <= t \
                <= r["t_ns"] + r["latency_ns"]:
            wake.block = r
        elif wake.upcall is None and _is(r, "UPCALL") and r["t_ns"] >= t \
                and port in (r.get("ports") or []):
            wake.upcall = r
    return wake


@dataclass
class PacketWalk:
    """Every record of one network packet's way, from the sender's notify to the receiver."""

    packet: int
    take: Record  # the tx request (its first slot) taken off the sender's tx ring
    notify: Record | None  # the sender's EVTCHNOP_send (its HYPERCALL record, with the port)
    copies: list[Record]  # grant copies of the packet's slots into Dom0
    tx_response: Record | None
    tx_push: Record | None
    tx_event: Record | None
    bridge_tx: Record | None
    delivery: Record | None  # the bridge queued it for this vif (the first that took it)
    deliveries: list[Record]
    rx_take: Record | None
    rx_grant: Record | None  # the transfer (page flip) or copy into the offered page
    rx_response: Record | None
    rx_push: Record | None
    rx_event: Record | None
    wake: Wake = field(default_factory=Wake)
    rx_posted: Record | None = None  # the receiver's latest notify before the rx take

    @property
    def t0(self) -> int:
        return self.notify["t_ns"] if self.notify is not None else self.take["t_ns"]

    def chain(self) -> list[tuple[str, int]]:
        """(step, t_ns) along the packet's causal chain, the steps that are in the trace."""
        steps: list[tuple[str, Record | None]] = [
            ("notify", self.notify), ("tx_take", self.take),
            ("tx_grant_copy", self.copies[0] if self.copies else None),
            ("bridge_tx", self.bridge_tx), ("bridge_rx", self.delivery),
            ("rx_take", self.rx_take), ("rx_grant", self.rx_grant),
            ("rx_response", self.rx_response), ("rx_push", self.rx_push),
            ("rx_event", self.rx_event)]
        out = [(name, r["t_ns"]) for name, r in steps if r is not None]
        if self.wake.t_ns is not None:
            out.append(("receiver_wake", self.wake.t_ns))
        return out


def packet_numbers(records: list[Record]) -> list[int]:
    """The packets netback took off tx rings, in the order it took them."""
    seen: list[int] = []
    for r in records:
        if _is(r, "RING_TAKE") and r["ring"].startswith("netif_tx/") and \
                r.get("packet") is not None and r["packet"] not in seen:
            seen.append(r["packet"])
    return seen


def walk_packet(records: list[Record], packet: int) -> PacketWalk:
    """Follow netback's packet number `packet` from the sender's tx ring to the receiver."""
    take = _first(records, "RING_TAKE", packet=packet)
    if take is None:
        raise TraceWalkError(f"packet {packet} is not in the trace")
    sender = take["domid"]
    tx_ring = take["ring"]
    copies = [r for r in records if _is(r, "GRANT_OP", packet=packet)]
    tx_response = _first(records, "RING_RESPONSE", ring=tx_ring, packet=packet)
    tx_push = _push_after(records, tx_ring, tx_response["seq"]) if tx_response else None
    deliveries = [r for r in records if _is(r, "BRIDGE_RX", packet=packet)]
    delivery = next((r for r in deliveries if r.get("queued")), None)
    rx_take = rx_grant = rx_response = rx_push = rx_event = None
    wake = Wake()
    rx_posted = None
    if delivery is not None:
        receiver, seq = delivery["domid"], delivery["rx_seq"]
        rx_take = _first(records, "RING_TAKE", domid=receiver, vif=delivery["vif"], rx_seq=seq)
        if rx_take is not None:
            rx_posted = _notify_for(records, rx_take)
            rx_grant = _first(records, "GRANT_OP", rx_take["seq"], domid=receiver, rx_seq=seq)
            rx_response = _first(records, "RING_RESPONSE", rx_take["seq"], ring=rx_take["ring"],
                                 rx_seq=seq)
        if rx_response is not None:
            rx_push = _push_after(records, rx_response["ring"], rx_response["seq"])
            rx_event = _event_after(records, rx_push, receiver)
            wake = _wake_after(records, rx_event, receiver)
    return PacketWalk(packet, take, _notify_for(records, take), copies, tx_response, tx_push,
                      _event_after(records, tx_push, sender),
                      _first(records, "BRIDGE_TX", packet=packet), delivery, deliveries,
                      rx_take, rx_grant, rx_response, rx_push, rx_event, wake, rx_posted)


@dataclass
class BlkWalk:
    """Every record of one blkif request: notify, take, grant maps, response, event, wake."""

    take: Record
    notify: Record | None
    grants: list[Record]
    response: Record | None
    push: Record | None
    event: Record | None
    wake: Wake

    @property
    def t0(self) -> int:
        return self.notify["t_ns"] if self.notify is not None else self.take["t_ns"]


def blk_requests(records: list[Record]) -> list[Record]:
    return [r for r in records if _is(r, "RING_TAKE", backend="blkback")]


def walk_blk(records: list[Record], take: Record) -> BlkWalk:
    domid, ring, req_id = take["domid"], take["ring"], take["id"]
    response = _first(records, "RING_RESPONSE", take["seq"], ring=ring, id=req_id)
    end = response["seq"] if response is not None else 1 << 62
    grants = [r for r in records if _is(r, "GRANT_OP", backend="blkback", domid=domid, id=req_id)
              and take["seq"] < r["seq"] < end]
    push = _push_after(records, ring, response["seq"]) if response is not None else None
    event = _event_after(records, push, domid)
    return BlkWalk(take, _notify_for(records, take), grants, response, push, event,
                   _wake_after(records, event, domid))
