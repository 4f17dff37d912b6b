"""A machine: one HVM domain wired from its parts (vCPU, hypervisor, PC devices, device-model thread), run to its end, with a result."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devicemodel.clock import MonotonicClock
from devicemodel.server import IoreqServer

from . import exit_reasons as R
from .affinity import pair_cpu, pin_current_thread
from .boot import boot
from .bufioreq import BufferedIoPage
from .console import ConsoleSink
from .controls import ExecutionControls
from .cpuid import hvmlab_cpu
from .engine import Engine
from .evtchn import make_interdomain_pair
from .host_timer import HostTimer
from .hypervisor import Hypervisor
from .ioreq import SharedIoPage
from .ioreq_client import IoreqClient
from .loader import GuestImage, LoadError, place
from .memory import GuestMemory
from .pc import NE2000_MAC, VGA_HOLE, Platform, PlatformError, PlatformOptions, build
from .status import INTERNAL, GuestEnded, debug_exit
from .trace import TraceWriteError, TraceWriter
from .vcpu import Vcpu

KICK_RETRY_S = 0.05


@dataclass
class RunOptions:
    mem: int = 16 << 20
    timeout_s: float | None = 10.0
    max_exits: int | None = None
    pass_through: list[int] = field(default_factory=list)
    use_io_bitmaps: bool = True
    unconditional_io_exiting: bool = False
    rdtsc_exiting: bool = False
    trace: Path | None = None
    dump_vmcs: int | None = None
    stream_console: bool = True
    placement: str = "xen"
    disk: Path | None = None
    pcap: Path | None = None
    serial_in: bytes | None = None
    buffered_ports: list[int] = field(default_factory=list)
    dm_timeout_s: float = 5.0
    keep_ioreqs: bool = False
    dm_affinity: str = "vcpu"  # see hvm.affinity.DM_AFFINITIES
    pair_index: int = 0  # which vCPU/device-model pair of this process (picks the host CPU)


@dataclass
class RunResult:
    guest: str
    mode: str
    ended_by: str
    exit_status: int
    message: str
    console: str
    exits: dict[str, int]
    exits_total: int
    ioreqs: int
    buffered_ioreqs: int
    interrupts_injected: int
    direct_port_accesses: int
    unassigned_port_reads: int
    unassigned_port_writes: int
    wall_s: float
    hypercalls: dict[str, int]
    serial: str = ""
    placement: str = "xen"
    ioreqs_by_type: dict[str, int] = field(default_factory=dict)
    device_accesses: dict[str, int] = field(default_factory=dict)
    frames_sent: int = 0
    screen: str = ""
    vmcs_dump: dict | None = None
    ioreq_records: list = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("vmcs_dump", "ioreq_records")}
        if self.vmcs_dump is not None:
            out["vmcs_dump"] = {"exit": self.vmcs_dump["exit"], "reason": self.vmcs_dump["reason"],
                                "vmcs": {f.name: f.value for f in self.vmcs_dump["vmcs"]}}
        return out


class HvmDomain:
    """One HVM domain: its memory, vCPU thread, hypervisor, PC devices and device-model thread.
    `start()` then `wait()`; `run()` below does both. Several domains can run side by side
    (`hvmlab up`), each with its own threads."""

    def __init__(self, image: GuestImage, options: RunOptions, console: ConsoleSink | None = None,
                 serial: ConsoleSink | None = None,
                 nic_tx: Callable[[bytes], None] | None = None, nic_mac: bytes | None = None) -> None:
        self.image = image
        self.options = options
        self.console = console = console or ConsoleSink()
        self.serial = serial = serial or ConsoleSink()
        self.memory = memory = GuestMemory(options.mem)
        place(image, memory)
        self.clock = clock = MonotonicClock()
        try:
            self.platform = platform = build(
                PlatformOptions(placement=options.placement, mem=options.mem, disk=options.disk,
                                pcap=options.pcap, serial_in=options.serial_in,
                                buffered_ports=options.buffered_ports, nic_tx=nic_tx,
                                nic_mac=nic_mac if nic_mac is not None else NE2000_MAC),
                clock, console, serial, debug_exit)
        except PlatformError as exc:
            raise LoadError(str(exc)) from None
        self.controls = controls = ExecutionControls(
            use_io_bitmaps=options.use_io_bitmaps, unconditional_io_exiting=options.unconditional_io_exiting,
            rdtsc_exiting=options.rdtsc_exiting)
        assert controls.io_bitmaps is not None
        for port in options.pass_through:
            controls.io_bitmaps.set_exit(port, False)
        # The shared I/O page, the buffered page, and the event channels between this vCPU and
        # the device model (Xen: one interdomain channel per vCPU, one for buffered ioreqs).
        page, bufpage = SharedIoPage(), BufferedIoPage()
        hv_end, dm_end = make_interdomain_pair(name="ioreq-vcpu0")
        buf_hv, buf_dm = make_interdomain_pair(name="bufioreq")
        # One host CPU for this vCPU and its device model (hvm.affinity), unless told otherwise.
        self.cpu = pair_cpu(options.pair_index) if options.dm_affinity == "vcpu" else None
        self.server = IoreqServer(page, [dm_end], platform.dm, memory, bufpage, buf_dm, clock=clock,
                                  cpu=self.cpu)
        self.ioreq = IoreqClient(0, page, hv_end, clock.now_ns, options.dm_timeout_s, bufpage, buf_hv,
                                 self.server)
        self.ioreq.keep_records = options.keep_ioreqs or options.trace is not None
        self.server.record_steps = self.ioreq.keep_records
        self.hv = Hypervisor(memory, console, hvmlab_cpu(), platform=platform, ioreq=self.ioreq, clock=clock)
        self.hv.timeout_s = options.timeout_s
        self.tracer: TraceWriter | None = None
        if options.trace is not None:
            self.tracer = TraceWriter(options.trace, {"guest": image.name, "mode": image.mode,
                                                      "placement": options.placement})
        self.holder: dict[str, Any] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._vcpu_thread, name=f"vcpu0-{image.name}", daemon=True)
        self._start = 0.0

    def _vcpu_thread(self) -> None:
        holder, options, memory, platform = self.holder, self.options, self.memory, self.platform
        pin_current_thread(self.cpu)
        try:
            engine = Engine(self.image.bits, memory, holes=(VGA_HOLE,))
            vcpu = Vcpu(0, engine, memory, self.controls, self.hv, self.tracer, options.max_exits,
                        options.dump_vmcs, t0_ns=self.clock.origin_ns)
            engine.install(vcpu, options.rdtsc_exiting)
            _map_mmio(engine, vcpu, platform)
            boot(engine, memory, self.image.bits, self.image.entry)
            platform.router.on_intr = vcpu.request_interrupt_check
            vcpu.host_timer = holder["host_timer"] = HostTimer(self.clock, vcpu.timer_fired)
            holder["vcpu"] = vcpu
            self._ready.set()
            holder["ending"] = vcpu.run(self.hv.wait_for_interrupt)
        except BaseException as exc:  # noqa: BLE001 - reported as an internal failure, one line
            holder["ending"] = GuestEnded("error", INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            holder["exception"] = exc
        finally:
            self._ready.set()

    def start(self) -> None:
        self._start = time.monotonic()
        self.hv.deadline = self._start + self.options.timeout_s if self.options.timeout_s else None
        self.server.start()
        self._thread.start()
        self._ready.wait()

    def deliver_frame(self, frame: bytes) -> bool:
        """A frame from the bridge for this domain's NE2000 (False: the card dropped it)."""
        return self.platform.receive_frame(frame)

    def stop(self) -> None:
        """Ask the guest to stop as a user's Ctrl-C would (ends by `interrupted`)."""
        self.hv.user_interrupt.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self) -> RunResult:
        try:
            _supervise(self._thread, self.holder, self.hv)
        finally:
            wall = time.monotonic() - self._start
            if "host_timer" in self.holder:
                self.holder["host_timer"].stop()
            self.server.stop()
            # Buffered writes the device model had not yet taken when the guest ended are
            # still in the page: apply them now, in order (what a guest wrote is never lost).
            self.server.drain_buffered()
            self.platform.close()
        return _result(self.image, self.options, self.holder, self.hv, self.platform, self.ioreq,
                       self.console, self.serial, self.tracer, wall)


