"""Console backend: drains each guest's xencons_interface out[] to a sink and feeds in[] (Xen io/console.h, xenconsoled)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hvm.evtchn import EventChannel, EventChannelError
from pv.backends import BackendLoop, ConnectError, FrontendLink, RingPushHook
from pv.layouts import X86_32, field_offsets, xencons_interface

_OFFSETS = field_offsets(xencons_interface(X86_32))  # identical on x86_64: bytes and u32s
XENCONS_IN = _OFFSETS["in"]
XENCONS_OUT = _OFFSETS["out"]
XENCONS_IN_SIZE = XENCONS_OUT - XENCONS_IN  # 1024
XENCONS_OUT_SIZE = _OFFSETS["in_cons"] - XENCONS_OUT  # 2048
XENCONS_IN_CONS = _OFFSETS["in_cons"]
XENCONS_IN_PROD = _OFFSETS["in_prod"]
XENCONS_OUT_CONS = _OFFSETS["out_cons"]
XENCONS_OUT_PROD = _OFFSETS["out_prod"]
XENCONS_IDX_MASK = 0xFFFF_FFFF  # XENCONS_RING_IDX is a u32 running free

Sink = Callable[[bytes], None]


class XenconsInterface:
    """The console page both ends see: two byte rings with free-running u32 indices.

    MASK_XENCONS_IDX(idx, ring) is idx & (sizeof(ring) - 1): both ring sizes are powers of two.
    The guest owns out_prod and in_cons, the backend out_cons and in_prod.
    """

    def __init__(self, view: memoryview) -> None:
        if view.nbytes < XENCONS_OUT_PROD + 4:
            raise ValueError(f"a console page needs {XENCONS_OUT_PROD + 4} bytes")
        self.view = view
        self._idx = view[XENCONS_IN_CONS:XENCONS_OUT_PROD + 4].cast("I")

    def _get(self, offset: int) -> int:
        return self._idx[(offset - XENCONS_IN_CONS) // 4]

    def _set(self, offset: int, value: int) -> None:
        self._idx[(offset - XENCONS_IN_CONS) // 4] = value & XENCONS_IDX_MASK

    @property
    def in_cons(self) -> int:
        return self._get(XENCONS_IN_CONS)

    @in_cons.setter
    def in_cons(self, value: int) -> None:
        self._set(XENCONS_IN_CONS, value)

    @property
    def in_prod(self) -> int:
        return self._get(XENCONS_IN_PROD)

    @in_prod.setter
    def in_prod(self, value: int) -> None:
        self._set(XENCONS_IN_PROD, value)

    @property
    def out_cons(self) -> int:
        return self._get(XENCONS_OUT_CONS)

    @out_cons.setter
    def out_cons(self, value: int) -> None:
        self._set(XENCONS_OUT_CONS, value)

    @property
    def out_prod(self) -> int:
        return self._get(XENCONS_OUT_PROD)

    @out_prod.setter
    def out_prod(self, value: int) -> None:
        self._set(XENCONS_OUT_PROD, value)

    def read_out(self, cons: int, count: int) -> bytes:
        """`count` bytes of out[] from index `cons`, across the wrap."""
        return _ring_read(self.view, XENCONS_OUT, XENCONS_OUT_SIZE, cons, count)

    def write_in(self, prod: int, data: bytes) -> None:
        """Write `data` into in[] from index `prod`, across the wrap."""
        _ring_write(self.view, XENCONS_IN, XENCONS_IN_SIZE, prod, data)

    # What a guest's console driver does; tests and Dom0-side frontends use these.
    def write_out(self, prod: int, data: bytes) -> None:
        _ring_write(self.view, XENCONS_OUT, XENCONS_OUT_SIZE, prod, data)

    def read_in(self, cons: int, count: int) -> bytes:
        return _ring_read(self.view, XENCONS_IN, XENCONS_IN_SIZE, cons, count)


def _ring_read(view: memoryview, base: int, size: int, idx: int, count: int) -> bytes:
    out = bytearray()
    while count:
        pos = idx & (size - 1)
        chunk = min(count, size - pos)
        out += view[base + pos:base + pos + chunk]
        idx += chunk
        count -= chunk
    return bytes(out)


def _ring_write(view: memoryview, base: int, size: int, idx: int, data: bytes) -> None:
    done = 0
    while done < len(data):
        pos = (idx + done) & (size - 1)
        chunk = min(len(data) - done, size - pos)
        view[base + pos:base + pos + chunk] = data[done:done + chunk]
        done += chunk


@dataclass
class ConsoleStats:
    bytes_out: int = 0  # guest -> sink
    bytes_in: int = 0  # input written into in[]
    input_dropped: int = 0  # input refused because too much was already waiting
    notifications_sent: int = 0


class Console:
    """One guest's console: its page, Dom0's end of its console event channel, the sink."""

    def __init__(self, backend: ConsoleBackend, domid: int, page: memoryview,
                 channel: EventChannel, sink: Sink, max_pending_input: int) -> None:
        self.domid = domid
        self.name = f"xencons/d{domid}"
        self.intf = XenconsInterface(page)
        self.channel = channel
        self.sink = sink
        self.stats = ConsoleStats()
        self.connected = True
        self.disconnect_reason = ""
        self.max_pending_input = max_pending_input
        self._backend = backend
        self._pending: deque[bytes] = deque()
        self._pending_len = 0
        self._input_lock = threading.Lock()
        self.lock = threading.RLock()  # held while the service runs or the console is torn down

    @property
    def notifications_received(self) -> int:
        return self.channel.received

    def write_input(self, data: bytes) -> int:
        """Queue keyboard input for the guest; returns how many bytes were accepted."""
        if not self.connected:
            return 0
        with self._input_lock:
            room = max(0, self.max_pending_input - self._pending_len)
            accepted = bytes(data[:room])
            self.stats.input_dropped += len(data) - len(accepted)
            if accepted:
                self._pending.append(accepted)
                self._pending_len += len(accepted)
        if accepted:
            self._backend.loop.request(self.service)
        return len(accepted)

    @property
    def pending_input(self) -> int:
        with self._input_lock:
            return self._pending_len

    def service(self) -> None:
        with self.lock:
            if not self.connected:
                return
            if self.channel.peer_closed or self.channel.closed:
                self._backend._drop(self, "the console event channel was closed")
                return
            notify = self._drain_out()
            if notify is None:
                return
            more = self._fill_in()
            if more is None:
                return
            if notify or more:
                self._notify()

    def _drain_out(self) -> bool | None:
        """Copy out[out_cons, out_prod) to the sink once; None if the guest broke the ring."""
        intf = self.intf
        cons = intf.out_cons
        prod = intf.out_prod  # read once: the guest may move it while we copy
        count = (prod - cons) & XENCONS_IDX_MASK
        if count > XENCONS_OUT_SIZE:
            self._backend._drop(self, f"out_prod {prod:#x} is {count} bytes past out_cons "
                                      f"{cons:#x} (ring of {XENCONS_OUT_SIZE})")
            return None
        if count == 0:
            return False
        data = intf.read_out(cons, count)
        # The bytes are copied before out_cons moves: only then may the guest reuse them.
        intf.out_cons = prod
        self.stats.bytes_out += count
        self._backend._report(self.name + "/out", prod, prod, True)
        try:
            self.sink(data)
        except Exception:  # a sink that fails loses output, never the backend
            self._backend.sink_errors += 1
        return True

    def _fill_in(self) -> bool | None:
        """Move queued input into in[] as far as there is room; None if the ring is broken."""
        with self._input_lock:
            if not self._pending:
                return False
            intf = self.intf
            prod = intf.in_prod
            cons = intf.in_cons
            used = (prod - cons) & XENCONS_IDX_MASK
            if used > XENCONS_IN_SIZE:
                reason = f"in_cons {cons:#x} is not within {XENCONS_IN_SIZE} of in_prod {prod:#x}"
            else:
                reason = ""
                room = XENCONS_IN_SIZE - used
                chunk = bytearray()
                while self._pending and len(chunk) < room:
                    head = self._pending.popleft()
                    take = head[:room - len(chunk)]
                    chunk += take
                    if len(take) < len(head):
                        self._pending.appendleft(head[len(take):])
                self._pending_len -= len(chunk)
        if reason:
            self._backend._drop(self, reason)
            return None
        if not chunk:
            return False  # full: the guest notifies us when it has read some
        # The bytes first, in_prod last: the guest trusts in[] up to in_prod.
        intf.write_in(prod, bytes(chunk))
        intf.in_prod = prod + len(chunk)
        self.stats.bytes_in += len(chunk)
        self._backend._report(self.name + "/in", intf.in_prod, intf.in_prod, True)
        return True

    def _notify(self) -> None:
        try:
            self.channel.notify()
            self.stats.notifications_sent += 1
        except EventChannelError:
            pass


class ConsoleBackend:
    """xenconsoled: one thread serving every guest's console ring.

    The xencons_interface has no event indices: the guest notifies after moving out_prod or
    in_cons, and the backend after moving out_cons or in_prod; on_ring_push reports each with
    event = prod (always notify). A guest whose indices are impossible is disconnected (its
    ring is "broken", as xenconsoled says); the other consoles go on.
    """

    def __init__(self, *, on_ring_push: RingPushHook | None = None, idle_wait_s: float = 0.5,
                 max_pending_input: int = 64 * 1024, name: str = "xenconsoled") -> None:
        self.loop = BackendLoop(name, idle_wait_s)
        self.on_ring_push = on_ring_push
        self.max_pending_input = max_pending_input
        self.consoles: list[Console] = []
        self.sink_errors = 0
        self._lock = threading.Lock()

    def add(self, domid: int, page: memoryview, channel: EventChannel, sink: Sink) -> Console:
        """Serve the console on `page` (the guest's ring page, e.g. memory.p2m(mfn).view())
        notified through `channel` (Dom0's end of the guest's console port)."""
        console = Console(self, domid, page, channel, sink, self.max_pending_input)
        with self._lock:
            self.consoles.append(console)
        self.loop.watch(channel, console.service)
        self.loop.request(console.service)  # output written before we attached
        return console

    def attach(self, link: FrontendLink, gfn: int, port: int, sink: Sink) -> Console:
        """add() for a domain whose console page is guest frame `gfn` and port `port` unbound."""
        try:
            page = link.memory.p2m(gfn).view()
        except Exception as exc:
            raise ConnectError(f"domain {link.domid}: console frame {gfn:#x}: {exc}") from exc
        try:
            channel = link.bind_evtchn(port)
        except (EventChannelError, ValueError) as exc:
            raise ConnectError(f"domain {link.domid}: console port {port}: {exc}") from exc
        return self.add(link.domid, page, channel, sink)

    def remove(self, console: Console, reason: str = "removed") -> None:
        with console.lock:
            self._drop(console, reason)

    def _drop(self, console: Console, reason: str) -> None:
        """Disconnect one console (its lock held): stop waiting on it, close Dom0's end."""
        if not console.connected:
            return
        console.connected = False
        console.disconnect_reason = reason
        self.loop.unwatch(console.channel)
        console.channel.close()

    def _report(self, ring: str, prod: int, event: int, notify: bool) -> None:
        if self.on_ring_push is not None:
            self.on_ring_push(ring, prod, event, notify)

    def start(self) -> None:
        self.loop.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread, then give one last drain to each console and disconnect it."""
        self.loop.stop(timeout_s)
        with self._lock:
            consoles = list(self.consoles)
        for console in consoles:
            console.service()
            self.remove(console, "backend stopped")
