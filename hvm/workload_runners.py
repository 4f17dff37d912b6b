"""Each compare workload on each path: its guest assembled with the parameters, run on an HVM machine or as a PV domain with Dom0's backends, its data checked, its I/O phase counted (hvm/workloads.py)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devicemodel.clock import MonotonicClock
from devicemodel.pcap import PcapWriter, read_pcap

from .console import ConsoleSink
from .loader import GuestImage, Segment
from .machine import HvmDomain, RunOptions, RunResult
from .nasm import AsmError, assemble_text
from .workloads import (
    PEER_MAC,
    SECTOR,
    WL_MAC,
    PathCounts,
    WorkloadError,
    WorkloadSpec,
    checksum,
    console_line,
    frame,
    hvm_counts,
    pcap_frames,
    pv_counts,
    report,
    sector_pattern,
)

PAGE = 4096
BLKIF_SEGMENTS = 11  # BLKIF_MAX_SEGMENTS_PER_REQUEST: pages in one blkif request
BLKIF_RING_SLOTS = 32
PV_GRANT_PAGES = 480  # data pages disk_pv.asm may grant at once
NET_PV_BATCH_MAX = 64
NETBACK_PAGES = 64  # Dom0 pages netback bounces and flips through
RX_QUEUE_HIGH = 192  # frames queued at netback before the runner waits (its queue holds 256)
FEED_POLL_S = 0.0005  # how long the frame feeder waits before offering a refused frame again
CONNECT_WAIT_S = 30.0  # bound for a PV vif to connect before frames are fed
IMAGE_FILL = 0xE5  # what a disk-write image holds before the guest writes
TRACE_EXIT_S = 400e-6  # a generous bound of one traced exit with its ioreq (timeouts)

# (workload, path) -> (guest file in guests/workloads/, its defines besides WL_IOS/WL_SIZE)
GUESTS: dict[tuple[str, str], tuple[str, dict[str, int]]] = {
    ("console", "hvm"): ("console_hvm", {}),
    ("console", "pv"): ("console_pv", {}),
    ("disk-read", "hvm"): ("disk_hvm", {"WL_WRITE": 0, "WL_STRING": 1}),
    ("disk-read", "hvm-nostring"): ("disk_hvm", {"WL_WRITE": 0, "WL_STRING": 0}),
    ("disk-read", "pv"): ("disk_pv", {"WL_WRITE": 0}),
    ("disk-write", "hvm"): ("disk_hvm", {"WL_WRITE": 1, "WL_STRING": 1}),
    ("disk-write", "hvm-nostring"): ("disk_hvm", {"WL_WRITE": 1, "WL_STRING": 0}),
    ("disk-write", "pv"): ("disk_pv", {"WL_WRITE": 1}),
    ("net-send", "hvm"): ("net_hvm", {"WL_RECV": 0}),
    ("net-send", "pv"): ("net_pv", {"WL_RECV": 0}),
    ("net-recv", "hvm"): ("net_hvm", {"WL_RECV": 1}),
    ("net-recv", "pv"): ("net_pv", {"WL_RECV": 1, "WL_FLIP": 0}),
    ("net-recv", "pv-flip"): ("net_pv", {"WL_RECV": 1, "WL_FLIP": 1}),
    ("port-hv", "hvm"): ("port_hv", {}),
    ("port-dm", "hvm"): ("port_dm", {}),
    ("hypercall", "hvm"): ("hypercall_hvm", {}),
    ("hypercall", "pv"): ("hypercall_pv", {}),
    ("evtchn", "pv"): ("evtchn_pv", {}),
}


def check_params(wl: WorkloadSpec, path: str, ios: int, size: int, batch: int) -> None:
    """ValueError unless the parameters make sense for this workload and path."""
    if ios < 1:
        raise ValueError(f"{wl.name}: ios must be at least 1, not {ios}")
    if batch < 1:
        raise ValueError(f"{wl.name}: batch must be at least 1, not {batch}")
    name = wl.name
    if name == "console" and not 10 <= size <= 4096:
        raise ValueError(f"console: size is the bytes of a line, 10..4096, not {size}")
    if name in ("disk-read", "disk-write"):
        if size < SECTOR or size % SECTOR or size > 1 << 20:
            raise ValueError(f"{name}: size must be a multiple of 512, at most 1 MiB, not {size}")
        pages = -(-size // PAGE)
        if path == "pv" and (batch * -(-pages // BLKIF_SEGMENTS) > BLKIF_RING_SLOTS
                             or batch * pages > PV_GRANT_PAGES):
            raise ValueError(f"{name}: {batch} requests of {size} bytes do not fit the blkif "
                             f"ring ({BLKIF_RING_SLOTS} slots of {BLKIF_SEGMENTS} pages) and "
                             f"{PV_GRANT_PAGES} granted pages")
    if name in ("net-send", "net-recv"):
        if not 60 <= size <= 1514:
            raise ValueError(f"{name}: size is an Ethernet frame without FCS, 60..1514, not {size}")
        if name == "net-send" and path == "pv" and batch > NET_PV_BATCH_MAX:
            raise ValueError(f"net-send: batch must be at most {NET_PV_BATCH_MAX}, not {batch}")
    if name in ("port-hv", "port-dm", "hypercall", "evtchn") and size != wl.default_size:
        raise ValueError(f"{name}: the size of one {wl.unit} is fixed ({wl.default_size})")


@functools.lru_cache(maxsize=64)
def _assemble(file: str, defines: tuple[tuple[str, int], ...]) -> GuestImage:
    text = "".join(f"%define {k} {v}\n" for k, v in defines) + f'%include "workloads/{file}.asm"\n'
    try:
        asm = assemble_text(text, f"{file}.asm")
    except AsmError as exc:
        raise ValueError(f"workload guest {file}: {exc}") from None
    base = asm.org if asm.org is not None else 0x100000
    return GuestImage(file, "asm", asm.bits, base, (Segment(base, asm.code, len(asm.code)),),
                      None, dict(asm.symbols))


def guest_image(name: str, path: str, ios: int, size: int, batch: int = 1) -> GuestImage:
    """The workload guest of (name, path) assembled with its parameters prepended as %define."""
    file, extra = GUESTS[(name, path)]
    defines = {"WL_IOS": ios, "WL_SIZE": size, **extra}
    if file in ("disk_pv", "net_pv"):
        defines["WL_BATCH"] = batch
    return _assemble(file, tuple(sorted(defines.items())))


def _fail(name: str, path: str, why: str) -> WorkloadError:
    return WorkloadError(f"{name} on {path}: {why}")


def _tail(text: str, lines: int = 4) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# -- the HVM path ---------------------------------------------------------------------------------
def _run_hvm(name: str, path: str, image: GuestImage, work: Path, exits: int, *,
             disk: Path | None = None, pcap: Path | None = None,
             feed: Sequence[bytes] = (), text_bytes: int = 0) -> tuple[RunResult, Path]:
    """Run the guest on an HVM machine with a trace; frames in `feed` go to its NE2000 as it
    takes them. The guest must end as a workload guest ends: halt, status 0."""
    trace = work / "trace.jsonl"
    options = RunOptions(trace=trace, disk=disk, pcap=pcap,
                         timeout_s=60.0 + exits * TRACE_EXIT_S)
    limit = max(1 << 20, 2 * text_bytes)
    console, serial = ConsoleSink(limit=limit), ConsoleSink(limit=limit)
    domain = HvmDomain(image, options, console, serial)
    domain.start()
    stop = threading.Event()
    feeder = None
    if feed:
        feeder = threading.Thread(target=_feed_nic, args=(domain, feed, stop), daemon=True,
                                  name="wl-feed")
        feeder.start()
    try:
        result = domain.wait()
    finally:
        stop.set()
        if feeder is not None:
            feeder.join(5.0)
    if result.ended_by != "halt" or result.exit_status != 0:
        raise _fail(name, path, f"the guest ended by {result.ended_by}: {result.message}; "
                                f"console: {_tail(result.console)}")
    return result, trace


def _feed_nic(domain: HvmDomain, frames: Sequence[bytes], stop: threading.Event) -> None:
    """Offer each frame to the NE2000 until it stores it (it refuses while stopped or while
    its receive ring is full), in order."""
    for f in frames:
        while not domain.deliver_frame(f):
            if stop.wait(FEED_POLL_S) or not domain.running:
                return


# -- the PV path ----------------------------------------------------------------------------------
class _Net:
    """netback with vif 0 of the domain on a bridge (every frame to `pcap`), its steps in the
    trace; with `feed`, a peer port on the bridge that sends those frames to the vif once it
    is connected, never more than RX_QUEUE_HIGH waiting at netback."""

    def __init__(self, dom0: Any, domain: Any, pcap: Path, feed: Sequence[bytes]) -> None:
        from pv.backends.netback import Dom0Pages, Netback
        from pv.backends.xenbus_glue import XenbusGlue
        from pv.bridge import Bridge, mac_text

        tracer = domain.tracer
        self.pcap = PcapWriter(pcap, MonotonicClock())
        self.bridge = Bridge(self.pcap)
        pages = Dom0Pages(dom0.memory, [dom0.alloc_frame() for _ in range(NETBACK_PAGES)])
        self.netback = Netback(pages, on_ring_push=domain.on_ring_push,
                               on_step=tracer.step if tracer is not None else None)
        self.glue = XenbusGlue(dom0.xs_client(), "vif")
        self.driver = self.netback.vif_driver(domain, 0, self.bridge)
        self.glue.add_device(domain.domid, 0, self.driver,
                             frontend_entries={"mac": mac_text(WL_MAC)})
        self.netback.start()
        self.glue.start()
        self._stop = threading.Event()
        self._feeder: threading.Thread | None = None
        self.fed = 0
        if feed:
            self.peer = self.bridge.add_port("wl-peer")
            self._feeder = threading.Thread(target=self._feed, args=(feed,), daemon=True,
                                            name="wl-feed")
            self._feeder.start()

    def _feed(self, frames: Sequence[bytes]) -> None:
        waited = 0.0
        while self.driver.vif is None:
            if self._stop.wait(FEED_POLL_S * 4) or waited > CONNECT_WAIT_S:
                return
            waited += FEED_POLL_S * 4
        vif = self.driver.vif
        for f in frames:
            while vif.rx_pending >= RX_QUEUE_HIGH:
                if self._stop.wait(FEED_POLL_S):
                    return
            self.peer.transmit(f)
            self.fed += 1

    def stop(self) -> None:
        self._stop.set()
        if self._feeder is not None:
            self._feeder.join(5.0)
        self.glue.stop()
        self.netback.stop()
        self.pcap.close()


def _run_pv(name: str, path: str, image: GuestImage, work: Path, ios: int,
            extra: Sequence[Callable[[Any, Any], Any]] = (), text_bytes: int = 0,
            ) -> tuple[Any, Path, dict[str, Any]]:
    """Run the guest as a PV domain with a trace, Dom0's console backend and `extra`
    backends; `seen` gets the domain and each service made. The guest must power off."""
    from pv.domain import PvOptions, run_pv
    from pv.services import ConsoleService

    seen: dict[str, Any] = {}

    def remember(key: str, attach: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def made(dom0: Any, domain: Any) -> Any:
            seen["domain"] = domain
            seen[key] = service = attach(dom0, domain)
            return service
        return made

    trace = work / "trace.jsonl"
    backends = [remember("console", ConsoleService)]
    backends += [remember(f"service{i}", attach) for i, attach in enumerate(extra)]
    options = PvOptions(trace=trace, backends=backends, timeout_s=60.0 + ios * 0.05)
    console = ConsoleSink(limit=max(1 << 20, 2 * text_bytes))
    result = run_pv(image, options, console)
    if result.ended_by != "shutdown_poweroff" or result.exit_status != 0:
        raise _fail(name, path, f"the guest ended by {result.ended_by}: {result.message}; "
                                f"console: {_tail(result.console)}")
    return result, trace, seen


def _expect(name: str, path: str, got: dict[str, int], **wanted: int) -> None:
    for key, value in wanted.items():
        have = got.get(key)
        if have != value:
            said = "nothing" if have is None else hex(have)
            raise _fail(name, path, f"the guest reports {key} = {said}, expected {value:#x}")


# -- the workloads --------------------------------------------------------------------------------
def run_console(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    name = "console"
    image = guest_image(name, path, ios, size)
    expected = b"".join(console_line(i, size) for i in range(1, ios + 1)).decode()
    if path == "hvm":
        result, trace = _run_hvm(name, path, image, work, ios * (size + size // 16 + 2),
                                 text_bytes=len(expected))
        out = result.serial
        counts = hvm_counts(trace, path, ios, size, result.interrupts_injected)
        got = report(result.console)
    else:
        pv, trace, _seen = _run_pv(name, path, image, work, ios, text_bytes=len(expected))
        out = pv.console[:len(expected)]  # the report follows the lines on the same console
        counts = pv_counts(trace, path, ios, size, pv.domid)
        got = report(pv.console)
    if out != expected:
        at = next((i for i, (a, b) in enumerate(zip(out, expected, strict=False)) if a != b),
                  min(len(out), len(expected)))
        raise _fail(name, path, f"the console differs from the {ios} lines expected at byte "
                                f"{at}: {out[at:at + 24]!r} instead of {expected[at:at + 24]!r}")
    _expect(name, path, got, lines=ios)
    counts.verified = True
    return counts


def make_disk_image(path: Path, sectors: int, pattern: bool) -> None:
    """A raw image of `sectors` sectors: the disk pattern (to be read) or IMAGE_FILL bytes
    (to be written over)."""
    data = sector_pattern(0, sectors) if pattern else bytes([IMAGE_FILL]) * (sectors * SECTOR)
    path.write_bytes(data)


def _run_disk(name: str, path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    from pv.services import blk_factory

    write = name == "disk-write"
    image = guest_image(name, path, ios, size, batch)
    used = ios * size // SECTOR
    disk = work / "disk.img"
    make_disk_image(disk, used + 8, pattern=not write)
    if path.startswith("hvm"):
        words = size // 2
        exits = ios * (words if path == "hvm-nostring" else size // SECTOR * 2 + 8)
        result, trace = _run_hvm(name, path, image, work, exits, disk=disk)
        counts = hvm_counts(trace, path, ios, size, result.interrupts_injected)
        got = report(result.console)
    else:
        pv, trace, _seen = _run_pv(name, path, image, work, ios, [blk_factory(disk)])
        counts = pv_counts(trace, path, ios, size, pv.domid)
        got = report(pv.console)
    _expect(name, path, got, requests=ios)
    if write:
        data = disk.read_bytes()
        want = sector_pattern(0, used)
        if data[:len(want)] != want:
            at = next(i for i, (a, b) in enumerate(zip(data, want, strict=False)) if a != b)
            raise _fail(name, path, f"the image differs from what was written at byte {at} "
                                    f"(sector {at // SECTOR})")
        if data[len(want):].strip(bytes([IMAGE_FILL])):
            raise _fail(name, path, "sectors past the last request were written")
    else:
        _expect(name, path, got, checksum=checksum(sector_pattern(0, used)))
    counts.verified = True
    return counts


def run_disk_read(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    return _run_disk("disk-read", path, ios, size, batch, work)


def run_disk_write(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    return _run_disk("disk-write", path, ios, size, batch, work)


def run_net_send(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    name = "net-send"
    image = guest_image(name, path, ios, size, batch)
    pcap = work / "frames.pcap"
    if path == "hvm":
        result, trace = _run_hvm(name, path, image, work, ios * 20, pcap=pcap)
        counts = hvm_counts(trace, path, ios, size, result.interrupts_injected)
        got = report(result.console)
    else:
        pv, trace, _seen = _run_pv(name, path, image, work, ios,
                                   [lambda dom0, domain: _Net(dom0, domain, pcap, ())])
        counts = pv_counts(trace, path, ios, size, pv.domid)
        got = report(pv.console)
    _expect(name, path, got, frames=ios, errors=0)
    sent = pcap_frames(f for _t, f in read_pcap(pcap))
    want = [frame(i, size) for i in range(ios)]
    if sent != want:
        bad = next((i for i, (a, b) in enumerate(zip(sent, want, strict=False)) if a != b),
                   min(len(sent), len(want)))
        raise _fail(name, path, f"the capture holds {len(sent)} workload frames, expected {ios}; "
                                f"the first wrong or missing one is frame {bad}")
    counts.verified = True
    return counts


def run_net_recv(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    name = "net-recv"
    image = guest_image(name, path, ios, size, batch)
    frames = [frame(i, size, dst=WL_MAC, src=PEER_MAC) for i in range(ios)]
    want = 0
    for i, f in enumerate(frames):
        want = checksum(f, i * size, want)
    if path == "hvm":
        result, trace = _run_hvm(name, path, image, work, ios * 40, feed=frames)
        counts = hvm_counts(trace, path, ios, size, result.interrupts_injected)
        got = report(result.console)
    else:
        pcap = work / "frames.pcap"
        pv, trace, _seen = _run_pv(name, path, image, work, ios,
                                   [lambda dom0, domain: _Net(dom0, domain, pcap, frames)])
        counts = pv_counts(trace, path, ios, size, pv.domid)
        got = report(pv.console)
    _expect(name, path, got, frames=ios, errors=0, checksum=want)
    counts.verified = True
    return counts


def run_port_hv(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    name = "port-hv"
    result, trace = _run_hvm(name, path, guest_image(name, path, ios, size), work, ios)
    counts = hvm_counts(trace, path, ios, size, result.interrupts_injected)
    got = report(result.console)
    _expect(name, path, got, reads=ios, errors=0)
    # A 24-bit counter at 3.579545 MHz wraps every ~4.69 s: more backward steps than the
    # phase had time for means the values are not a PM timer's.
    wraps = 1 + counts.wall_ns // 4_000_000_000
    if got.get("backsteps", wraps + 1) > wraps or got.get("first", 1 << 24) >> 24 \
            or got.get("last", 1 << 24) >> 24:
        raise _fail(name, path, f"the PM timer values make no sense: {got}")
    counts.verified = True
    return counts


def run_port_dm(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    name = "port-dm"
    result, trace = _run_hvm(name, path, guest_image(name, path, ios, size), work, ios)
    counts = hvm_counts(trace, path, ios, size, result.interrupts_injected)
    _expect(name, path, report(result.console), reads=ios, errors=0, value=0xA5)
    counts.verified = True
    return counts


def run_hypercall(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    name = "hypercall"
    image = guest_image(name, path, ios, size)
    if path == "hvm":
        from .hypercall import HypercallTable

        major, minor = HypercallTable().version
        result, trace = _run_hvm(name, path, image, work, ios)
        counts = hvm_counts(trace, path, ios, size, result.interrupts_injected)
        got = report(result.console)
    else:
        pv, trace, seen = _run_pv(name, path, image, work, ios)
        major, minor = seen["domain"].hypercalls.version
        counts = pv_counts(trace, path, ios, size, pv.domid)
        got = report(pv.console)
    _expect(name, path, got, calls=ios, errors=0, version=major << 16 | minor)
    counts.verified = True
    return counts


def run_evtchn(path: str, ios: int, size: int, batch: int, work: Path) -> PathCounts:
    from pv.evtchn_echo import EvtchnEcho

    name = "evtchn"
    pv, trace, seen = _run_pv(name, path, guest_image(name, path, ios, size), work, ios,
                              [EvtchnEcho.attach])
    got = report(pv.console)
    _expect(name, path, got, trips=ios)
    echo = seen["service0"]
    if echo.echoes != ios or echo.port != got.get("port"):
        raise _fail(name, path, f"Dom0's echo answered {echo.echoes} notifications on port "
                                f"{echo.port}; the guest made {ios} round trips on port "
                                f"{got.get('port')}")
    counts = pv_counts(trace, path, ios, size, pv.domid)
    counts.verified = True
    return counts


RUNNERS: dict[str, Callable[[str, int, int, int, Path], PathCounts]] = {
    "console": run_console,
    "disk-read": run_disk_read,
    "disk-write": run_disk_write,
    "net-send": run_net_send,
    "net-recv": run_net_recv,
    "port-hv": run_port_hv,
    "port-dm": run_port_dm,
    "hypercall": run_hypercall,
    "evtchn": run_evtchn,
}