def run(image: GuestImage, options: RunOptions, console: ConsoleSink | None = None,
        serial: ConsoleSink | None = None) -> RunResult:
    """Load `image`, run it to its end on a vCPU thread, and say how it went."""
    domain = HvmDomain(image, options, console, serial)
    domain.start()
    return domain.wait()


def _map_mmio(engine: Engine, vcpu: Vcpu, platform: Platform) -> None:
    """Pages where the device model emulates a device are left out of EPT: each access is an
    EPT violation the hypervisor sends on as a COPY ioreq."""
    for base, length, _name in platform.mmio_ranges:
        def read(offset: int, size: int, base: int = base) -> int:
            return vcpu.mmio_access(base + offset, size, False, 0)

        def write(offset: int, size: int, value: int, base: int = base) -> None:
            vcpu.mmio_access(base + offset, size, True, value)

        engine.map_mmio(base, length, read, write)


def _result(image: GuestImage, options: RunOptions, holder: dict[str, Any], hv: Hypervisor,
            platform: Platform, ioreq: IoreqClient, console: ConsoleSink, serial: ConsoleSink,
            tracer: TraceWriter | None, wall: float) -> RunResult:
    ending: GuestEnded = holder["ending"]
    vcpu: Vcpu | None = holder.get("vcpu")
    console.flush()
    serial.flush()
    exits = {R.name(code): n for code, n in sorted(vcpu.exits_by_reason.items())} if vcpu else {}
    if tracer is not None:
        try:
            tracer.close({"ended_by": ending.ended_by, "exit_status": ending.status, "exits": exits})
        except TraceWriteError as exc:  # the guest's run is still reported; the trace is not whole
            ending = GuestEnded("error", INTERNAL, f"the trace could not be written: {exc}")
    return RunResult(
        guest=image.name, mode=image.mode, ended_by=ending.ended_by, exit_status=ending.status,
        message=ending.message, console=console.text(), exits=exits,
        exits_total=vcpu.exits if vcpu else 0, ioreqs=hv.ioreqs, buffered_ioreqs=hv.buffered_ioreqs,
        interrupts_injected=hv.interrupts_injected,
        direct_port_accesses=vcpu.direct_port_accesses if vcpu else 0,
        unassigned_port_reads=hv.unassigned_port_reads, unassigned_port_writes=hv.unassigned_port_writes,
        wall_s=round(wall, 6), hypercalls={str(n): c for n, c in hv.hypercalls.calls.items()},
        serial=serial.text(), placement=options.placement, ioreqs_by_type=dict(ioreq.by_type),
        device_accesses=_device_accesses(platform), frames_sent=len(platform.frames_sent),
        screen=platform.vga.screen(), vmcs_dump=vcpu.dump if vcpu else None,
        ioreq_records=list(ioreq.records) if options.keep_ioreqs else [],
    )


def _device_accesses(platform: Platform) -> dict[str, int]:
    counts = dict(platform.hv_pio.accesses)
    for name, n in platform.dm.accesses().items():
        counts[name] = counts.get(name, 0) + n
    return counts


def _supervise(thread: threading.Thread, holder: dict[str, Any], hv: Hypervisor) -> None:
    """Wait for the vCPU thread; at the deadline (or Ctrl-C) kick it out of the guest until it
    notices: a kick that lands between two runs of the CPU would otherwise be lost."""
    vcpu: Vcpu | None = holder.get("vcpu")
    while thread.is_alive():
        now = time.monotonic()
        wait = KICK_RETRY_S
        if hv.deadline is not None and now < hv.deadline:
            wait = min(hv.deadline - now, 0.25)
        try:
            thread.join(wait)
        except KeyboardInterrupt:
            hv.user_interrupt.set()
        if not thread.is_alive() or vcpu is None:
            continue
        if hv.user_interrupt.is_set() or (hv.deadline is not None and time.monotonic() >= hv.deadline):
            vcpu.kick()
