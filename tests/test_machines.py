"""Machines with several domains (`hvmlab up`) and single PV runs (`hvmlab run --pv`), checked on
the disk image, the pcap and the console."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from devicemodel.pcap import read_pcap

EXAMPLES = Path(__file__).parent.parent / "examples"
SECTOR = 512


def hvmlab(*args: str, cwd: Path | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def blk_pattern(sector: int) -> bytes:
    text = f"hvmlab pv blk sector {sector}".encode()
    return text + bytes(i & 0xFF for i in range(len(text), SECTOR))


def test_pv_blk_machine_writes_flushes_and_reads_back(tmp_path):
    proc = hvmlab("up", str(EXAMPLES / "pv-blk.toml"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "[blk] Test result: SUCCESS" in proc.stdout
    assert "ended by shutdown_poweroff" in proc.stderr
    image = (tmp_path / "pv-blk.img").read_bytes()
    assert len(image) == 1 << 20
    written = {5, 8, 9, 10, 11}
    for sector in written:
        assert image[sector * SECTOR:(sector + 1) * SECTOR] == blk_pattern(sector), sector
    untouched = bytearray(image)
    for sector in written:
        untouched[sector * SECTOR:(sector + 1) * SECTOR] = bytes(SECTOR)
    assert not any(untouched)  # nothing else changed


def test_pv_net_machine_exchanges_frames_by_copy_and_by_flip(tmp_path):
    proc = hvmlab("up", str(EXAMPLES / "pv-net.toml"), "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [d["ended_by"] for d in result["domains"]] == ["shutdown_poweroff"] * 2
    consoles = {d["name"]: d["console"] for d in result["domains"]}
    assert "hello from pv net 2" in consoles["net-copy"] and "rx by grant copy" in consoles["net-copy"]
    assert "hello from pv net 1" in consoles["net-flip"] and "rx by page flipping" in consoles["net-flip"]
    frames = [frame for _t, frame in read_pcap(tmp_path / "pv-net.pcap")]
    payloads = {frame[14:14 + 19] for frame in frames}
    assert payloads == {b"hello from pv net 1", b"hello from pv net 2"}
    assert all(frame[12:14] == b"\x88\xb5" and frame[:6] == b"\xff" * 6 for frame in frames)


def test_machine_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[domain]]\nname = "x"\nkind = "pv"\nguest = "pv/hello"\ncolour = "blue"\n')
    proc = hvmlab("up", str(bad), "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown key(s) colour" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = hvmlab("up", str(tmp_path / "none.toml"))
    assert proc.returncode == 2 and "no such machine file" in proc.stderr
    bad.write_text('[[domain]]\nname = "x"\nkind = "pv"\nguest = "no-such-guest"\n')
    proc = hvmlab("up", str(bad), "--out", str(tmp_path))
    assert proc.returncode == 2 and "no shipped guest" in proc.stderr and "Traceback" not in proc.stderr


def test_run_pv_hello_and_its_hypercall_trace(tmp_path):
    trace = tmp_path / "pv.jsonl"
    proc = hvmlab("run", "pv/hello", "--pv", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert "start_info says xen-3.0-x86_32p" in proc.stdout
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    calls = [r for r in records if r.get("reason") == "HYPERCALL"]
    assert [r["hypercall"] for r in calls] == ["console_io", "sched_op"]
    assert all(r["reason_code"] == 256 + {"console_io": 18, "sched_op": 29}[r["hypercall"]] for r in calls)


def test_run_pv_blk_with_a_disk(tmp_path):
    disk = tmp_path / "xvda.img"
    disk.write_bytes(bytes(1 << 20))
    proc = hvmlab("run", "pv/blk", "--pv", "--disk", str(disk), "--json")
    result = json.loads(proc.stdout)
    assert result["ended_by"] == "shutdown_poweroff" and proc.returncode == 0
    assert disk.read_bytes()[5 * SECTOR:6 * SECTOR] == blk_pattern(5)
    missing = hvmlab("run", "pv/blk", "--pv", "--disk", str(tmp_path / "nope.img"))
    assert missing.returncode == 2 and "nope.img" in missing.stderr


def test_mixed_machine_pv_netfront_and_hvm_ne2000_on_one_bridge(tmp_path):
    proc = hvmlab("up", str(EXAMPLES / "mixed.toml"), "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    kinds = {d["kind"]: d for d in result["domains"]}
    assert kinds["pv"]["ended_by"] == "shutdown_poweroff" and kinds["hvm"]["exit_status"] == 0
    assert "hello from hvm ne2000" in kinds["pv"]["console"]
    assert "hello from pv net 1" in kinds["hvm"]["console"]
    payloads = {frame[14:].split(b"\0")[0] for _t, frame in read_pcap(tmp_path / "mixed.pcap")}
    assert {b"hello from pv net 1", b"hello from hvm ne2000"} <= payloads
