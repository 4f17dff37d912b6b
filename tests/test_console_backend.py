"""Console backend over a guest's xencons_interface page: output to a sink, input into in[], wrap, hostile indices."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from hvm.evtchn import EventChannel
from hvm.memory import PAGE_SIZE, GuestMemory
from pv.backends import ConnectError, LocalFrontendLink
from pv.backends.console import (
    XENCONS_IN_SIZE,
    XENCONS_OUT_SIZE,
    Console,
    ConsoleBackend,
    XenconsInterface,
)
from pv.grant_table import GrantOps

CONSOLE_GFN = 5  # start_info.console.domU.mfn of hvmlab's PV domains
TIMEOUT = 3.0


class Output:
    """A sink the test can block on: the backend writes from its own thread."""

    def __init__(self) -> None:
        self.q: queue.Queue[bytes] = queue.Queue()

    def __call__(self, data: bytes) -> None:
        self.q.put(data)

    def take(self, count: int) -> bytes:
        out = b""
        while len(out) < count:
            out += self.q.get(timeout=TIMEOUT)
        return out

    def empty(self) -> bool:
        return self.q.empty()


class Guest:
    """What a guest's console driver does with its page and its console port."""

    def __init__(self, domid: int) -> None:
        self.memory = GuestMemory(16 * PAGE_SIZE)
        self.link = LocalFrontendLink(domid, self.memory, GrantOps())
        self.intf = XenconsInterface(self.memory.p2m(CONSOLE_GFN).view())
        self.port = self.link.alloc_unbound()
        self.evtchn = self.link.guest_end(self.port)

    def write(self, data: bytes, notify: bool = True) -> None:
        prod = self.intf.out_prod
        self.intf.write_out(prod, data)
        self.intf.out_prod = prod + len(data)  # the bytes first, then the index
        if notify:
            self.evtchn.notify()

    def read_input(self) -> bytes:
        cons, prod = self.intf.in_cons, self.intf.in_prod
        data = self.intf.read_in(cons, (prod - cons) & 0xFFFF_FFFF)
        self.intf.in_cons = prod
        return data

    def wait_until(self, cond: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + TIMEOUT
        while not cond():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.evtchn.wait(remaining)
        return True


@pytest.fixture
def backend() -> Iterator[ConsoleBackend]:
    b = ConsoleBackend(idle_wait_s=0.2)
    b.start()
    yield b
    b.stop()


def attach(backend: ConsoleBackend, guest: Guest, sink: Callable[[bytes], None]) -> Console:
    return backend.attach(guest.link, CONSOLE_GFN, guest.port, sink)


def test_output_reaches_the_sink_and_out_cons_follows(backend: ConsoleBackend) -> None:
    guest, out = Guest(1), Output()
    console = attach(backend, guest, out)
    guest.write(b"Hello from a PV guest\n")
    assert out.take(22) == b"Hello from a PV guest\n"
    # The backend told the guest it may reuse the space.
    assert guest.wait_until(lambda: guest.intf.out_cons == guest.intf.out_prod == 22)
    guest.write(b"Test result: SUCCESS\n")
    assert out.take(21) == b"Test result: SUCCESS\n"
    assert console.stats.bytes_out == 43 and console.connected


def test_output_across_the_ring_end_and_the_index_wrap(backend: ConsoleBackend) -> None:
    guest, out = Guest(1), Output()
    start = 0xFFFF_FFF6  # 10 bytes before the u32 wrap, 10 slots before the end of out[]
    assert start % XENCONS_OUT_SIZE == XENCONS_OUT_SIZE - 10
    guest.intf.out_cons = guest.intf.out_prod = start
    attach(backend, guest, out)
    text = bytes(range(32, 127)) + b"\n"
    guest.write(text)
    assert out.take(len(text)) == text
    assert guest.wait_until(lambda: guest.intf.out_cons == (start + len(text)) & 0xFFFF_FFFF)
    page = guest.memory.read(CONSOLE_GFN * PAGE_SIZE, PAGE_SIZE)
    assert page[1024 + XENCONS_OUT_SIZE - 10:1024 + XENCONS_OUT_SIZE] == text[:10]
    assert page[1024:1024 + len(text) - 10] == text[10:]


def test_output_written_before_attach_is_not_lost(backend: ConsoleBackend) -> None:
    guest, out = Guest(1), Output()
    guest.write(b"early boot message\n", notify=False)
    attach(backend, guest, out)
    assert out.take(19) == b"early boot message\n"


def test_input_goes_into_in_and_the_guest_is_notified(backend: ConsoleBackend) -> None:
    guest = Guest(1)
    console = attach(backend, guest, Output())
    assert console.write_input(b"ls -l\n") == 6
    assert guest.wait_until(lambda: guest.intf.in_prod == 6)
    assert guest.read_input() == b"ls -l\n"
    assert console.stats.bytes_in == 6


def test_input_larger_than_in_waits_for_the_guest_to_read(backend: ConsoleBackend) -> None:
    guest = Guest(1)
    console = attach(backend, guest, Output())
    text = bytes(i % 251 for i in range(2500))
    assert console.write_input(text) == len(text)
    got = b""
    while len(got) < len(text):
        assert guest.wait_until(lambda: guest.intf.in_prod != guest.intf.in_cons)
        used = (guest.intf.in_prod - guest.intf.in_cons) & 0xFFFF_FFFF
        assert used <= XENCONS_IN_SIZE  # never more than in[] holds
        got += guest.read_input()
        guest.evtchn.notify()  # "I have read some": the backend fills in more
    assert got == text and console.pending_input == 0


def test_input_beyond_the_queue_limit_is_refused_and_counted() -> None:
    backend = ConsoleBackend(idle_wait_s=0.2, max_pending_input=100)
    guest = Guest(1)
    console = attach(backend, guest, Output())  # not started: the queue only fills
    assert console.write_input(b"a" * 60) == 60
    assert console.write_input(b"b" * 60) == 40
    assert console.stats.input_dropped == 20 and console.pending_input == 100
    backend.stop()


@pytest.mark.parametrize("attack", ["out_prod far ahead", "in_cons past in_prod"])
def test_impossible_indices_disconnect_that_console_only(backend: ConsoleBackend,
                                                         attack: str) -> None:
    hostile, honest = Guest(1), Guest(2)
    out_bad, out_good = Output(), Output()
    bad = attach(backend, hostile, out_bad)
    good = attach(backend, honest, out_good)
    if attack == "out_prod far ahead":
        hostile.intf.out_prod = hostile.intf.out_cons + XENCONS_OUT_SIZE + 1
        hostile.evtchn.notify()
    else:
        hostile.intf.in_cons = 5000  # in_prod is 0
        bad.write_input(b"x")
    assert hostile.wait_until(lambda: hostile.evtchn.peer_closed)
    assert not bad.connected and bad.disconnect_reason
    assert out_bad.empty()  # nothing was read out of a ring with lying indices
    honest.write(b"still here\n")
    assert out_good.take(11) == b"still here\n" and good.connected
    assert bad.write_input(b"late") == 0


def test_ring_pushes_are_reported_and_a_failing_sink_is_survived() -> None:
    pushes: list[tuple[str, int, int, bool]] = []
    backend = ConsoleBackend(idle_wait_s=0.2, on_ring_push=lambda *a: pushes.append(a))
    backend.start()
    try:
        guest, out = Guest(3), Output()
        calls = {"n": 0}

        def flaky(data: bytes) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("terminal went away")
            out(data)

        console = attach(backend, guest, flaky)
        guest.write(b"lost\n")
        assert guest.wait_until(lambda: guest.intf.out_cons == 5)
        guest.write(b"kept\n")
        assert out.take(5) == b"kept\n"
        console.write_input(b"y")
        assert guest.wait_until(lambda: guest.intf.in_prod == 1)
    finally:
        backend.stop()
    assert backend.sink_errors == 1
    assert ("xencons/d3/out", 5, 5, True) in pushes
    assert ("xencons/d3/out", 10, 10, True) in pushes
    assert ("xencons/d3/in", 1, 1, True) in pushes


def test_stop_drains_what_is_left_and_leaves_no_thread() -> None:
    before = set(threading.enumerate())
    backend = ConsoleBackend(idle_wait_s=0.2)
    backend.start()
    guest, out = Guest(1), Output()
    console = attach(backend, guest, out)
    guest.write(b"last words\n", notify=False)  # a guest that never notifies
    backend.stop(timeout_s=TIMEOUT)
    assert out.take(11) == b"last words\n"
    assert set(threading.enumerate()) <= before
    assert not console.connected and guest.evtchn.peer_closed


def test_attach_to_a_port_that_is_not_unbound_is_refused(backend: ConsoleBackend) -> None:
    guest = Guest(1)
    with pytest.raises(ConnectError):
        backend.attach(guest.link, CONSOLE_GFN, guest.port + 7, Output())
    with pytest.raises(ConnectError):
        backend.attach(guest.link, 0x10000, guest.port, Output())  # not guest RAM
    dom0_end: EventChannel = guest.link.bind_evtchn(guest.port)
    with pytest.raises(ConnectError):  # bound once already
        backend.attach(guest.link, CONSOLE_GFN, guest.port, Output())
    dom0_end.close()
