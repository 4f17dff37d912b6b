"""Tests of VMExit trace export to CSV and Perfetto trace-event JSON (hvm/trace_export.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from hvm.trace_export import CSV_FIELDS, export_csv, export_perfetto
from hvm.trace_summary import read_trace


def io_exit(seq: int, t_ns: int, latency_ns: int, port: int, direction: str, *, vcpu: int = 0,
            rep_count: int | None = None, data: int | None = 0x41) -> dict[str, Any]:
    string = rep_count is not None
    # Exit qualification for I/O (SDM Vol. 3C table 28-5): size-1, bit 3 IN, 4 string,
    # 5 REP, port in bits 31:16.
    qualification = ((8 if direction == "in" else 0) | (48 if string else 0) | (port << 16))
    return {
        "seq": seq, "t_ns": t_ns, "vcpu": vcpu, "reason": "IO_INSTRUCTION", "reason_code": 30,
        "qualification": qualification, "rip": 0x100000 + 4 * seq,
        "insn": ("rep outsb" if string else "out dx, al") if direction == "out"
        else ("rep insb" if string else "in al, dx"),
        "handled_by": "hypervisor" if port == 0xE9 else "device-model",
        "latency_ns": latency_ns, "port": port, "size": 1, "direction": direction,
        "string": string, "rep": string, "count": rep_count if string else 1,
        "data": None if string else data,
    }


def plain_exit(seq: int, t_ns: int, latency_ns: int, reason: str, code: int, insn: str,
               vcpu: int = 0) -> dict[str, Any]:
    return {
        "seq": seq, "t_ns": t_ns, "vcpu": vcpu, "reason": reason, "reason_code": code,
        "qualification": 0, "rip": 0x100000 + 4 * seq, "insn": insn,
        "handled_by": "hypervisor", "latency_ns": latency_ns,
    }


def fixture_records() -> list[dict[str, Any]]:
    records = [
        io_exit(0, 2_000, 1_250, 0xE9, "out", data=0x4F),
        plain_exit(1, 6_001, 1_999, "CPUID", 10, "cpuid", vcpu=1),
        io_exit(2, 10_500, 9_333, 0x3F8, "out"),
        io_exit(3, 25_000, 3_000, 0xE9, "out", rep_count=12),
        io_exit(4, 31_007, 7_777, 0x71, "in", vcpu=1, data=0x23),
        plain_exit(5, 40_000, 500, "HLT", 12, "hlt"),
    ]
    # Fields a later writer may add; exporters must not choke on them.
    records[2]["ioreq"] = {"type": 0, "addr": 0x3F8, "size": 1, "state": 3}
    records[2]["steps"] = {
        "vmexit": 10_500,
        "ioreq_ready": 10_900,
        "dm_dispatch": 14_000,
        "ioresp_ready": 18_500,
        "vmentry": 19_833,
    }
    return records


@pytest.fixture
def records() -> list[dict[str, Any]]:
    return fixture_records()


@pytest.fixture
def trace_file(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    path = tmp_path / "run.trace"
    lines = [{"trace": "hvmlab", "version": 1, "guest": "uart.asm", "mode": "protected"},
             *records, {"summary": {"exits": len(records)}}]
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines), encoding="utf-8")
    return path


# --- CSV -------------------------------------------------------------------------------

def test_csv_round_trip(trace_file: Path, records: list[dict]) -> None:
    out = io.StringIO()
    rows_written = export_csv(read_trace(trace_file), out)
    out.seek(0)
    reader = csv.DictReader(out)
    rows = list(reader)

    assert rows_written == len(records) == len(rows)
    assert tuple(reader.fieldnames or ()) == CSV_FIELDS
    int_fields = ("seq", "t_ns", "vcpu", "reason_code", "qualification", "rip", "latency_ns",
                  "port", "size", "count")
    for record, row in zip(records, rows, strict=True):
        for name in CSV_FIELDS:
            value = record.get(name)
            cell = row[name]
            if value is None:
                assert cell == ""
            elif isinstance(value, bool):
                assert cell == ("true" if value else "false")
            elif name in int_fields or name == "data":
                assert int(cell) == value
            else:
                assert cell == value


def test_csv_header_is_fixed_even_without_io(records: list[dict]) -> None:
    out = io.StringIO()
    export_csv([r for r in records if "port" not in r], out)
    out.seek(0)
    reader = csv.DictReader(out)
    rows = list(reader)
    assert tuple(reader.fieldnames or ()) == CSV_FIELDS
    assert all(row["port"] == "" and row["direction"] == "" for row in rows)


def test_csv_leaves_out_unknown_fields(records: list[dict]) -> None:
    out = io.StringIO()
    export_csv(records, out)
    header = out.getvalue().splitlines()[0].split(",")
    assert "ioreq" not in header and "steps" not in header


def test_csv_quotes_insn_text_with_commas(records: list[dict]) -> None:
    # capstone text like "out dx, al" contains a comma: it must survive as one cell.
    out = io.StringIO()
    export_csv(records, out)
    out.seek(0)
    assert [row["insn"] for row in csv.DictReader(out)] == [r["insn"] for r in records]


def test_csv_empty_trace_has_header_only() -> None:
    out = io.StringIO()
    assert export_csv([], out) == 0
    assert out.getvalue().splitlines() == [",".join(CSV_FIELDS)]


# --- Perfetto --------------------------------------------------------------------------

def perfetto(records: list[dict], **kwargs: Any) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    n = export_perfetto(records, out, **kwargs)
    return n, json.loads(out.getvalue())


def exit_events(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and e.get("cat") == "vmexit"]


def test_perfetto_one_complete_event_per_exit(trace_file: Path, records: list[dict]) -> None:
    out = io.StringIO()
    n = export_perfetto(read_trace(trace_file), out)
    doc = json.loads(out.getvalue())

    assert doc["displayTimeUnit"] == "ns"
    events = exit_events(doc)
    assert n == len(records) == len(events)
    for record, event in zip(records, events, strict=True):
        assert event["pid"] == 1
        assert event["tid"] == record["vcpu"]
        assert event["ts"] == pytest.approx(record["t_ns"] / 1000, abs=1e-9)
        assert event["dur"] == pytest.approx(record["latency_ns"] / 1000, abs=1e-9)
        assert event["args"]["seq"] == record["seq"]
        assert event["args"]["insn"] == record["insn"]
        assert int(event["args"]["rip"], 16) == record["rip"]
        assert int(event["args"]["qualification"], 16) == record["qualification"]


def test_perfetto_event_names(records: list[dict]) -> None:
    _, doc = perfetto(records)
    names = [e["name"] for e in exit_events(doc)]
    expected = [
        f"{r['reason']} {r['direction']} {r['port']:#x}" if "port" in r else r["reason"]
        for r in records
    ]
    assert names == expected
    assert "IO_INSTRUCTION out 0xe9" in names


def test_perfetto_metadata_names_process_and_vcpus(records: list[dict]) -> None:
    _, doc = perfetto(records, process_name="uart-guest")
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    process = [e for e in meta if e["name"] == "process_name"]
    assert [(e["pid"], e["args"]["name"]) for e in process] == [(1, "uart-guest")]
    threads = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert threads == {v: f"vCPU {v}" for v in {r["vcpu"] for r in records}}


def test_perfetto_steps_become_nested_slices(records: list[dict]) -> None:
    _, doc = perfetto(records)
    record = next(r for r in records if "steps" in r)
    parent = next(e for e in exit_events(doc) if e["args"]["seq"] == record["seq"])
    steps = [e for e in doc["traceEvents"] if e.get("cat") == "step"]
    times = list(record["steps"].items())

    assert [e["name"] for e in steps] == [name for name, _ in times[:-1]]
    for event, (name, t_from), (next_name, t_to) in zip(steps, times, times[1:], strict=False):
        assert event["ph"] == "X"
        assert event["tid"] == parent["tid"]
        assert event["ts"] == pytest.approx(t_from / 1000, abs=1e-9)
        assert event["dur"] == pytest.approx((t_to - t_from) / 1000, abs=1e-9)
        assert (event["args"]["from"], event["args"]["to"]) == (name, next_name)
        # Inside the exit's slice, so the viewer stacks it under the exit.
        assert event["ts"] >= parent["ts"] - 1e-9
        assert event["ts"] + event["dur"] <= parent["ts"] + parent["dur"] + 1e-9


def test_perfetto_steps_outside_the_exit_are_clipped() -> None:
    record = io_exit(0, 1_000, 2_000, 0x3F8, "out")
    record["steps"] = {"early": 500, "mid": 1_800, "late": 4_000}
    _, doc = perfetto([record])
    steps = [e for e in doc["traceEvents"] if e.get("cat") == "step"]
    assert [(e["name"], e["ts"], e["dur"]) for e in steps] == [
        ("early", pytest.approx(1.0), pytest.approx(0.8)),
        ("mid", pytest.approx(1.8), pytest.approx(1.2)),
    ]
    # The recorded times are kept, unclipped, in the args.
    assert steps[0]["args"]["from_ns"] == 500
    assert steps[1]["args"]["to_ns"] == 4_000


def test_perfetto_empty_trace_is_valid_json() -> None:
    n, doc = perfetto([])
    assert n == 0
    assert exit_events(doc) == []
    assert [e["name"] for e in doc["traceEvents"]] == ["process_name"]
