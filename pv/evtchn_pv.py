"""A PV domain's event-channel ports: the port table over its shared_info (2-level ABI), binding to Dom0 and to other domains, and the thread that turns Dom0 notifications into pending bits (Xen common/event_channel.c, event_2l.c)."""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hvm.evtchn import EventChannel, EventChannelError, make_interdomain_pair
from pv.shared_info import SharedInfo

log = logging.getLogger(__name__)

# Xen's internal channel states (struct evtchn.state) and what EVTCHNOP_status reports.
ECS_FREE, ECS_RESERVED, ECS_UNBOUND, ECS_INTERDOMAIN = 0, 1, 2, 3
EVTCHNSTAT_closed, EVTCHNSTAT_unbound, EVTCHNSTAT_interdomain = 0, 1, 2
_STATUS = {ECS_FREE: EVTCHNSTAT_closed, ECS_RESERVED: EVTCHNSTAT_closed,
           ECS_UNBOUND: EVTCHNSTAT_unbound, ECS_INTERDOMAIN: EVTCHNSTAT_interdomain}

DOMID_SELF = 0x7FF0
DOM0 = 0
EPERM, ESRCH, ENOSPC, EINVAL = 1, 3, 28, 22
IDLE_WAIT_S = 0.5  # the delivery thread's bound on one wait (it is woken on every change)


@dataclass
class PortStatus:
    """EVTCHNOP_status's answer for one port."""

    status: int  # EVTCHNSTAT_*
    remote_dom: int = 0  # unbound: who may bind; interdomain: the other end's domain
    remote_port: int = 0  # interdomain: the other end's port


@dataclass
class _Port:
    state: int = ECS_FREE
    remote_dom: int = 0
    remote_port: int = 0
    end: EventChannel | None = None  # this domain's end of the eventfd pair when bound to Dom0


PeerLookup = Callable[[int], "PvEventChannels | None"]


def _no_peers(_domid: int) -> PvEventChannels | None:
    return None


