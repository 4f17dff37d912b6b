"""Event channels: select()-able ports, local or interdomain pairs (Xen public/event_channel.h)."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Sequence

# Xen never hands out port 0; the first usable port is 1.
FIRST_PORT = 1
DEFAULT_MAX_PORTS = 4096  # the 2-level ABI's limit on 64-bit guests


class EventChannelError(ValueError):
    """An operation on a port that does not exist or is closed (Xen answers -EINVAL)."""


class _WaitObject:
    """An OS object with a counter that a thread can block on: an eventfd, or a pipe."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self.rfd = self.wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.is_eventfd = True
        else:  # pragma: no cover - non-Linux hosts
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
            self.is_eventfd = False

    def signal(self) -> None:
        try:
            if self.is_eventfd:
                os.eventfd_write(self.wfd, 1)
            else:  # pragma: no cover
                os.write(self.wfd, b"\x01")
        except BlockingIOError:  # counter or pipe full: it is pending anyway
            pass

    def drain(self) -> int:
        try:
            if self.is_eventfd:
                return os.eventfd_read(self.rfd)
            return len(os.read(self.rfd, 65536))  # pragma: no cover
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.rfd)
        if self.wfd != self.rfd:  # pragma: no cover
            os.close(self.wfd)


def _readable(fds: Sequence[int], timeout_s: float) -> set[int]:
    """Block (poll(2), no spinning) until some fds are readable or timeout_s passes."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = max(0, int(timeout_s * 1000 + 0.999))
    return {fd for fd, _ in poller.poll(ms)}


class EventChannel:
    """One end of an event channel: a port in one domain's table.

    A local port (EventChannelTable.alloc) is its own target: notify() makes it pending, like
    a channel bound to the same domain. An interdomain end is linked to a remote end:
    notify() on one makes the OTHER pending, so the hypervisor and the device model each wait
    on their own end and never steal each other's notifications. When one end is closed the
    other is woken and sees `peer_closed`; its notifications are then dropped, as Xen drops
    sends on a port whose remote went away.
    """

    def __init__(self, port: int, *, name: str = "") -> None:
        self.port = port
        self.name = name
        self.notifications = 0  # notify() calls made on this end
        self.received = 0  # notifications consumed on this end
        self.dropped = 0  # notify() calls that found nobody to deliver to
        self.peer_closed = False
        self._peer: EventChannel | None = None
        self._closed = False
        self._wait = _WaitObject()
        self._lock = threading.Lock()  # shared by both ends once bound (see _link)
        self._poller: select.poll | None = None  # built on first wait, kept: one syscall per wait

    @staticmethod
    def _link(a: EventChannel, b: EventChannel) -> None:
        lock = threading.Lock()
        a._peer, b._peer = b, a
        a._lock = b._lock = lock

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def remote_port(self) -> int | None:
        """The port of the linked end (None for a local port)."""
        return self._peer.port if self._peer is not None else None

    def notify(self) -> None:
        """Make the target end pending; callable from any thread."""
        with self._lock:
            if self._closed:
                raise EventChannelError(f"notify on closed port {self.port}")
            self.notifications += 1
            target = self._peer if self._peer is not None else self
            if self.peer_closed or target._closed:
                self.dropped += 1
                return
            target._wait.signal()

    def fileno(self) -> int:
        if self._closed:
            raise EventChannelError(f"port {self.port} is closed")
        return self._wait.rfd

    def consume(self) -> int:
        """Clear pending; the number of notifications since the last consume (0 if none)."""
        if self._closed:
            return 0
        n = self._wait.drain()
        self.received += n
        return n

    def wait(self, timeout_s: float) -> bool:
        """Block until notified (True, and consumed) or until timeout_s passes (False)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.fileno(), select.POLLIN)
        while True:
            if self._closed:
                raise EventChannelError(f"port {self.port} is closed")
            ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            if poller.poll(ms) and self.consume():
                return True
            if time.monotonic() >= deadline:
                return False

    def close(self) -> None:
        """Close this end; a linked end is woken and sees peer_closed. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wait.close()
            peer = self._peer
            if peer is not None and not peer._closed:
                peer.peer_closed = True
                peer._wait.signal()  # wake whoever waits on the other end

    def __repr__(self) -> str:
        link = f" -> {self.remote_port}" if self._peer is not None else " local"
        state = " closed" if self._closed else (" peer-closed" if self.peer_closed else "")
        return f"<EventChannel {self.name or 'port'} {self.port}{link}{state}>"


class WaitSet:
    """Several ports one thread blocks on (a device model's select loop); the poll set is built
    once, so each wait is one poll(2) call."""

    def __init__(self, channels: Sequence[EventChannel]) -> None:
        if not channels:
            raise ValueError("a wait set needs at least one event channel")
        self._by_fd = {ch.fileno(): ch for ch in channels}
        self._poller = select.poll()
        for fd in self._by_fd:
            self._poller.register(fd, select.POLLIN)

    def wait(self, timeout_s: float) -> list[EventChannel]:
        """Block until some ports are notified; return them (now consumed), or [] at timeout."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        by_fd = self._by_fd
        while True:
            ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            got = [by_fd[fd] for fd, _ in self._poller.poll(ms) if by_fd[fd].consume()]
            if got or time.monotonic() >= deadline:
                return got


def wait_any(channels: Sequence[EventChannel], timeout_s: float) -> list[EventChannel]:
    """Block in poll(2) on several ports; return the ones that were notified (now consumed)."""
    if not channels:
        raise ValueError("wait_any needs at least one event channel")
    return WaitSet(channels).wait(timeout_s)


class EventChannelTable:
    """One domain's ports, allocated lowest-free from 1 as Xen does."""

    def __init__(self, domid: int = 0, max_ports: int = DEFAULT_MAX_PORTS) -> None:
        self.domid = domid
        self.max_ports = max_ports
        self._ports: dict[int, EventChannel] = {}
        self._lock = threading.Lock()

    def _new_port_locked(self, name: str) -> EventChannel:
        for port in range(FIRST_PORT, self.max_ports):
            if port not in self._ports:
                ch = EventChannel(port, name=name or f"d{self.domid}p{port}")
                self._ports[port] = ch
                return ch
        raise EventChannelError(f"domain {self.domid}: all {self.max_ports - 1} ports in use")

    def alloc(self, name: str = "") -> EventChannel:
        """A local port: notify() makes this same port pending."""
        with self._lock:
            return self._new_port_locked(name)

    def bind_interdomain(
        self, remote: EventChannelTable, name: str = ""
    ) -> tuple[EventChannel, EventChannel]:
        """Allocate a port here and one in `remote`, linked: (local_end, remote_end)."""
        if remote is self:
            raise EventChannelError("an interdomain binding needs two different tables")
        first, second = (self, remote) if id(self) < id(remote) else (remote, self)
        with first._lock, second._lock:  # fixed order: two binders never deadlock
            local = self._new_port_locked(name)
            try:
                far = remote._new_port_locked(name)
            except EventChannelError:
                del self._ports[local.port]
                local.close()
                raise
        EventChannel._link(local, far)
        return local, far

    def get(self, port: int) -> EventChannel:
        with self._lock:
            ch = self._ports.get(port)
        if ch is None:
            raise EventChannelError(f"domain {self.domid}: port {port} is not allocated")
        return ch

    def close(self, port: int) -> None:
        with self._lock:
            ch = self._ports.pop(port, None)
        if ch is None:
            raise EventChannelError(f"domain {self.domid}: port {port} is not allocated")
        ch.close()

    def close_all(self) -> None:
        with self._lock:
            chans = list(self._ports.values())
            self._ports.clear()
        for ch in chans:
            ch.close()

    def ports(self) -> list[int]:
        with self._lock:
            return sorted(self._ports)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ports)

    def __contains__(self, port: object) -> bool:
        with self._lock:
            return port in self._ports


def make_interdomain_pair(
    local_port: int = FIRST_PORT, remote_port: int = FIRST_PORT, name: str = ""
) -> tuple[EventChannel, EventChannel]:
    """Two linked ends outside any table (for tests and one-off wiring)."""
    a = EventChannel(local_port, name=name)
    b = EventChannel(remote_port, name=name)
    EventChannel._link(a, b)
    return a, b
