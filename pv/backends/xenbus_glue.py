"""Backend side of the XenbusState handshake: InitWait, connect on Initialised, Closing/Closed (Xen io/xenbus.h, Linux xenbus backends)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pv.backends import ConnectError
from pv.xenbus import XenbusBackend, XenbusDevice, XenbusState, XsClient
from pv.xenstore import domain_path
from pv.xs_wire import XsError

log = logging.getLogger(__name__)

Fatal = Callable[[str], None]


class FrontendNodes:
    """Read-only access to a frontend's directory for a driver's connect()."""

    def __init__(self, client: XsClient, path: str) -> None:
        self.client = client
        self.path = path

    def read(self, key: str) -> str | None:
        try:
            return self.client.read_text(f"{self.path}/{key}")
        except XsError:
            return None

    def read_int(self, key: str) -> int:
        """An unsigned decimal node (ring-ref, event-channel); ConnectError if absent or bad."""
        raw = self.read(key)
        if raw is None:
            raise ConnectError(f"reading {self.path}/{key}: no such node")
        text = raw.strip().rstrip("\0")
        if not text.isdigit() or int(text) > 0xFFFF_FFFF:
            raise ConnectError(f"reading {self.path}/{key}: {raw!r} is not a u32")
        return int(text)


class DeviceDriver(Protocol):
    """What a backend does at each step of one device's handshake."""

    def probe(self) -> Mapping[str, str]:
        """Backend nodes (features) written before the backend goes to InitWait."""
        ...

    def connect(self, frontend: FrontendNodes, fatal: Fatal) -> Mapping[str, str]:
        """Map the ring and bind the port the frontend published (ConnectError if it cannot);
        return the nodes to write before the backend goes to Connected. `fatal(reason)` is
        for the backend to call later if the frontend breaks the protocol."""
        ...

    def disconnect(self, reason: str) -> None:
        """Unmap and unbind; called more than once is harmless."""
        ...


@dataclass
class _Entry:
    dev: XenbusDevice
    driver: DeviceDriver
    connected: bool = False
    error: str = ""


