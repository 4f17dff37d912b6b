"""PV trace records: hypercalls, event sends, upcalls, blocks, ring pushes and the backends' steps (ring takes, grant ops, the bridge, responses) as lines of the exit trace (hvm/trace.py format; reason codes are hvmlab's, above the SDM's basic exit reasons)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from hvm.trace import TraceWriter
from pv.backends import grant_entry, status_name
from pv.grant_table import (
    DOMID_SELF,
    Copy,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GrantOps,
    MapResult,
)

HYPERCALL_BASE = 256  # reason_code = 256 + hypercall number
EVENT_SEND = 512  # an event on a port: the guest's EVTCHNOP_send ("out") or one arriving ("in")
UPCALL = 513  # the hypervisor entered the guest's event callback
BLOCK = 514  # SCHEDOP_block / SCHEDOP_poll / HLT: the vCPU slept until an event (or timeout)
RING_PUSH = 515  # a backend pushed on a shared ring; the record says if it notified
# The backends' steps (pv.backends.StepHook), on Dom0's backend threads:
RING_TAKE = 516  # a request copied out of its slot, req_cons advanced ("hex", "fields")
GRANT_OP = 517  # map/unmap/copy/transfer: "op", "status", "entry_before", "entry_after"
BRIDGE_TX = 518  # netback handed a frame from a vif's tx ring to the bridge ("packet")
BRIDGE_RX = 519  # the bridge queued a frame for a vif's rx ring ("packet", "rx_seq")
RING_RESPONSE = 520  # a response written into its slot ("hex", "fields"), not yet pushed

REASON_NAMES = {EVENT_SEND: "EVENT_SEND", UPCALL: "UPCALL", BLOCK: "BLOCK", RING_PUSH: "RING_PUSH",
                RING_TAKE: "RING_TAKE", GRANT_OP: "GRANT_OP", BRIDGE_TX: "BRIDGE_TX",
                BRIDGE_RX: "BRIDGE_RX", RING_RESPONSE: "RING_RESPONSE"}
# pv.backends.StepHook kind -> record code
STEP_CODES = {"ring_take": RING_TAKE, "grant_op": GRANT_OP, "bridge_tx": BRIDGE_TX,
              "bridge_rx": BRIDGE_RX, "ring_response": RING_RESPONSE, "ring_push": RING_PUSH,
              "event_send": EVENT_SEND}
INT_0X82 = '"int 0x82"'


def reason_name(code: int) -> str:
    """The trace's `reason` for a PV record code (what hvm/trace.py should print for it)."""
    if HYPERCALL_BASE <= code < HYPERCALL_BASE + 256:
        return "HYPERCALL"
    return REASON_NAMES.get(code, f"UNKNOWN_{code}")


class PvTracer:
    """Writes PV records to a TraceWriter; callable from any thread (the vCPU threads of
    every domain and Dom0's backend threads share one trace), so each add is under a lock.
    Times are ns since `t0_ns` (the run's start), as for HVM exits."""

    def __init__(self, writer: TraceWriter, t0_ns: int | None = None) -> None:
        self.writer = writer
        self.t0_ns = time.monotonic_ns() if t0_ns is None else t0_ns
        self._lock = threading.Lock()
        self._seq = 0

    def now_ns(self) -> int:
        return time.monotonic_ns() - self.t0_ns

    def record(self, code: int, *, domid: int, rip: int = 0, t_ns: int | None = None,
               latency_ns: int = 0, vcpu: int = 0, insn_json: str = '""',
               handled_by: str = "hypervisor", extra: dict[str, Any] | None = None) -> None:
        fields = {"domid": domid, **(extra or {})}
        with self._lock:
            seq = self._seq
            self._seq += 1
            self.writer.add((seq, self.now_ns() if t_ns is None else t_ns, vcpu, code, 0, rip,
                             insn_json, handled_by, latency_ns, None, fields))

    def hypercall(self, *, domid: int, rip: int, number: int, name: str, op: str | None,
                  args: tuple[int, ...], result: int, t_ns: int, latency_ns: int,
                  preempted: bool = False) -> None:
        extra: dict[str, Any] = {"hypercall": name}
        if op:
            extra["op"] = op
        extra["args"] = list(args)
        extra["result"] = None if preempted else result
        if preempted:
            extra["preempted"] = True  # continued by re-entering the same hypercall
        # numbers past 255 (no such hypercall) share the last code; "hypercall" names them
        code = HYPERCALL_BASE + (number if 0 <= number < 256 else 255)
        self.record(code, domid=domid, rip=rip, t_ns=t_ns,
                    latency_ns=latency_ns, insn_json=INT_0X82, extra=extra)

    def ring_push(self, *, domid: int, ring: str, prod: int, event: int, notify: bool) -> None:
        """A backend's RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: handled by Dom0, not Xen."""
        self.record(RING_PUSH, domid=domid, handled_by="dom0",
                    extra={"ring": ring, "prod": prod, "event": event, "notify": notify})

    def step(self, kind: str, domid: int, fields: dict[str, Any]) -> None:
        """A backend's step (pv.backends.StepHook, callable from any thread) as a record handled
        by Dom0. An event Dom0 sends is an EVENT_SEND of domain 0 (its port; the guest as
        remote_dom/remote_port), as a guest's send is the guest's; the other steps carry the
        frontend's domid. A ring_push is a RING_PUSH with ring_push()'s fields and more."""
        code = STEP_CODES.get(kind)
        if code is None:
            return
        if code == EVENT_SEND:
            self.record(EVENT_SEND, domid=0, handled_by="dom0",
                        extra={"direction": "out", **fields})
            return
        self.record(code, domid=domid, handled_by="dom0", extra=fields)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.writer.close(summary)



