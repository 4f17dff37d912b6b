"""The compare workloads: the same I/O as an HVM guest and a PV guest (guests/workloads/), run, checked, and counted per path from the trace of their I/O phase (hvmlab issue 5)."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import exit_reasons as R
from .trace_summary import read_trace

# -- what the guests and the runner agree on (guests/workloads/common.inc) -----------------------
SECTOR = 512
ETHERTYPE = b"\x88\xb5"
WL_MAC = bytes.fromhex("00163e574c00")  # the guests' station address (wl_mac)
PEER_MAC = bytes.fromhex("00163e574cff")  # the runner's, for the frames it sends them
BROADCAST = b"\xff" * 6
HVM_MARKER_PORT = 0xE9  # HVM phase markers: `in al, 0xE9` (hvm.inc)
PV_MARKER_HYPERCALL = 63  # PV phase markers: hypercall 63, EBX = 1 start / 2 end (pv.inc)
MARK_START, MARK_END = 1, 2


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    unit: str                 # what one I/O is: "line", "request", "frame", "access", ...
    paths: tuple[str, ...]    # the paths it runs on, HVM ones first
    default_ios: int
    default_size: int         # bytes per I/O where it applies (0 where it does not)
    describe: str


WORKLOADS: dict[str, WorkloadSpec] = {s.name: s for s in (
    WorkloadSpec("console", "line", ("hvm", "pv"), 100, 64,
                 "N lines of `size` bytes: the 16550 UART's THR (HVM) / the PV console ring"),
    WorkloadSpec("disk-read", "request", ("hvm", "hvm-nostring", "pv"), 100, 4096,
                 "N reads of `size` bytes at increasing sectors: IDE PIO with `rep insw` (hvm), "
                 "a word per `in` (hvm-nostring) / blkfront requests, `batch` per notification"),
    WorkloadSpec("disk-write", "request", ("hvm", "hvm-nostring", "pv"), 100, 4096,
                 "N writes of `size` bytes at increasing sectors: IDE PIO with `rep outsw` (hvm), "
                 "a word per `out` (hvm-nostring) / blkfront requests, `batch` per notification"),
    WorkloadSpec("net-send", "frame", ("hvm", "pv"), 100, 1514,
                 "N Ethernet frames of `size` bytes sent: NE2000 remote DMA and transmit / "
                 "netfront tx (netback grant-copies each frame), `batch` per notification"),
    WorkloadSpec("net-recv", "frame", ("hvm", "pv", "pv-flip"), 100, 1514,
                 "N Ethernet frames of `size` bytes received: NE2000 with IRQ 9 / netfront rx, "
                 "by grant copy (pv) or page flipping (pv-flip)"),
    WorkloadSpec("port-hv", "access", ("hvm",), 1000, 4,
                 "N reads of the ACPI PM timer (0xB008), answered in the hypervisor"),
    WorkloadSpec("port-dm", "access", ("hvm",), 1000, 1,
                 "N reads of the UART scratch register (0x3FF), answered by the device model"),
    WorkloadSpec("hypercall", "call", ("hvm", "pv"), 1000, 0,
                 "N xen_version(XENVER_version) hypercalls: VMCALL / int 0x82"),
    WorkloadSpec("evtchn", "round trip", ("pv",), 100, 0,
                 "N event-channel round trips with Dom0's echo: EVTCHNOP_send, SCHEDOP_poll"),
)}


@dataclass
class PathCounts:
    """What one path's I/O phase cost, for the WHOLE run (compare divides by `ios`). Every
    count comes from the trace records between the guest's two phase markers (the markers
    themselves excluded) or from the run's result; none is estimated.

    vmexits, exits_by_reason: VM exits (HVM; a PV guest has no VMCS: 0 and {}).
    ioreqs: synchronous ioreqs to the device model: one per device-model port access, the
        count the hypervisor reports for string I/O (one per page of buffer), one per MMIO
        read. buffered_ioreqs: writes through the buffered ioreq page.
    hypercalls: HVM VMCALL exits; PV HYPERCALL records of the guest.
    evtchn_notifications: event-channel notifications sent to wake the side that serves the
        I/O: HVM one per ioreq, buffered or not (the hypervisor's notify to the device
        model); PV the guest's EVTCHNOP_send (the frontend kicking its backend, or the echo).
        The answers that come back are counted as domain switches and interrupts.
    domain_switches: hand-offs between the guest and Domain 0 / the device model. HVM: 2 per
        synchronous ioreq (the vCPU blocks and the device model runs; it answers and the
        vCPU runs again). PV: each event that wakes the other side: the guest's sends to
        Dom0, plus each block of the guest (SCHEDOP_block, SCHEDOP_poll, HLT) that an event
        ended.
    interrupts: HVM interrupts injected (the workload guests keep IF=0 outside the phase, so
        the run's total is the phase's); PV upcalls delivered.
    bytes_copied: data bytes the hypervisor, device model or a backend copied between guest
        memory and elsewhere: HVM string-I/O buffers served by an ioreq; PV grant copies.
        (Bytes in registers, and shared rings or granted pages read in place, are not copies.)
    grant_ops: PV grant operations (map, unmap, copy, transfer): the GRANT_OP records of the
        guest's domain, made by the backends for it or by its own grant_table_op hypercalls.
        page_flips: the transfers among them that succeeded.
    wall_ns: from the start marker to the end marker (trace clock).
    verified: the data was checked (a wrong result raises WorkloadError instead).
    trace: the trace file the counts came from (None when no out_dir was given: it was in a
        temporary directory, removed since).
    """

    path: str
    ios: int
    size: int
    vmexits: int = 0
    exits_by_reason: dict[str, int] = field(default_factory=dict)
    ioreqs: int = 0
    buffered_ioreqs: int = 0
    hypercalls: int = 0
    evtchn_notifications: int = 0
    domain_switches: int = 0
    interrupts: int = 0
    bytes_copied: int = 0
    grant_ops: int = 0
    page_flips: int = 0
    wall_ns: int = 0
    verified: bool = False
    trace: Path | None = None

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["trace"] = str(self.trace) if self.trace is not None else None
        return out


class WorkloadError(Exception):
    """A workload's data came out wrong (or its guest failed): no cost is reported for it."""


