"""Xenbus: XenbusState, a xenstore client, the Dom0 backend helper (Xen io/xenbus.h, libxl layout)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, TypeVar

from pv.xenstore import NodePerm, domain_path
from pv.xs_wire import (
    XS_DIRECTORY,
    XS_ERROR,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_INTRODUCE,
    XS_IS_DOMAIN_INTRODUCED,
    XS_MKDIR,
    XS_READ,
    XS_RELEASE,
    XS_RM,
    XS_SET_PERMS,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_UNWATCH,
    XS_WATCH,
    XS_WRITE,
    WatchEvent,
    XsdSockmsg,
    XsError,
    XsWireError,
    join_strings,
    split_strings,
)

T = TypeVar("T")


class XenbusState(IntEnum):
    """enum xenbus_state (io/xenbus.h), the value of every device's `state` node."""

    Unknown = 0
    Initialising = 1
    InitWait = 2  # backend: early init done, waiting for the frontend's details
    Initialised = 3  # frontend: ring and event channel published, waiting for the backend
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8

    @classmethod
    def parse(cls, raw: bytes) -> XenbusState:
        """A state node's value; anything unreadable is Unknown, as xenbus drivers treat it."""
        try:
            return cls(int(raw.decode("ascii").strip()))
        except (UnicodeDecodeError, ValueError):
            return cls.Unknown


class XsTransport(Protocol):
    """Something that carries xs_wire requests: a guest ring, or Dom0's local connection."""

    def request(self, msg_type: int, payload: bytes, tx_id: int = 0) -> XsdSockmsg: ...

    def read_watch(self, timeout_s: float) -> WatchEvent | None: ...


