"""A machine: one HVM domain wired from its parts, run on its own vCPU thread, with a result (the run's public face)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import exit_reasons as R
from .boot import boot
from .console import ConsoleSink
from .controls import ExecutionControls
from .cpuid import hvmlab_cpu
from .engine import Engine
from .hypervisor import Hypervisor
from .loader import GuestImage, place
from .memory import GuestMemory
from .status import INTERNAL, GuestEnded
from .trace import TraceWriter
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
    vmcs_dump: dict | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "vmcs_dump"}
        if self.vmcs_dump is not None:
            out["vmcs_dump"] = {"exit": self.vmcs_dump["exit"], "reason": self.vmcs_dump["reason"],
                                "vmcs": {f.name: f.value for f in self.vmcs_dump["vmcs"]}}
        return out


def run(image: GuestImage, options: RunOptions, console: ConsoleSink | None = None) -> RunResult:
    """Load `image`, run it to its end on a vCPU thread, and say how it went."""
    console = console or ConsoleSink()
    memory = GuestMemory(options.mem)
    place(image, memory)
    controls = ExecutionControls(use_io_bitmaps=options.use_io_bitmaps,
                                 unconditional_io_exiting=options.unconditional_io_exiting,
                                 rdtsc_exiting=options.rdtsc_exiting)
    assert controls.io_bitmaps is not None
    for port in options.pass_through:
        controls.io_bitmaps.set_exit(port, False)
    hv = Hypervisor(memory, console, hvmlab_cpu())
    hv.timeout_s = options.timeout_s
    tracer = None
    if options.trace is not None:
        tracer = TraceWriter(options.trace, {"guest": image.name, "mode": image.mode})
    holder: dict[str, Any] = {}
    ready = threading.Event()

    def vcpu_thread() -> None:
        try:
            engine = Engine(image.bits, memory)
            vcpu = Vcpu(0, engine, memory, controls, hv, tracer, options.max_exits, options.dump_vmcs)
            engine.install(vcpu, options.rdtsc_exiting)
            boot(engine, memory, image.bits, image.entry)
            holder["vcpu"] = vcpu
            ready.set()
            holder["ending"] = vcpu.run(hv.wait_for_interrupt)
        except BaseException as exc:  # noqa: BLE001 - reported as an internal failure, one line
            holder["ending"] = GuestEnded("error", INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            holder["exception"] = exc
        finally:
            ready.set()

    start = time.monotonic()
    hv.deadline = start + options.timeout_s if options.timeout_s else None
    thread = threading.Thread(target=vcpu_thread, name="vcpu0", daemon=True)
    thread.start()
    ready.wait()
    try:
        _supervise(thread, holder, hv)
    finally:
        wall = time.monotonic() - start
    ending: GuestEnded = holder["ending"]
    vcpu = holder.get("vcpu")
    console.flush()
    exits = {R.name(code): n for code, n in sorted(vcpu.exits_by_reason.items())} if vcpu else {}
    exits = {k: v for k, v in exits.items() if v}
    if tracer is not None:
        tracer.close({"ended_by": ending.ended_by, "exit_status": ending.status, "exits": exits})
    hypercall_names = {str(n): c for n, c in hv.hypercalls.calls.items()}
    return RunResult(
        guest=image.name, mode=image.mode, ended_by=ending.ended_by, exit_status=ending.status,
        message=ending.message, console=console.text(), exits=exits,
        exits_total=vcpu.exits if vcpu else 0, ioreqs=hv.ioreqs, buffered_ioreqs=hv.buffered_ioreqs,
        interrupts_injected=hv.interrupts_injected,
        direct_port_accesses=vcpu.direct_port_accesses if vcpu else 0,
        unassigned_port_reads=hv.unassigned_port_reads, unassigned_port_writes=hv.unassigned_port_writes,
        wall_s=round(wall, 6), hypercalls=hypercall_names, vmcs_dump=vcpu.dump if vcpu else None,
    )


def _supervise(thread: threading.Thread, holder: dict[str, Any], hv: Hypervisor) -> None:
    """Wait for the vCPU thread; at the deadline (or Ctrl-C) kick it out of the guest until it
    notices: a kick that lands between two runs of the CPU would otherwise be lost."""
    vcpu: Vcpu | None = holder.get("vcpu")
    while thread.is_alive():
        now = time.monotonic()
        wait = KICK_RETRY_S if hv.deadline is None or now < hv.deadline else KICK_RETRY_S
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