def spec(name: str) -> WorkloadSpec:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


def run_workload(name: str, path: str, ios: int, size: int | None = None,
                 out_dir: Path | None = None, batch: int = 1) -> PathCounts:
    """Run workload `name` on `path` with `ios` I/Os of `size` bytes (the workload's default
    if None), check its data, and count its I/O phase. `batch` is the number of requests the
    PV disk and net-send paths queue behind one push (elsewhere it is ignored). With
    `out_dir`, each run leaves its trace, disk image and capture in a new directory in it
    (`<name>-<path>-XXXX/`); without, in a temporary directory removed afterwards.
    Bad parameters raise ValueError; wrong data, or a guest that fails, WorkloadError."""
    from .workload_runners import RUNNERS, check_params

    wl = spec(name)
    if path not in wl.paths:
        raise ValueError(f"workload {name!r} has no path {path!r}; it has {', '.join(wl.paths)}")
    size = wl.default_size if size is None else size
    check_params(wl, path, ios, size, batch)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-{path}-", dir=out_dir))
        return RUNNERS[name](path, ios, size, batch, work)
    work = Path(tempfile.mkdtemp(prefix=f"hvmlab-{name}-{path}-"))
    try:
        counts = RUNNERS[name](path, ios, size, batch, work)
        counts.trace = None
        return counts
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the data the runner checks (the same patterns as guests/workloads/common.inc) ---------------
def checksum(data: bytes, start: int = 0, total: int = 0) -> int:
    """The workloads' checksum (common.inc wl_sum): byte k adds (2k + 1) * byte, mod 2^32.
    `start` is the index of data[0] and `total` the checksum so far, to continue one."""
    weights = range(2 * start + 1, 2 * (start + len(data)) + 1, 2)
    return (total + sum(map(int.__mul__, data, weights))) & 0xFFFF_FFFF


def sector_pattern(first_lba: int, sectors: int) -> bytes:
    """The disk pattern (wl_fill_sectors): each sector its LBA (u32 LE), then (j + LBA) & 0xFF."""
    ramp = bytes(range(256)) * 3
    out = bytearray()
    for lba in range(first_lba, first_lba + sectors):
        start = (4 + lba) & 0xFF
        out += (lba & 0xFFFF_FFFF).to_bytes(4, "little") + ramp[start:start + SECTOR - 4]
    return bytes(out)


def console_line(number: int, size: int) -> bytes:
    """Line `number` of the console pattern (wl_make_line): 8 hex digits, ':', letters, LF."""
    letters = bytes(ord("a") + j % 26 for j in range(9, size - 1))
    return f"{number & 0xFFFF_FFFF:08x}:".encode() + letters + b"\n"


def frame(sequence: int, size: int, dst: bytes = BROADCAST, src: bytes = WL_MAC) -> bytes:
    """Frame `sequence` of the net pattern (wl_make_frame): dst, src, 0x88B5, the sequence
    number (u32 LE), then at offset j the byte (j + sequence) & 0xFF."""
    head = dst + src + ETHERTYPE + (sequence & 0xFFFF_FFFF).to_bytes(4, "little")
    return head + bytes((j + sequence) & 0xFF for j in range(len(head), size))