class XsClient:
    """The xenstore client library (libxenstore's calls) over one transport.

    Errors come back as XsError with the wire's name ("ENOENT", "EACCES", ...).
    """

    def __init__(self, transport: XsTransport, max_pending_events: int = 1024) -> None:
        self.transport = transport
        self._pending: deque[WatchEvent] = deque(maxlen=max_pending_events)

    def _call(self, msg_type: int, payload: bytes, tx_id: int = 0) -> bytes:
        reply = self.transport.request(msg_type, payload, tx_id)
        if reply.type == XS_ERROR:
            raise XsError(reply.errname or "EINVAL")
        if reply.type != msg_type:
            raise XsWireError(f"reply type {reply.type} to request type {msg_type}")
        return reply.payload

    def read(self, path: str, tx_id: int = 0) -> bytes:
        return self._call(XS_READ, join_strings(path), tx_id)

    def read_text(self, path: str, tx_id: int = 0) -> str:
        return self.read(path, tx_id).decode("latin-1")

    def write(self, path: str, value: bytes | str, tx_id: int = 0) -> None:
        raw = value.encode("latin-1") if isinstance(value, str) else value
        self._call(XS_WRITE, join_strings(path) + raw, tx_id)

    def mkdir(self, path: str, tx_id: int = 0) -> None:
        self._call(XS_MKDIR, join_strings(path), tx_id)

    def rm(self, path: str, tx_id: int = 0) -> None:
        self._call(XS_RM, join_strings(path), tx_id)

    def directory(self, path: str, tx_id: int = 0) -> list[str]:
        return split_strings(self._call(XS_DIRECTORY, join_strings(path), tx_id))

    def get_perms(self, path: str, tx_id: int = 0) -> list[str]:
        return split_strings(self._call(XS_GET_PERMS, join_strings(path), tx_id))

    def set_perms(self, path: str, perms: Sequence[str | NodePerm], tx_id: int = 0) -> None:
        self._call(XS_SET_PERMS, join_strings(path, *(str(p) for p in perms)), tx_id)

    def watch(self, path: str, token: str) -> None:
        self._call(XS_WATCH, join_strings(path, token))

    def unwatch(self, path: str, token: str) -> None:
        self._call(XS_UNWATCH, join_strings(path, token))
        self._pending = deque((e for e in self._pending if e.token != token),
                              maxlen=self._pending.maxlen)

    def read_watch(self, timeout_s: float, token: str | None = None) -> WatchEvent | None:
        """The next watch event (for `token` if given, keeping others for later), or None."""
        for ev in self._pending:
            if token is None or ev.token == token:
                self._pending.remove(ev)
                return ev
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.transport.read_watch(max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            if token is None or got.token == token:
                return got
            self._pending.append(got)

    def transaction_start(self) -> int:
        return int(split_strings(self._call(XS_TRANSACTION_START, b"\0"))[0])

    def transaction_end(self, tx_id: int, commit: bool = True) -> bool:
        """True if committed (or aborted as asked); False if the commit conflicted (EAGAIN)."""
        try:
            self._call(XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx_id)
        except XsError as exc:
            if exc.errname == "EAGAIN":
                return False
            raise
        return True

    def transact(self, body: Callable[[int], T], attempts: int = 8) -> T:
        """Run body(tx_id) in a transaction, retrying on EAGAIN as the toolstack does."""
        for _ in range(attempts):
            tx_id = self.transaction_start()
            try:
                result = body(tx_id)
            except BaseException:
                self.transaction_end(tx_id, commit=False)
                raise
            if self.transaction_end(tx_id):
                return result
        raise XsError("EAGAIN", f"transaction still conflicting after {attempts} attempts")

    def get_domain_path(self, domid: int) -> str:
        return split_strings(self._call(XS_GET_DOMAIN_PATH, join_strings(str(domid))))[0]

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        self._call(XS_INTRODUCE, join_strings(str(domid), str(mfn), str(port)))

    def release(self, domid: int) -> None:
        self._call(XS_RELEASE, join_strings(str(domid)))

    def is_domain_introduced(self, domid: int) -> bool:
        return self._call(XS_IS_DOMAIN_INTRODUCED, join_strings(str(domid))) == b"T\0"


def read_state(client: XsClient, path: str) -> XenbusState:
    """The XenbusState in node `path`; Unknown if it is missing or unreadable."""
    try:
        return XenbusState.parse(client.read(path))
    except XsError:
        return XenbusState.Unknown


def wait_for_state(client: XsClient, path: str, wanted: Collection[XenbusState],
                   timeout_s: float, token: str) -> XenbusState:
    """Block (through a watch on `path` under `token`) until its state is one of `wanted`.

    The watch must already be registered. Raises TimeoutError after timeout_s.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        state = read_state(client, path)
        if state in wanted:
            return state
        if client.read_watch(deadline - time.monotonic(), token) is None:
            raise TimeoutError(f"{path} stayed {state.name}, wanted "
                               f"{sorted(s.name for s in wanted)}")


def make_domain_home(client: XsClient, domid: int, name: str = "") -> str:
    """What the toolstack creates for a new domain: /local/domain/<domid> (Dom0 owns it, the
    domain may read it) and the subdirectories the domain itself owns (device, data)."""
    home = domain_path(domid)

    def body(tx: int) -> None:
        client.mkdir(home, tx)
        client.set_perms(home, ["n0", f"r{domid}"], tx)
        client.write(f"{home}/domid", str(domid), tx)
        if name:
            client.write(f"{home}/name", name, tx)
        for sub in ("device", "data"):
            client.mkdir(f"{home}/{sub}", tx)
            client.set_perms(f"{home}/{sub}", [f"n{domid}"], tx)

    client.transact(body)
    return home


@dataclass(frozen=True)
class XenbusDevice:
    """Where one split device lives in the store."""

    device_type: str  # "vbd", "vif", "console", ...
    devid: int
    frontend_domid: int
    backend_domid: int

    @property
    def frontend_path(self) -> str:
        return f"{domain_path(self.frontend_domid)}/device/{self.device_type}/{self.devid}"

    @property
    def backend_path(self) -> str:
        return (f"{domain_path(self.backend_domid)}/backend/{self.device_type}/"
                f"{self.frontend_domid}/{self.devid}")

    @property
    def state_token(self) -> str:
        return f"be-{self.device_type}-{self.frontend_domid}-{self.devid}-fe-state"


class XenbusBackend:
    """Dom0's side of xenbus for one device type: creates device directories the way the
    toolstack does, moves the backend's state, and follows the frontend's through a watch."""

    def __init__(self, client: XsClient, device_type: str, backend_domid: int = 0) -> None:
        self.client = client
        self.device_type = device_type
        self.backend_domid = backend_domid

    def create_device(self, frontend_domid: int, devid: int, *,
                      backend_entries: Mapping[str, str] | None = None,
                      frontend_entries: Mapping[str, str] | None = None) -> XenbusDevice:
        """Both directories, in one transaction, both in XenbusStateInitialising.

        The frontend directory is owned by the frontend domain (it writes its ring-ref,
        event-channel and state there) and readable by the backend; the backend directory
        is the backend's, readable by the frontend.
        """
        dev = XenbusDevice(self.device_type, devid, frontend_domid, self.backend_domid)
        fe, be = dev.frontend_path, dev.backend_path
        fe_perms = [f"n{frontend_domid}", f"r{self.backend_domid}"]
        be_perms = [f"n{self.backend_domid}", f"r{frontend_domid}"]
        initialising = str(int(XenbusState.Initialising))

        def body(tx: int) -> None:
            for stale in (fe, be):  # leftovers of an earlier device with this devid
                try:
                    self.client.rm(stale, tx)
                except XsError as exc:
                    if exc.errname != "ENOENT":  # ENOENT: not even its parent exists
                        raise
            self.client.mkdir(fe, tx)
            self.client.set_perms(fe, fe_perms, tx)
            self.client.mkdir(be, tx)
            self.client.set_perms(be, be_perms, tx)
            self.client.write(f"{fe}/backend", be, tx)
            self.client.write(f"{fe}/backend-id", str(self.backend_domid), tx)
            self.client.write(f"{fe}/state", initialising, tx)
            for key, value in (frontend_entries or {}).items():
                self.client.write(f"{fe}/{key}", value, tx)
            self.client.write(f"{be}/frontend", fe, tx)
            self.client.write(f"{be}/frontend-id", str(frontend_domid), tx)
            self.client.write(f"{be}/online", "1", tx)
            self.client.write(f"{be}/state", initialising, tx)
            for key, value in (backend_entries or {}).items():
                self.client.write(f"{be}/{key}", value, tx)

        self.client.transact(body)
        # A backend follows its frontend's state from the start (xenbus otherend watch).
        self.client.watch(f"{fe}/state", dev.state_token)
        return dev

    def switch_state(self, dev: XenbusDevice, state: XenbusState) -> None:
        self.client.write(f"{dev.backend_path}/state", str(int(state)))

    def backend_state(self, dev: XenbusDevice) -> XenbusState:
        return read_state(self.client, f"{dev.backend_path}/state")

    def frontend_state(self, dev: XenbusDevice) -> XenbusState:
        return read_state(self.client, f"{dev.frontend_path}/state")

    def wait_for_frontend_state(self, dev: XenbusDevice, wanted: Collection[XenbusState],
                                timeout_s: float) -> XenbusState:
        return wait_for_state(self.client, f"{dev.frontend_path}/state", wanted, timeout_s,
                              dev.state_token)

    def remove_device(self, dev: XenbusDevice) -> None:
        self.client.unwatch(f"{dev.frontend_path}/state", dev.state_token)

        def body(tx: int) -> None:
            self.client.rm(dev.frontend_path, tx)
            self.client.rm(dev.backend_path, tx)

        self.client.transact(body)
