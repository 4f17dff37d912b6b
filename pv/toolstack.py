"""`hvmlab up MACHINE.toml`: domains described like xl.cfg files, started with Domain 0's services (xenstored, console, blkback, netback, the bridge) and run to their end (Xen tools/xl, libxl)."""

from __future__ import annotations

import re
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from devicemodel.clock import MonotonicClock
from devicemodel.ide_disk import DiskError, FileBlockBackend
from devicemodel.pcap import PcapWriter
from hvm.console import ConsoleSink
from hvm.loader import LoadError, load
from hvm.machine import HvmDomain, RunOptions, RunResult
from hvm.status import BAD_INPUT, LIMIT, GuestEnded
from hvm.trace import TraceWriter
from pv.backends.blkback import Blkback
from pv.backends.console import ConsoleBackend
from pv.backends.netback import Dom0Pages, Netback
from pv.backends.xenbus_glue import XenbusGlue
from pv.bridge import Bridge
from pv.dom0 import Dom0
from pv.domain import PvDomain, PvRunResult
from pv.trace_pv import PvTracer

XVDA = 51712  # (202 << 8): the device number Xen's toolstack gives xvda
DOMAIN_KEYS = {"name", "kind", "guest", "memory", "disks", "vifs", "serial", "mode", "placement"}
MACHINE_KEYS = {"name", "timeout", "pcap", "blk_reorder"}
NETBACK_PAGES = 64


class MachineError(Exception):
    """The machine file is wrong or a resource cannot be had: one line, status 2."""


@dataclass
class DiskSpec:
    path: Path
    size: int | None = None  # create a zero-filled image of this size if the file is missing


@dataclass
class DomainSpec:
    name: str
    kind: str  # "hvm" or "pv"
    guest: str
    memory_mib: int = 16
    disks: list[DiskSpec] = field(default_factory=list)
    vifs: list[dict[str, str]] = field(default_factory=list)
    serial: str | None = None
    mode: str | None = None
    placement: str = "xen"


@dataclass
class MachineSpec:
    name: str
    domains: list[DomainSpec]
    timeout_s: float = 30.0
    pcap: Path | None = None
    blk_reorder: bool = False


def _size(text: Any, where: str) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", str(text))
    if not m:
        raise MachineError(f"{where}: bad size {text!r} (use e.g. 1M, 64K or bytes)")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def parse_machine(path: Path, out_dir: Path) -> MachineSpec:
    """Read a machine file; output paths (disks, pcap) are relative to `out_dir`."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MachineError(f"{path}: no such machine file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MachineError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MachineError(f"{path.name}: not valid TOML: {exc}") from None
    machine = raw.get("machine", {})
    unknown = set(machine) - MACHINE_KEYS
    if unknown:
        raise MachineError(f"{path.name}: [machine]: unknown key(s) {', '.join(sorted(unknown))}")
    domains = []
    for i, d in enumerate(raw.get("domain", [])):
        where = f"{path.name}: domain {d.get('name', i)!r}"
        unknown = set(d) - DOMAIN_KEYS
        if unknown:
            raise MachineError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        kind = d.get("kind", "hvm")
        if kind not in ("hvm", "pv"):
            raise MachineError(f"{where}: kind must be hvm or pv, not {kind!r}")
        if "guest" not in d:
            raise MachineError(f"{where}: no guest")
        disks = []
        for disk in d.get("disks", []):
            if isinstance(disk, str):
                disk = {"path": disk}
            if "path" not in disk:
                raise MachineError(f"{where}: a disk needs a path")
            size = _size(disk["size"], where) if "size" in disk else None
            disks.append(DiskSpec(out_dir / disk["path"], size))
        vifs = [v if isinstance(v, dict) else {"bridge": str(v)} for v in d.get("vifs", [])]
        domains.append(DomainSpec(
            name=str(d.get("name", f"dom{i + 1}")), kind=kind, guest=str(d["guest"]),
            memory_mib=int(d.get("memory", 16)), disks=disks, vifs=vifs, serial=d.get("serial"),
            mode=d.get("mode"), placement=str(d.get("placement", "xen"))))
    if not domains:
        raise MachineError(f"{path.name}: no [[domain]] in the machine file")
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise MachineError(f"{path.name}: two domains share a name")
    pcap = machine.get("pcap")
    return MachineSpec(name=str(machine.get("name", path.stem)), domains=domains,
                       timeout_s=float(machine.get("timeout", 30)),
                       pcap=out_dir / pcap if pcap else None,
                       blk_reorder=bool(machine.get("blk_reorder", False)))


class _Prefixed:
    """A console stream that prefixes each line with the domain's name (like `xl console`)."""

    def __init__(self, name: str, out: BinaryIO, lock: threading.Lock) -> None:
        self._prefix = f"[{name}] ".encode()
        self._out = out
        self._lock = lock
        self._pending = b""

    def write(self, data: bytes) -> int:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        if lines:
            with self._lock:
                self._out.write(b"".join(self._prefix + line + b"\n" for line in lines))
        return len(data)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._out.write(self._prefix + self._pending + b"\n")
                self._pending = b""
            self._out.flush()


