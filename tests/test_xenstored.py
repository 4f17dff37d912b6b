"""xenstored over real rings and event channels: guests' requests, watches, hostile rings, xenbus."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from hvm.evtchn import EventChannel, EventChannelTable, make_interdomain_pair
from pv.xenbus import (
    XenbusBackend,
    XenbusState,
    XsClient,
    make_domain_home,
    read_state,
    wait_for_state,
)
from pv.xenstore_ring import (
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    XenstoreRingClient,
    XsRingError,
)
from pv.xenstored import Xenstored
from pv.xs_wire import (
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_ERROR,
    XS_INTRODUCE,
    XS_READ,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_WATCH,
    XS_WRITE,
    XSD_ERROR_NAMES,
    XsdSockmsg,
    XsError,
    join_strings,
)

TIMEOUT = 3.0


class Guest:
    """One domain's side: its page, its event-channel end, a ring client and an XsClient."""

    def __init__(self, daemon: Xenstored, domid: int, page: bytearray | None = None) -> None:
        self.domid = domid
        self.page = page if page is not None else bytearray(4096)
        self.dom0_end, self.port = make_interdomain_pair(name=f"xs-d{domid}")
        daemon.add_domain(domid, memoryview(self.page), self.dom0_end)
        self.ring = XenstoreRingClient(self.page, self.port, timeout_s=TIMEOUT)
        self.xs = XsClient(self.ring)

    def close(self) -> None:
        self.port.close()
        self.dom0_end.close()


MakeGuest = Callable[..., Guest]


def wait_until(cond: Callable[[], bool], port: EventChannel, timeout_s: float = TIMEOUT) -> bool:
    """Block on the guest's event channel (no spinning) until cond() holds."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        port.wait(remaining)
    return True


@pytest.fixture
def daemon() -> Iterator[Xenstored]:
    d = Xenstored(idle_wait_s=0.2)
    d.start()
    yield d
    d.stop()


@pytest.fixture
def dom0(daemon: Xenstored) -> XsClient:
    return XsClient(daemon.connect_local(0))


@pytest.fixture
def guest(daemon: Xenstored, dom0: XsClient) -> Iterator[MakeGuest]:
    """Make a domain the toolstack's way (home directory first), closed at teardown."""
    made: list[Guest] = []

    def make(domid: int, page: bytearray | None = None) -> Guest:
        make_domain_home(dom0, domid, name=f"guest{domid}")
        made.append(Guest(daemon, domid, page))
        return made[-1]

    yield make
    for g in made:
        g.close()


def test_raw_requests_over_the_ring_get_xenstored_payloads(
        dom0: XsClient, guest: MakeGuest) -> None:
    g = guest(1)
    ok = g.ring.request(XS_WRITE, b"data/a\0hello")
    assert (ok.type, ok.payload) == (XS_WRITE, b"OK\0")
    g.ring.request(XS_WRITE, b"data/b\0")
    assert g.ring.request(XS_READ, b"data/a\0").payload == b"hello"  # raw, no NUL
    assert g.ring.request(XS_DIRECTORY, b"data\0").payload == b"a\0b\0"
    err = g.ring.request(XS_READ, b"data/missing\0")
    assert (err.type, err.payload) == (XS_ERROR, b"ENOENT\0")
    tx = g.ring.request(XS_TRANSACTION_START, b"\0")
    assert tx.payload.endswith(b"\0") and int(tx.payload[:-1]) > 0
    assert dom0.read("/local/domain/1/data/a") == b"hello"
    features = int.from_bytes(g.page[2064:2068], "little")
    assert features == XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR


def test_watch_over_the_ring_fires_on_registration_and_on_dom0_writes(
        dom0: XsClient, guest: MakeGuest) -> None:
    g = guest(1)
    g.xs.mkdir("data/cfg")
    reply = g.ring.request(XS_WATCH, join_strings("data/cfg", "tok"))
    assert reply.payload == b"OK\0"
    first = g.ring.read_watch(TIMEOUT)
    assert first is not None and (first.path, first.token) == ("data/cfg", "tok")
    dom0.write("/local/domain/1/data/cfg/mtu", "1500")
    ev = g.ring.read_watch(TIMEOUT)
    assert ev is not None and (ev.path, ev.token) == ("data/cfg/mtu", "tok")
    assert g.xs.read("data/cfg/mtu") == b"1500"
    assert g.ring.read_watch(0.05) is None  # nothing else changed


