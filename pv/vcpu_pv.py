"""The PV vCPU: a Unicorn engine running a 32-bit PV guest, hypercalls at `int 0x82`, event upcalls, blocking and page remaps between runs (Xen arch/x86/pv: hypercall entry, create_bounce_frame; common/sched: do_block, do_poll)."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Sequence

from hvm.boot import boot
from hvm.cpuid import CpuModel, hvmlab_cpu
from hvm.engine import Engine, Reg, StopInfo
from hvm.interrupts import EXCEPTION_NAMES
from hvm.memory import GuestMemory, HostFrame
from hvm.status import CRASHED, HALTED, INTERNAL, LIMIT, GuestEnded
from hvm.vcpu import GUEST_SLICE_INSNS
from pv.evtchn_pv import PortStatus, PvEventChannels
from pv.guest_copy import GuestCopy
from pv.hypercalls import SHUTDOWN_NAMES, Callbacks, Hypercalls, hypercall_name
from pv.layouts import X86_32, field_offsets, vcpu_info
from pv.shared_info import SharedInfo
from pv.trace_pv import BLOCK, EVENT_SEND, UPCALL, PvTracer

HYPERCALL_VECTOR = 0x82
ARG_REGS = (Reg.EBX, Reg.ECX, Reg.EDX, Reg.ESI, Reg.EDI)
INT_0X82 = b"\xcd\x82"
BLOCK_WAIT_S = 0.25  # one bounded wait of a blocked vCPU (it is woken by every event)
GATE_RETRY_S = 0.02  # a Dom0 thread waiting to remap re-kicks the vCPU this often
REMAP_TIMEOUT_S = 5.0
FLAGS_TF, FLAGS_IF, FLAGS_NT, FLAGS_RF, FLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17

_TIME = field_offsets(vcpu_info(X86_32))
TIME_VERSION, TIME_SYSTEM_TIME = _TIME["time.version"], _TIME["time.system_time"]


def shutdown_ending(reason: int, code: int | None = None) -> GuestEnded:
    """How SCHEDOP_shutdown ends the run: poweroff, reboot and suspend are clean ends (status
    0: there is no toolstack here to restart or save the domain); crash and watchdog are a
    crash (4); an unknown reason too, as Xen passes it on and no controller knows it."""
    name = SHUTDOWN_NAMES.get(reason)
    why = f" (shutdown code {code})" if code is not None else ""
    if name in ("poweroff", "reboot", "suspend", "soft_reset"):
        return GuestEnded(f"shutdown_{name}", HALTED, f"guest shut down: {name}{why}")
    if name is not None:
        return GuestEnded(f"shutdown_{name}", CRASHED, f"guest shut down: {name}{why}")
    return GuestEnded("shutdown_unknown", CRASHED, f"guest shut down with unknown reason {reason}")


class PvVcpu:
    """vCPU 0 of a PV domain. It is the hook sink of its engine (hvm.engine.HookSink) and the
    scheduler its hypercalls block in (pv.hypercalls.Scheduler).

    Threads: run() is the vCPU thread; event_arrived(), request_end() and on_remap() come
    from other threads. Unicorn's memory map may only change while the guest is not
    executing: the vCPU holds `_gate` whenever guest code may run, and lets it go between
    runs and while a hypercall is being served (so a hypercall blocked on an event or a lock
    never holds up a Dom0 thread that flips a page into this domain).
    """

    def __init__(self, domid: int, memory: GuestMemory, shared: SharedInfo,
                 evtchn: PvEventChannels, callbacks: Callbacks, *, tracer: PvTracer | None = None,
                 max_hypercalls: int | None = None, cpu: CpuModel | None = None,
                 t0_ns: int | None = None) -> None:
        self.domid = domid
        self.memory = memory
        self.shared = shared
        self.evtchn = evtchn
        self.callbacks = callbacks
        self.tracer = tracer
        self.max_hypercalls = max_hypercalls
        self.cpu = cpu or hvmlab_cpu()
        self.guest = GuestCopy(memory)
        self.hc: Hypercalls | None = None  # set by the domain builder (it needs this vCPU)
        self._t0 = time.monotonic_ns() if t0_ns is None else t0_ns
        self._engine: Engine | None = None
        self._apply_remap: Callable[[int, HostFrame], None] | None = None
        self._thread_ident: int | None = None
        self._gate = threading.Lock()
        self._gate_cond = threading.Condition()
        self._remaps_waiting = 0
        self._gate_open = False  # the vCPU thread let the gate go (serving a hypercall)
        self._closed = False
        self._kicked = threading.Event()  # someone stopped the engine on purpose
        self._wake = threading.Event()  # a blocked vCPU has something to look at
        self._in_guest = False
        self._ending: GuestEnded | None = None
        self._end_request: GuestEnded | None = None
        self._fault: str | None = None
        self._hypercall_rip = 0  # where the hypercall being served was made (for BLOCK records)
        self._upcall_in_hook = False  # enter the event callback as this hypercall returns
        # counters for the run's result
        self.hypercalls_total = 0
        self.upcalls = 0
        self.blocks = 0
        self.yields = 0
        self.port_accesses = 0  # IN/OUT: a domU has no I/O ports (reads all-ones, writes dropped)
        self.remap_failures = 0
        evtchn.on_event = self.event_arrived
        memory.on_remap(self.on_remap)

    # -- time and the other threads --------------------------------------------------------------
    def now_ns(self) -> int:
        return time.monotonic_ns() - self._t0

    def _kick(self) -> None:
        """Get the vCPU out of the guest: it runs in exact slices (GUEST_SLICE_INSNS) and looks
        at this flag between them. No uc_emu_stop from another thread: such a stop is not exact
        (an instruction can run twice after it; see hvm/vcpu.py GUEST_SLICE_INSNS)."""
        self._kicked.set()

    def event_arrived(self) -> None:
        """An event was queued for this domain (any thread): wake a blocked vCPU, or get a
        running one out of the guest so it can set the bits and deliver an upcall."""
        self._wake.set()
        self._kick()

    def request_end(self, ending: GuestEnded) -> None:
        """End the run at the next point the vCPU looks (timeout, Ctrl-C, a Dom0 decision)."""
        if self._end_request is None:
            self._end_request = ending
        self._wake.set()
        self._kick()

    def watchdog(self) -> None:
        """Called periodically by the supervisor: a stop requested just before the engine
        started running is lost by Unicorn; ask again while the request is unanswered."""
        # Nothing to re-send: a running vCPU sees the flag at its next slice boundary.
        return

    def on_remap(self, pfn: int, frame: HostFrame) -> None:
        """GuestMemory.remap listener (page flips, grant mappings): change Unicorn's map on the
        vCPU thread, or from another thread only while the guest is stopped (see the gate)."""
        if threading.get_ident() == self._thread_ident:
            # In a hook or between runs: the CPU is stopped. While a hypercall is served the
            # gate is open, and a Dom0 thread may be remapping too: take it for the change.
            if self._apply_remap is None:
                return
            if self._gate_open:
                with self._gate:
                    self._apply_remap(pfn, frame)
            else:
                self._apply_remap(pfn, frame)
            return
        with self._gate_cond:
            self._remaps_waiting += 1
        try:
            deadline = time.monotonic() + REMAP_TIMEOUT_S
            while not self._gate.acquire(timeout=GATE_RETRY_S):
                self._kick()
                if time.monotonic() > deadline:
                    self.remap_failures += 1
                    self.request_end(GuestEnded("error", INTERNAL, f"frame {pfn:#x} was re-backed "
                                                "but the vCPU never stopped to remap it"))
                    return
            try:
                if self._apply_remap is not None and not self._closed:
                    self._apply_remap(pfn, frame)
            finally:
                self._gate.release()
        finally:
            with self._gate_cond:
                self._remaps_waiting -= 1
                self._gate_cond.notify_all()

    def _open_gate(self) -> None:
        self._gate_open = True
        self._gate.release()

    def _close_gate(self) -> None:
        """Take the gate back, after any Dom0 thread already waiting for it."""
        with self._gate_cond:
            while self._remaps_waiting:
                self._gate_cond.wait(GATE_RETRY_S)
        self._gate.acquire()
        self._gate_open = False

    # -- the vCPU thread ---------------------------------------------------------------------------
    def run(self, entry: int, start_info: int, stack: int) -> GuestEnded:
        """Build the engine, enter the guest at `entry` (ESI = start_info) and run to its end."""
        self._thread_ident = threading.get_ident()
        self._gate.acquire()
        try:
            engine = Engine(32, self.memory)
            self._apply_remap = engine.take_remap_listener()
            engine.install(self, rdtsc_exiting=False)
            boot(engine, self.memory, 32, entry)  # flat protected mode, EFLAGS.IF = 0
            engine.set_reg(Reg.ESI, start_info)
            engine.set_reg(Reg.ESP, stack)
            self._engine = engine
            while self._ending is None:
                self._run_once(engine)
            return self._ending
        except BaseException as exc:  # noqa: BLE001 - reported as an internal failure
            self._ending = GuestEnded("error", INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            return self._ending
        finally:
            self._in_guest = False
            self._gate.release()

    def close(self) -> None:
        self._closed = True
        if self._engine is not None:
            self._engine.close()

    def _run_once(self, engine: Engine) -> None:
        self._kicked.clear()
        if self._end_request is not None:
            self._ending = self._end_request
            return
        self._drain()
        self._maybe_upcall(engine)
        if self._ending is not None:
            return
        self._in_guest = True
        try:
            stop = engine.run(engine.reg(Reg.EIP), count=GUEST_SLICE_INSNS)
        finally:
            self._in_guest = False
        if self._remaps_waiting:
            self._open_gate()
            self._close_gate()
        self._after_run(engine, stop)

    def _after_run(self, engine: Engine, stop: StopInfo) -> None:
        exc = stop.hook_exception
        if exc is not None:
            self.on_hook_exception(exc)
            return
        if self._ending is not None:
            return
        if self._fault is not None:
            self._ending = GuestEnded("fault", CRASHED, f"guest crashed: {self._fault}")
            return
        eip = engine.reg(Reg.EIP)
        if stop.error is not None:
            self._ending = GuestEnded("fault", CRASHED, f"guest crashed: the CPU could not go on "
                                      f"at {eip:#x}: {stop.error}")
            return
        if self._kicked.is_set():
            return  # stopped on purpose: events, an upcall, a remap, an end request
        if self.guest.read(eip - 1, 1) == b"\xf4":
            self._halted(engine)

    def _halted(self, engine: Engine) -> None:
        """HLT: with interrupts disabled the guest has finished (status 0, as for HVM guests);
        with IF=1 it waits for an event, as SCHEDOP_block."""
        if not engine.reg(Reg.EFLAGS) & FLAGS_IF:
            self._ending = GuestEnded("halt", HALTED, "guest halted with interrupts disabled")
            return
        rip = engine.reg(Reg.EIP) - 1
        self._open_gate()
        try:
            self._sleep("hlt", rip, lambda: self.shared.upcall_pending(0), None)
        finally:
            self._close_gate()

    # -- events and upcalls ------------------------------------------------------------------------
    def _drain(self) -> None:
        arrived = self.evtchn.drain()
        if arrived and self.tracer is not None:
            for port in arrived:
                self.tracer.record(EVENT_SEND, domid=self.domid,
                                   extra={"port": port, "direction": "in"})

    def _pending_ports(self) -> list[int]:
        shared = self.shared
        return [p for p in self.evtchn.ports() if shared.is_pending(p) and not shared.is_masked(p)]

    def _maybe_upcall(self, engine: Engine) -> None:
        """create_bounce_frame: with an event callback, upcalls unmasked and an upcall
        pending, enter the callback as a same-privilege interrupt would (push EFLAGS, CS,
        EIP), with evtchn_upcall_mask set; the guest clears it and returns with iret."""
        cb = self.callbacks
        if not cb.event_address or not self.shared.upcall_deliverable(0):
            return
        eip, esp = engine.reg(Reg.EIP), engine.reg(Reg.ESP)
        eflags, cs = engine.reg(Reg.EFLAGS), engine.reg(Reg.CS)
        frame_at = (esp - 12) & 0xFFFF_FFFF
        if not self.guest.write(frame_at, struct.pack("<III", eip, cs, eflags)):
            self._ending = GuestEnded("fault", CRASHED, f"guest crashed: the event upcall's frame "
                                      f"at {frame_at:#x} (ESP {esp:#x}) is outside guest RAM")
            return
        self.shared.set_upcall_mask(0, True)
        self._update_time()
        engine.set_reg(Reg.ESP, frame_at)
        engine.set_reg(Reg.EFLAGS, eflags & ~(FLAGS_TF | FLAGS_NT | FLAGS_RF | FLAGS_VM))
        if cs != cb.event_selector:
            engine.set_segment("cs", cb.event_selector)
        engine.set_reg(Reg.EIP, cb.event_address)
        self.upcalls += 1
        if self.tracer is not None:
            ports = self._pending_ports()
            self.tracer.record(UPCALL, domid=self.domid, rip=eip,
                               extra={"port": ports[0] if ports else None, "ports": ports,
                                      "callback": cb.event_address})

    def _update_time(self) -> None:
        """vcpu_time_info.system_time = ns since the domain started, under the version
        protocol (odd while updating). tsc_to_system_mul stays 0: no TSC extrapolation; the
        value is refreshed at every hypercall and upcall."""
        view = self.shared.view
        version = struct.unpack_from("<I", view, TIME_VERSION)[0]
        struct.pack_into("<I", view, TIME_VERSION, (version + 1) | 1)
        struct.pack_into("<Q", view, TIME_SYSTEM_TIME, self.now_ns())
        struct.pack_into("<I", view, TIME_VERSION, ((version + 1) | 1) + 1)

    # -- the Scheduler that sched_op calls (on this thread, gate open) -------------------------
    def check_upcall(self) -> None:
        if self.callbacks.event_address and self.shared.upcall_deliverable(0):
            # From inside the hypercall hook: the upcall is entered when the hypercall returns
            # (still in the hook, where EIP is exact: see _hypercall).
            self._upcall_in_hook = True

    def yield_(self) -> None:
        self.yields += 1

    def shutdown(self, reason: int) -> None:
        code = self.hc.shutdown_code if self.hc is not None else None
        self._stop_with(shutdown_ending(reason, code))

    def _stop_with(self, ending: GuestEnded) -> None:
        engine = self._engine
        if engine is not None:
            engine.fail(ending)
        else:
            self._ending = ending

    def block(self) -> None:
        """SCHEDOP_block: enable event delivery (clear evtchn_upcall_mask, as Xen does) and
        sleep until an upcall is pending; the upcall itself follows the hypercall."""
        self.shared.set_upcall_mask(0, False)
        self._sleep("SCHEDOP_block", self._hypercall_rip, lambda: self.shared.upcall_pending(0),
                    None)
        self.check_upcall()

    def poll(self, ports: Sequence[int], timeout_ns: int) -> None:
        """SCHEDOP_poll: sleep until one of `ports` is pending (masked or not), an upcall is
        deliverable, or the domain's system time reaches `timeout_ns` (0: no timeout)."""
        shared = self.shared

        def ready() -> bool:
            return any(shared.is_pending(p) for p in ports) or shared.upcall_deliverable(0)
        self._sleep("SCHEDOP_poll", self._hypercall_rip, ready, timeout_ns or None, list(ports))

    def _sleep(self, op: str, rip: int, ready: Callable[[], bool], until_ns: int | None,
               ports: list[int] | None = None) -> None:
        self.blocks += 1
        started = self.now_ns()
        woken_by = "event"
        while True:
            self._wake.clear()
            self._drain()
            if ready():
                break
            if self._end_request is not None:
                woken_by = "end"
                break
            wait_s = BLOCK_WAIT_S
            if until_ns is not None:
                left_ns = until_ns - self.now_ns()
                if left_ns <= 0:
                    woken_by = "timeout"
                    break
                wait_s = min(wait_s, left_ns / 1e9)
            self._wake.wait(wait_s)
        self._update_time()
        if self.tracer is not None:
            extra: dict[str, object] = {"op": op, "woken_by": woken_by,
                                        "port": next((p for p in (ports or self._pending_ports())
                                                      if self.shared.is_pending(p)), None)}
            if ports is not None:
                extra["ports"] = ports
            self.tracer.record(BLOCK, domid=self.domid, rip=rip, t_ns=started,
                               latency_ns=self.now_ns() - started, extra=extra)

    # -- HookSink ----------------------------------------------------------------------------------
    def on_interrupt(self, vector: int) -> None:
        """`int 0x82` is a hypercall (EIP is past it); any other vector is an exception or
        INT n the guest has no trap table for: Xen crashes such a domain."""
        if self._ending is not None:
            return
        engine = self._engine
        assert engine is not None
        eip = engine.reg(Reg.EIP)
        if vector == HYPERCALL_VECTOR and self.guest.read(eip - 2, 2) == INT_0X82:
            self._hypercall(engine, eip - 2)
            return
        if vector < 32:
            what = EXCEPTION_NAMES.get(vector, f"exception {vector}")
            cr2 = f" (CR2 {engine.reg(Reg.CR2):#x})" if vector == 14 else ""
            self._fault = f"{what} at {eip:#x}{cr2}, and a PV guest here has no trap table"
        else:
            self._fault = f"int {vector:#x} at {eip - 2:#x}: no trap table for it"
        engine.stop()

    def _hypercall(self, engine: Engine, rip: int) -> None:
        assert self.hc is not None
        t_ns = self.now_ns()
        number = engine.reg(Reg.EAX)
        args = tuple(engine.reg(reg) for reg in ARG_REGS)
        self.hypercalls_total += 1
        self._hypercall_rip = rip
        self._update_time()
        self._open_gate()
        try:
            result = self.hc.dispatch(number, args)
        finally:
            self._close_gate()
        rest = self.hc.continuation
        if rest is None:
            engine.set_reg(Reg.EAX, result & 0xFFFF_FFFF)
        else:
            # Preempted: the rest of the work is a new call of the same hypercall. EAX keeps
            # the number; the arguments say what is left; the guest re-executes int 0x82 once
            # the vCPU has stopped (events and upcalls may come first, as on Xen).
            for reg, value in zip(ARG_REGS, rest, strict=False):
                engine.set_reg(reg, value)
            # Back onto the int 0x82: inside the interrupt hook EIP is exact, and the CPU goes
            # on from it, so the guest issues the continuation itself (a stop from here would
            # not be honoured while the vCPU runs in counted slices).
            engine.set_reg(Reg.EIP, rip)
        if self.tracer is not None:
            self.tracer.hypercall(domid=self.domid, rip=rip, number=number,
                                  name=hypercall_name(number), op=self.hc.op, args=args,
                                  result=result, t_ns=t_ns, latency_ns=self.now_ns() - t_ns,
                                  preempted=rest is not None)
        if self._upcall_in_hook and rest is None:
            self._upcall_in_hook = False
            self._maybe_upcall(engine)
        if self.max_hypercalls is not None and self.hypercalls_total >= self.max_hypercalls \
                and self._ending is None:
            self._stop_with(GuestEnded("max_hypercalls", LIMIT,
                                       f"stopped after {self.hypercalls_total} hypercalls "
                                       "(max hypercalls)"))

    def traced_send(self, port: int, status: PortStatus) -> None:
        """Hypercalls.on_event_send: the guest's EVTCHNOP_send reached a bound port."""
        if self.tracer is not None:
            self.tracer.record(EVENT_SEND, domid=self.domid,
                               extra={"port": port, "direction": "out",
                                      "remote_dom": status.remote_dom,
                                      "remote_port": status.remote_port})

    def on_in(self, port: int, size: int) -> int:
        self.port_accesses += 1
        return (1 << (8 * size)) - 1  # no I/O privilege: Xen's emulation reads all-ones

    def on_out(self, port: int, size: int, value: int) -> None:
        self.port_accesses += 1  # dropped

    def on_cpuid(self) -> None:
        engine = self._engine
        assert engine is not None
        values = self.cpu.query(engine.reg(Reg.EAX), engine.reg(Reg.ECX))
        for reg, value in zip((Reg.EAX, Reg.EBX, Reg.ECX, Reg.EDX), values, strict=True):
            engine.set_reg(reg, value)

    def on_rdtsc(self) -> None:  # pragma: no cover - RDTSC is not hooked for PV guests
        return None

    def on_invalid_insn(self) -> bool:
        if self._ending is None and self._engine is not None:
            self._fault = f"#UD invalid opcode at {self._engine.reg(Reg.EIP):#x}"
        return False

    def on_unmapped(self, write: bool, fetch: bool, address: int, size: int, value: int) -> bool:
        if self._ending is None:
            kind = "instruction fetch" if fetch else "write" if write else "read"
            self._fault = (f"page fault: {kind} at {address:#x}, outside the domain's "
                           f"{self.memory.size >> 20} MiB")
        return False

    def on_hook_exception(self, exc: BaseException) -> None:
        if isinstance(exc, GuestEnded):
            self._ending = exc
        else:
            self._ending = GuestEnded("error", INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