@dataclass
class DomainOutcome:
    name: str
    kind: str
    guest: str
    ended_by: str
    exit_status: int
    message: str
    console: str
    counters: dict[str, Any]


@dataclass
class MachineResult:
    name: str
    domains: list[DomainOutcome]
    frames: int
    wall_s: float

    @property
    def exit_status(self) -> int:
        return max((d.exit_status for d in self.domains), default=0)

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.name, "exit_status": self.exit_status, "frames": self.frames,
                "wall_s": round(self.wall_s, 6), "domains": [d.__dict__ for d in self.domains]}


class _PushRouter:
    """One RingPushHook for backends that serve every domain: the ring's name says whose it is
    ("blkif/d1/51712", "netif_rx/d2/0", "xencons/d1"), and that domain counts and traces it."""

    def __init__(self) -> None:
        self.domains: dict[int, PvDomain] = {}

    def __call__(self, ring: str, prod: int, event: int, notify: bool) -> None:
        m = re.search(r"/d(\d+)", ring)
        domain = self.domains.get(int(m.group(1))) if m else None
        if domain is not None:
            domain.on_ring_push(ring, prod, event, notify)


def _mac(text: str, where: str) -> bytes:
    try:
        mac = bytes(int(part, 16) for part in text.split(":"))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise MachineError(f"{where}: bad MAC address {text!r} (use 00:16:3e:xx:xx:xx)")
    return mac


def _disk(spec: DiskSpec) -> FileBlockBackend:
    if not spec.path.exists() and spec.size is not None:
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.path, "wb") as f:
            f.truncate(spec.size)
    try:
        return FileBlockBackend(spec.path)
    except DiskError as exc:
        raise MachineError(str(exc)) from None


def hvm_trace_path(trace: Path, name: str) -> Path:
    """Where an HVM domain of a traced machine writes its own exit trace: FILE.<name>.jsonl."""
    return trace.with_name(f"{trace.name}.{name}.jsonl")


