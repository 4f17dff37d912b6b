"""The device-model thread: waits on event channels, answers ioreqs (Xen hvm/ioreq.h)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from devicemodel.clock import Clock, MonotonicClock
from hvm.affinity import pin_current_thread
from hvm.bufioreq import BufferedIoPage
from hvm.evtchn import EventChannel, WaitSet
from hvm.ioreq import (
    IOREQ_FLAG_BITS,
    IOREQ_READ,
    IOREQ_WRITE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_READY,
    IoReq,
    SharedIoPage,
    state_name,
)

_DATA_IS_PTR = 1 << IOREQ_FLAG_BITS["data_is_ptr"][0]  # in the flags byte (30) of ioreq_t
_DF = 1 << IOREQ_FLAG_BITS["df"][0]
_DIR_SHIFT = IOREQ_FLAG_BITS["dir"][0]

# The server re-checks its stop flag at least this often even if no port is ever notified:
# its waits are bounded too, and a wait of this length costs nothing (it is a poll(2) sleep).
WAKE_BOUND_S = 0.5


class GuestMemoryView(Protocol):
    """What the device model needs of guest RAM (guest-physical addresses)."""

    def read(self, gpa: int, n: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class IoreqHandler(Protocol):
    """Emulates one ioreq. Returns the value a read yields (ignored for writes).

    For string I/O (data_is_ptr) the handler moves the `count` elements of `size` bytes
    between the device and guest memory at req.data itself, stepping backwards when df.
    """

    def handle(self, req: IoReq, mem: GuestMemoryView) -> int: ...


class DirectIoreqHandler(IoreqHandler, Protocol):
    """A handler that can also take an ioreq with one value (data_is_ptr = 0) as plain fields,
    so the device-model thread builds no IoReq for it: access(type, addr, size, dir, data)."""

    def access(self, type_: int, addr: int, size: int, dir_: int, data: int) -> int: ...


class IoreqTimeout(RuntimeError):
    """The device model did not answer an ioreq within the bound."""


class DeviceModelError(IoreqTimeout):
    """The device model is gone (it closed its end of the vCPU's port): no answer will come."""


@dataclass(frozen=True)
class IoreqStepTimes:
    """When the device model woke for, copied out and answered one ioreq (clock ns)."""

    vcpu: int
    type: int
    addr: int
    dir: int
    t_wake: int
    t_fetched: int
    t_done: int


def _mask_to_size(value: int, size: int) -> int:
    """What a read of `size` bytes can carry (the whole u64 for odd sizes)."""
    bits = 8 * size if 1 <= size <= 8 else 64
    return int(value) & ((1 << bits) - 1)


class IoreqServer:
    """Device-model thread: blocks in select() on its event channels, as QEMU's xen ioreq
    server does.

    ports[i] is the device model's end of vCPU i's interdomain event channel. One wake-up:
    drain the buffered page first (those writes were posted earlier, so a read must see
    them), then for each notified vCPU copy its ioreq out once, set INPROCESS, run the
    handler, write back `data` for a plain read, set IORESP_READY, notify.

    If the handler raises, the exception is kept in `error`, the slot stays INPROCESS and
    the thread ends, closing its ends of the event channels as a crashed QEMU's are closed
    for it: a vCPU waiting in send_ioreq is woken and raises DeviceModelError at once.
    """

    def __init__(
        self,
        page: SharedIoPage,
        ports: Sequence[EventChannel],
        handler: IoreqHandler,
        mem: GuestMemoryView,
        bufpage: BufferedIoPage | None = None,
        buf_port: EventChannel | None = None,
        name: str = "device-model",
        *,
        clock: Clock | None = None,
        history: int = 64,
        cpu: int | None = None,
    ) -> None:
        if buf_port is not None and bufpage is None:
            raise ValueError("a buffered-ioreq port needs a buffered page to drain")
        if len(ports) > page.nr_vcpus:
            raise ValueError(f"{len(ports)} ports but the I/O page has {page.nr_vcpus} slots")
        self.page = page
        self.ports = list(ports)
        self.handler = handler
        self.mem = mem
        self.bufpage = bufpage
        self.buf_port = buf_port
        self.name = name
        self.served = 0
        self.buffered_served = 0
        self.spurious = 0  # wake-ups that found no READY ioreq
        self.record_steps = True  # keep step_times() (off: a little less work per ioreq)
        self.error: BaseException | None = None
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._vcpu_of = {ch: vcpu for vcpu, ch in enumerate(self.ports)}
        self._access = getattr(handler, "access", None)  # a DirectIoreqHandler's direct path
        self.cpu = cpu  # the host CPU the thread runs on (hvm.affinity); None: anywhere
        self._times: collections.deque[IoreqStepTimes] = collections.deque(maxlen=history)
        self._times_lock = threading.Lock()
        # A private wake object, not a guest-visible port: stop() pokes it.
        self._stop_ch = EventChannel(0, name=f"{name}-stop")
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None or self._stop_ch.closed:
            raise RuntimeError(f"{self.name}: a server runs once; make a new one to restart")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Wake the thread and wait (bounded) for it to end. Leaves the caller's ports open."""
        self._stopping = True
        if not self._stop_ch.closed:
            self._stop_ch.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"{self.name}: thread did not stop within {timeout_s} s "
                                   "(a handler is blocked?)")
        self._stop_ch.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> IoreqServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def last_step_times(self) -> IoreqStepTimes | None:
        """The timestamps of the last synchronous ioreq served, if kept."""
        with self._times_lock:
            return self._times[-1] if self._times else None

    def step_times(self) -> list[IoreqStepTimes]:
        """Timestamps of the last `history` synchronous ioreqs, oldest first."""
        with self._times_lock:
            return list(self._times)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        pin_current_thread(self.cpu)
        watch = [self._stop_ch, *self.ports]
        if self.buf_port is not None:
            watch.append(self.buf_port)
        try:
            waiter = WaitSet(watch)
            while not self._stopping:
                ready = waiter.wait(WAKE_BOUND_S)
                if not ready:
                    continue
                t_wake = self._clock.now_ns() if self.record_steps else 0
                if self._stop_ch in ready:
                    break
                self._drain_buffered()
                for ch in ready:
                    vcpu = self._vcpu_of.get(ch)
                    if vcpu is not None:
                        self._serve(vcpu, t_wake)
        except BaseException as exc:  # noqa: BLE001 - kept for the hypervisor to report
            self.error = exc
            for ch in self.ports + ([self.buf_port] if self.buf_port is not None else []):
                ch.close()

    def _serve(self, vcpu: int, t_wake: int) -> None:
        # One copy: every decision below is taken from these values, never from the page again.
        taken = self.page.take_request(vcpu)  # READY -> INPROCESS
        if taken is None:
            self.spurious += 1
            return
        addr, data, count, size, vp_eport, flags, type_ = taken
        record = self.record_steps
        t_fetched = self._clock.now_ns() if record else 0
        dir_ = (flags >> _DIR_SHIFT) & 1
        if flags & _DATA_IS_PTR or self._access is None:
            req = IoReq(addr, data, count, size, vp_eport, STATE_IOREQ_READY, bool(flags & _DATA_IS_PTR),
                        dir_, bool(flags & _DF), type_)
            result = self.handler.handle(req, self.mem)
        else:  # one value, no guest buffer: the handler's direct path, no IoReq built
            result = self._access(type_, addr, size, dir_, data)
        # The answer is in the page before the state says it is there.
        self.page.answer(vcpu, flags, _mask_to_size(result or 0, size)
                         if dir_ == IOREQ_READ and not flags & _DATA_IS_PTR else None)
        self.served += 1
        if record:
            t_done = self._clock.now_ns()
            with self._times_lock:
                self._times.append(IoreqStepTimes(vcpu, type_, addr, dir_, t_wake, t_fetched, t_done))
        self.ports[vcpu].notify()

    def drain_buffered(self) -> None:
        """Apply what is left in the buffered page (after stop(), when the guest has ended)."""
        if self.running:
            raise RuntimeError("drain_buffered() is for a stopped server; the thread drains it itself")
        self._drain_buffered()

    def _drain_buffered(self) -> None:
        """Apply the buffered writes until the page is empty. The hypervisor notifies only the
        write that finds the page empty, so a write posted while these were taken is seen by
        the check that ends the loop (the read pointer has moved by then)."""
        bufpage = self.bufpage
        if bufpage is None:
            return
        eport = self.buf_port.port if self.buf_port is not None else 0
        access = self._access
        while bufpage.has_entries():
            writes = bufpage.take()
            if not writes:
                return  # only half of an 8-byte write: its other half comes with a notification
            for type_, addr, size, data in writes:
                if access is not None:
                    access(type_, addr, size, IOREQ_WRITE, data)
                else:
                    self.handler.handle(IoReq(addr, data, 1, size, eport, STATE_IOREQ_INPROCESS, False,
                                              IOREQ_WRITE, False, type_), self.mem)
                self.buffered_served += 1


