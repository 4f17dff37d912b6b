"""VMExit trace export to CSV and to Chrome Trace Event Format JSON, which ui.perfetto.dev opens."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from itertools import pairwise
from typing import Any, TextIO

# Known record fields, in the order of the CSV columns: what every exit carries first,
# then what I/O exits add. Fields outside this list (nested "ioreq", "steps", ...) are
# not exported to CSV.
CSV_FIELDS: tuple[str, ...] = (
    "seq",
    "t_ns",
    "vcpu",
    "reason",
    "reason_code",
    "qualification",
    "rip",
    "insn",
    "handled_by",
    "latency_ns",
    "port",
    "size",
    "direction",
    "string",
    "rep",
    "count",
    "data",
)

# Record fields shown in hex in the Perfetto args panel: addresses, ports and the
# exit qualification (a bit field, SDM Vol. 3C table 28-5) read naturally only in hex.
HEX_ARGS = frozenset({"rip", "qualification", "port"})

PERFETTO_PID = 1


def _csv_cell(value: Any) -> str | int:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def export_csv(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write one CSV row per exit under a header of CSV_FIELDS; return the number of rows.

    Absent fields and null `data` are empty cells; booleans are `true`/`false`.
    """
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    rows = 0
    for record in records:
        writer.writerow([_csv_cell(record.get(name)) for name in CSV_FIELDS])
        rows += 1
    return rows


def _us(t_ns: float) -> float:
    return t_ns / 1000


def _exit_name(record: dict[str, Any]) -> str:
    reason = str(record["reason"])
    port = record.get("port")
    direction = record.get("direction")
    if isinstance(port, int) and not isinstance(port, bool) and direction is not None:
        return f"{reason} {direction} {port:#x}"
    return reason


def _args(record: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for name, value in record.items():
        if name in HEX_ARGS and isinstance(value, int) and not isinstance(value, bool):
            args[name] = f"{value:#x}"
        else:
            args[name] = value
    return args


def _step_slices(
    record: dict[str, Any], tid: int, start_ns: int, end_ns: int
) -> list[dict[str, Any]]:
    """One slice per pair of consecutive steps, named after the step it starts at.

    Steps are absolute times (ns since run start). Slices on one thread must nest inside
    the exit's slice or the viewer breaks the stack, so each is clipped to the exit;
    the unclipped times stay in its args.
    """
    steps = record.get("steps")
    if not isinstance(steps, dict):
        return []
    timed = [
        (name, t) for name, t in steps.items()
        if isinstance(t, int | float) and not isinstance(t, bool)
    ]
    # Stable sort: steps recorded at the same nanosecond keep their written order.
    timed.sort(key=lambda item: item[1])
    slices = []
    for (name, t_from), (next_name, t_to) in pairwise(timed):
        lo = min(max(t_from, start_ns), end_ns)
        hi = min(max(t_to, start_ns), end_ns)
        slices.append({
            "ph": "X",
            "cat": "step",
            "name": str(name),
            "pid": PERFETTO_PID,
            "tid": tid,
            "ts": _us(lo),
            "dur": _us(hi - lo),
            "args": {"from": str(name), "to": str(next_name), "from_ns": t_from, "to_ns": t_to},
        })
    return slices


def _metadata(name: str, args: dict[str, Any], tid: int | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"ph": "M", "name": name, "pid": PERFETTO_PID, "args": args}
    if tid is not None:
        event["tid"] = tid
    return event


def export_perfetto(
    records: Iterable[dict[str, Any]], out: TextIO, process_name: str = "hvmlab"
) -> int:
    """Write the trace as Chrome trace-event JSON; return the number of exit slices.

    Each exit is a complete event ("ph": "X") on its vCPU's track (pid 1, tid = vCPU)
    lasting from the exit to the VM entry that resumed the guest; ts/dur are microseconds.
    Events are streamed, so a long trace is never held in memory.
    """
    out.write('{"displayTimeUnit": "ns", "traceEvents": [\n')
    first = True

    def emit(event: dict[str, Any]) -> None:
        nonlocal first
        if not first:
            out.write(",\n")
        out.write(json.dumps(event, default=str))
        first = False

    emit(_metadata("process_name", {"name": process_name}))
    named: set[int] = set()
    exits = 0
    for record in records:
        vcpu = int(record["vcpu"])
        if vcpu not in named:
            named.add(vcpu)
            emit(_metadata("thread_name", {"name": f"vCPU {vcpu}"}, tid=vcpu))
            emit(_metadata("thread_sort_index", {"sort_index": vcpu}, tid=vcpu))
        start_ns = int(record["t_ns"])
        end_ns = start_ns + int(record["latency_ns"])
        # The exit's slice is written before its step slices, so a viewer that keeps file
        # order for equal timestamps still puts the steps under the exit.
        emit({
            "ph": "X",
            "cat": "vmexit",
            "name": _exit_name(record),
            "pid": PERFETTO_PID,
            "tid": vcpu,
            "ts": _us(start_ns),
            "dur": _us(end_ns - start_ns),
            "args": _args(record),
        })
        exits += 1
        for event in _step_slices(record, vcpu, start_ns, end_ns):
            emit(event)
    out.write("\n]}\n")
    return exits
