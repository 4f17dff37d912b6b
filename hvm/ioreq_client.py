"""The hypervisor's side of a vCPU's ioreq slot: fill it, notify, block, complete (SEED.md HVM steps 2, 8-9; Xen arch/x86/hvm/ioreq.c)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from devicemodel.server import IoreqServer

from .bufioreq import BufferedIoPage
from .evtchn import EventChannel, EventChannelError
from .ioreq import (
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_WRITE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    IoReq,
    SharedIoPage,
)
from .memory import PAGE_SIZE
from .status import INTERNAL, GuestEnded

TYPE_NAMES = {IOREQ_TYPE_PIO: "pio", IOREQ_TYPE_COPY: "copy", IOREQ_TYPE_PCI_CONFIG: "pci_config"}


@dataclass
class IoreqRecord:
    """One ioreq as `explain` and the trace show it: the bytes posted and answered, and when
    each step of the hand-off happened (ns on the vCPU's clock)."""

    request: IoReq
    posted_bytes: bytes
    answered_bytes: bytes
    data: int
    steps: dict[str, int] = field(default_factory=dict)
    device: str = ""


class IoreqClient:
    """Sends this vCPU's I/O to the device model through the shared I/O page."""

    def __init__(self, vcpu_id: int, page: SharedIoPage, port: EventChannel, now_ns: Callable[[], int],
                 timeout_s: float = 5.0, bufpage: BufferedIoPage | None = None,
                 buf_port: EventChannel | None = None, server: IoreqServer | None = None) -> None:
        self.vcpu_id = vcpu_id
        self.page = page
        self.port = port
        self.bufpage = bufpage
        self.buf_port = buf_port
        self.timeout_s = timeout_s
        self.now_ns = now_ns
        self.server = server
        self.ioreqs = 0
        self.buffered = 0
        self.buffered_full = 0  # buffered writes that found the page full and went synchronously
        self.by_type: dict[str, int] = {}
        self.keep_records = False
        self.records: list[IoreqRecord] = []

    # -- synchronous ioreqs ----------------------------------------------------------------------
    def send(self, req: IoReq) -> int:
        """Post `req` (all fields, then state READY), notify, block the vCPU until the device
        model answers; returns `data`. A device model that dies or never answers ends the run
        with status 8."""
        t_post = self.now_ns() if self.keep_records else 0
        data = self._send_fast(req.addr, req.data, req.size, req.dir == IOREQ_READ, req.type, req.count,
                               req.data_is_ptr, req.df)
        if self.keep_records:
            self._record(req, data, t_post)
        return data

    def _send(self, addr: int, data: int, size: int, direction_in: bool, type_: int, count: int = 1,
              data_is_ptr: bool = False, df: bool = False) -> int:
        """send() from the fields: an IoReq is built only when the ioreq is to be recorded."""
        if self.keep_records:
            return self.send(IoReq(addr, data if data_is_ptr or not direction_in else 0, count, size, 0, 0,
                                   data_is_ptr, IOREQ_READ if direction_in else IOREQ_WRITE, df, type_))
        return self._send_fast(addr, data, size, direction_in, type_, count, data_is_ptr, df)

    def _record(self, req: IoReq, data: int, t_post: int) -> None:
        t_back = self.now_ns()
        posted = IoReq(req.addr, req.data, req.count, req.size, self.port.port, STATE_IOREQ_READY,
                       req.data_is_ptr, req.dir, req.df, req.type)
        answered = IoReq(req.addr, req.data if req.data_is_ptr else data, req.count, req.size,
                         self.port.port, STATE_IORESP_READY, req.data_is_ptr, req.dir, req.df, req.type)
        steps = {"2_posted_and_notified": t_post}
        last = self.server.last_step_times() if self.server is not None else None
        if last is not None:
            steps.update({"6_dm_woke_in_select": last.t_wake, "7_dm_copied_ioreq": last.t_fetched,
                          "8_dm_answered_and_notified": last.t_done})
        steps["9_hypervisor_woke"] = t_back
        device = getattr(self.server.handler, "last_target", "") if self.server is not None else ""
        self.records.append(IoreqRecord(req, posted.pack(), answered.pack(), data, steps, device))
        if len(self.records) > 4096:
            del self.records[:2048]

    def _send_fast(self, addr: int, data: int, size: int, direction_in: bool, type_: int,
                   count: int = 1, data_is_ptr: bool = False, df: bool = False) -> int:
        """One ioreq without building IoReq objects: the hot path of every device-model access
        (with data_is_ptr, `data` is the guest buffer). Same protocol and errors as send()."""
        page, port, vcpu = self.page, self.port, self.vcpu_id
        try:
            page.post_fields(vcpu, addr, data if data_is_ptr or not direction_in else 0, count, size,
                             port.port, data_is_ptr, IOREQ_READ if direction_in else IOREQ_WRITE, df, type_)
            port.notify()
            deadline = 0.0
            while True:
                value = page.take_response(vcpu)  # IORESP_READY -> NONE, or None
                if value is not None:
                    break
                if port.peer_closed or (deadline and time.monotonic() >= deadline):
                    raise self._failure(addr, size, direction_in, type_)
                if not deadline:
                    deadline = time.monotonic() + self.timeout_s
                port.wait(max(0.0, deadline - time.monotonic()))
        except EventChannelError:
            raise self._failure(addr, size, direction_in, type_) from None
        self.ioreqs += 1
        name = TYPE_NAMES.get(type_, str(type_))
        self.by_type[name] = self.by_type.get(name, 0) + 1
        return value

    def _failure(self, addr: int, size: int, direction_in: bool, type_: int) -> GuestEnded:
        kind = TYPE_NAMES.get(type_, str(type_))
        what = f"{kind} {'read' if direction_in else 'write'} addr={addr:#x} size={size}"
        if self.port.peer_closed or self.port.closed:
            why = f"the device model closed its end of event channel port {self.port.port} while {what} was pending"
            if self.server is not None and self.server.error is not None:
                why += f" ({type(self.server.error).__name__}: {self.server.error})"
        else:
            state = self.page.state(self.vcpu_id)
            why = (f"no answer from the device model within {self.timeout_s:g} s for {what}; slot is "
                   f"{'STATE_IOREQ_READY (nobody picked it up)' if state == 1 else 'STATE_IOREQ_INPROCESS (taken, never answered)'}")
        return GuestEnded("error", INTERNAL, f"device model failed: vCPU {self.vcpu_id}: {why}")

    def pio(self, port: int, size: int, direction_in: bool, data: int) -> int:
        return self._send(port, data, size, direction_in, IOREQ_TYPE_PIO)

    def mmio(self, gpa: int, size: int, direction_in: bool, data: int) -> int:
        return self._send(gpa, data, size, direction_in, IOREQ_TYPE_COPY)

    def pci_config(self, sbdf: int, reg: int, size: int, direction_in: bool, data: int) -> int:
        return self._send((sbdf << 32) | reg, data, size, direction_in, IOREQ_TYPE_PCI_CONFIG)

    def string_pio(self, port: int, size: int, direction_in: bool, gpa: int, count: int, df: bool) -> int:
        """REP INS/OUTS: ioreqs with data_is_ptr = 1 and data = the guest buffer, each capped so
        its buffer stays within one page (as Xen does); returns how many ioreqs it took."""
        sent = 0
        while count > 0:
            if df:  # the buffer runs downwards from gpa: room is what lies below, in this page
                room = ((gpa & (PAGE_SIZE - 1)) // size) + 1
            else:
                room = (PAGE_SIZE - (gpa & (PAGE_SIZE - 1))) // size
            chunk = max(1, min(count, room))
            self._send(port, gpa, size, direction_in, IOREQ_TYPE_PIO, chunk, True, df)
            sent += 1
            gpa = gpa - chunk * size if df else gpa + chunk * size
            count -= chunk
        return sent

    # -- buffered ioreqs -------------------------------------------------------------------------
    def buffered_write(self, type_: int, addr: int, size: int, data: int) -> None:
        """A write that needs no answer: into the buffered page and on, without blocking. When
        the page is full it goes as a synchronous ioreq instead (the device model drains the
        buffered page first), so nothing is lost and order is kept."""
        queued = self.bufpage.put(type_, addr, size, data) if self.bufpage is not None else None
        if queued is not None:
            self.buffered += 1
            if not queued:  # the page was empty: the device model may be asleep. Otherwise it has
                assert self.buf_port is not None  # been notified and drains until it is empty,
                self.buf_port.notify()  # as a Xen event already pending is not raised again
            return
        self.buffered_full += 1
        self._send(addr, data, size, False, type_)
