"""The hvmlab command as a user meets it: statuses, one-line errors, --json, trace tools, help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from elf_builder import elf32


def hvmlab(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvm", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_run_streams_console_and_prints_a_summary_line():
    proc = hvmlab("run", "hello")
    assert proc.returncode == 1
    assert proc.stdout == "Hello from a real-mode guest\nTest result: SUCCESS\n"
    assert "ended by debug_exit" in proc.stderr and "51 exits" in proc.stderr


def test_json_is_exactly_one_object():
    proc = hvmlab("run", "cpuid", "--json")
    data = json.loads(proc.stdout)
    for key in ("guest", "mode", "ended_by", "exit_status", "console", "exits", "ioreqs",
                "buffered_ioreqs", "interrupts_injected", "direct_port_accesses", "wall_s"):
        assert key in data
    assert data["exits"]["CPUID"] == 2 and data["exit_status"] == 0 == proc.returncode
    assert "XenVMMXenVMM" in data["console"]


def test_missing_file(tmp_path):
    assert_one_line_error(hvmlab("run", str(tmp_path / "missing.asm")), 2, "missing.asm", "no such file")


def test_assembly_error_names_file_and_line(tmp_path):
    src = tmp_path / "bad.asm"
    src.write_text("bits 16\n  nop\n  frobnicate ax\n")
    assert_one_line_error(hvmlab("run", str(src)), 2, "bad.asm:3")
    src.write_text("bits 16\n  nop\n  foo 1\n%foo\n")
    assert_one_line_error(hvmlab("asm", str(src)), 2, "bad.asm:")


def test_truncated_elf(tmp_path):
    path = tmp_path / "t.elf"
    path.write_bytes(elf32(b"\xf4" * 64)[:70])
    assert_one_line_error(hvmlab("run", str(path)), 2, "t.elf", "ELF")


def test_bad_option_is_status_2():
    assert_one_line_error(hvmlab("run", "hello", "--mem", "lots"), 2, "--mem")
    assert_one_line_error(hvmlab("run", "hello", "--pass-through", "0x1FFFF"), 2, "port")


def test_faulting_and_runaway_guests():
    fault = hvmlab("run", "fault")
    assert fault.returncode == 4 and "triple_fault" in fault.stderr and "Traceback" not in fault.stderr
    runaway = hvmlab("run", "runaway", "--timeout", "0.3")
    assert runaway.returncode == 6 and "--timeout" in runaway.stderr
    assert len(runaway.stderr.strip().splitlines()) == 1
    limited = hvmlab("run", "hello", "--max-exits", "3", "--json")
    assert limited.returncode == 6 and json.loads(limited.stdout)["ended_by"] == "max_exits"


def test_asm_writes_the_same_bytes_the_loader_runs(tmp_path):
    out = tmp_path / "hello.bin"
    proc = hvmlab("asm", str(Path(__file__).parent.parent / "guests" / "hello.asm"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    run = hvmlab("run", str(out))
    assert run.returncode == 1 and "Test result: SUCCESS" in run.stdout


def test_trace_summary_and_exports(tmp_path):
    trace = tmp_path / "t.jsonl"
    assert hvmlab("run", "cpuid", "--trace", str(trace), "-q").returncode == 0
    summary = hvmlab("trace", "summary", str(trace))
    assert summary.returncode == 0
    for word in ("VM-EXIT", "Samples", "IO_INSTRUCTION", "CPUID", "HLT", "0x00e9"):
        assert word in summary.stdout
    data = json.loads(hvmlab("trace", "summary", str(trace), "--json").stdout)
    assert data["total_samples"] == 74
    csv = hvmlab("trace", "export", str(trace), "--format", "csv")
    assert csv.stdout.splitlines()[0].startswith("seq,") and len(csv.stdout.splitlines()) == 75
    perfetto = tmp_path / "p.json"
    assert hvmlab("trace", "export", str(trace), "--format", "perfetto", "-o", str(perfetto)).returncode == 0
    events = json.loads(perfetto.read_text())["traceEvents"]
    assert sum(1 for e in events if e["ph"] == "X") == 74
    assert_one_line_error(hvmlab("trace", "summary", str(tmp_path / "none.jsonl")), 2, "none.jsonl")


def test_dump_vmcs_prints_areas():
    proc = hvmlab("run", "string_io", "--dump-vmcs", "0")
    for text in ("guest-state area", "VM-execution control fields", "VM-exit information fields",
                 "EXIT_QUALIFICATION", "0xe90030"):
        assert text in proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["asm", "--help"], ["trace", "--help"],
                                  ["bench", "--help"], ["guests", "--help"], ["demo", "--help"],
                                  ["abi", "--help"]])
def test_help_explains_options_and_statuses(args):
    proc = hvmlab(*args)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    if args[0] in ("--help", "run", "asm"):
        assert "(v<<1)|1" in proc.stdout and "internal failure" in proc.stdout


def test_guests_lists_shipped_guests():
    proc = hvmlab("guests")
    for name in ("hello", "string_io", "long_hello", "cpuid", "rdtsc", "vmcall", "fault", "runaway", "unmapped"):
        assert name in proc.stdout


def test_demo_runs_and_ends_with_a_trace_summary(tmp_path):
    proc = hvmlab("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    assert "VM-EXIT" in proc.stdout and "XenVMMXenVMM" in proc.stdout
    assert (tmp_path / "demo" / "hello.trace.jsonl").exists()