def send_ioreq(page: SharedIoPage, vcpu: int, req: IoReq, port: EventChannel,
               timeout_s: float) -> int:
    """Hypervisor side, on the vCPU thread: post the ioreq, notify, block until answered.

    Returns the slot's `data` (for a plain read, the value; the caller masks it to size).
    The slot is back to NONE on return. On IoreqTimeout/DeviceModelError the slot is left
    as the device model left it (READY or INPROCESS): that vCPU cannot post again, as in
    Xen, where a device model that loses an ioreq crashes the domain.
    """
    if req.vp_eport != port.port:
        req = replace(req, vp_eport=port.port)
    page.post(vcpu, req)  # all fields, then state = READY
    port.notify()
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        data = page.take_response(vcpu)  # IORESP_READY -> NONE, or None
        if data is not None:
            return data
        state = page.state(vcpu)
        if port.peer_closed:
            raise DeviceModelError(
                f"vCPU {vcpu}: the device model closed its end of event channel port "
                f"{port.port} while {req.describe()} was {state_name(state)}; it has stopped "
                "(its IoreqServer.error says why)")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            why = ("nobody picked it up: is the device-model thread running?"
                   if state == STATE_IOREQ_READY else "the device model took it but never answered")
            raise IoreqTimeout(
                f"vCPU {vcpu}: no answer from the device model within {timeout_s:g} s for "
                f"{req.describe()} on port {port.port}; slot is {state_name(state)} ({why})")
        port.wait(remaining)
