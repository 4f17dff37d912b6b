"""xenstored: one Dom0 thread serving every domain's xenstore ring (Xen io/xs_wire.h, xenstore.txt)."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hvm.evtchn import EventChannel, EventChannelError, wait_any
from pv.xenstore import (
    DOMID_FIRST_RESERVED,
    Connection,
    Watch,
    XenStore,
    domain_path,
    parse_perms,
)
from pv.xenstore_ring import (
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_COMM,
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_RECONNECT,
    XENSTORE_RING_SIZE,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    RingIndexError,
    XenstoreDomainInterface,
)
from pv.xs_wire import (
    OK_PAYLOAD,
    XENSTORE_PAYLOAD_MAX,
    XS_CONTROL,
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_INTRODUCE,
    XS_IS_DOMAIN_INTRODUCED,
    XS_MKDIR,
    XS_READ,
    XS_RELEASE,
    XS_RESET_WATCHES,
    XS_RESUME,
    XS_RM,
    XS_SET_PERMS,
    XS_SET_TARGET,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_UNWATCH,
    XS_WATCH,
    XS_WRITE,
    WatchEvent,
    XsdSockmsg,
    XsError,
    XsWireError,
    decode,
    decode_stream,
    error_reply,
    join_strings,
    split_strings,
)

log = logging.getLogger(__name__)

# XS_INTRODUCE hands over (domid, mfn, port); the machine turns those into the page and our
# end of the event channel. Without a resolver XS_INTRODUCE answers ENOSYS.
RingResolver = Callable[[int, int, int], tuple[memoryview, EventChannel]]

# Requests xenstored accepts from Dom0 only (docs/misc/xenstore.txt); others get EACCES.
_PRIVILEGED = {XS_CONTROL, XS_INTRODUCE, XS_RELEASE, XS_RESUME, XS_SET_TARGET}


@dataclass
class _Reply:
    payload: bytes
    after: Callable[[], None] | None = None  # runs once the reply is queued


@dataclass
class DomainStatus:
    """What the daemon knows about one ring domain (a snapshot)."""

    domid: int
    connected: bool
    disconnect_reason: str
    requests: int
    error_replies: int
    events_dropped: int
    ring_error: int


@dataclass
class _Domain:
    domid: int
    intf: XenstoreDomainInterface
    port: EventChannel
    conn: Connection
    req_cons: int  # our copies of the indices we own: the guest cannot move them for us
    rsp_prod: int
    inbuf: bytearray = field(default_factory=bytearray)
    outq: deque[bytes] = field(default_factory=deque)
    out_lock: threading.Lock = field(default_factory=threading.Lock)
    connected: bool = True
    released: bool = False  # removed from the daemon; a pass already under way skips it
    disconnect_reason: str = ""
    requests: int = 0
    error_replies: int = 0
    events_dropped: int = 0

    def backlog(self) -> int:
        with self.out_lock:
            return sum(len(m) for m in self.outq)


def _no_delivery(_ev: WatchEvent) -> None:
    return None


def _domid_arg(text: str) -> int:
    if not text.isdigit() or int(text) >= DOMID_FIRST_RESERVED:
        raise XsError("EINVAL", f"bad domid {text!r}")
    return int(text)


class Xenstored:
    """XenStore daemon. add_domain() per guest ring; start() runs the one serving thread.

    The thread blocks in poll(2) on all domains' event channels (and a private kick port);
    each wake-up it reads every connected ring's requests, answers them, writes replies and
    queued watch events back, and notifies each domain it wrote to or read from. A domain
    that breaks the protocol is disconnected (the page's `error` field says why) until it
    asks for a ring reconnection; the others are unaffected.
    """

    def __init__(self, store: XenStore | None = None, *, resolve_ring: RingResolver | None = None,
                 idle_wait_s: float = 0.5, max_queued_events: int = 256,
                 output_backlog_limit: int = 4 * XENSTORE_RING_SIZE) -> None:
        self.store = store or XenStore()
        self.resolve_ring = resolve_ring
        self.idle_wait_s = idle_wait_s
        self.max_queued_events = max_queued_events
        self.output_backlog_limit = output_backlog_limit
        self._domains: dict[int, _Domain] = {}
        self._domains_lock = threading.Lock()
        self._kick = EventChannel(0, name="xenstored-kick")  # local port: wakes the thread
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.internal_errors = 0

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, domid: int, page_view: memoryview | bytearray,
                   port: EventChannel) -> None:
        """Start serving `domid`'s ring (what XS_INTRODUCE does). `port` is Dom0's end."""
        intf = XenstoreDomainInterface(page_view)
        with self._domains_lock:
            if domid in self._domains:
                raise ValueError(f"domain {domid} is already introduced")
            d = _Domain(domid, intf, port, self.store.connect(domid, _no_delivery),
                        req_cons=intf.req_cons, rsp_prod=intf.rsp_prod)
            d.conn.deliver = functools.partial(self._queue_event, d)  # needs d: set after
            intf.server_features = (XENSTORE_SERVER_FEATURE_RECONNECTION
                                    | XENSTORE_SERVER_FEATURE_ERROR)
            self._domains[domid] = d
        self.store.fire_special("@introduceDomain")
        self._wake()

    def remove_domain(self, domid: int) -> bool:
        """Stop serving `domid` (XS_RELEASE); its watches and transactions go. The caller
        still owns the page and the event channel."""
        with self._domains_lock:
            d = self._domains.pop(domid, None)
        if d is None:
            return False
        d.released = True
        d.connected = False
        d.disconnect_reason = "released"
        self.store.disconnect(d.conn)
        self.store.fire_special("@releaseDomain")
        self._wake()
        return True

    def domain_status(self, domid: int) -> DomainStatus | None:
        with self._domains_lock:
            d = self._domains.get(domid)
        if d is None:
            return None
        return DomainStatus(d.domid, d.connected, d.disconnect_reason, d.requests,
                            d.error_replies, d.events_dropped, d.intf.error)

    def is_introduced(self, domid: int) -> bool:
        with self._domains_lock:
            return domid == 0 or domid in self._domains

    def connect_local(self, domid: int = 0) -> XsLocalTransport:
        """A Dom0 process's connection (xenstored's Unix socket), speaking the same wire."""
        return XsLocalTransport(self, domid)

    # -- the thread --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("xenstored is already running")
        if self._kick.closed:
            self._kick = EventChannel(0, name="xenstored-kick")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="xenstored", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"xenstored thread did not stop within {timeout_s} s")
        self._thread = None
        self._kick.close()  # its eventfd; start() makes a new one

    def _wake(self) -> None:
        try:
            self._kick.notify()
        except EventChannelError:  # stopped: nobody to wake
            pass

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.service_once(self.idle_wait_s)
            except Exception:  # pragma: no cover - last line of defence: keep serving
                self.internal_errors += 1
                log.exception("xenstored: unexpected error in the serving loop")

    def service_once(self, timeout_s: float) -> None:
        """Wait (bounded) for any domain's event channel, then serve every ring once.

        The serving thread's loop body; call it directly only while the thread is not running.
        """
        if self.running and threading.current_thread() is not self._thread:
            raise RuntimeError("xenstored's thread is serving the rings")
        with self._domains_lock:
            domains = list(self._domains.values())
        ports = [p for p in [self._kick, *(d.port for d in domains)] if not p.closed]
        if ports:
            try:
                wait_any(ports, timeout_s)
            except EventChannelError:
                pass  # a port closed under us: the pass below notices and disconnects it
        for d in domains:
            try:
                self._service(d)
            except Exception as exc:  # a bug must cost one domain, never the daemon
                self.internal_errors += 1
                log.exception("xenstored: domain %d", d.domid)
                self._break(d, XENSTORE_ERROR_COMM, f"internal error: {exc!r}")

    # -- one domain's ring ---------------------------------------------------------------

    def _service(self, d: _Domain) -> None:
        if d.released:
            return
        if d.port.closed:
            if d.connected:
                self._break(d, XENSTORE_ERROR_COMM, "event channel closed", notify=False)
            return
        if d.intf.connection == XENSTORE_RECONNECT:
            self._reconnect(d)
            return
        if not d.connected:
            return
        if d.port.peer_closed:
            self._break(d, XENSTORE_ERROR_COMM, "guest closed its event channel", notify=False)
            return
        consumed = produced = 0
        if d.backlog() < self.output_backlog_limit:  # else let the guest drain replies first
            try:
                data, d.req_cons = d.intf.server_read_requests(d.req_cons)
            except RingIndexError as exc:
                self._break(d, XENSTORE_ERROR_RINGIDX, f"request ring: {exc}")
                return
            consumed = len(data)
            d.inbuf += data
            while d.connected:
                try:
                    msg = decode_stream(d.inbuf)
                except XsWireError as exc:
                    self._break(d, XENSTORE_ERROR_PROTO, str(exc))
                    return
                if msg is None:
                    break
                d.requests += 1
                self._serve(d, msg)
        try:
            produced = self._flush(d)
        except RingIndexError as exc:
            self._break(d, XENSTORE_ERROR_RINGIDX, f"response ring: {exc}")
            return
        if consumed or produced:
            self._notify(d)

    def _serve(self, d: _Domain, msg: XsdSockmsg) -> None:
        def send(reply: XsdSockmsg) -> None:
            if reply.type != msg.type:
                d.error_replies += 1
            with d.out_lock:
                d.outq.append(reply.pack())
        self.handle_message(d.conn, msg, send)

    def _queue_event(self, d: _Domain, ev: WatchEvent) -> None:
        """Called by the store (under its lock, any thread): queue, then wake the thread."""
        with d.out_lock:
            if not d.connected or len(d.outq) >= self.max_queued_events:
                d.events_dropped += 1
                return
            d.outq.append(ev.to_message().pack())
        self._wake()

    def _flush(self, d: _Domain) -> int:
        """Write queued output into rsp[] as far as it fits; bytes written."""
        total = 0
        with d.out_lock:
            while d.outq:
                head = d.outq[0]
                n, d.rsp_prod = d.intf.server_write_responses(d.rsp_prod, head)
                total += n
                if n < len(head):
                    d.outq[0] = head[n:]  # the rest goes when the guest has read some
                    break
                d.outq.popleft()
        return total

    def _notify(self, d: _Domain) -> None:
        try:
            d.port.notify()
        except EventChannelError:
            pass  # closed under us; the next pass disconnects

    def _break(self, d: _Domain, error: int, reason: str, notify: bool = True) -> None:
        """Stop serving a misbehaving ring: say why in the page, drop its state, keep others."""
        log.warning("xenstored: disconnecting domain %d: %s", d.domid, reason)
        d.connected = False
        d.disconnect_reason = reason
        d.inbuf.clear()
        with d.out_lock:
            d.outq.clear()
        self.store.reset_watches(d.conn)
        try:
            d.intf.error = error
        except Exception:  # pragma: no cover - page gone
            pass
        if notify:
            self._notify(d)

    def _reconnect(self, d: _Domain) -> None:
        """docs/misc/xenstore-ring.txt: forget everything, zero the indices, then CONNECTED."""
        self.store.reset_watches(d.conn)
        d.inbuf.clear()
        with d.out_lock:
            d.outq.clear()
        d.req_cons = d.rsp_prod = 0
        intf = d.intf
        intf.req_cons = intf.req_prod = intf.rsp_cons = intf.rsp_prod = 0
        intf.error = XENSTORE_ERROR_NONE
        d.connected = True
        d.disconnect_reason = ""
        intf.connection = XENSTORE_CONNECTED  # last: the guest may use the ring from here
        self._notify(d)

    # -- requests ----------------------------------------------------------------------

    def handle_message(self, conn: Connection, msg: XsdSockmsg,
                       send: Callable[[XsdSockmsg], None]) -> None:
        """Answer one request from `conn`; send() gets the reply (XS_ERROR on failure)."""
        try:
            if msg.type in _PRIVILEGED and not conn.privileged:
                raise XsError("EACCES", "privileged request")
            handler = self._handlers.get(msg.type)
            if handler is None:
                raise XsError("EINVAL", f"unknown request type {msg.type}")
            reply = handler(self, conn, msg)
            if len(reply.payload) > XENSTORE_PAYLOAD_MAX:
                raise XsError("E2BIG", "reply longer than XENSTORE_PAYLOAD_MAX")
        except XsError as exc:
            send(error_reply(msg, exc.errname))
            return
        except (XsWireError, UnicodeError, ValueError):
            send(error_reply(msg, "EINVAL"))
            return
        except Exception:
            self.internal_errors += 1
            log.exception("xenstored: request type %d", msg.type)
            send(error_reply(msg, "EIO"))
            return
        send(XsdSockmsg(msg.type, msg.req_id, msg.tx_id, reply.payload))
        if reply.after is not None:
            reply.after()

    @staticmethod
    def _args(msg: XsdSockmsg, count: int) -> list[str]:
        args = split_strings(msg.payload)
        if len(args) != count:
            raise XsError("EINVAL", f"expected {count} strings, got {len(args)}")
        return args

    def _directory(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (path,) = self._args(msg, 1)
        return _Reply(join_strings(*self.store.directory(conn, path, msg.tx_id)))

    def _directory_part(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        path, offset_text = self._args(msg, 2)
        if not offset_text.isdigit():
            raise XsError("EINVAL", "bad offset")
        generation, children = self.store.directory_generation(conn, path, msg.tx_id)
        listing = join_strings(*children)
        head = join_strings(str(generation))
        chunk = listing[int(offset_text):]
        room = XENSTORE_PAYLOAD_MAX - len(head) - 1
        if len(chunk) > room:  # cut at a name boundary; no empty name means "more to come"
            chunk = chunk[:chunk.rindex(b"\0", 0, room) + 1]
            return _Reply(head + chunk)
        return _Reply(head + chunk + b"\0")

    def _read(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (path,) = self._args(msg, 1)
        return _Reply(self.store.read(conn, path, msg.tx_id))

    def _get_perms(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (path,) = self._args(msg, 1)
        perms = self.store.get_perms(conn, path, msg.tx_id)
        return _Reply(join_strings(*(str(p) for p in perms)))

    def _write(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        raw_path, sep, value = msg.payload.partition(b"\0")
        if not sep:
            raise XsError("EINVAL", "WRITE needs path\\0value")
        self.store.write(conn, raw_path.decode("latin-1"), value, msg.tx_id)
        return _Reply(OK_PAYLOAD)

    def _mkdir(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (path,) = self._args(msg, 1)
        self.store.mkdir(conn, path, msg.tx_id)
        return _Reply(OK_PAYLOAD)

    def _rm(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (path,) = self._args(msg, 1)
        self.store.rm(conn, path, msg.tx_id)
        return _Reply(OK_PAYLOAD)

    def _set_perms(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        args = split_strings(msg.payload)
        if len(args) < 2:
            raise XsError("EINVAL", "SET_PERMS needs a path and at least one permission")
        self.store.set_perms(conn, args[0], parse_perms(args[1:]), msg.tx_id)
        return _Reply(OK_PAYLOAD)

    def _watch(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        path, token = self._args(msg, 2)
        w: Watch = self.store.watch(conn, path, token, initial_event=False)
        # xenstored acknowledges first, then fires the watch once.
        return _Reply(OK_PAYLOAD, after=lambda: self.store.fire_initial(conn, w))

    def _unwatch(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        path, token = self._args(msg, 2)
        self.store.unwatch(conn, path, token)
        return _Reply(OK_PAYLOAD)

    def _transaction_start(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        if msg.tx_id != 0:
            raise XsError("EBUSY", "already in a transaction")
        return _Reply(join_strings(str(self.store.transaction_start(conn))))

    def _transaction_end(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (verdict,) = self._args(msg, 1)
        if verdict not in ("T", "F"):
            raise XsError("EINVAL", "TRANSACTION_END takes T or F")
        self.store.transaction_end(conn, msg.tx_id, verdict == "T")
        return _Reply(OK_PAYLOAD)

    def _introduce(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        domid_text, mfn_text, port_text = self._args(msg, 3)
        domid = _domid_arg(domid_text)
        if not (mfn_text.isdigit() and port_text.isdigit()):
            raise XsError("EINVAL", "bad mfn or port")
        if self.is_introduced(domid):
            return _Reply(OK_PAYLOAD)
        if self.resolve_ring is None:
            raise XsError("ENOSYS", "no way to map a ring from an mfn")
        page, port = self.resolve_ring(domid, int(mfn_text), int(port_text))
        self.add_domain(domid, page, port)
        return _Reply(OK_PAYLOAD)

    def _release(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (domid_text,) = self._args(msg, 1)
        if not self.remove_domain(_domid_arg(domid_text)):
            raise XsError("ENOENT", "domain not introduced")
        return _Reply(OK_PAYLOAD)

    def _get_domain_path(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (domid_text,) = self._args(msg, 1)
        return _Reply(join_strings(domain_path(_domid_arg(domid_text))))

    def _is_domain_introduced(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (domid_text,) = self._args(msg, 1)
        return _Reply(b"T\0" if self.is_introduced(_domid_arg(domid_text)) else b"F\0")

    def _resume(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        (domid_text,) = self._args(msg, 1)
        if not self.is_introduced(_domid_arg(domid_text)):
            raise XsError("ENOENT", "domain not introduced")
        return _Reply(OK_PAYLOAD)

    def _set_target(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        domid_text, target_text = self._args(msg, 2)
        domid, target = _domid_arg(domid_text), _domid_arg(target_text)
        if not (self.is_introduced(domid) and self.is_introduced(target)):
            raise XsError("ENOENT", "both domains must be introduced")
        self.store.set_target(domid, target)
        return _Reply(OK_PAYLOAD)

    def _reset_watches(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        self.store.reset_watches(conn)
        return _Reply(OK_PAYLOAD)

    def _control(self, conn: Connection, msg: XsdSockmsg) -> _Reply:
        args = split_strings(msg.payload)
        if len(args) == 2 and args[0] == "print":
            log.info("xenstored control print: %s", args[1])
            return _Reply(OK_PAYLOAD)
        raise XsError("EINVAL", "unsupported XS_CONTROL command")

    _handlers: dict[int, Callable[[Xenstored, Connection, XsdSockmsg], _Reply]] = {
        XS_CONTROL: _control,
        XS_DIRECTORY: _directory,
        XS_READ: _read,
        XS_GET_PERMS: _get_perms,
        XS_WATCH: _watch,
        XS_UNWATCH: _unwatch,
        XS_TRANSACTION_START: _transaction_start,
        XS_TRANSACTION_END: _transaction_end,
        XS_INTRODUCE: _introduce,
        XS_RELEASE: _release,
        XS_GET_DOMAIN_PATH: _get_domain_path,
        XS_WRITE: _write,
        XS_MKDIR: _mkdir,
        XS_RM: _rm,
        XS_SET_PERMS: _set_perms,
        XS_IS_DOMAIN_INTRODUCED: _is_domain_introduced,
        XS_RESUME: _resume,
        XS_SET_TARGET: _set_target,
        XS_RESET_WATCHES: _reset_watches,
        XS_DIRECTORY_PART: _directory_part,
    }


class XsLocalTransport:
    """A Dom0 client's connection: requests are packed, framed and answered synchronously on
    the caller's thread; watch events wait in a bounded queue (like xenstored's socket)."""

    def __init__(self, daemon: Xenstored, domid: int = 0, max_events: int = 1024) -> None:
        self.daemon = daemon
        self.events: queue.Queue[WatchEvent] = queue.Queue(maxsize=max_events)
        self.events_dropped = 0
        self.conn = daemon.store.connect(domid, self._deliver)
        self._next_req_id = 1
        self._lock = threading.Lock()

    def _deliver(self, ev: WatchEvent) -> None:
        try:
            self.events.put_nowait(ev)
        except queue.Full:
            self.events_dropped += 1

    def request(self, msg_type: int, payload: bytes, tx_id: int = 0) -> XsdSockmsg:
        with self._lock:
            req_id = self._next_req_id
            self._next_req_id += 1
        wire = decode(XsdSockmsg(msg_type, req_id, tx_id, payload).pack())
        replies: list[bytes] = []
        self.daemon.handle_message(self.conn, wire, lambda r: replies.append(r.pack()))
        return decode(replies[0])

    def read_watch(self, timeout_s: float) -> WatchEvent | None:
        try:
            return self.events.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def close(self) -> None:
        self.daemon.store.disconnect(self.conn)