class TracedGrantOps:
    """The shared GrantOps as one domain's grant_table_op hypercalls use it, recording each
    map, unmap, copy and transfer they make as a GRANT_OP record of that domain (handled by
    the hypervisor) with its status and the grant entry's bytes before and after. Everything
    else is the GrantOps itself."""

    def __init__(self, ops: GrantOps, tracer: PvTracer, domid: int) -> None:
        self._ops = ops
        self._tracer = tracer
        self._domid = domid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def _record(self, op: str, granter: int | None, ref: int | None, status: int,
                before: dict[str, Any] | None, extra: dict[str, Any]) -> None:
        after = grant_entry(self._ops, granter, ref) if granter is not None and ref is not None \
            else None
        self._tracer.record(GRANT_OP, domid=self._domid, extra={
            "op": op, "by": "guest", "granter": granter, "ref": ref, "status": status,
            "status_name": status_name(status), "entry_before": before, "entry_after": after,
            **extra})

    def map(self, grantee: int, granter: int, ref: int, readonly: bool = False) -> MapResult:
        before = grant_entry(self._ops, granter, ref)
        result = self._ops.map(grantee, granter, ref, readonly)
        self._record("map", granter, ref, result.status, before,
                     {"grantee": grantee, "readonly": readonly, "handle": result.handle})
        return result

    def unmap(self, grantee: int, handle: int) -> int:
        status = self._ops.unmap(grantee, handle)
        self._record("unmap", None, None, status, None, {"grantee": grantee, "handle": handle})
        return status

    def copy(self, caller: int, ops: Sequence[Copy]) -> list[int]:
        befores = [self._copy_entry(caller, op) for op in ops]
        statuses = self._ops.copy(caller, ops)
        for op, status, (granter, ref, before) in zip(ops, statuses, befores, strict=True):
            self._record("copy", granter, ref, status, before, {
                "source": [op.source.ref, op.source.domid, op.source.offset],
                "dest": [op.dest.ref, op.dest.domid, op.dest.offset], "len": op.len,
                "flags": op.flags})
        return statuses

    def _copy_entry(self, caller: int, op: Copy) -> tuple[int | None, int | None,
                                                          dict[str, Any] | None]:
        """The grant a copy goes through (the source's if it is by ref, else the dest's)."""
        for ptr, flag in ((op.source, GNTCOPY_source_gref), (op.dest, GNTCOPY_dest_gref)):
            if op.flags & flag:
                granter = caller if ptr.domid == DOMID_SELF else ptr.domid
                return granter, ptr.ref, grant_entry(self._ops, granter, ptr.ref)
        return None, None, None

    def transfer(self, sender: int, gfn: int, receiver: int, ref: int) -> int:
        before = grant_entry(self._ops, receiver, ref)
        status = self._ops.transfer(sender, gfn, receiver, ref)
        self._record("transfer", receiver, ref, status, before, {"gfn": gfn})
        return status
