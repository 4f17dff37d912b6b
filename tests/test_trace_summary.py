"""Tests of the VMExit trace reader and its perf-kvm-stat-shaped summary (hvm/trace_summary.py)."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from hvm.trace_summary import (
    TraceError,
    read_trace,
    render_summary,
    summarize,
    summary_to_dict,
)

# Basic exit reasons (Intel SDM Vol. 3C appendix C).
EXIT_CODES = {"CPUID": 10, "HLT": 12, "VMCALL": 18, "IO_INSTRUCTION": 30}


def io_qualification(port: int, size: int, direction: str, string: bool, rep: bool) -> int:
    """Exit qualification for I/O instructions (SDM Vol. 3C table 28-5), DX-encoded port."""
    return (
        (size - 1)
        | (8 if direction == "in" else 0)
        | (16 if string else 0)
        | (32 if rep else 0)
        | (port << 16)
    )


def io_exit(seq: int, t_ns: int, latency_ns: int, port: int, direction: str, *, vcpu: int = 0,
            size: int = 1, rep_count: int | None = None, data: int | None = 0x41,
            handled_by: str = "hypervisor") -> dict[str, Any]:
    string = rep_count is not None
    if string:
        insn = "rep outsb" if direction == "out" else "rep insb"
    else:
        insn = "out dx, al" if direction == "out" else "in al, dx"
    return {
        "seq": seq, "t_ns": t_ns, "vcpu": vcpu, "reason": "IO_INSTRUCTION",
        "reason_code": EXIT_CODES["IO_INSTRUCTION"],
        "qualification": io_qualification(port, size, direction, string, string),
        "rip": 0x7C00 + 2 * seq, "insn": insn, "handled_by": handled_by,
        "latency_ns": latency_ns, "port": port, "size": size, "direction": direction,
        "string": string, "rep": string, "count": rep_count if string else 1,
        "data": None if string else data,
    }


def plain_exit(seq: int, t_ns: int, latency_ns: int, reason: str, insn: str,
               vcpu: int = 0) -> dict[str, Any]:
    return {
        "seq": seq, "t_ns": t_ns, "vcpu": vcpu, "reason": reason,
        "reason_code": EXIT_CODES[reason], "qualification": 0, "rip": 0x7C00 + 2 * seq,
        "insn": insn, "handled_by": "hypervisor", "latency_ns": latency_ns,
    }


def fixture_records() -> list[dict[str, Any]]:
    records = [
        io_exit(0, 1_000, 1_500, 0xE9, "out", data=0x48),
        io_exit(1, 5_000, 1_700, 0xE9, "out", data=0x69),
        plain_exit(2, 9_000, 2_100, "CPUID", "cpuid"),
        io_exit(3, 14_000, 9_000, 0x3F8, "out", handled_by="device-model"),
        io_exit(4, 30_000, 11_000, 0x3FD, "in", handled_by="device-model", data=0x60),
        io_exit(5, 45_000, 2_600, 0xE9, "out", rep_count=5),
        plain_exit(6, 50_000, 1_900, "CPUID", "cpuid", vcpu=1),
        io_exit(7, 55_000, 8_000, 0x3FD, "in", handled_by="device-model", data=0x20),
        plain_exit(8, 70_000, 4_000, "VMCALL", "vmcall", vcpu=1),
        plain_exit(9, 80_000, 900, "HLT", "hlt"),
    ]
    # A field a later writer may add: readers must carry on regardless.
    records[3]["ioreq"] = {"type": 0, "addr": 0x3F8, "state": 3}
    return records


def write_trace(path: Path, records: list[dict[str, Any]], *, header: bool = True,
                footer: bool = True) -> Path:
    lines = []
    if header:
        lines.append({"trace": "hvmlab", "version": 1, "guest": "hello.asm", "mode": "real"})
    lines.extend(records)
    if footer:
        lines.append({"summary": {"exits": len(records), "status": 0}})
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines), encoding="utf-8")
    return path


@pytest.fixture
def records() -> list[dict[str, Any]]:
    return fixture_records()


@pytest.fixture
def trace_file(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    return write_trace(tmp_path / "run.trace", records)


def rendered(summary: Any) -> str:
    console = Console(record=True, width=120)
    render_summary(summary, console)
    return console.export_text()


# --- reading ---------------------------------------------------------------------------

def test_read_trace_skips_header_and_footer(trace_file: Path, records: list[dict]) -> None:
    assert list(read_trace(trace_file)) == records


def test_read_trace_without_header_or_footer(tmp_path: Path, records: list[dict]) -> None:
    path = write_trace(tmp_path / "bare.trace", records, header=False, footer=False)
    assert [r["seq"] for r in read_trace(path)] == [r["seq"] for r in records]


def test_read_trace_skips_blank_lines(tmp_path: Path, records: list[dict]) -> None:
    path = tmp_path / "gaps.trace"
    path.write_text("\n".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert len(list(read_trace(path))) == len(records)


def test_missing_file_raises_trace_error_at_once(tmp_path: Path) -> None:
    missing = tmp_path / "nope.trace"
    with pytest.raises(TraceError) as info:
        read_trace(missing)
    assert str(missing) in str(info.value)


def test_directory_is_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(TraceError):
        read_trace(tmp_path)


@pytest.mark.parametrize(
    ("bad_line", "mentions"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2, 3]", "JSON object"),
        (json.dumps({"seq": 2, "t_ns": 5, "vcpu": 0, "reason": "HLT"}), "latency_ns"),
        (json.dumps({"seq": 2, "t_ns": 5, "vcpu": "0", "reason": "HLT", "latency_ns": 1}),
         "vcpu"),
        (json.dumps({"seq": 2, "t_ns": 5, "vcpu": True, "reason": "HLT", "latency_ns": 1}),
         "vcpu"),
        (json.dumps({"seq": 2, "t_ns": 5, "vcpu": 0, "reason": "HLT", "latency_ns": -3}),
         "negative"),
        (json.dumps({"seq": 2, "t_ns": 5, "vcpu": 0, "reason": "IO_INSTRUCTION",
                     "latency_ns": 1, "port": 233, "direction": "sideways"}), "direction"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, records: list[dict],
                                            bad_line: str, mentions: str) -> None:
    path = tmp_path / "bad.trace"
    header = json.dumps({"trace": "hvmlab", "version": 1, "guest": "g.asm", "mode": "real"})
    # Header on line 1, two good records on lines 2-3, the bad one on line 4.
    path.write_text("\n".join([header, json.dumps(records[0]), json.dumps(records[1]),
                               bad_line, json.dumps(records[2])]) + "\n", encoding="utf-8")
    reader = read_trace(path)
    assert next(reader) == records[0]
    assert next(reader) == records[1]
    with pytest.raises(TraceError) as info:
        next(reader)
    message = str(info.value)
    assert message.startswith(f"{path}:4: not a trace record")
    assert mentions in message
    assert "\n" not in message


def test_trace_error_is_a_value_error() -> None:
    assert issubclass(TraceError, ValueError)


# --- summarising -----------------------------------------------------------------------

def test_per_reason_counts_and_times(trace_file: Path, records: list[dict]) -> None:
    summary = summarize(read_trace(trace_file))
    latencies: dict[str, list[int]] = defaultdict(list)
    for r in records:
        latencies[r["reason"]].append(r["latency_ns"])

    assert summary.total_samples == len(records)
    assert summary.total_ns == sum(r["latency_ns"] for r in records)
    assert {s.reason: s.samples for s in summary.by_reason} == dict(
        Counter(r["reason"] for r in records))
    for stats in summary.by_reason:
        values = latencies[stats.reason]
        assert stats.total_ns == sum(values)
        assert stats.min_ns == min(values)
        assert stats.max_ns == max(values)
        assert stats.avg_ns == pytest.approx(sum(values) / len(values))


def test_reasons_sorted_by_samples_descending(records: list[dict]) -> None:
    summary = summarize(records)
    samples = [s.samples for s in summary.by_reason]
    assert samples == sorted(samples, reverse=True)
    assert summary.by_reason[0].reason == Counter(r["reason"] for r in records).most_common(1)[0][0]


def test_stddev_is_relative_stddev_of_the_mean(records: list[dict]) -> None:
    # perf prints the standard deviation of the mean (s / sqrt(n)) as a percent of the mean.
    summary = summarize(records)
    for stats in summary.by_reason:
        values = [r["latency_ns"] for r in records if r["reason"] == stats.reason]
        if len(values) < 2:
            assert stats.stddev_pct == 0.0
            continue
        expected = 100 * statistics.stdev(values) / math.sqrt(len(values)) / statistics.mean(values)
        assert stats.stddev_pct == pytest.approx(expected)


def test_per_port_aggregation(records: list[dict]) -> None:
    summary = summarize(records)
    expected: dict[tuple[int, str], dict[str, int]] = defaultdict(
        lambda: {"samples": 0, "count": 0, "total_ns": 0})
    for r in records:
        if "port" in r:
            e = expected[(r["port"], r["direction"])]
            e["samples"] += 1
            e["count"] += r["count"]
            e["total_ns"] += r["latency_ns"]

    got = {(p.port, p.direction): {"samples": p.samples, "count": p.count,
                                   "total_ns": p.total_ns} for p in summary.by_port}
    assert got == expected
    # The rep outsb moved several elements in one exit: elements exceed exits on 0xE9.
    e9 = next(p for p in summary.by_port if p.port == 0xE9 and p.direction == "out")
    assert e9.count > e9.samples
    assert summary.io_samples == sum(1 for r in records if "port" in r)


def test_in_and_out_on_one_port_are_separate_rows() -> None:
    recs = [io_exit(0, 0, 100, 0x70, "out"), io_exit(1, 200, 300, 0x70, "in")]
    summary = summarize(recs)
    assert sorted((p.port, p.direction, p.samples) for p in summary.by_port) == [
        (0x70, "in", 1), (0x70, "out", 1)]


def test_empty_trace(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "empty.trace", [])
    summary = summarize(read_trace(path))
    assert summary.total_samples == 0
    assert summary.by_reason == [] and summary.by_port == []
    assert "No VM exits" in rendered(summary)
    assert summary_to_dict(summary)["total_samples"] == 0


# --- rendering -------------------------------------------------------------------------

def _row(text: str, first_cell: str) -> str:
    rows = [line for line in text.splitlines() if line.split()[:1] == [first_cell]]
    assert len(rows) == 1, f"expected one row for {first_cell!r} in:\n{text}"
    return rows[0]


def test_reason_table_rows(records: list[dict]) -> None:
    summary = summarize(records)
    text = rendered(summary)
    for column in ("VM-EXIT", "Samples", "Samples%", "Time%", "Min Time", "Max Time",
                   "Avg time"):
        assert column in text
    total_ns = sum(r["latency_ns"] for r in records)
    for reason, n in Counter(r["reason"] for r in records).items():
        values = [r["latency_ns"] for r in records if r["reason"] == reason]
        cells = _row(text, reason).split()
        assert cells[1] == str(n)
        assert cells[2] == f"{100 * n / len(records):.2f}%"
        assert cells[3] == f"{100 * sum(values) / total_ns:.2f}%"
        assert cells[4] == f"{min(values) / 1000:.2f}us"
        assert cells[5] == f"{max(values) / 1000:.2f}us"
        assert cells[6] == f"{sum(values) / len(values) / 1000:.2f}us"
        assert "+-" in _row(text, reason)


def test_port_table_rows(records: list[dict]) -> None:
    text = rendered(summarize(records))
    for column in ("Port", "Dir", "Exits", "Elements"):
        assert column in text
    io = [r for r in records if "port" in r]
    for port, direction in {(r["port"], r["direction"]) for r in io}:
        mine = [r for r in io if r["port"] == port and r["direction"] == direction]
        rows = [line.split() for line in text.splitlines()
                if line.split()[:2] == [f"{port:#06x}", direction]]
        assert len(rows) == 1, text
        cells = rows[0]
        assert cells[2] == str(len(mine))
        assert cells[3] == str(sum(r["count"] for r in mine))
        assert cells[4] == f"{100 * len(mine) / len(io):.2f}%"
        avg = sum(r["latency_ns"] for r in mine) / len(mine)
        assert cells[5] == f"{avg / 1000:.2f}us"


def test_no_port_table_without_io() -> None:
    text = rendered(summarize([plain_exit(0, 0, 500, "CPUID", "cpuid")]))
    assert "CPUID" in text
    assert "Port" not in text


# --- JSON ------------------------------------------------------------------------------

def test_summary_to_dict_is_json_and_matches(records: list[dict]) -> None:
    summary = summarize(records)
    data = json.loads(json.dumps(summary_to_dict(summary)))
    assert data["total_samples"] == len(records)
    assert data["total_ns"] == sum(r["latency_ns"] for r in records)
    by_reason = {row["reason"]: row for row in data["by_reason"]}
    for reason, n in Counter(r["reason"] for r in records).items():
        assert by_reason[reason]["samples"] == n
        assert by_reason[reason]["samples_pct"] == pytest.approx(100 * n / len(records))
    assert sum(row["samples_pct"] for row in data["by_reason"]) == pytest.approx(100)
    assert sum(row["time_pct"] for row in data["by_reason"]) == pytest.approx(100)
    ports = {(row["port"], row["direction"]): row for row in data["by_port"]}
    assert set(ports) == {(r["port"], r["direction"]) for r in records if "port" in r}
    assert sum(row["samples_pct"] for row in data["by_port"]) == pytest.approx(100)