def test_domu_gets_eacces_for_dom0_nodes_over_the_ring(dom0: XsClient, guest: MakeGuest) -> None:
    g1 = guest(1)
    guest(2)
    dom0.write("/local/domain/2/data/secret", "s")
    with pytest.raises(XsError) as info:
        g1.xs.read("/local/domain/2/data/secret")
    assert info.value.errname == "EACCES"
    with pytest.raises(XsError) as info:
        g1.xs.write("/local/domain/1/name", "renamed")  # the toolstack's node, read-only
    assert info.value.errname == "EACCES"
    assert g1.xs.read("/local/domain/1/name") == b"guest1"
    assert g1.xs.get_domain_path(1) == "/local/domain/1"
    with pytest.raises(XsError) as info:
        g1.xs.introduce(5, 1, 1)
    assert info.value.errname == "EACCES"


def test_transactions_over_the_ring_commit_abort_and_conflict(
        dom0: XsClient, guest: MakeGuest) -> None:
    g = guest(1)
    g.xs.write("data/x", "0")
    g.xs.watch("data", "w")
    assert g.xs.read_watch(TIMEOUT, "w") is not None  # registration event

    tx = g.xs.transaction_start()
    g.xs.write("data/x", "1", tx)
    g.xs.write("data/y", "1", tx)
    assert g.xs.read("data/x") == b"0"  # outside the transaction: unchanged
    assert g.xs.transaction_end(tx) is True
    assert g.xs.read("data/y") == b"1"
    events = {g.xs.read_watch(TIMEOUT, "w").path for _ in range(2)}  # type: ignore[union-attr]
    assert events == {"data/x", "data/y"}

    tx = g.xs.transaction_start()
    g.xs.write("data/x", "aborted", tx)
    assert g.xs.transaction_end(tx, commit=False) is True
    assert g.xs.read("data/x") == b"1"
    assert g.xs.read_watch(0.05, "w") is None

    tx = g.xs.transaction_start()
    assert g.xs.read("data/x", tx) == b"1"
    g.xs.write("data/z", "2", tx)
    dom0.write("/local/domain/1/data/x", "dom0")
    assert g.xs.transaction_end(tx) is False  # EAGAIN
    with pytest.raises(XsError):
        g.xs.read("data/z")


def test_large_values_cross_the_ring_in_several_fills(dom0: XsClient, guest: MakeGuest) -> None:
    g = guest(1)
    value = bytes((i * 7) & 0x7F for i in range(2000))  # within the 2048-byte value quota
    g.xs.write("data/big", value)
    assert g.xs.read("data/big") == value
    assert dom0.read("/local/domain/1/data/big") == value
    dom0.write("/local/domain/1/data/huge", b"h" * 4000)  # Dom0 is not held to the quota
    assert g.xs.read("data/huge") == b"h" * 4000


def test_long_listings_are_e2big_for_directory_and_come_in_parts(dom0: XsClient) -> None:
    names = [f"child-with-a-long-name-{i:04}" for i in range(200)]  # ~5.6 KiB of names
    for name in names:
        dom0.write(f"/big/{name}", "")
    with pytest.raises(XsError) as info:
        dom0.directory("/big")
    assert info.value.errname == "E2BIG"
    listing = b""
    generations = set()
    while True:
        reply = dom0.transport.request(XS_DIRECTORY_PART,
                                       join_strings("/big", str(len(listing))))
        gen, _, chunk = reply.payload.partition(b"\0")
        generations.add(gen)
        assert len(reply.payload) <= 4096
        if chunk.endswith(b"\0\0") or chunk == b"\0":  # an empty name ends the list
            listing += chunk[:-1]
            break
        listing += chunk
    assert listing.split(b"\0")[:-1] == [n.encode() for n in names]
    assert len(generations) == 1  # nothing changed between the parts


