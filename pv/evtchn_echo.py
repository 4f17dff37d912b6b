"""A Dom0 echo on an event channel, the partner of guests/pv/events.asm: it binds the port a guest publishes in XenStore and answers each notification with one (Xen public/event_channel.h, xenstore paths)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Protocol

from hvm.evtchn import EventChannel, EventChannelError, WaitSet
from pv.xenbus import XsClient
from pv.xs_wire import XsError

if TYPE_CHECKING:
    from pv.dom0 import Dom0

log = logging.getLogger(__name__)

ECHO_KEY = "data/echo-port"  # relative to /local/domain/<domid>: the guest writes its port here
WATCH_WAIT_S = 0.05  # bound of one wait for the key to appear (a watch cannot be interrupted)
WAIT_S = 0.5  # bound of one wait on the port (stop() wakes it at once)


class EchoFrontend(Protocol):
    @property
    def domid(self) -> int: ...

    def bind_evtchn(self, port: int) -> EventChannel: ...


class EvtchnEcho:
    """One thread for one domain: wait until /local/domain/<id>/data/echo-port holds a port,
    bind it (domain.bind_evtchn), notify once to say it is bound, then notify back once for
    every wake-up on it, until the guest closes the port or stop()."""

    def __init__(self, frontend: EchoFrontend, xs: XsClient) -> None:
        self.frontend = frontend
        self.xs = xs
        self.port: int | None = None
        self.echoes = 0
        self.error: str | None = None
        self.bound = threading.Event()
        self._stopping = threading.Event()
        self._kick = EventChannel(0, name="echo-kick")  # a local port: stop() wakes the thread
        self._thread: threading.Thread | None = None

    @classmethod
    def attach(cls, dom0: Dom0, frontend: EchoFrontend) -> EvtchnEcho:
        """A pv.domain.BackendFactory: an echo for `frontend`, started."""
        echo = cls(frontend, dom0.xs_client())
        echo.start()
        return echo

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"echo-d{self.frontend.domid}")
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        try:
            self._kick.notify()
        except EventChannelError:  # already stopped
            pass
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._kick.close()

    def _published_port(self, path: str) -> int | None:
        try:
            text = self.xs.read_text(path)
        except XsError:
            return None
        return int(text) if text.strip().isdigit() else None

    def _run(self) -> None:
        path = f"/local/domain/{self.frontend.domid}/{ECHO_KEY}"
        try:
            self.xs.watch(path, "echo")
            port = self._published_port(path)
            while port is None:
                if self._stopping.is_set():
                    return
                self.xs.read_watch(WATCH_WAIT_S, "echo")
                port = self._published_port(path)
            channel = self.frontend.bind_evtchn(port)
        except (XsError, EventChannelError, ValueError) as exc:
            self.error = str(exc)
            log.warning("echo for domain %d: %s", self.frontend.domid, exc)
            return
        self.port = port
        try:
            channel.consume()  # the binder's own notification (see PvEventChannels.bind_dom0)
            channel.notify()  # "bound": the guest's port becomes pending
            self.bound.set()
            waits = WaitSet([channel, self._kick])
            while not self._stopping.is_set() and not channel.peer_closed:
                if channel in waits.wait(WAIT_S) and not channel.peer_closed:
                    channel.notify()
                    self.echoes += 1
        except EventChannelError as exc:  # closed under us
            self.error = str(exc)
        finally:
            channel.close()
