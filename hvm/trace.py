"""The per-exit trace: one JSON object per VMExit, written in batches so tracing stays cheap (field names in README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from .exit_reasons import NAMES

TRACE_VERSION = 1
FLUSH_EVERY = 4096

# A record as the vCPU hands it over (a tuple: no dict per exit on the hot path):
# (seq, t_ns, vcpu, reason_code, qualification, rip, insn_json, handled_by, latency_ns, io, extra)
# io = (port, size, direction, string, rep, count, data) or None; extra = dict or None.
Record = tuple[int, int, int, int, int, int, str, str, int, tuple | None, dict | None]

_BOOL = {True: "true", False: "false"}


def format_record(r: Record) -> str:
    seq, t_ns, vcpu, code, qual, rip, insn_json, handled_by, latency, io, extra = r
    reason = NAMES.get(code, f"UNKNOWN_{code}")
    line = (f'{{"seq":{seq},"t_ns":{t_ns},"vcpu":{vcpu},"reason":"{reason}","reason_code":{code},'
            f'"qualification":{qual},"rip":{rip},"insn":{insn_json},"handled_by":"{handled_by}",'
            f'"latency_ns":{latency}')
    if io is not None:
        port, size, direction, string, rep, count, data = io
        line += (f',"port":{port},"size":{size},"direction":"{direction}","string":{_BOOL[string]},'
                 f'"rep":{_BOOL[rep]},"count":{count},"data":{"null" if data is None else data}')
    if extra:
        line += "," + json.dumps(extra, separators=(",", ":"))[1:-1]
    return line + "}\n"


class TraceWriter:
    """Collects exit records and writes them as JSON lines, a batch at a time."""

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self._file: IO[str] = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._file.write(json.dumps({"trace": "hvmlab", "version": TRACE_VERSION, **header}) + "\n")
        self._pending: list[Record] = []
        self.records = 0

    def add(self, record: Record) -> None:
        self._pending.append(record)
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._file.write("".join(map(format_record, self._pending)))
            self.records += len(self._pending)
            self._pending.clear()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._file.closed:
            return
        self.flush()
        if summary is not None:
            self._file.write(json.dumps({"summary": summary}) + "\n")
        self._file.close()