def test_ring_indices_wrap_past_1024_and_past_2_to_the_32(guest: MakeGuest) -> None:
    page = bytearray(4096)
    start = 0xFFFFFE00
    for off in (2048, 2052, 2056, 2060):  # req_cons, req_prod, rsp_cons, rsp_prod
        page[off:off + 4] = start.to_bytes(4, "little")
    g = guest(1, page=page)
    for i in range(12):
        g.xs.write(f"data/n{i}", f"{i}-" + "v" * 200)
    for i in range(12):
        assert g.xs.read(f"data/n{i}") == f"{i}-".encode() + b"v" * 200
    req_prod = int.from_bytes(page[2052:2056], "little")
    rsp_prod = int.from_bytes(page[2060:2064], "little")
    assert req_prod < start and rsp_prod < start  # both ran past 2^32 ...
    assert req_prod > 1024  # ... and round the 1024-byte ring more than once
    assert int.from_bytes(page[2048:2052], "little") == req_prod  # all consumed


def test_many_watch_events_trickle_through_a_full_response_ring(
        dom0: XsClient, guest: MakeGuest) -> None:
    g = guest(1)
    g.xs.mkdir("data/many")
    g.xs.watch("data/many", "m")
    for i in range(60):  # ~60 x 30 bytes of events: more than rsp[] holds at once
        dom0.write(f"/local/domain/1/data/many/k{i:02}", "x")
    paths = []
    while True:
        ev = g.xs.read_watch(TIMEOUT, "m")
        assert ev is not None
        paths.append(ev.path)
        if ev.path == "data/many/k59":
            break
    assert paths == ["data/many"] + [f"data/many/k{i:02}" for i in range(60)]


def test_oversized_length_disconnects_only_that_domain(daemon: Xenstored, guest: MakeGuest) -> None:
    good = guest(1)
    bad = guest(2)
    good.xs.write("data/v", "1")
    bad.ring.send_raw(XsdSockmsg(XS_READ, 1, 0).pack()[:12] + (5000).to_bytes(4, "little"))
    assert wait_until(lambda: bad.ring.intf.error == XENSTORE_ERROR_PROTO, bad.port)
    status = daemon.domain_status(2)
    assert status is not None and not status.connected
    with pytest.raises(XsRingError):
        bad.xs.read("data/v")
    good.xs.write("data/v", "2")  # the other domain is served as before
    assert good.xs.read("data/v") == b"2"
    assert daemon.running

    bad.ring.reconnect()  # docs/misc/xenstore-ring.txt: reset and start again
    assert bad.ring.intf.error == XENSTORE_ERROR_NONE
    assert bad.ring.intf.connection == XENSTORE_CONNECTED
    assert int.from_bytes(bad.page[2048:2064], "little") == 0  # all four indices zeroed
    bad.xs.write("data/v", "back")
    assert bad.xs.read("data/v") == b"back"


def test_hostile_indices_disconnect_only_that_domain(daemon: Xenstored, guest: MakeGuest) -> None:
    good = guest(1)
    bad = guest(3)
    intf = bad.ring.intf
    intf.req_prod = intf.req_cons + 4000  # "4000 bytes" in a 1024-byte ring
    bad.port.notify()
    assert wait_until(lambda: intf.error == XENSTORE_ERROR_RINGIDX, bad.port)
    assert "request ring" in daemon.domain_status(3).disconnect_reason  # type: ignore[union-attr]
    assert good.xs.read("name") == b"guest1"

    bad.ring.reconnect()
    intf.rsp_cons = intf.rsp_prod + 0x80000000  # now the response side is garbage
    bad.ring.send_raw(XsdSockmsg(XS_READ, 7, 0, b"name\0").pack())
    assert wait_until(lambda: intf.error == XENSTORE_ERROR_RINGIDX, bad.port)
    assert "response ring" in daemon.domain_status(3).disconnect_reason  # type: ignore[union-attr]
    good.xs.write("data/still", "here")
    assert good.xs.read("data/still") == b"here"


def test_garbage_requests_get_errors_and_the_domain_stays(
        daemon: Xenstored, guest: MakeGuest) -> None:
    g = guest(1)
    assert g.ring.request(999, b"junk").payload == b"EINVAL\0"
    assert g.ring.request(XS_WATCH, b"only-a-path\0").payload == b"EINVAL\0"
    assert g.ring.request(XS_WRITE, b"no-separator").payload == b"EINVAL\0"
    assert g.ring.request(XS_READ, b"bad path!\0").payload == b"EINVAL\0"
    assert g.ring.request(XS_READ, b"\xff\xfe\0").payload == b"EINVAL\0"
    assert g.ring.request(XS_READ, b"name\0", tx_id=12345).payload == b"ENOENT\0"
    assert g.ring.request(XS_INTRODUCE, b"4\0" b"1\0" b"1\0").payload == b"EACCES\0"
    assert g.xs.read("name") == b"guest1"
    status = daemon.domain_status(1)
    assert status is not None and status.connected and status.error_replies == 7


