"""pcap writer: header bytes by hand, a round trip with clock timestamps, and tshark when it is installed."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from devicemodel.clock import ManualClock
from devicemodel.pcap import PcapWriter, read_pcap

FRAMES = [
    bytes.fromhex("ffffffffffff525400123456") + b"\x08\x06" + bytes(range(46)),
    bytes.fromhex("525400123456020000000001") + b"\x08\x00" + bytes(range(200)) * 3,
]


def write_capture(path: Path) -> list[int]:
    clock = ManualClock(1_700_000_000 * 10**9)
    stamps = []
    with PcapWriter(path, clock) as pcap:
        for frame in FRAMES:
            clock.advance(1_234_567_891)
            stamps.append(clock.now_ns())
            pcap.write(frame)
    return stamps


def test_file_header_bytes(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    write_capture(path)
    raw = path.read_bytes()
    assert raw[:4] == b"\xd4\xc3\xb2\xa1"  # 0xa1b2c3d4 little-endian: usec timestamps
    magic, major, minor, zone, sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", raw)
    assert (major, minor, zone, sigfigs, snaplen, linktype) == (2, 4, 0, 0, 65535, 1)
    # First record header: seconds, microseconds, captured and original length.
    sec, usec, incl, orig = struct.unpack_from("<IIII", raw, 24)
    assert (sec, usec) == (1_700_000_001, 234_567)
    assert incl == orig == len(FRAMES[0])
    assert raw[40 : 40 + incl] == FRAMES[0]
    assert len(raw) == 24 + sum(16 + len(f) for f in FRAMES)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    stamps = write_capture(path)
    records = read_pcap(path)
    assert [frame for _, frame in records] == FRAMES
    # pcap keeps microseconds: nanoseconds below that are cut off.
    assert [ts for ts, _ in records] == [s // 1000 * 1000 for s in stamps]


def test_snaplen_cuts_frames_and_fileobj_stays_open(tmp_path: Path) -> None:
    buf = io.BytesIO()
    pcap = PcapWriter(buf, ManualClock(), snaplen=20)
    pcap.write(FRAMES[1])
    pcap.close()
    assert not buf.closed
    raw = buf.getvalue()
    _, _, incl, orig = struct.unpack_from("<IIII", raw, 24)
    assert (incl, orig) == (20, len(FRAMES[1]))
    path = tmp_path / "cut.pcap"
    path.write_bytes(raw)
    assert read_pcap(path) == [(0, FRAMES[1][:20])]
    with pytest.raises(ValueError):
        pcap.write(FRAMES[0])


def test_read_pcap_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(b"not a capture file at all")
    with pytest.raises(ValueError, match="not a pcap"):
        read_pcap(path)
    good = tmp_path / "good.pcap"
    write_capture(good)
    path.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_pcap(path)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_reads_the_capture(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    write_capture(path)
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.len", "-e", "eth.src"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    rows = [line.split("\t") for line in out if line.strip()]
    assert [int(r[0]) for r in rows] == [len(f) for f in FRAMES]
    assert [r[1] for r in rows] == ["52:54:00:12:34:56", "02:00:00:00:00:01"]
