"""xenstore_domain_interface: the page, bounded ring copies, a guest-side client (Xen io/xs_wire.h)."""

from __future__ import annotations

import struct
import threading
import time
from collections import deque

from hvm.evtchn import EventChannel
from pv.xs_wire import (
    XS_WATCH_EVENT,
    WatchEvent,
    XsdSockmsg,
    XsWireError,
    decode_stream,
)

XENSTORE_RING_SIZE = 1024
RING_IDX_MASK = 0xFFFFFFFF  # XENSTORE_RING_IDX is a free-running u32

# struct xenstore_domain_interface (byte offsets; checked against the header with gcc).
REQ_OFFSET = 0
RSP_OFFSET = 1024
REQ_CONS_OFFSET = 2048
REQ_PROD_OFFSET = 2052
RSP_CONS_OFFSET = 2056
RSP_PROD_OFFSET = 2060
SERVER_FEATURES_OFFSET = 2064
CONNECTION_OFFSET = 2068
ERROR_OFFSET = 2072
XENSTORE_DOMAIN_INTERFACE_SIZE = 2076

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2

XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1

XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3

_U32 = struct.Struct("<I")


def MASK_XENSTORE_IDX(idx: int) -> int:  # noqa: N802 - the header's macro name
    return idx & (XENSTORE_RING_SIZE - 1)


class RingIndexError(ValueError):
    """A producer more than XENSTORE_RING_SIZE ahead of its consumer: the peer is hostile."""


def ring_used(cons: int, prod: int) -> int:
    """Bytes between consumer and producer (u32 arithmetic); RingIndexError past the ring size."""
    used = (prod - cons) & RING_IDX_MASK
    if used > XENSTORE_RING_SIZE:
        raise RingIndexError(f"prod {prod:#x} is {used} bytes ahead of cons {cons:#x}")
    return used


def ring_read(ring: memoryview, cons: int, prod: int, limit: int = XENSTORE_RING_SIZE) -> bytes:
    """Copy up to `limit` unread bytes starting at `cons`, wrapping at the ring's end."""
    n = min(ring_used(cons, prod), max(0, limit))
    start = MASK_XENSTORE_IDX(cons)
    first = min(n, XENSTORE_RING_SIZE - start)
    return bytes(ring[start:start + first]) + bytes(ring[0:n - first])


def ring_write(ring: memoryview, cons: int, prod: int, data: bytes) -> int:
    """Copy as much of `data` as there is room for at `prod`; the number of bytes written."""
    n = min(XENSTORE_RING_SIZE - ring_used(cons, prod), len(data))
    start = MASK_XENSTORE_IDX(prod)
    first = min(n, XENSTORE_RING_SIZE - start)
    ring[start:start + first] = data[:first]
    ring[0:n - first] = data[first:n]
    return n


class XenstoreDomainInterface:
    """Typed access to one domain's xenstore page (at least 2076 bytes, normally 4096)."""

    def __init__(self, page: memoryview | bytearray) -> None:
        view = memoryview(page)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.readonly:
            raise ValueError("the xenstore page must be writable")
        if len(view) < XENSTORE_DOMAIN_INTERFACE_SIZE:
            raise ValueError(f"xenstore page of {len(view)} bytes is smaller than "
                             f"xenstore_domain_interface ({XENSTORE_DOMAIN_INTERFACE_SIZE})")
        self.page = view
        self.req = view[REQ_OFFSET:REQ_OFFSET + XENSTORE_RING_SIZE]
        self.rsp = view[RSP_OFFSET:RSP_OFFSET + XENSTORE_RING_SIZE]

    def _get(self, offset: int) -> int:
        return int(_U32.unpack_from(self.page, offset)[0])

    def _set(self, offset: int, value: int) -> None:
        _U32.pack_into(self.page, offset, value & RING_IDX_MASK)

    req_cons = property(lambda s: s._get(REQ_CONS_OFFSET), lambda s, v: s._set(REQ_CONS_OFFSET, v))
    req_prod = property(lambda s: s._get(REQ_PROD_OFFSET), lambda s, v: s._set(REQ_PROD_OFFSET, v))
    rsp_cons = property(lambda s: s._get(RSP_CONS_OFFSET), lambda s, v: s._set(RSP_CONS_OFFSET, v))
    rsp_prod = property(lambda s: s._get(RSP_PROD_OFFSET), lambda s, v: s._set(RSP_PROD_OFFSET, v))
    server_features = property(lambda s: s._get(SERVER_FEATURES_OFFSET),
                               lambda s, v: s._set(SERVER_FEATURES_OFFSET, v))
    connection = property(lambda s: s._get(CONNECTION_OFFSET),
                          lambda s, v: s._set(CONNECTION_OFFSET, v))
    error = property(lambda s: s._get(ERROR_OFFSET), lambda s, v: s._set(ERROR_OFFSET, v))

    # Server (xenstored) side. The daemon passes in its own copy of the index it owns, so a
    # guest scribbling over req_cons / rsp_prod cannot make it re-read or skip bytes.

    def server_read_requests(self, req_cons: int, limit: int = XENSTORE_RING_SIZE
                             ) -> tuple[bytes, int]:
        """(bytes, new req_cons). req_prod is read once; req_cons is published after the copy."""
        prod = self.req_prod
        data = ring_read(self.req, req_cons, prod, limit)
        new_cons = (req_cons + len(data)) & RING_IDX_MASK
        self.req_cons = new_cons
        return data, new_cons

    def server_write_responses(self, rsp_prod: int, data: bytes) -> tuple[int, int]:
        """(bytes written, new rsp_prod). Data lands in rsp[] before rsp_prod moves."""
        n = ring_write(self.rsp, self.rsp_cons, rsp_prod, data)
        new_prod = (rsp_prod + n) & RING_IDX_MASK
        self.rsp_prod = new_prod
        return n, new_prod

    # Client (guest) side: the same rules with the roles swapped.

    def client_write_requests(self, data: bytes) -> int:
        prod = self.req_prod
        n = ring_write(self.req, self.req_cons, prod, data)
        self.req_prod = prod + n
        return n

    def client_read_responses(self, limit: int = XENSTORE_RING_SIZE) -> bytes:
        cons = self.rsp_cons
        data = ring_read(self.rsp, cons, self.rsp_prod, limit)
        self.rsp_cons = cons + len(data)
        return data


