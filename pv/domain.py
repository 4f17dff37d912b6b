"""A PV domain: the domain builder (memory layout, start_info, shared_info, hypercall page, grant table, xenstore and console channels), its vCPU thread, and run_pv() (Xen tools/libs/guest xc_dom_*, public/xen.h start_info).

Decisions the PV helpers build on (also in the P1 report):

Memory (x86_32, paging off: guest virtual == pseudo-physical == machine frame of this
domain, except where a page flip or a grant mapping re-backed a frame). Real x86_32 PV
kernels run paged in ring 1; running flat in ring 0 is this model's one big simplification.
    pfn 0x0      the flat GDT hvm.boot builds at 0x800 (CS 0x08, data 0x10)
    pfn 0x1      start_info (x86_32, "xen-3.0-x86_32p"); ESI points here at entry
    pfn 0x2      shared_info: vcpu_info[0] at 0, evtchn_pending at 2048, evtchn_mask at 2176
    pfn 0x3      hypercall page: stub N at 0x3000 + 32*N = B8 N 00 00 00 CD 82 C3, then 0xCC
    pfn 0x4      xenstore ring (start_info.store_mfn = 4, store_evtchn = port 1)
    pfn 0x5      console ring (start_info.console.domU.mfn = 5, evtchn = port 2)
    pfn 0x8-0xB  grant table, 4 frames = 2048 grant_entry_v1, entries written at 0x8000
    pfn 0x10-0x7F the guest's own (rings, buffers); the stack starts at ESP = 0x80000
    0x100000     the image (`bits 32`, `org 0x100000`); below 0x10000 it is refused
Entry: EIP = image entry, ESI = 0x1000, ESP = 0x80000, EFLAGS = 0x2 (IF = 0), CS = 0x08,
evtchn_upcall_mask = 1 (upcalls masked, as IF = 0 says), every port unmasked.

Event channels. Port 1 (store) is bound to xenstored by the builder. Port 2 (console) is
allocated unbound for Dom0 and stays so until a console backend binds it, as xenconsoled
does: `ConsoleBackend.attach(domain, domain.console_gfn, domain.console_port, domain.console)`.
A guest send on a port nobody bound yet is dropped (Xen's rule); ring bytes wait.
`domain.bind_evtchn(port)` (= domain.evtchn.bind_dom0) binds a port the guest allocated
unbound for domain 0 and returns Dom0's end; it raises hvm.evtchn.EventChannelError if the
port is not unbound for Dom0. As Xen's bind_interdomain does for the binder, Dom0's end
starts notified. The backend owns that end; closing it returns the guest's port to unbound.
EVTCHNOP_bind_interdomain binds to another domU (or loopback), not to Dom0 (-EINVAL).

Upcalls. set_callbacks(event_selector, event_address, failsafe_selector, failsafe_address):
a selector must be 0x08 (the flat code segment) or Xen's FLAT_KERNEL_CS 0xE019 (taken as
the same), else -EINVAL; event_address 0 means no upcalls. With a callback, upcalls
unmasked and evtchn_upcall_pending set, the vCPU pushes EFLAGS, CS, EIP (a same-privilege
interrupt frame, no error code), sets evtchn_upcall_mask = 1 and jumps to the callback; the
guest clears the mask when it likes and returns with iret. Delivery happens between runs of
the CPU: right after the hypercall that made it possible (SCHEDOP_block, EVTCHNOP_unmask,
set_callbacks), or as soon as the vCPU is kicked for an event from Dom0 or another domain.
SCHEDOP_block clears evtchn_upcall_mask (as Xen does) and returns once evtchn_upcall_pending
is set. SCHEDOP_poll returns once a polled port is pending (masked or not), an upcall is
deliverable, or `timeout` (absolute, in the domain's system time: ns since it was built, in
vcpu_info[0].time.system_time, refreshed at each hypercall and upcall; 0 = none) passes.
HLT with IF = 0 ends the run ("halt", status 0); with IF = 1 it waits for an upcall pending.

Endings (ended_by, status): shutdown_poweroff/reboot/suspend/soft_reset 0,
shutdown_crash/watchdog 4, shutdown_unknown 4, halt 0, fault 4 (any exception or INT n but
int 0x82: a PV guest here has no trap table, so Xen would crash it), timeout 6,
max_hypercalls 6, interrupted 6, error 8 (internal). IN/OUT read all-ones and drop writes.

Grants. GNTTABOP_setup_table(DOMID_SELF, nr_frames <= 4) returns frames 8..; query_size
says 4 of 4. map_grant_ref with GNTMAP_host_map takes host_addr = a page-aligned guest
address whose frame is re-backed by the granted page until unmap (readonly mappings are not
write-protected in Unicorn: a limitation). The fixed pages above can neither be mapped over
nor transferred (GNTST_general_error / GNTST_bad_page). XENMEM_decrease_reservation returns
the count done but only accounts the frames as released (they stay backed). A grant op over
more than 256 uops (or a decrease over more than 256 extents) is preempted as Xen does: the
guest's registers are set to the rest and its `int 0x82` runs again (upcalls may come first).

Page flips. GrantOps.transfer re-backs a frame of this domain from a Dom0 thread while the
guest may run; the vCPU applies such remaps to Unicorn only while it is stopped (see
pv.vcpu_pv.PvVcpu and hvm.engine.Engine.take_remap_listener): remap() returns once done.

Trace (hvm/trace.py lines, extra fields "domid" and below): HYPERCALL 256 + number
("hypercall", "op", "args", "result"; "preempted" and result null when continued),
EVENT_SEND 512 ("port", "direction" out|in, and for out "remote_dom", "remote_port"),
UPCALL 513 ("port", "ports", "callback"), BLOCK 514 ("op", "woken_by", "port", "ports";
latency_ns = time asleep), RING_PUSH 515 (from backends through
domain.on_ring_push(ring, prod, event, notify)), GRANT_OP 517 for the guest's own
map/unmap/copy/transfer ("by": "guest", "op", "status", "entry_before", "entry_after"). The
backends' steps (RING_TAKE 516 ... RING_RESPONSE 520) come through their on_step hook (see
pv.trace_pv). Names: pv.trace_pv.reason_name and hvm.exit_reasons.PV_RECORD_NAMES.

XenStore. /local/domain/<id> is made as the toolstack does (pv.xenbus.make_domain_home),
with store/port, store/ring-ref, console/port, console/ring-ref, console/type; the ring page
and port 1 are introduced to xenstored before the guest starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from hvm.affinity import pair_cpu, pin_threads
from hvm.boot import PROTECTED_STACK
from hvm.console import ConsoleSink
from hvm.evtchn import EventChannel
from hvm.loader import GuestImage, LoadError, place
from hvm.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from hvm.status import INTERNAL, LIMIT, GuestEnded
from hvm.trace import TraceWriter
from pv.evtchn_pv import DOM0, PvEventChannels
from pv.gnttab_pv import GuestGrantTable
from pv.grant_table import Domain, GrantOps
from pv.hypercalls import Callbacks, Hypercalls
from pv.shared_info import SharedInfo, StartInfo
from pv.trace_pv import PvTracer, TracedGrantOps
from pv.vcpu_pv import PvVcpu
from pv.xenbus import XsClient, make_domain_home
from pv.xenstored import Xenstored

if TYPE_CHECKING:
    from pv.dom0 import Dom0

START_INFO_PFN, SHARED_INFO_PFN, HYPERCALL_PAGE_PFN = 0x1, 0x2, 0x3
STORE_PFN, CONSOLE_PFN = 0x4, 0x5
GRANT_FRAMES = (0x8, 0x9, 0xA, 0xB)
GUEST_FREE_PFNS = range(0x10, 0x80)
FIXED_PFNS = frozenset({START_INFO_PFN, SHARED_INFO_PFN, HYPERCALL_PAGE_PFN, STORE_PFN,
                        CONSOLE_PFN, *GRANT_FRAMES})
START_INFO = START_INFO_PFN << PAGE_SHIFT
SHARED_INFO = SHARED_INFO_PFN << PAGE_SHIFT
HYPERCALL_PAGE = HYPERCALL_PAGE_PFN << PAGE_SHIFT
LOW_LIMIT = 0x10000  # an image may not reach below: the GDT and the fixed pages
STACK = PROTECTED_STACK  # 0x80000
HYPERCALL_STUBS, HYPERCALL_STUB_SIZE = 128, 32
DEFAULT_MEM = 16 << 20
END_GRACE_S = 5.0  # after asking a vCPU to end, how long before the run is called stuck
WATCHDOG_S = 0.02


def hypercall_page() -> bytes:
    """128 stubs of 32 bytes: `mov eax, N` ; `int 0x82` ; `ret`, the rest int3 (0xCC)."""
    page = bytearray()
    for n in range(HYPERCALL_STUBS):
        stub = b"\xb8" + n.to_bytes(4, "little") + b"\xcd\x82\xc3"
        page += stub.ljust(HYPERCALL_STUB_SIZE, b"\xcc")
    return bytes(page)


class Dom0Services(Protocol):
    """What the domain builder needs of Domain 0 (pv.dom0.Dom0 provides it)."""

    grant_ops: GrantOps
    xenstored: Xenstored
    xs: XsClient

    def evtchn_of(self, domid: int) -> PvEventChannels | None: ...
    def exists(self, domid: int) -> bool: ...
    def next_dom0_port(self) -> int: ...


class PvDomain:
    """One built PV domain: its memory and fixed pages, ports, grant table, hypercalls and
    vCPU. It satisfies pv.backends.FrontendLink (domid, memory, grant_ops, bind_evtchn)."""

    def __init__(self, dom0: Dom0Services, image: GuestImage, domid: int, *, name: str = "",
                 mem: int = DEFAULT_MEM, console: ConsoleSink | None = None,
                 tracer: PvTracer | None = None, max_hypercalls: int | None = None) -> None:
        if image.bits != 32:
            raise LoadError(f"{image.name}: a PV guest is 32-bit (`bits 32`), not {image.bits}-bit")
        if mem < 2 << 20 or mem % PAGE_SIZE:
            raise LoadError(f"PV domain memory must be at least 2 MiB in whole pages, not {mem}")
        for seg in image.segments:
            if seg.gpa < LOW_LIMIT:
                raise LoadError(f"{image.name}: segment at {seg.gpa:#x} overlaps the PV fixed "
                                f"pages below {LOW_LIMIT:#x} (use org 0x100000)")
        self.domid = domid
        self.name = name or image.name
        self.image = image
        self.mem = mem
        self.grant_ops = dom0.grant_ops
        self.console = console if console is not None else ConsoleSink()
        self.tracer = tracer
        self.store_gfn, self.console_gfn = STORE_PFN, CONSOLE_PFN
        self.memory = GuestMemory(mem)
        place(image, self.memory)
        self.memory.write(HYPERCALL_PAGE, hypercall_page())

        self.shared = SharedInfo(self.memory.p2m(SHARED_INFO_PFN).view())
        self.shared.set_upcall_mask(0, True)
        self.evtchn = PvEventChannels(domid, self.shared, peers=dom0.evtchn_of,
                                      dom0_port=dom0.next_dom0_port)
        self.grant_ops.add_domain(Domain(domid, self.memory))
        status = self.grant_ops.setup_table(domid, list(GRANT_FRAMES))
        if status != 0:  # pragma: no cover - the frames are RAM by construction
            raise LoadError(f"cannot set up the grant table of domain {domid}: status {status}")
        # Traced, the guest's own map/unmap/copy/transfer become GRANT_OP records of this domain.
        guest_ops = self.grant_ops if tracer is None else \
            cast(GrantOps, TracedGrantOps(self.grant_ops, tracer, domid))
        self.gnttab = GuestGrantTable(domid, self.memory, guest_ops, GRANT_FRAMES,
                                      FIXED_PFNS, dom0.exists)
        self.callbacks = Callbacks()
        t0 = tracer.t0_ns if tracer is not None else None
        self.vcpu = PvVcpu(domid, self.memory, self.shared, self.evtchn, self.callbacks,
                           tracer=tracer, max_hypercalls=max_hypercalls, t0_ns=t0)
        self.hypercalls = Hypercalls(domid=domid, memory=self.memory, evtchn=self.evtchn,
                                     gnttab=self.gnttab, console=self.console, sched=self.vcpu,
                                     exists=dom0.exists, protected=FIXED_PFNS,
                                     callbacks=self.callbacks)
        self.hypercalls.on_event_send = self.vcpu.traced_send
        self.vcpu.hc = self.hypercalls

        # Xen's own channels: xenstore (bound to xenstored now) and the console (unbound
        # for Dom0 until a console backend binds it).
        self.store_port = self.evtchn.alloc_unbound(DOM0)
        self.console_port = self.evtchn.alloc_unbound(DOM0)
        start_info = StartInfo(nr_pages=self.memory.nr_pages, shared_info=SHARED_INFO,
                               store_mfn=STORE_PFN, store_evtchn=self.store_port,
                               console_mfn=CONSOLE_PFN, console_evtchn=self.console_port)
        self.memory.write(START_INFO, start_info.pack("x86_32"))
        self._xenstored = dom0.xenstored
        self._xs = dom0.xs
        self._introduce(dom0)

        self.ring_pushes = 0
        self.ring_notifies = 0
        self._thread: threading.Thread | None = None
        self.ending: GuestEnded | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None

    # -- XenStore ---------------------------------------------------------------------------------
    def _introduce(self, dom0: Dom0Services) -> None:
        home = make_domain_home(self._xs, self.domid, self.name)
        entries = {"store/port": self.store_port, "store/ring-ref": STORE_PFN,
                   "console/port": self.console_port, "console/ring-ref": CONSOLE_PFN,
                   "console/type": "xenconsoled"}

        def body(tx: int) -> None:
            for key, value in entries.items():
                self._xs.write(f"{home}/{key}", str(value), tx)
        self._xs.transact(body)
        store_end = self.evtchn.bind_dom0(self.store_port)
        self._store_end = store_end
        self._xenstored.add_domain(self.domid, self.memory.p2m(STORE_PFN).view(), store_end)

    # -- FrontendLink and backend hooks ----------------------------------------------------------
    def bind_evtchn(self, port: int) -> EventChannel:
        """Bind the guest's port `port` (unbound for Dom0) and return Dom0's end."""
        return self.evtchn.bind_dom0(port)

    def on_ring_push(self, ring: str, prod: int, event: int, notify: bool) -> None:
        """pv.backends.RingPushHook for this domain's devices: counted and traced."""
        self.ring_pushes += 1
        self.ring_notifies += bool(notify)
        if self.tracer is not None:
            self.tracer.ring_push(domid=self.domid, ring=ring, prod=prod, event=event,
                                  notify=notify)

    # -- running ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the event delivery thread and the vCPU thread."""
        if self._thread is not None:
            raise RuntimeError(f"domain {self.domid} is already running")
        self.evtchn.start()
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._vcpu_thread, name=f"d{self.domid}v0",
                                        daemon=True)
        self._thread.start()

    def _vcpu_thread(self) -> None:
        try:
            self.ending = self.vcpu.run(self.image.entry, START_INFO, STACK)
        finally:
            self.ended_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request_end(self, ending: GuestEnded) -> None:
        self.vcpu.request_end(ending)

    def join(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the vCPU thread; True once it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def watchdog(self) -> None:
        self.vcpu.watchdog()

    def destroy(self) -> None:
        """Tear down what Dom0 holds for this domain (its vCPU must have ended)."""
        self._xenstored.remove_domain(self.domid)  # first: it would log the port closing
        self.evtchn.close_all()
        try:
            self._xs.rm(f"/local/domain/{self.domid}")
        except Exception:  # noqa: BLE001 - best effort: the store may already be gone
            pass
        self.gnttab.unmap_all()
        if not self.running:  # a vCPU that never stopped keeps its engine (hooks still live)
            self.vcpu.close()

    # -- the result -------------------------------------------------------------------------------
    def result(self, wall_s: float, trace: Path | None = None) -> PvRunResult:
        ending = self.ending or GuestEnded("error", INTERNAL, "the vCPU never ended")
        self.console.flush()
        hc = self.hypercalls
        return PvRunResult(
            guest=self.image.name, mode="pv", domid=self.domid, ended_by=ending.ended_by,
            exit_status=ending.status, message=ending.message, console=self.console.text(),
            hypercalls=dict(sorted(hc.calls.items())), hypercalls_total=self.vcpu.hypercalls_total,
            events_sent=self.evtchn.sent, events_received=self.evtchn.received,
            events_dropped=self.evtchn.dropped, upcalls=self.vcpu.upcalls,
            blocks=self.vcpu.blocks, grant_ops=dict(sorted(self.gnttab.counts.items())),
            ring_pushes=self.ring_pushes, ring_notifies=self.ring_notifies,
            port_accesses=self.vcpu.port_accesses, wall_s=round(wall_s, 6),
            trace=str(trace) if trace is not None else None)


@dataclass
class PvRunResult:
    """How a PV run went; the fields HVM's RunResult has where they apply."""

    guest: str
    mode: str
    domid: int
    ended_by: str
    exit_status: int
    message: str
    console: str
    hypercalls: dict[str, int]
    hypercalls_total: int
    events_sent: int
    events_received: int
    events_dropped: int
    upcalls: int
    blocks: int
    grant_ops: dict[str, int]
    ring_pushes: int
    ring_notifies: int
    port_accesses: int
    wall_s: float
    trace: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Stoppable(Protocol):
    def stop(self) -> None: ...


# A Dom0 service for one domain: called once the domain is built, before it starts; it
# starts what it needs (threads) and returns something run_pv stops at the end.
BackendFactory = Callable[["Dom0", PvDomain], Stoppable]


def default_backends() -> list[BackendFactory]:
    from pv.evtchn_echo import EvtchnEcho
    return [EvtchnEcho.attach]


@dataclass
class PvOptions:
    mem: int = DEFAULT_MEM
    timeout_s: float | None = 10.0
    max_hypercalls: int | None = None
    trace: Path | None = None
    dom0_mem: int = 4 << 20
    backends: Sequence[BackendFactory] = field(default_factory=default_backends)
    # "vcpu": the vCPU and every Dom0 thread this run starts (xenstored, the backends, event
    # delivery) on one host CPU, as an HVM vCPU shares one with its device model (hvm.affinity);
    # "any": the host scheduler places them.
    affinity: str = "vcpu"


def supervise(domains: Sequence[PvDomain], timeout_s: float | None) -> None:
    """Wait for every domain's vCPU to end; at the deadline (or Ctrl-C) ask them to end.
    Meanwhile re-kick vCPUs whose stop request Unicorn lost (see PvVcpu.watchdog)."""
    start = time.monotonic()
    deadline = start + timeout_s if timeout_s else None
    asked_at: float | None = None
    while any(d.running for d in domains):
        try:
            for d in domains:
                if d.running:
                    d.join(WATCHDOG_S / max(1, len(domains)))
                    d.watchdog()
        except KeyboardInterrupt:
            asked_at = asked_at or time.monotonic()
            for d in domains:
                d.request_end(GuestEnded("interrupted", LIMIT, "stopped by the user (Ctrl-C)"))
        now = time.monotonic()
        if deadline is not None and now >= deadline and asked_at is None:
            asked_at = now
            for d in domains:
                d.request_end(GuestEnded("timeout", LIMIT,
                                         f"guest still running after {timeout_s:g} s (--timeout)"))
        if asked_at is not None and now - asked_at > END_GRACE_S:
            for d in domains:
                if d.running and d.ending is None:
                    d.ending = GuestEnded("error", INTERNAL, "the vCPU did not stop when asked")
            return


def run_pv(image: GuestImage, options: PvOptions | None = None,
           console: ConsoleSink | None = None) -> PvRunResult:
    """Run one PV domain with Dom0's services (xenstored and options.backends) to its end."""
    from pv.dom0 import Dom0

    options = options or PvOptions()
    tracer = None
    if options.trace is not None:
        tracer = PvTracer(TraceWriter(options.trace, {"guest": image.name, "mode": "pv"}))
    dom0 = Dom0(pool_bytes=options.dom0_mem)
    services: list[Stoppable] = []
    summary: dict[str, Any] | None = None
    start = time.monotonic()
    threads_before = set(threading.enumerate())
    try:
        dom0.start()
        domain = dom0.create_pv_domain(image, mem=options.mem, console=console, tracer=tracer,
                                       max_hypercalls=options.max_hypercalls)
        for attach in options.backends:
            services.append(attach(dom0, domain))
        start = time.monotonic()
        domain.start()
        if options.affinity == "vcpu":
            pin_threads((t for t in threading.enumerate() if t not in threads_before), pair_cpu(0))
        supervise([domain], options.timeout_s)
        wall = time.monotonic() - start
        for service in services:
            service.stop()
        services.clear()
        result = domain.result(wall, options.trace)
        summary = {"ended_by": result.ended_by, "exit_status": result.exit_status,
                   "hypercalls": result.hypercalls}
    finally:
        for service in services:
            service.stop()
        dom0.stop()
        if tracer is not None:
            tracer.close(summary)
    return result