def up(spec: MachineSpec, stream: BinaryIO | None = None,
       progress: Callable[[str], None] | None = None, trace: Path | None = None) -> MachineResult:
    """Build every domain and Dom0's services, run them together, tear everything down.

    With `trace`, every PV domain's vCPU (hypercalls, event sends, upcalls, blocks) and
    blkback's and netback's steps (pv.backends.StepHook) go to ONE trace file through one
    PvTracer, on one clock; each HVM domain writes its own exit trace beside it
    (hvm_trace_path)."""
    say = progress or (lambda _text: None)
    out_lock = threading.Lock()
    clock = MonotonicClock()
    tracer: PvTracer | None = None
    if trace is not None:
        try:
            writer = TraceWriter(trace, {"machine": spec.name, "mode": "pv",
                                         "domains": [d.name for d in spec.domains]})
        except OSError as exc:
            raise MachineError(f"{trace}: cannot write the trace: {exc.strerror}") from None
        tracer = PvTracer(writer)
    on_step = tracer.step if tracer is not None else None
    pcap = PcapWriter(spec.pcap, clock) if spec.pcap is not None else None
    bridge = Bridge(pcap)
    dom0 = Dom0()
    dom0.start()
    pushes = _PushRouter()  # shared backends: each ring push is counted by its own domain
    console_backend = ConsoleBackend(on_ring_push=pushes)
    blkback = Blkback(reorder=spec.blk_reorder, on_step=on_step, on_ring_push=pushes)
    netback = Netback(Dom0Pages(dom0.memory, [dom0.alloc_frame() for _ in range(NETBACK_PAGES)]),
                      on_step=on_step, on_ring_push=pushes)
    vbd_glue = XenbusGlue(dom0.xs_client(), "vbd")
    vif_glue = XenbusGlue(dom0.xs_client(), "vif")
    services: list[Any] = [console_backend, blkback, netback, vbd_glue, vif_glue]
    pv_domains: list[tuple[DomainSpec, PvDomain]] = []
    hvm_domains: list[tuple[DomainSpec, HvmDomain]] = []
    disks: list[FileBlockBackend] = []
    start = time.monotonic()
    summary: dict[str, Any] | None = None
    try:
        for d in spec.domains:
            sink = ConsoleSink(_Prefixed(d.name, stream, out_lock) if stream is not None else None)  # type: ignore[arg-type]
            try:
                image = load(d.guest, {"real": 16, "protected": 32, "long": 64}.get(d.mode or "", None))
            except LoadError as exc:
                raise MachineError(f"domain {d.name!r}: {exc}") from None
            if d.kind == "pv":
                domain = dom0.create_pv_domain(image, name=d.name, mem=d.memory_mib << 20,
                                               console=sink, tracer=tracer)
                pushes.domains[domain.domid] = domain
                console_backend.attach(domain, domain.console_gfn, domain.console_port, domain.console)
                for n, disk_spec in enumerate(d.disks):
                    disk = _disk(disk_spec)
                    disks.append(disk)
                    vbd_glue.add_device(domain.domid, XVDA + 16 * n, blkback.vbd(domain, XVDA + 16 * n, disk))
                for n, vif in enumerate(d.vifs):
                    mac = vif.get("mac", f"00:16:3e:00:{domain.domid:02x}:{n:02x}")
                    vif_glue.add_device(domain.domid, n, netback.vif_driver(domain, n, bridge),
                                        frontend_entries={"mac": mac})
                pv_domains.append((d, domain))
                say(f"{d.name}: PV domain {domain.domid}, {d.guest}, {d.memory_mib} MiB, "
                    f"{len(d.disks)} disk(s), {len(d.vifs)} vif(s)")
            else:
                port = bridge.add_port(d.name) if d.vifs else None
                options = RunOptions(mem=d.memory_mib << 20, timeout_s=spec.timeout_s + 5,
                                     placement=d.placement, pair_index=len(hvm_domains),
                                     disk=d.disks[0].path if d.disks else None,
                                     trace=hvm_trace_path(trace, d.name) if trace else None)
                if d.disks:
                    _disk(d.disks[0]).close()  # create it if asked
                nic_mac = d.vifs[0].get("mac") if d.vifs else None
                hvm = HvmDomain(image, options, sink, ConsoleSink(), nic_tx=port.transmit if port else None,
                                nic_mac=_mac(nic_mac, f"domain {d.name!r}") if nic_mac else None)
                if port is not None:
                    port.connect(hvm.deliver_frame)
                hvm_domains.append((d, hvm))
                say(f"{d.name}: HVM domain, {d.guest}, {d.memory_mib} MiB, placement {d.placement}")
        for service in services:
            service.start()
        for _d, pv in pv_domains:
            pv.start()
        for _d, hvm in hvm_domains:
            hvm.start()
        _wait(spec, [pv for _d, pv in pv_domains], [h for _d, h in hvm_domains])
        outcomes: list[DomainOutcome] = []
        wall = time.monotonic() - start
        for d, pv in pv_domains:
            outcomes.append(_pv_outcome(d, pv.result(wall)))
        for d, hvm in hvm_domains:
            outcomes.append(_hvm_outcome(d, hvm.wait()))
        result = MachineResult(spec.name, outcomes, bridge.frames, time.monotonic() - start)
        summary = {"exit_status": result.exit_status, "frames": result.frames,
                   "domains": {o.name: o.ended_by for o in outcomes}}
        return result
    finally:
        for service in reversed(services):
            try:
                service.stop()
            except Exception:  # noqa: BLE001 - tearing down: keep going
                pass
        dom0.stop()
        for disk in disks:
            disk.close()
        if pcap is not None:
            pcap.close()
        if tracer is not None:
            tracer.close(summary)  # after the backends stopped: nothing records any more
        if stream is not None:
            stream.flush()


