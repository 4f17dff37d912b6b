"""Dom0 split-driver backends: the FrontendLink they take and the event loop thread each runs (Xen io/ring.h, event_channel.h)."""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable
from typing import Any, Protocol

from hvm.evtchn import FIRST_PORT, EventChannel, EventChannelError, make_interdomain_pair
from hvm.memory import GuestMemory
from pv.grant_table import GNTST_NAMES, GrantOps

log = logging.getLogger(__name__)

DOMID_DOM0 = 0  # the backends' own domain: every grant op is made on its behalf

# on_ring_push(ring, prod, event, notify): a backend published responses up to `prod`; the
# frontend had asked to be woken at `event` (rsp_event); `notify` is the decision taken.
RingPushHook = Callable[[str, int, int, bool], None]
# on_step(kind, domid, fields): one step of a request's way through a backend, for the trace
# (pv.trace_pv.StepTracer turns them into records). `domid` is the frontend's domain. Kinds:
# "ring_take" (a request copied out of the ring, req_cons advanced), "grant_op" (map, unmap,
# copy or transfer with its status and the grant entry's bytes before and after),
# "bridge_tx" (a frame handed to the bridge), "bridge_rx" (a frame the bridge queued for a
# vif), "ring_response" (a response written), "ring_push" (responses published, with the
# notify decision) and "event_send" (Dom0's end notified). Called on the backend's thread;
# a backend given None builds no fields at all.
StepHook = Callable[[str, int, dict[str, Any]], None]
Service = Callable[[], None]


def grant_entry(ops: GrantOps, domid: int, ref: int) -> dict[str, Any] | None:
    """grant_entry_v1 `ref` of `domid`'s table as the trace shows it: its 8 bytes and fields
    (None if there is no such entry)."""
    table = ops.tables.get(domid)
    if table is None or not 0 <= ref < table.nr_entries:
        return None
    entry = table.entry(ref)
    raw = (entry.flags.to_bytes(2, "little") + entry.domid.to_bytes(2, "little")
           + entry.frame.to_bytes(4, "little"))
    return {"hex": raw.hex(), "flags": entry.flags, "domid": entry.domid, "frame": entry.frame}


def status_name(status: int) -> str:
    """A GNTST_* code's name as grant_table.h's GNTTABOP_error_msgs says it."""
    return GNTST_NAMES.get(status, f"GNTST {status}")


class FrontendLink(Protocol):
    """What a backend needs of the frontend's domain (PvDomain satisfies it).

    `bind_evtchn(port)` binds the domain's unbound port (made by its EVTCHNOP_alloc_unbound
    with remote_dom = 0) to Dom0 and returns Dom0's end; the backend owns and closes it.
    """

    @property
    def domid(self) -> int: ...

    @property
    def memory(self) -> GuestMemory: ...

    @property
    def grant_ops(self) -> GrantOps: ...

    def bind_evtchn(self, port: int) -> EventChannel: ...


class ConnectError(Exception):
    """A frontend's ring or event channel cannot be used (bad grant, unknown port, ...)."""


class LocalFrontendLink:
    """A FrontendLink for a frontend run as Python code in Dom0 (tests, benchmarks).

    alloc_unbound() plays the guest's EVTCHNOP_alloc_unbound: it makes a linked pair and keeps
    the guest's end (guest_end(port)) for the frontend code; bind_evtchn() hands the other end
    to the backend once, as Xen binds an unbound port once.
    """

    def __init__(self, domid: int, memory: GuestMemory, grant_ops: GrantOps) -> None:
        self._domid = domid
        self._memory = memory
        self._grant_ops = grant_ops
        self._guest: dict[int, EventChannel] = {}
        self._unbound: dict[int, EventChannel] = {}
        self._lock = threading.Lock()

    @property
    def domid(self) -> int:
        return self._domid

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def grant_ops(self) -> GrantOps:
        return self._grant_ops

    def alloc_unbound(self) -> int:
        with self._lock:
            port = FIRST_PORT
            while port in self._guest:
                port += 1
            guest, dom0 = make_interdomain_pair(port, port, name=f"d{self._domid}p{port}")
            self._guest[port] = guest
            self._unbound[port] = dom0
            return port

    def guest_end(self, port: int) -> EventChannel:
        with self._lock:
            try:
                return self._guest[port]
            except KeyError:
                raise EventChannelError(f"domain {self._domid}: port {port} is not allocated") from None

    def bind_evtchn(self, port: int) -> EventChannel:
        with self._lock:
            dom0 = self._unbound.pop(port, None)
        if dom0 is None:
            raise EventChannelError(f"domain {self._domid}: port {port} is not an unbound port")
        return dom0

    def close(self) -> None:
        with self._lock:
            ends = list(self._guest.values()) + list(self._unbound.values())
            self._guest.clear()
            self._unbound.clear()
        for end in ends:
            end.close()