def test_random_requests_always_get_an_answer_and_never_hurt_the_daemon(
        daemon: Xenstored, guest: MakeGuest) -> None:
    rng = random.Random(20240605)
    words = ["data", "data/a", "/local/domain/1/data/b", "/", "@releaseDomain", "@x", "T", "F",
             "r1", "n0", "b1", "x9", "1", "0", "4294967295", "", "a//b", "tok", "device"]
    g = guest(1)
    replies = []
    for _ in range(300):
        msg_type = rng.randrange(0, 26)
        payload = b"\0".join(rng.choice(words).encode() for _ in range(rng.randrange(0, 4)))
        if rng.random() < 0.5:
            payload += b"\0"
        tx_id = rng.choice([0, 0, 0, 1, 2, 0xFFFFFFFF])
        if msg_type == XS_TRANSACTION_END and tx_id == 0:
            continue
        replies.append(g.ring.request(msg_type, payload, tx_id))
    assert len(replies) > 250
    assert all(r.type != XS_ERROR or r.errname in XSD_ERROR_NAMES for r in replies)
    assert not any(r.errname == "EIO" for r in replies)  # EIO would mean a daemon bug
    assert daemon.internal_errors == 0
    status = daemon.domain_status(1)
    assert status is not None and status.connected
    assert daemon.running


def test_closing_the_guest_end_disconnects_the_domain(daemon: Xenstored, guest: MakeGuest) -> None:
    g = guest(1)
    other = guest(2)
    g.port.close()
    other.xs.write("data/x", "1")  # a full round trip: the daemon has passed over domain 1
    status = daemon.domain_status(1)
    assert status is not None and not status.connected
    assert "closed" in status.disconnect_reason


def test_introduce_release_and_their_special_watches() -> None:
    daemon_pages: dict[int, tuple[bytearray, EventChannel, EventChannel]] = {}
    dom0_ports = EventChannelTable(domid=0)
    guest_ports = EventChannelTable(domid=7)

    def resolve(domid: int, mfn: int, port: int) -> tuple[memoryview, EventChannel]:
        """The machine's part of XS_INTRODUCE: map the page, bind to the guest's port."""
        page = bytearray(4096)
        ours, theirs = dom0_ports.bind_interdomain(guest_ports, name=f"xenstore-d{domid}")
        daemon_pages[domid] = (page, ours, theirs)
        return memoryview(page), ours

    daemon = Xenstored(resolve_ring=resolve, idle_wait_s=0.2)
    daemon.start()
    try:
        d0 = XsClient(daemon.connect_local(0))
        d0.watch("@introduceDomain", "intro")
        d0.watch("@releaseDomain", "rel")
        assert d0.read_watch(TIMEOUT, "intro") is not None  # registration events
        assert d0.read_watch(TIMEOUT, "rel") is not None
        assert d0.is_domain_introduced(7) is False
        d0.introduce(7, 0x1234, 3)
        assert d0.is_domain_introduced(7) is True
        assert d0.read_watch(TIMEOUT, "intro") is not None
        page, _ours, theirs = daemon_pages[7]
        make_domain_home(d0, 7)
        g = XsClient(XenstoreRingClient(page, theirs, timeout_s=TIMEOUT))
        g.write("data/hello", "world")
        assert d0.read("/local/domain/7/data/hello") == b"world"
        d0.release(7)
        assert d0.read_watch(TIMEOUT, "rel") is not None
        assert d0.is_domain_introduced(7) is False
        with pytest.raises(XsError) as info:
            d0.release(7)
        assert info.value.errname == "ENOENT"
    finally:
        daemon.stop()
        dom0_ports.close_all()
        guest_ports.close_all()