def _wait(spec: MachineSpec, pvs: list[PvDomain], hvms: list[HvmDomain]) -> None:
    """Until every domain has ended; at the machine's timeout ask the rest to end."""
    deadline = time.monotonic() + spec.timeout_s
    asked = False
    while any(d.running for d in pvs) or any(h.running for h in hvms):
        for d in pvs:
            if d.running:
                d.join(0.02)
                d.watchdog()
        for h in hvms:
            if h.running:
                h._thread.join(0.02)
        if not asked and time.monotonic() >= deadline:
            asked = True
            for d in pvs:
                d.request_end(GuestEnded("timeout", LIMIT,
                                         f"machine still running after {spec.timeout_s:g} s"))
            for h in hvms:
                h.stop()


def _pv_outcome(d: DomainSpec, r: PvRunResult) -> DomainOutcome:
    counters = {k: getattr(r, k) for k in ("hypercalls_total", "events_sent", "upcalls", "blocks",
                                           "grant_ops", "ring_pushes", "ring_notifies")
                if hasattr(r, k)}
    return DomainOutcome(d.name, "pv", d.guest, r.ended_by, r.exit_status, r.message, r.console, counters)


def _hvm_outcome(d: DomainSpec, r: RunResult) -> DomainOutcome:
    counters = {"exits": r.exits_total, "ioreqs": r.ioreqs, "interrupts_injected": r.interrupts_injected,
                "frames_sent": r.frames_sent}
    return DomainOutcome(d.name, "hvm", d.guest, r.ended_by, r.exit_status, r.message, r.console, counters)


def main_up(path: Path, out_dir: Path, as_json: bool, trace: Path | None = None) -> int:
    """The `hvmlab up` command."""
    import json

    try:
        spec = parse_machine(path, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = up(spec, None if as_json else sys.stdout.buffer,
                    None if as_json else (lambda t: print(f"hvmlab up: {t}", file=sys.stderr)),
                    trace)
    except MachineError as exc:
        print(f"hvmlab: error: {exc}", file=sys.stderr)
        return BAD_INPUT
    if as_json:
        print(json.dumps(result.to_json()))
    for d in result.domains:
        print(f"hvmlab up: {d.name} ({d.kind}, {d.guest}) ended by {d.ended_by}: {d.message}; "
              f"status {d.exit_status}", file=sys.stderr)
    print(f"hvmlab up: {result.name}: {len(result.domains)} domain(s) in {result.wall_s:.2f} s; "
          f"status {result.exit_status}", file=sys.stderr)
    return result.exit_status