class XenbusGlue:
    """Drives the handshake of a backend's devices from one thread, through the watch each
    device has on its frontend's state node (XenbusBackend.create_device registers it).

    Give it its own XsClient (its own connection to xenstored): the thread reads every watch
    event of that connection. Waits are bounded (`idle_wait_s`); a frontend that never
    publishes its ring leaves its device in InitWait and costs nothing.
    """

    def __init__(self, client: XsClient, device_type: str, *, backend_domid: int = 0,
                 idle_wait_s: float = 0.2) -> None:
        self.client = client
        self.backend = XenbusBackend(client, device_type, backend_domid)
        self.idle_wait_s = idle_wait_s
        self._entries: dict[str, _Entry] = {}  # by watch token
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- devices -------------------------------------------------------------------------------
    def add_device(self, frontend_domid: int, devid: int, driver: DeviceDriver, *,
                   backend_entries: Mapping[str, str] | None = None,
                   frontend_entries: Mapping[str, str] | None = None) -> XenbusDevice:
        """Create both directories (Initialising), write the driver's features, go InitWait."""
        dev = self.backend.create_device(frontend_domid, devid, backend_entries=backend_entries,
                                         frontend_entries=frontend_entries)
        with self._lock:
            self._entries[dev.state_token] = _Entry(dev, driver)
        self._write_nodes(dev.backend_path, driver.probe())
        self.backend.switch_state(dev, XenbusState.InitWait)
        return dev

    def _write_nodes(self, directory: str, nodes: Mapping[str, str]) -> None:
        """Write several nodes of one directory in one transaction."""
        if not nodes:
            return

        def body(tx: int) -> None:
            for key, value in nodes.items():
                self.client.write(f"{directory}/{key}", value, tx)

        self.client.transact(body)

    def remove_device(self, dev: XenbusDevice) -> None:
        with self._lock:
            entry = self._entries.pop(dev.state_token, None)
        if entry is not None:
            entry.driver.disconnect("device removed")
        self.backend.remove_device(dev)

    def is_connected(self, dev: XenbusDevice) -> bool:
        with self._lock:
            entry = self._entries.get(dev.state_token)
            return entry is not None and entry.connected

    def error(self, dev: XenbusDevice) -> str:
        with self._lock:
            entry = self._entries.get(dev.state_token)
            return entry.error if entry is not None else ""

    def wait_connected(self, dev: XenbusDevice, timeout_s: float) -> bool:
        """Block until the device is Connected (True) or timeout_s passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                entry = self._entries.get(dev.state_token)
                if entry is not None and entry.connected:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)

    # -- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("xenbus glue is already running")
        self._stopping.clear()
        name = f"xenbus-{self.backend.device_type}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"xenbus glue thread did not stop within {timeout_s} s")
        self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.service_once(self.idle_wait_s)
            except Exception:  # xenstore trouble for one device must not end the thread
                log.exception("xenbus-%s: handling a watch event failed", self.backend.device_type)

    def service_once(self, timeout_s: float) -> bool:
        """Wait (bounded) for one watch event and act on it; False if none came."""
        ev = self.client.read_watch(timeout_s)
        if ev is None:
            return False
        with self._lock:
            entry = self._entries.get(ev.token)
        if entry is not None:
            self._frontend_changed(entry)
        return True

    # -- the state machine ---------------------------------------------------------------------
    def _frontend_changed(self, entry: _Entry) -> None:
        dev = entry.dev
        fe = self.backend.frontend_state(dev)
        be = self.backend.backend_state(dev)
        if fe in (XenbusState.Initialised, XenbusState.Connected):
            if not entry.connected and be not in (XenbusState.Closing, XenbusState.Closed):
                self._connect(entry)
        elif fe == XenbusState.Closing:
            self._disconnect(entry, "frontend closing")
            if be != XenbusState.Closing:
                self.backend.switch_state(dev, XenbusState.Closing)
        elif fe in (XenbusState.Closed, XenbusState.Unknown):
            # Unknown: the frontend's node went away (its domain is gone).
            self._disconnect(entry, "frontend closed")
            if be != XenbusState.Closed:
                self.backend.switch_state(dev, XenbusState.Closed)
        elif fe == XenbusState.Initialising and be == XenbusState.Closed:
            # The frontend starts over after a close: offer the device again.
            self.backend.switch_state(dev, XenbusState.InitWait)

    def _connect(self, entry: _Entry) -> None:
        dev = entry.dev
        nodes = FrontendNodes(self.client, dev.frontend_path)
        with self._lock:
            entry.error = ""
        try:
            extra = dict(entry.driver.connect(nodes, lambda reason: self.fatal(dev, reason)))
        except ConnectError as exc:
            self.fatal(dev, str(exc))
            return
        self._write_nodes(dev.backend_path, extra)
        with self._changed:
            if entry.error:  # the backend already gave up on this frontend: stay Closing
                return
            entry.connected = True
            self._changed.notify_all()
            # Under the lock: a fatal() from the backend thread comes after, never between.
            self.backend.switch_state(dev, XenbusState.Connected)

    def _disconnect(self, entry: _Entry, reason: str) -> None:
        entry.driver.disconnect(reason)
        with self._changed:
            entry.connected = False
            self._changed.notify_all()

    def fatal(self, dev: XenbusDevice, reason: str) -> None:
        """xenbus_dev_fatal: record the error where the toolstack looks for it
        (/local/domain/<backend>/error/<backend path>/error) and go to Closing."""
        with self._changed:
            entry = self._entries.get(dev.state_token)
            if entry is not None:
                entry.connected = False
                entry.error = reason
                self._changed.notify_all()
        if entry is not None:
            entry.driver.disconnect(reason)
        error_node = f"{domain_path(dev.backend_domid)}/error{dev.backend_path}/error"
        try:
            self.client.write(error_node, reason)
            self.backend.switch_state(dev, XenbusState.Closing)
        except XsError as exc:
            log.warning("%s: cannot report %r: %s", dev.backend_path, reason, exc)