def report(console: str) -> dict[str, int]:
    """The guest's "wl: KEY VALUE" lines (hex values) as a dict."""
    out: dict[str, int] = {}
    for line in console.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "wl:":
            try:
                out[parts[1]] = int(parts[2], 16)
            except ValueError:
                continue
    return out


# -- counting ------------------------------------------------------------------------------------
def _phase(records: Iterable[dict[str, Any]], is_marker: Any,
           where: str) -> tuple[list[dict[str, Any]], int, int]:
    """The records strictly between the two markers, and the markers' t_ns."""
    inside: list[dict[str, Any]] = []
    marks: list[int] = []
    for record in records:
        if is_marker(record):
            marks.append(record["t_ns"])
            continue
        if len(marks) == 1:
            inside.append(record)
    if len(marks) != 2:
        raise WorkloadError(f"{where}: the trace has {len(marks)} phase marker(s), not 2")
    return inside, marks[0], marks[1]


def hvm_counts(trace: Path, path: str, ios: int, size: int, interrupts: int,
               buffered_ports: frozenset[int] = frozenset()) -> PathCounts:
    """Count an HVM run's I/O phase from its exit trace (markers: reads of port 0xE9)."""
    def is_marker(r: dict[str, Any]) -> bool:
        return (r.get("reason") == "IO_INSTRUCTION" and r.get("port") == HVM_MARKER_PORT
                and r.get("direction") == "in")

    inside, start, end = _phase(read_trace(trace), is_marker, str(trace))
    counts = PathCounts(path=path, ios=ios, size=size, trace=trace, wall_ns=end - start,
                        interrupts=interrupts)
    reasons: Counter[str] = Counter()
    for r in inside:
        reason = r["reason"]
        reasons[reason] += 1
        if reason == "VMCALL":
            counts.hypercalls += 1
        if r.get("handled_by") != "device-model":
            continue
        if reason == "IO_INSTRUCTION":
            if r.get("string"):
                counts.ioreqs += int(r.get("ioreqs", 1))
                counts.bytes_copied += int(r.get("count", 1)) * int(r.get("size", 1))
            elif r.get("direction") == "out" and r.get("port") in buffered_ports:
                counts.buffered_ioreqs += 1
            else:
                counts.ioreqs += 1
        elif reason == R.NAMES[R.EPT_VIOLATION]:
            if int(r.get("qualification", 0)) & 2:  # a write: through the buffered page
                counts.buffered_ioreqs += 1
            else:
                counts.ioreqs += 1
    counts.vmexits = sum(reasons.values())
    counts.exits_by_reason = dict(reasons.most_common())
    counts.evtchn_notifications = counts.ioreqs + counts.buffered_ioreqs
    counts.domain_switches = 2 * counts.ioreqs
    return counts


def pv_counts(trace: Path, path: str, ios: int, size: int, domid: int) -> PathCounts:
    """Count a PV run's I/O phase from its trace (markers: hypercall 63 of domain `domid`)."""
    from pv.hypercalls import hypercall_name

    marker_name = hypercall_name(PV_MARKER_HYPERCALL)

    def is_marker(r: dict[str, Any]) -> bool:
        return (r.get("reason") == "HYPERCALL" and r.get("domid") == domid
                and r.get("hypercall") == marker_name)

    records = list(read_trace(trace))
    marks = [r for r in records if is_marker(r)]
    if [r.get("args", [0, 0])[0] for r in marks] != [MARK_START, MARK_END]:
        raise WorkloadError(f"{trace}: the phase markers are not one start and one end")
    inside, start, end = _phase(records, is_marker, str(trace))
    counts = PathCounts(path=path, ios=ios, size=size, trace=trace, wall_ns=end - start)
    for r in inside:
        reason, ours = r["reason"], r.get("domid") == domid
        if reason == "HYPERCALL" and ours:
            counts.hypercalls += 1
        elif reason == "EVENT_SEND" and ours and r.get("direction") == "out":
            counts.evtchn_notifications += 1
            counts.domain_switches += 1
        elif reason == "BLOCK" and ours and r.get("woken_by") == "event":
            counts.domain_switches += 1
        elif reason == "UPCALL" and ours:
            counts.interrupts += 1
        elif reason == "GRANT_OP" and ours:
            counts.grant_ops += 1
            if r.get("status") == 0 and r.get("op") == "copy":
                counts.bytes_copied += int(r.get("len", 0))
            if r.get("status") == 0 and r.get("op") == "transfer":
                counts.page_flips += 1
    return counts


def pcap_frames(frames: Iterable[bytes], src: bytes = WL_MAC) -> list[bytes]:
    """The workload's frames among `frames`: from `src`, of ethertype 0x88B5, in order."""
    return [f for f in frames if f[6:12] == src and f[12:14] == ETHERTYPE]
