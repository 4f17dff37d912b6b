"""Shared helpers for hvmlab's tests: run a guest and read its trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvm.console import ConsoleSink
from hvm.loader import load
from hvm.machine import RunOptions, run


@pytest.fixture
def run_guest(tmp_path: Path):
    """run_guest(name_or_path, **options) -> (RunResult, list of trace records)."""

    def _run(guest: str, mode: int | None = None, load_address: int | None = None, **options):
        trace = tmp_path / "trace.jsonl"
        options.setdefault("timeout_s", 10)
        image = load(guest, mode, load_address)
        result = run(image, RunOptions(trace=trace, **options), ConsoleSink())
        lines = [json.loads(line) for line in trace.read_text().splitlines()]
        records = [r for r in lines if "seq" in r]
        return result, records

    return _run
