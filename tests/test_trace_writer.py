"""The trace writer: the offloaded writer process and the in-process writer produce the same bytes, and a lost writer is never silent."""

from __future__ import annotations

import enum
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

import hvm.trace as trace
from hvm.exit_reasons import NAMES
from hvm.trace import Record, TraceWriteError, TraceWriter, format_record

HEADER = {"guest": "edge", "mode": "protected"}
SUMMARY = {"ended_by": "halt", "exit_status": 0, "exits": {"IO_INSTRUCTION": 3}}

_BOOL_TEXT = {True: "true", False: "false"}


def reference_format(r: Record) -> str:
    """The line format as the trace has always had it (the in-thread writer before the offload)."""
    seq, t_ns, vcpu, code, qual, rip, insn_json, handled_by, latency, io, extra = r
    reason = NAMES.get(code, f"UNKNOWN_{code}")
    line = (f'{{"seq":{seq},"t_ns":{t_ns},"vcpu":{vcpu},"reason":"{reason}","reason_code":{code},'
            f'"qualification":{qual},"rip":{rip},"insn":{insn_json},"handled_by":"{handled_by}",'
            f'"latency_ns":{latency}')
    if io is not None:
        port, size, direction, string, rep, count, data = io
        line += (f',"port":{port},"size":{size},"direction":"{direction}","string":{_BOOL_TEXT[string]},'
                 f'"rep":{_BOOL_TEXT[rep]},"count":{count},"data":{"null" if data is None else data}')
    if extra:
        line += "," + json.dumps(extra, separators=(",", ":"))[1:-1]
    return line + "}\n"


class Leaf(enum.IntEnum):
    """An enum value in `extra`: JSON takes it, marshal does not."""

    SIGNATURE = 0x40000000


class InsnText(str):
    """A str subclass as instruction text: marshal refuses it as well."""


U64 = 2**64 - 1
EDGE: list[Record] = [
    (0, 1, 0, 30, 0x00E90000, 0x100009, '"out dx, al"', "hypervisor", 2900,
     (0xE9, 1, "out", False, False, 1, 0x41), None),
    (1, 2, 0, 30, 0x00E90030, 0x10000C, '"rep outsb"', "hypervisor", 3100,
     (0xE9, 1, "out", True, True, 4096, None), {"linear_address": 0x2000, "df": False}),
    (2, 3, 1, 30, 0xFFFF0009, U64, '"in eax, dx"', "device-model", 41000,
     (0xFFFF, 4, "in", False, False, 1, 0xFFFF_FFFF),
     {"ioreq": {"hex": "00" * 32, "answer_hex": "ff" * 32}, "steps": [["posted", 10], ["answered", 99]]}),
    (3, U64, 0, 12, 0, 0x10000F, '"hlt"', "hypervisor", 0, None, None),
    (4, 5, 0, 10, 0, 0x100010, '"cpuid"', "hypervisor", 700, None, {"leaf": 0x40000000, "subleaf": 0}),
    (5, 6, 0, 18, 0, 0x100012, '"vmcall"', "hypervisor", 900, None, {"hypercall": 17, "result": -38}),
    (6, 7, 0, 99, U64, U64, '"mov al, \'\u00e9\' ; \u2603 \U0001F600"', "hypervisor", U64, None,
     {"why": "d\u00e9j\u00e0 vu", "x": 1.5, "n": None, "ok": True}),
    (7, 8, 0, 2, 0, 0, '"\\u00e9"', "hypervisor", 1, None, {}),
    (8, 9, 0, 30, 0x00F40040, 0x100020, '"out 0xf4, al"', "hypervisor", 5,
     (0xF4, 1, "out", False, False, 1, 0), {"tsc": U64}),
]
# Marshal cannot carry these: they travel to the writer process as text lines.
ODD: list[Record] = [
    (9, 10, 0, 10, 0, 0x100030, '"cpuid"', "hypervisor", 800, None, {"leaf": Leaf.SIGNATURE}),
    (10, 11, 0, 30, 0x00E90000, 0x100009, InsnText('"out dx, al"'), "hypervisor", 2900,
     (0xE9, 1, "out", False, False, 1, 7), None),
]