def test_xenbus_backend_creates_vbd_paths_with_toolstack_permissions(
        dom0: XsClient, guest: MakeGuest) -> None:
    fe_guest = guest(1)
    other = guest(2)
    backend = XenbusBackend(dom0, "vbd")
    dev = backend.create_device(1, 51712, backend_entries={"params": "disk.img", "mode": "w"})
    fe = "/local/domain/1/device/vbd/51712"
    be = "/local/domain/0/backend/vbd/1/51712"
    assert (dev.frontend_path, dev.backend_path) == (fe, be)
    assert dom0.read(f"{fe}/backend") == be.encode()
    assert dom0.read(f"{fe}/backend-id") == b"0"
    assert dom0.read(f"{fe}/state") == b"1"
    assert dom0.read(f"{be}/frontend") == fe.encode()
    assert dom0.read(f"{be}/frontend-id") == b"1"
    assert dom0.read(f"{be}/state") == b"1"
    assert dom0.read(f"{be}/params") == b"disk.img"
    assert dom0.get_perms(fe) == ["n1", "r0"]
    assert dom0.get_perms(be) == ["n0", "r1"]
    # The frontend may write its own directory and read the backend's; nobody else may.
    fe_guest.xs.write("device/vbd/51712/ring-ref", "8")
    assert fe_guest.xs.read(f"{be}/mode") == b"w"
    for path in (f"{fe}/state", f"{be}/state"):
        with pytest.raises(XsError) as info:
            other.xs.read(path)
        assert info.value.errname == "EACCES"
    with pytest.raises(XsError):
        fe_guest.xs.write(f"{be}/state", "4")
    backend.remove_device(dev)
    with pytest.raises(XsError):
        dom0.read(fe)


def test_frontend_moves_1_3_4_and_the_backend_sees_it_through_its_watch(
        dom0: XsClient, guest: MakeGuest) -> None:
    fe_guest = guest(1)
    backend = XenbusBackend(dom0, "vbd")
    dev = backend.create_device(1, 51712)
    errors: list[BaseException] = []

    def frontend() -> None:  # what blkfront does, over the guest's ring
        try:
            xs = fe_guest.xs
            fe = "device/vbd/51712"
            be = xs.read_text(f"{fe}/backend")
            xs.watch(f"{be}/state", "otherend")
            wait_for_state(xs, f"{be}/state", {XenbusState.InitWait}, TIMEOUT, "otherend")
            xs.write(f"{fe}/ring-ref", "8")
            xs.write(f"{fe}/event-channel", "5")
            xs.write(f"{fe}/state", str(int(XenbusState.Initialised)))
            wait_for_state(xs, f"{be}/state", {XenbusState.Connected}, TIMEOUT, "otherend")
            xs.write(f"{fe}/state", str(int(XenbusState.Connected)))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    seen: list[XenbusState] = []
    ev = dom0.read_watch(TIMEOUT, dev.state_token)  # the registration event
    assert ev is not None and ev.path == f"{dev.frontend_path}/state"
    seen.append(backend.frontend_state(dev))
    thread = threading.Thread(target=frontend, name="test-blkfront")
    thread.start()
    backend.switch_state(dev, XenbusState.InitWait)
    while seen[-1] != XenbusState.Connected:
        ev = dom0.read_watch(TIMEOUT, dev.state_token)
        assert ev is not None, f"no state change after {seen}"
        state = backend.frontend_state(dev)
        if state != seen[-1]:
            seen.append(state)
        if state == XenbusState.Initialised:
            assert dom0.read(f"{dev.frontend_path}/ring-ref") == b"8"
            backend.switch_state(dev, XenbusState.Connected)
    thread.join(TIMEOUT)
    assert not errors
    assert seen == [XenbusState.Initialising, XenbusState.Initialised, XenbusState.Connected]
    assert read_state(dom0, f"{dev.backend_path}/state") == XenbusState.Connected


def test_no_thread_is_left_after_stop() -> None:
    before = set(threading.enumerate())
    daemon = Xenstored(idle_wait_s=0.2)
    daemon.start()
    d0 = XsClient(daemon.connect_local(0))
    make_domain_home(d0, 1)
    g = Guest(daemon, 1)
    g.xs.write("data/x", "1")
    assert any(t.name == "xenstored" for t in threading.enumerate())
    daemon.stop()
    assert not daemon.running
    assert set(threading.enumerate()) <= before
    assert daemon.remove_domain(1) is True
    g.close()