class PvEventChannels:
    """One PV domain's ports 1..nr_ports-1 (port 0 is reserved, as in Xen).

    Guest operations (the EVTCHNOP_* hypercalls, on the vCPU thread) return a port or a
    negative errno, never raise. Dom0 operations (bind_dom0, from backend threads) raise
    EventChannelError, as a Dom0 library call fails.

    Events reach the guest in two steps, so that shared_info is only written while the guest
    is stopped (its own `lock btr` on the same words would race a Python read-modify-write):
    raise_event() (any thread) queues the port and calls `on_event` (the vCPU's kick);
    drain() (the vCPU thread, guest stopped) sets the pending bits as Xen's
    evtchn_2l_set_pending does, with the selector and evtchn_upcall_pending.
    """

    def __init__(self, domid: int, shared: SharedInfo, *, peers: PeerLookup = _no_peers,
                 dom0_port: Callable[[], int] | None = None,
                 on_event: Callable[[], None] | None = None) -> None:
        self.domid = domid
        self.shared = shared
        self.nr_ports = shared.nr_ports  # 1024 for a 32-bit guest (32 words of 32 bits)
        self.peers = peers
        self.on_event = on_event
        self._dom0_port = dom0_port or self._local_dom0_port
        self._next_dom0_port = 1
        self._ports: dict[int, _Port] = {0: _Port(ECS_RESERVED)}
        self._lock = threading.Lock()
        self._incoming: list[int] = []
        self._incoming_lock = threading.Lock()
        # the delivery thread's state
        self._control = EventChannel(0, name=f"d{domid}-evtchn-control")
        self._retired: list[EventChannel] = []
        self._dirty = True
        self._poller: select.poll | None = None
        self._by_fd: dict[int, tuple[int, EventChannel]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # counters for the run's result
        self.sent = 0  # EVTCHNOP_send that reached a bound port
        self.dropped = 0  # sends on an unbound port (Xen drops them silently)
        self.received = 0  # events set pending in shared_info by drain()

    def _local_dom0_port(self) -> int:
        with self._lock:
            port = self._next_dom0_port
            self._next_dom0_port += 1
        return port

    # -- lookups ------------------------------------------------------------------------------
    def valid(self, port: int) -> bool:
        return 0 <= port < self.nr_ports

    def _get(self, port: int) -> _Port:
        return self._ports.get(port) or _Port()

    def _exists(self, domid: int) -> bool:
        return domid in (self.domid, DOM0) or self.peers(domid) is not None

    def _resolve(self, domid: int) -> int:
        return self.domid if domid == DOMID_SELF else domid

    def status(self, port: int) -> PortStatus | int:
        """EVTCHNOP_status of one of our ports, or -EINVAL."""
        if not self.valid(port):
            return -EINVAL
        with self._lock:
            p = self._get(port)
            return PortStatus(_STATUS[p.state], p.remote_dom,
                              p.remote_port if p.state == ECS_INTERDOMAIN else 0)

    def ports(self) -> dict[int, PortStatus]:
        """Every port in use (not free), for tests and reports."""
        with self._lock:
            return {n: PortStatus(_STATUS[p.state], p.remote_dom, p.remote_port)
                    for n, p in self._ports.items() if p.state not in (ECS_FREE, ECS_RESERVED)}

    @contextmanager
    def _both(self, other: PvEventChannels) -> Iterator[None]:
        """Hold our lock and `other`'s, in domid order (two binders never deadlock)."""
        if other is self:
            with self._lock:
                yield
            return
        first, second = (self, other) if self.domid < other.domid else (other, self)
        with first._lock, second._lock:
            yield

    def _free_port_locked(self) -> int:
        for port in range(1, self.nr_ports):
            if self._get(port).state == ECS_FREE:
                return port
        return -ENOSPC

    # -- guest operations (EVTCHNOP_*) ----------------------------------------------------------
    def alloc_unbound(self, remote_dom: int, dom: int = DOMID_SELF) -> int:
        """EVTCHNOP_alloc_unbound: a new port that `remote_dom` may bind; the port or -errno."""
        dom = self._resolve(dom)
        if dom != self.domid:
            return -EPERM if self._exists(dom) else -ESRCH  # only Dom0 may allocate for others
        remote_dom = self._resolve(remote_dom)
        with self._lock:
            port = self._free_port_locked()
            if port > 0:
                self._ports[port] = _Port(ECS_UNBOUND, remote_dom)
        return port

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        """EVTCHNOP_bind_interdomain to a domain's port left unbound for us; the local port or -errno.

        As Xen does, the new local port is set pending at once: notifications sent to the
        unbound port before the bind were dropped, so the binder looks at its ring anyway."""
        remote_dom = self._resolve(remote_dom)
        if remote_dom == DOM0:
            return -EINVAL  # Dom0's ports are Python objects here: Dom0 binds ours (bind_dom0)
        peer = self if remote_dom == self.domid else self.peers(remote_dom)
        if peer is None:
            return -ESRCH
        if not peer.valid(remote_port):
            return -EINVAL
        with self._both(peer):
            local = self._free_port_locked()
            if local < 0:
                return local
            far = peer._get(remote_port)
            if far.state != ECS_UNBOUND or far.remote_dom != self.domid:
                return -EINVAL
            self._ports[local] = _Port(ECS_INTERDOMAIN, remote_dom, remote_port)
            peer._ports[remote_port] = _Port(ECS_INTERDOMAIN, self.domid, local)
        self.raise_event(local)
        return local

    def send(self, port: int) -> int:
        """EVTCHNOP_send: make the other end pending. 0, or -EINVAL for a port not in use."""
        if not self.valid(port):
            return -EINVAL
        with self._lock:
            p = self._get(port)
            state, remote_dom, remote_port, end = p.state, p.remote_dom, p.remote_port, p.end
        if state == ECS_UNBOUND:
            self.dropped += 1  # nobody bound yet: Xen drops it silently
            return 0
        if state != ECS_INTERDOMAIN:
            return -EINVAL
        self.sent += 1
        if end is not None:  # Dom0: its end's eventfd becomes readable
            try:
                end.notify()
            except EventChannelError:
                self.dropped += 1
            return 0
        peer = self if remote_dom == self.domid else self.peers(remote_dom)
        if peer is not None:
            peer.raise_event(remote_port)
        return 0

    def close(self, port: int) -> int:
        """EVTCHNOP_close: free the port; an interdomain peer's port goes back to unbound."""
        if not self.valid(port):
            return -EINVAL
        with self._lock:
            p = self._get(port)
            if p.state in (ECS_FREE, ECS_RESERVED):
                return -EINVAL
            remote_dom, remote_port, interdomain = p.remote_dom, p.remote_port, \
                p.state == ECS_INTERDOMAIN
            if p.end is not None:
                self._retire(p.end)
            self._ports[port] = _Port()
            # Xen clears the pending bit so a later binding of this port starts clean; this
            # runs on the vCPU thread (a hypercall), with the guest stopped.
            self.shared.clear_pending(port)
        if interdomain and remote_dom != DOM0:
            peer = self if remote_dom == self.domid else self.peers(remote_dom)
            if peer is not None:
                peer._remote_closed(remote_port, self.domid, port)
        return 0

    def _remote_closed(self, port: int, remote_dom: int, remote_port: int) -> None:
        with self._lock:
            p = self._get(port)
            if p.state == ECS_INTERDOMAIN and p.remote_dom == remote_dom and \
                    p.remote_port == remote_port:
                self._ports[port] = _Port(ECS_UNBOUND, remote_dom)

    def unmask(self, port: int) -> int:
        """EVTCHNOP_unmask: clear the mask bit; an event that arrived masked raises the upcall now."""
        if not self.valid(port):
            return -EINVAL
        self.shared.unmask(port)
        return 0

    # -- Dom0 operations ------------------------------------------------------------------------
    def bind_dom0(self, port: int) -> EventChannel:
        """Dom0 binds our port `port`, left unbound for domain 0: returns Dom0's end.

        Dom0's end.notify() makes `port` pending here (+ upcall or wake); our EVTCHNOP_send
        makes Dom0's end readable. As EVTCHNOP_bind_interdomain does for the binder, Dom0's
        end starts notified: a backend's first wait returns at once and it looks at its ring.
        Raises EventChannelError if `port` is not unbound for Dom0."""
        if not isinstance(port, int) or not 0 < port < self.nr_ports:
            raise EventChannelError(f"domain {self.domid}: port {port!r} is out of range")
        dom0_port = self._dom0_port()
        with self._lock:
            p = self._get(port)
            if p.state != ECS_UNBOUND or p.remote_dom != DOM0:
                state = {ECS_FREE: "free", ECS_RESERVED: "reserved", ECS_UNBOUND: "unbound",
                         ECS_INTERDOMAIN: "bound"}[p.state]
                who = f" for domain {p.remote_dom}" if p.state != ECS_FREE else ""
                raise EventChannelError(f"domain {self.domid}: port {port} is {state}{who}, "
                                        "not unbound for Dom0")
            ours, theirs = make_interdomain_pair(port, dom0_port, name=f"d{self.domid}p{port}")
            self._ports[port] = _Port(ECS_INTERDOMAIN, DOM0, dom0_port, ours)
            self._dirty = True
        ours.notify()
        self._wake_delivery()
        return theirs

    # -- delivery -------------------------------------------------------------------------------
    def raise_event(self, port: int) -> None:
        """An event for `port` (any thread): queue it and kick the vCPU to drain()."""
        with self._incoming_lock:
            self._incoming.append(port)
        on_event = self.on_event
        if on_event is not None:
            on_event()

    def has_incoming(self) -> bool:
        return bool(self._incoming)

    def drain(self) -> list[int]:
        """Set the queued ports pending in shared_info (vCPU thread, guest stopped); returns
        the ports whose pending bit this set (a port already pending is not counted)."""
        with self._incoming_lock:
            if not self._incoming:
                return []
            ports, self._incoming = self._incoming, []
        set_now: list[int] = []
        for port in ports:
            with self._lock:
                bound = self._get(port).state == ECS_INTERDOMAIN
            if bound and not self.shared.is_pending(port):
                self.shared.set_pending(port)
                set_now.append(port)
        self.received += len(set_now)
        return set_now

    def _retire(self, end: EventChannel) -> None:
        """Close our end of a Dom0 pair. The delivery thread polls it, so it closes it itself
        (closing under its poll would leave a dead or reused descriptor in the set)."""
        if self._thread is not None and self._thread.is_alive():
            self._retired.append(end)
            self._dirty = True
            self._wake_delivery()
        else:
            end.close()

    def _wake_delivery(self) -> None:
        try:
            self._control.notify()
        except EventChannelError:
            pass  # stopped

    def _rebuild_locked(self) -> None:
        for end in self._retired:
            end.close()  # Dom0's end wakes and sees peer_closed
        self._retired.clear()
        self._poller = select.poll()
        self._by_fd = {}
        for port, p in self._ports.items():
            if p.end is not None and not p.end.closed:
                self._by_fd[p.end.fileno()] = (port, p.end)
        if not self._control.closed:
            self._by_fd[self._control.fileno()] = (0, self._control)
        for fd in self._by_fd:
            self._poller.register(fd, select.POLLIN)
        self._dirty = False

    def pump(self, timeout_s: float) -> int:
        """One wait of the delivery thread: block (bounded) until Dom0 notifies one of our
        ports, then queue those events. Returns how many ports were raised."""
        with self._lock:
            if self._dirty or self._poller is None:
                self._rebuild_locked()
            poller, by_fd = self._poller, self._by_fd
        assert poller is not None
        raised = 0
        for fd, _mask in poller.poll(max(0, int(timeout_s * 1000))):
            port, end = by_fd.get(fd, (0, None))
            if end is None or end is self._control:
                self._control.consume()
                continue
            if end.peer_closed:
                self._dom0_closed(port, end)
                continue
            if end.consume():
                self.raise_event(port)
                raised += 1
        return raised

    def _dom0_closed(self, port: int, end: EventChannel) -> None:
        """Dom0 closed its end: our port goes back to unbound for Dom0 (Xen's evtchn_close on
        the far side), and the end leaves the poll set."""
        with self._lock:
            p = self._get(port)
            if p.end is end:
                self._ports[port] = _Port(ECS_UNBOUND, DOM0)
            self._retired.append(end)
            self._dirty = True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"d{self.domid}-evtchn",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.pump(IDLE_WAIT_S)
            except Exception:  # pragma: no cover - keep delivering; a bug costs one wake-up
                log.exception("domain %d: event delivery", self.domid)

    def stop(self, timeout_s: float = 2.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake_delivery()
        thread.join(timeout_s)

    def close_all(self) -> None:
        """The domain is gone: close every Dom0 pair (backends see peer_closed), free all."""
        self.stop()
        with self._lock:
            ends = [p.end for p in self._ports.values() if p.end is not None] + self._retired
            self._retired = []
            self._ports = {0: _Port(ECS_RESERVED)}
        for end in ends:
            end.close()
        self._control.close()