def many(n: int, extra_every: int = 97) -> list[Record]:
    """n records like a long run: mostly one OUT exit site, with the edge cases mixed in."""
    records: list[Record] = []
    insn = '"out dx, al"'
    for seq in range(n):
        if seq % extra_every == 0:
            base = EDGE[(seq // extra_every) % len(EDGE)]
            records.append((seq, *base[1:]))
        else:
            records.append((seq, 1000 * seq, 0, 30, 0x00E90000, 0x100009, insn, "hypervisor",
                            2000 + seq % 300, (0xE9, 1, "out", False, False, 1, seq & 0xFF), None))
    return records


def write(path: Path, records: list[Record], offload: bool, summary: dict | None = SUMMARY) -> TraceWriter:
    writer = TraceWriter(path, HEADER, offload=offload)
    for r in records:
        writer.add(r)
    writer.close(summary)
    return writer


def expected_bytes(records: list[Record], summary: dict | None = SUMMARY) -> bytes:
    head = json.dumps({"trace": "hvmlab", "version": trace.TRACE_VERSION, **HEADER}) + "\n"
    foot = json.dumps({"summary": summary}) + "\n" if summary is not None else ""
    return (head + "".join(map(reference_format, records)) + foot).encode("utf-8")


@pytest.fixture
def spawns(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The writer processes started (their command lines)."""
    started: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(args, **kwargs):
        started.append(list(args))
        return real_popen(args, **kwargs)

    monkeypatch.setattr(trace.subprocess, "Popen", popen)
    return started


@pytest.fixture
def wait_for_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the writer wait for its process at the first chunk, so the process surely writes."""
    monkeypatch.setattr(trace, "MAX_BACKLOG", 0)
    monkeypatch.setattr(trace, "READY_TIMEOUT_S", 20.0)


def fake_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Replace the writer process by a shell script (it gets the descriptor number as $1)."""
    exe = tmp_path / "fake_writer.sh"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(trace, "WRITER_COMMAND", (str(exe),))


# -- the line format ---------------------------------------------------------------------------

@pytest.mark.parametrize("record", EDGE + ODD, ids=lambda r: f"seq{r[0]}")
def test_format_record_is_the_trace_line_format(record: Record) -> None:
    line = format_record(record)
    assert line == reference_format(record)
    obj = json.loads(line)
    assert obj["seq"] == record[0] and obj["rip"] == record[5] and obj["latency_ns"] == record[8]


def test_edge_values_read_back_exactly() -> None:
    hlt, weird = json.loads(format_record(EDGE[3])), json.loads(format_record(EDGE[6]))
    assert hlt["t_ns"] == 2**64 - 1 and "port" not in hlt
    assert weird["reason"] == "UNKNOWN_99" and weird["qualification"] == 2**64 - 1
    assert weird["insn"] == "mov al, '\u00e9' ; \u2603 \U0001F600" and weird["why"] == "d\u00e9j\u00e0 vu"
    string_io = json.loads(format_record(EDGE[1]))
    assert string_io["data"] is None and string_io["count"] == 4096 and string_io["rep"] is True
    assert "why" not in json.loads(format_record(EDGE[7]))  # an empty extra adds nothing


# -- offloaded and in-process writers write the same bytes ---------------------------------------

def test_offloaded_writer_process_writes_the_same_bytes(tmp_path: Path, spawns, wait_for_writer) -> None:
    records = many(6000) + ODD + EDGE
    off = write(tmp_path / "off.jsonl", records, offload=True)
    assert len(spawns) == 1 and spawns[0][-2:] == ["hvm.trace_sink", spawns[0][-1]]
    assert off.offloaded and off.offload_error is None  # the writer process wrote the lines
    sync = write(tmp_path / "sync.jsonl", records, offload=False)
    assert off.records == sync.records == len(records)
    data = (tmp_path / "off.jsonl").read_bytes()
    assert data == (tmp_path / "sync.jsonl").read_bytes() == expected_bytes(records)


def test_offloaded_without_waiting_is_still_complete(tmp_path: Path) -> None:
    # The default policy: nothing waits for the process to start; whichever side formats, the
    # file is whole when close() returns.
    records = many(20000)
    write(tmp_path / "off.jsonl", records, offload=True, summary=None)
    assert (tmp_path / "off.jsonl").read_bytes() == expected_bytes(records, summary=None)


def test_a_short_trace_starts_no_process(tmp_path: Path, spawns) -> None:
    records = EDGE + ODD
    writer = write(tmp_path / "short.jsonl", records, offload=True)
    assert spawns == []
    assert writer.records == len(records)
    assert (tmp_path / "short.jsonl").read_bytes() == expected_bytes(records)


def test_header_only_trace(tmp_path: Path) -> None:
    for offload in (True, False):
        path = tmp_path / f"empty-{offload}.jsonl"
        write(path, [], offload=offload, summary=None)
        assert path.read_bytes() == expected_bytes([], summary=None)


def test_flush_puts_lines_in_the_file_before_close(tmp_path: Path) -> None:
    for offload in (True, False):
        path = tmp_path / f"flush-{offload}.jsonl"
        writer = TraceWriter(path, HEADER, offload=offload)
        for r in EDGE:
            writer.add(r)
        writer.flush()
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["seq"] for line in lines[1:]] == [r[0] for r in EDGE]
        writer.close(SUMMARY)
        writer.close(SUMMARY)  # a second close changes nothing
        assert path.read_bytes() == expected_bytes(EDGE)


# -- when the writer process cannot help ----------------------------------------------------------

def test_falls_back_in_process_when_no_process_can_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(trace, "WRITER_COMMAND", (str(tmp_path / "no-such-python"),))
    records = many(3000)
    writer = write(tmp_path / "t.jsonl", records, offload=True)
    assert not writer.offloaded and "cannot start" in (writer.offload_error or "")
    assert (tmp_path / "t.jsonl").read_bytes() == expected_bytes(records)


def test_falls_back_when_the_process_ends_before_it_is_ready(tmp_path: Path, monkeypatch,
                                                            wait_for_writer) -> None:
    fake_writer(tmp_path, monkeypatch, "echo 'cannot import' >&2; exit 1")
    records = many(3000)
    writer = write(tmp_path / "t.jsonl", records, offload=True)
    assert not writer.offloaded
    assert "ended before it was ready" in (writer.offload_error or "")
    assert "cannot import" in (writer.offload_error or "")
    assert (tmp_path / "t.jsonl").read_bytes() == expected_bytes(records)


def test_falls_back_when_the_process_is_never_ready(tmp_path: Path, monkeypatch) -> None:
    fake_writer(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(trace, "MAX_BACKLOG", 0)
    monkeypatch.setattr(trace, "READY_TIMEOUT_S", 0.3)
    records = many(3000)
    writer = write(tmp_path / "t.jsonl", records, offload=True)
    assert not writer.offloaded and "not ready within" in (writer.offload_error or "")
    assert (tmp_path / "t.jsonl").read_bytes() == expected_bytes(records)


def test_a_writer_that_dies_is_an_error(tmp_path: Path, monkeypatch, wait_for_writer) -> None:
    fake_writer(tmp_path, monkeypatch, "echo ready; head -c 100 >/dev/null; echo 'disk full' >&2; exit 3")
    writer = TraceWriter(tmp_path / "t.jsonl", HEADER)
    for r in many(6000):
        writer.add(r)
    with pytest.raises(TraceWriteError, match=r"exit status 3.*disk full.*incomplete"):
        writer.close(SUMMARY)
    assert b"summary" not in (tmp_path / "t.jsonl").read_bytes()


def test_a_writer_that_stops_reading_is_an_error(tmp_path: Path, monkeypatch, wait_for_writer) -> None:
    fake_writer(tmp_path, monkeypatch, "echo ready; exec sleep 30")
    monkeypatch.setattr(trace, "PIPE_SIZE", 4096)
    monkeypatch.setattr(trace, "SEND_TIMEOUT_S", 0.3)
    writer = TraceWriter(tmp_path / "t.jsonl", HEADER)
    for r in many(6000):
        writer.add(r)
    with pytest.raises(TraceWriteError, match="read nothing for 0.3 s"):
        writer.close(SUMMARY)


def test_a_writer_that_never_finishes_is_an_error(tmp_path: Path, monkeypatch, wait_for_writer) -> None:
    fake_writer(tmp_path, monkeypatch, "echo ready; cat >/dev/null; exec sleep 30")
    monkeypatch.setattr(trace, "CLOSE_TIMEOUT_S", 0.3)
    writer = TraceWriter(tmp_path / "t.jsonl", HEADER)
    for r in many(3000):
        writer.add(r)
    with pytest.raises(TraceWriteError, match="did not finish within 0.3 s"):
        writer.close(SUMMARY)


def test_the_writer_process_rejects_a_cut_stream(tmp_path: Path) -> None:
    # The process itself: a stream cut inside a message is reported, what came before is kept.
    out = tmp_path / "cut.jsonl"
    good = trace.message(trace.MSG_TEXT, b'{"seq":0}\n')
    cut = trace.message(trace.MSG_TEXT, b'{"seq":1}\n')[:-3]
    with open(out, "w") as f:
        proc = subprocess.run([*trace.WRITER_COMMAND, str(f.fileno())], input=good + cut,
                              capture_output=True, pass_fds=(f.fileno(),), timeout=30,
                              env={**os.environ, "PYTHONPATH": trace._PACKAGE_ROOT})
    assert proc.returncode == 1 and b"ends inside a message" in proc.stderr
    assert proc.stdout == b"ready\n"
    assert out.read_bytes() == b'{"seq":0}\n'


# -- end to end ----------------------------------------------------------------------------------

def test_a_run_with_many_exits_has_every_exit_in_its_trace(tmp_path: Path) -> None:
    from hvm.console import ConsoleSink
    from hvm.loader import load
    from hvm.machine import RunOptions, run

    n = 5000
    guest = tmp_path / "loop.asm"
    guest.write_text(f"bits 32\norg 0x100000\n    mov ecx, {n}\n    mov dx, 0xe9\n"
                     "l:  out dx, al\n    dec ecx\n    jnz l\n    cli\n    hlt\n")
    path = tmp_path / "loop.jsonl"
    result = run(load(str(guest)), RunOptions(trace=path, timeout_s=20), ConsoleSink())
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    records = [r for r in lines if "seq" in r]
    assert lines[0]["trace"] == "hvmlab" and "summary" in lines[-1]
    assert [r["seq"] for r in records] == list(range(result.exits_total))
    assert sum(r.get("port") == 0xE9 and r.get("direction") == "out" for r in records) == n
    assert records[-1]["reason"] == "HLT"


def test_compact_records_give_the_lines_full_records_give(tmp_path: Path) -> None:
    """A traced run writes compact records for plain OUT exits; --max-exits makes it write full
    ones. Both traces must say the same of every exit (times aside), whether the hypervisor or
    the device model served it."""
    from hvm.console import ConsoleSink
    from hvm.loader import load
    from hvm.machine import RunOptions, run

    guest = tmp_path / "mixed.asm"
    guest.write_text("bits 32\norg 0x100000\n    mov ecx, 700\n"
                     "l:  mov dx, 0xe9\n    out dx, al\n    mov dx, 0x2ff\n    out dx, ax\n"
                     "    out 0x80, al\n    dec ecx\n    jnz l\n    cli\n    hlt\n")
    traces = []
    for limit in (None, 10**9):
        path = tmp_path / f"t{limit}.jsonl"
        run(load(str(guest)), RunOptions(trace=path, timeout_s=20, max_exits=limit), ConsoleSink())
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()][1:-1]
        for r in records:
            assert r.pop("t_ns") >= 0 and r.pop("latency_ns") >= 0
            assert r.get("handled_by") != "device-model" or all(t > 0 for t in r.pop("steps").values())
        traces.append(records)
    compact, full = traces
    assert len(compact) == 3 * 700 + 1 and compact == full
    assert {(r.get("port"), r["handled_by"]) for r in compact if r.get("port")} == {
        (0xE9, "hypervisor"), (0x2FF, "device-model"), (0x80, "device-model")}
    assert {r["qualification"] for r in compact if r.get("port") == 0x2FF} == {0x02FF0001}


def test_a_site_template_keeps_percent_signs_literal() -> None:
    sites: trace.Sites = {}
    format_record((trace.SITE_TAG, 7, 0, 100, 30, 0x40, 0x1000, '"out 0x80, al ; 100%d"', "hypervisor",
                   1, "out", False, False, 1), sites)
    line = format_record((7, 0x80, 5, 150e-9, 180e-9, 9), sites)
    assert line == reference_format((4, 50, 0, 30, 0x00800040, 0x1000, '"out 0x80, al ; 100%d"',
                                     "hypervisor", 30, (0x80, 1, "out", False, False, 1, 9), None))
