"""The compare workloads: every workload on every path moves the data it should, and its counts
from the trace show what each path costs per I/O (exits, ioreqs, notifications, copies, flips)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvm import workload_runners
from hvm.trace_summary import read_trace
from hvm.workloads import (
    WORKLOADS,
    PathCounts,
    WorkloadError,
    checksum,
    console_line,
    frame,
    run_workload,
    sector_pattern,
)

# Small runs: a few I/Os of a small size, so that the whole file stays within seconds.
SMALL = {"console": 24, "disk-read": 1024, "disk-write": 1024, "net-send": 200,
         "net-recv": 200, "port-hv": None, "port-dm": None, "hypercall": None, "evtchn": None}
IOS = 3
CASES = [(name, path) for name, wl in WORKLOADS.items() for path in wl.paths]


def per_io(counts: PathCounts, field: str) -> float:
    return getattr(counts, field) / counts.ios


@pytest.mark.parametrize(("name", "path"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_every_workload_on_every_path_is_verified_and_counted(name: str, path: str,
                                                               tmp_path: Path) -> None:
    counts = run_workload(name, path, IOS, SMALL[name], tmp_path)
    assert counts.verified and counts.path == path and counts.ios == IOS
    assert counts.wall_ns > 0
    assert counts.trace is not None and counts.trace.is_file()
    if path.startswith("pv"):
        # A PV guest has no VMCS: every cost is a hypercall, an event or a backend's work.
        assert counts.vmexits == 0 and counts.exits_by_reason == {} and counts.ioreqs == 0
        assert counts.hypercalls >= 1
    else:
        assert counts.vmexits == sum(counts.exits_by_reason.values()) >= IOS
        assert counts.domain_switches == 2 * counts.ioreqs
        assert counts.grant_ops == counts.page_flips == 0


def test_the_counts_are_the_trace_records_between_the_markers(tmp_path: Path) -> None:
    counts = run_workload("port-dm", "hvm", 5, None, tmp_path)
    assert counts.trace is not None
    ports = [r.get("port") for r in read_trace(counts.trace)]
    first, last = ports.index(0xE9), len(ports) - 1 - ports[::-1].index(0xE9)
    # The report lines after the end marker also use 0xE9 (writes): the phase is what lies
    # between the first two reads of it.
    reads = [i for i, r in enumerate(read_trace(counts.trace))
             if r.get("port") == 0xE9 and r.get("direction") == "in"]
    assert len(reads) == 2 and first == reads[0] and last > reads[1]
    assert counts.vmexits == reads[1] - reads[0] - 1 == 5
    assert counts.ioreqs == 5 and counts.exits_by_reason == {"IO_INSTRUCTION": 5}


def test_disk_read_without_string_io_exits_once_a_word(tmp_path: Path) -> None:
    size = 2048
    nostring = run_workload("disk-read", "hvm-nostring", 2, size, tmp_path)
    string = run_workload("disk-read", "hvm", 2, size, tmp_path)
    pv = run_workload("disk-read", "pv", 2, size, tmp_path)
    sectors = size // 512
    # One `in ax, dx` a word, plus a few task-file writes and status reads a request.
    assert size // 2 <= per_io(nostring, "vmexits") <= size // 2 + 2 * sectors + 8
    assert nostring.bytes_copied == 0
    # `rep insw`: one exit (one ioreq, the buffer copied by the device model) a sector.
    assert sectors <= per_io(string, "vmexits") <= 2 * sectors + 8
    assert string.ioreqs == string.vmexits
    assert string.bytes_copied == 2 * size
    # blkfront: no exit at all; at most one notification a request; the data pages mapped
    # and unmapped by blkback, never copied.
    assert pv.vmexits == 0 and pv.ioreqs == 0
    assert pv.evtchn_notifications <= pv.ios
    assert pv.grant_ops == 2 * pv.ios and pv.bytes_copied == 0


def test_pv_disk_batching_needs_fewer_notifications(tmp_path: Path) -> None:
    one = run_workload("disk-read", "pv", 8, 512, tmp_path, batch=1)
    eight = run_workload("disk-read", "pv", 8, 512, tmp_path, batch=8)
    assert 1 <= one.evtchn_notifications <= 8
    assert eight.evtchn_notifications == 1 < one.evtchn_notifications
    assert per_io(eight, "domain_switches") < per_io(one, "domain_switches")


def test_pv_disk_request_larger_than_one_blkif_request(tmp_path: Path) -> None:
    # 48 KiB = 12 pages: two blkif requests (11 segments at most) for one I/O.
    counts = run_workload("disk-write", "pv", 2, 48 * 1024, tmp_path, batch=2)
    assert counts.grant_ops == 2 * 12 * 2
    assert counts.evtchn_notifications == 1


def test_net_receive_by_flipping_copies_nothing(tmp_path: Path) -> None:
    size = 1514
    flip = run_workload("net-recv", "pv-flip", 4, size, tmp_path)
    copy = run_workload("net-recv", "pv", 4, size, tmp_path)
    hvm = run_workload("net-recv", "hvm", 4, size, tmp_path)
    assert flip.page_flips == 4 and flip.bytes_copied == 0
    assert copy.page_flips == 0 and copy.bytes_copied == 4 * size
    assert per_io(copy, "bytes_copied") >= size
    # The NE2000 raised IRQ 9 at least once; every frame came through remote DMA ioreqs.
    assert hvm.interrupts >= 1 and per_io(hvm, "ioreqs") >= 10
    assert hvm.bytes_copied >= 4 * size


def test_net_send_copies_each_frame_once_on_pv(tmp_path: Path) -> None:
    pv = run_workload("net-send", "pv", 4, 300, tmp_path, batch=4)
    hvm = run_workload("net-send", "hvm", 4, 300, tmp_path)
    assert pv.bytes_copied == 4 * 300 and pv.grant_ops == 4
    assert pv.evtchn_notifications == 1
    assert per_io(hvm, "ioreqs") >= 10 and hvm.bytes_copied == 4 * 300


def test_console_costs_an_exit_a_byte_on_hvm_and_a_notification_a_line_on_pv(
        tmp_path: Path) -> None:
    hvm = run_workload("console", "hvm", 3, 40, tmp_path)
    pv = run_workload("console", "pv", 3, 40, tmp_path)
    assert per_io(hvm, "vmexits") >= 40 and hvm.ioreqs == hvm.vmexits
    # One EVTCHNOP_send a line; the final flush sends one more if the backend has not read
    # everything yet.
    assert pv.vmexits == 0 and 3 <= pv.evtchn_notifications <= 4


def test_microbenchmarks_cost_what_they_say(tmp_path: Path) -> None:
    hv = run_workload("port-hv", "hvm", 6, None, tmp_path)
    dm = run_workload("port-dm", "hvm", 6, None, tmp_path)
    assert hv.vmexits == 6 and hv.ioreqs == 0 and hv.domain_switches == 0
    assert dm.vmexits == 6 and dm.ioreqs == 6 and dm.domain_switches == 12
    vmcall = run_workload("hypercall", "hvm", 6, None, tmp_path)
    int82 = run_workload("hypercall", "pv", 6, None, tmp_path)
    assert vmcall.exits_by_reason == {"VMCALL": 6} and vmcall.hypercalls == 6
    assert int82.hypercalls == 6 and int82.evtchn_notifications == 0
    echo = run_workload("evtchn", "pv", 6, None, tmp_path)
    # Each round trip: EVTCHNOP_send, then SCHEDOP_poll until Dom0's echo arrives (no poll
    # when the echo was quicker than the guest); each poll an event ended is a switch back.
    assert echo.evtchn_notifications == 6 and 6 <= echo.hypercalls <= 12
    assert echo.domain_switches == echo.hypercalls


@pytest.mark.parametrize("path", ["hvm", "pv"])
def test_a_corrupted_disk_fails_the_workload(path: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = workload_runners.make_disk_image

    def corrupted(image: Path, sectors: int, pattern: bool) -> None:
        real(image, sectors, pattern)
        data = bytearray(image.read_bytes())
        data[700] ^= 0x01  # sector 1, one bit
        image.write_bytes(bytes(data))

    monkeypatch.setattr(workload_runners, "make_disk_image", corrupted)
    with pytest.raises(WorkloadError, match="checksum"):
        run_workload("disk-read", path, 2, 1024, tmp_path)


def test_frames_other_than_expected_fail_the_workload(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def shifted(sequence: int, size: int, **kw: bytes) -> bytes:
        return frame(sequence + 1, size, **kw)

    monkeypatch.setattr(workload_runners, "frame", shifted)
    with pytest.raises(WorkloadError, match="capture"):
        run_workload("net-send", "hvm", 2, 100, tmp_path)


def test_bad_parameters_are_refused_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        run_workload("disk", "hvm", 1)
    with pytest.raises(ValueError, match="no path"):
        run_workload("evtchn", "hvm", 1)
    with pytest.raises(ValueError, match="multiple of 512"):
        run_workload("disk-read", "hvm", 1, 1000)
    with pytest.raises(ValueError, match="blkif"):
        run_workload("disk-read", "pv", 1, 65536, batch=32)
    with pytest.raises(ValueError, match="60..1514"):
        run_workload("net-send", "pv", 1, 2000)
    with pytest.raises(ValueError, match="ios"):
        run_workload("hypercall", "pv", 0)


def test_patterns_are_what_the_guests_build() -> None:
    assert console_line(0x1A, 14) == b"0000001a:jklm\n"
    sector = sector_pattern(3, 1)
    assert sector[:4] == b"\x03\x00\x00\x00" and sector[4] == 7 and sector[511] == (511 + 3) & 0xFF
    f = frame(2, 64)
    assert f[:6] == b"\xff" * 6 and f[12:14] == b"\x88\xb5" and f[14:18] == b"\x02\0\0\0"
    assert f[18] == 20 and len(f) == 64
    # Continuing a checksum over a second piece gives the checksum of the whole.
    data = bytes(range(200))
    assert checksum(data[80:], 80, checksum(data[:80])) == checksum(data)
    assert checksum(b"\x01\x01") == 1 + 3