class BackendLoop:
    """One backend thread: blocks in poll(2) on its devices' event channels and a private kick
    port, and runs the service of each device that was notified or asked for work.

    Waits are bounded (`idle_wait_s`), so stop() is honoured even when no frontend ever sends.
    A service that raises is logged and counted; the thread and the other devices go on.
    """

    def __init__(self, name: str, idle_wait_s: float = 0.5) -> None:
        self.name = name
        self.idle_wait_s = idle_wait_s
        self.wakeups = 0
        self.service_errors = 0
        self._kick = EventChannel(0, name=f"{name}-kick")  # a local port: wakes the thread
        self._services: dict[EventChannel, Service] = {}
        self._requested: list[Service] = []
        self._dirty = True  # the set of channels changed: rebuild the poll set
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def watch(self, channel: EventChannel, service: Service) -> None:
        """Run `service` on the thread each time `channel` is notified."""
        with self._lock:
            self._services[channel] = service
            self._dirty = True
        self._wake()

    def unwatch(self, channel: EventChannel) -> None:
        """Stop waiting on `channel`. Call before closing it: the kick makes the thread leave
        its poll set before the descriptor goes away."""
        with self._lock:
            self._services.pop(channel, None)
            self._dirty = True
        self._wake()

    def request(self, service: Service) -> None:
        """Run `service` on the thread soon (work queued by another thread, or a service that
        stopped early to let other devices in)."""
        with self._lock:
            if all(s is not service for s in self._requested):
                self._requested.append(service)
        self._wake()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already running")
        if self._kick.closed:
            self._kick = EventChannel(0, name=f"{self.name}-kick")
            self._dirty = True
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"{self.name} thread did not stop within {timeout_s} s")
        self._thread = None
        self._kick.close()

    def _wake(self) -> None:
        try:
            self._kick.notify()
        except EventChannelError:  # stopped: nobody to wake
            pass

    def _poll_set(self) -> _PollSet | None:
        with self._lock:
            channels = [self._kick] + [ch for ch in self._services if not ch.closed]
            self._dirty = False
        try:
            return _PollSet(channels)
        except EventChannelError:  # one closed between the check and fileno(): try again
            with self._lock:
                self._dirty = True
            return None

    def _run(self) -> None:
        poll_set: _PollSet | None = None
        while not self._stopping.is_set():
            if poll_set is None or self._dirty:
                poll_set = self._poll_set()
                if poll_set is None:
                    continue
            fired, stale = poll_set.wait(self.idle_wait_s)
            if stale:  # someone else closed a port we wait on: drop it from the poll set
                with self._lock:
                    self._dirty = True
            if self._stopping.is_set():
                break
            with self._lock:
                todo = [self._services[ch] for ch in fired if ch in self._services]
                todo += self._requested
                self._requested = []
            if fired:
                self.wakeups += 1
            ran: list[Service] = []
            for service in todo:
                if any(s is service for s in ran):
                    continue
                ran.append(service)
                try:
                    service()
                except Exception:  # a backend bug must not take the others down
                    self.service_errors += 1
                    log.exception("%s: device service failed", self.name)


class SplitBackend:
    """What blkback and netback share: their devices' connection ends, on one BackendLoop
    (Linux's xen_blkif_disconnect / xenvif_disconnect_data). A subclass sets `loop` and lists
    its devices in _devices(); a device has lock, connected, disconnect_reason, channel,
    grant_ops, ring_handles, stats.grant_ops and on_disconnect."""

    loop: BackendLoop

    def _devices(self) -> list[Any]:
        raise NotImplementedError

    def start(self) -> None:
        self.loop.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self.loop.stop(timeout_s)
        for dev in self._devices():
            self.disconnect(dev, "backend stopped")

    def disconnect(self, dev: Any, reason: str = "disconnected") -> None:
        """Stop serving `dev` (the xenbus side asked): unmap its rings, close Dom0's end."""
        with dev.lock:
            self._teardown(dev, reason)

    def _fail(self, dev: Any, reason: str) -> None:
        """The frontend broke the protocol: disconnect it and tell whoever owns the device."""
        if not dev.connected:
            return
        self._teardown(dev, reason)
        if dev.on_disconnect is not None:
            dev.on_disconnect(reason)

    def _teardown(self, dev: Any, reason: str) -> None:
        if not dev.connected:
            return
        dev.connected = False
        dev.disconnect_reason = reason
        self.loop.unwatch(dev.channel)
        dev.channel.close()
        for handle in dev.ring_handles:
            dev.grant_ops.unmap(DOMID_DOM0, handle)
            dev.stats.grant_ops += 1
        self._torn_down(dev)

    def _torn_down(self, dev: Any) -> None:
        """After a device's rings are gone: drop what else it holds (nothing, by default)."""


class _PollSet:
    """The loop's poll(2) set. Unlike hvm.evtchn.WaitSet it reports a port whose descriptor was
    closed under it (POLLNVAL) instead of polling it again: a backend must not spin on a port
    its domain's teardown closed."""

    _GONE = select.POLLNVAL | select.POLLERR | select.POLLHUP

    def __init__(self, channels: list[EventChannel]) -> None:
        self._by_fd = {ch.fileno(): ch for ch in channels}
        self._poller = select.poll()
        for fd in self._by_fd:
            self._poller.register(fd, select.POLLIN)

    def wait(self, timeout_s: float) -> tuple[list[EventChannel], bool]:
        """(ports notified, now consumed, or found closed; whether any was closed)."""
        ms = max(0, int(timeout_s * 1000 + 0.999))
        fired: list[EventChannel] = []
        stale = False
        for fd, events in self._poller.poll(ms):
            ch = self._by_fd[fd]
            if events & self._GONE or ch.closed:
                stale = True
                fired.append(ch)  # its service sees the port closed and disconnects
            elif ch.consume():
                fired.append(ch)
        return fired, stale