class XsRingError(RuntimeError):
    """The server reported an error on the page (the `error` field), or left the ring hostile."""


class XenstoreRingClient:
    """Guest-side xenbus transport over the shared page: what a frontend kernel does.

    Requests go into req[] and req_prod moves, then the event channel is notified; replies and
    watch events are read from rsp[]. Every wait is bounded by `timeout_s`. One request at a
    time (a lock serialises callers); watch events that arrive meanwhile are queued.
    """

    def __init__(self, page: memoryview | bytearray, port: EventChannel, *,
                 timeout_s: float = 2.0) -> None:
        self.intf = XenstoreDomainInterface(page)
        self.port = port
        self.timeout_s = timeout_s
        self.events: deque[WatchEvent] = deque()
        self._replies: dict[int, XsdSockmsg] = {}
        self._inbuf = bytearray()
        self._next_req_id = 1
        self._lock = threading.Lock()

    def request(self, msg_type: int, payload: bytes, tx_id: int = 0) -> XsdSockmsg:
        """Send one request and return its reply (XS_ERROR replies are returned, not raised)."""
        with self._lock:
            req_id = self._next_req_id
            self._next_req_id = (req_id + 1) & RING_IDX_MASK or 1
            deadline = time.monotonic() + self.timeout_s
            self.send_raw(XsdSockmsg(msg_type, req_id, tx_id, payload).pack(), deadline)
            while req_id not in self._replies:
                self._pump(deadline)
            return self._replies.pop(req_id)

    def send_raw(self, data: bytes, deadline: float | None = None) -> None:
        """Put bytes on the request ring (any bytes: tests use it for garbage), notifying."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        sent = 0
        while sent < len(data):
            self._check_error()
            n = self.intf.client_write_requests(data[sent:])
            sent += n
            if n:
                self.port.notify()
            if sent < len(data):
                self._pump(deadline)  # the ring is full: wait for xenstored to consume

    def read_watch(self, timeout_s: float) -> WatchEvent | None:
        """The next watch event, waiting up to timeout_s; None if none arrived."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not self.events:
                try:
                    self._pump(deadline)
                except TimeoutError:
                    return None
            return self.events.popleft()

    def reconnect(self) -> None:
        """Ask for a ring reset (connection = XENSTORE_RECONNECT) and wait until it is done."""
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            self.intf.connection = XENSTORE_RECONNECT
            self.port.notify()
            while self.intf.connection != XENSTORE_CONNECTED:
                if not self.port.wait(deadline - time.monotonic()):
                    raise TimeoutError("xenstored did not complete the ring reconnection")
            self._inbuf.clear()
            self._replies.clear()
            self.events.clear()

    def _check_error(self) -> None:
        err = self.intf.error
        if err != XENSTORE_ERROR_NONE:
            raise XsRingError(f"xenstored reported ring error {err}")

    def _pump(self, deadline: float) -> None:
        """Read whatever rsp[] holds; if there was nothing, block on the event channel."""
        self._check_error()
        try:
            data = self.intf.client_read_responses()
        except RingIndexError as exc:
            raise XsRingError(str(exc)) from exc
        if data:
            self.port.notify()  # room freed in rsp[]: xenstored may have more to write
            self._inbuf += data
            while True:
                try:
                    msg = decode_stream(self._inbuf)
                except XsWireError as exc:
                    raise XsRingError(str(exc)) from exc
                if msg is None:
                    break
                if msg.type == XS_WATCH_EVENT:
                    self.events.append(WatchEvent.from_message(msg))
                else:
                    self._replies[msg.req_id] = msg
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self.port.wait(remaining):
            self._check_error()
            raise TimeoutError("no answer from xenstored on the ring")
