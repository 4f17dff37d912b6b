"""VMExit trace reader and per-reason / per-port summary, in the shape of `perf kvm stat report`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Fields every exit record must carry, with the type a reader relies on.
REQUIRED_FIELDS: dict[str, type] = {
    "seq": int,
    "t_ns": int,
    "vcpu": int,
    "reason": str,
    "latency_ns": int,
}

# Optional fields that, when present, must have this type (None allowed for `data`, and for
# `port` in PV records: a SCHEDOP_poll that timed out woke on no port).
OPTIONAL_FIELDS: dict[str, type] = {
    "reason_code": int,
    "qualification": int,
    "rip": int,
    "insn": str,
    "handled_by": str,
    "port": int,
    "size": int,
    "direction": str,
    "string": bool,
    "rep": bool,
    "count": int,
    "data": int,
}

IO_DIRECTIONS = ("in", "out")
IO_REASONS = frozenset({"IO_INSTRUCTION"})


class TraceError(ValueError):
    """A trace file that cannot be read: missing, unreadable, or a line that is no record."""


def _type_ok(value: Any, expected: type) -> bool:
    # JSON true/false load as bool, which Python also counts as int: keep them apart.
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _record_problem(obj: Any) -> str | None:
    """Why `obj` is not an exit record, or None if it is one."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for name, expected in REQUIRED_FIELDS.items():
        if name not in obj:
            return f"missing field {name!r}"
        if not _type_ok(obj[name], expected):
            return f"field {name!r} should be {expected.__name__}, got {obj[name]!r}"
    for name in ("seq", "t_ns", "vcpu", "latency_ns"):
        if obj[name] < 0:
            return f"field {name!r} is negative ({obj[name]})"
    for name, expected in OPTIONAL_FIELDS.items():
        if name not in obj or (name in ("data", "port") and obj[name] is None):
            continue
        if not _type_ok(obj[name], expected):
            return f"field {name!r} should be {expected.__name__}, got {obj[name]!r}"
    if "direction" in obj and obj["direction"] not in IO_DIRECTIONS:
        return f"field 'direction' should be 'in' or 'out', got {obj['direction']!r}"
    return None


def _is_header(obj: Any) -> bool:
    return isinstance(obj, dict) and "trace" in obj and "seq" not in obj


def _is_footer(obj: Any) -> bool:
    return isinstance(obj, dict) and "summary" in obj and "seq" not in obj


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open trace file: {exc.strerror or exc}") from exc
    with handle:
        lineno = 0
        try:
            for lineno, line in enumerate(handle, start=1):
                text = line.strip()
                if not text:
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise TraceError(
                        f"{path}:{lineno}: not a trace record (invalid JSON: {exc.msg})"
                    ) from None
                if _is_header(obj) or _is_footer(obj):
                    continue
                problem = _record_problem(obj)
                if problem is not None:
                    raise TraceError(f"{path}:{lineno}: not a trace record ({problem})")
                yield obj
        except UnicodeDecodeError as exc:
            raise TraceError(
                f"{path}:{lineno + 1}: not a trace record (not UTF-8 text: {exc.reason})"
            ) from None


def read_trace(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the exit records of a trace file, skipping its header and footer lines.

    A missing file raises TraceError at once; a malformed line raises TraceError naming
    the file and line when iteration reaches it.
    """
    trace_path = Path(path)
    if not trace_path.exists():
        raise TraceError(f"{trace_path}: no such trace file")
    if trace_path.is_dir():
        raise TraceError(f"{trace_path}: is a directory, not a trace file")
    return _lines(trace_path)


@dataclass
class ReasonStats:
    """Exits of one reason: how many, and the exit-to-entry latency they took."""

    reason: str
    samples: int = 0
    total_ns: int = 0
    min_ns: int = 0
    max_ns: int = 0
    sumsq_ns2: int = field(default=0, repr=False)  # sum of squared latencies, for stddev

    def add(self, latency_ns: int) -> None:
        if self.samples == 0:
            self.min_ns = self.max_ns = latency_ns
        else:
            self.min_ns = min(self.min_ns, latency_ns)
            self.max_ns = max(self.max_ns, latency_ns)
        self.samples += 1
        self.total_ns += latency_ns
        self.sumsq_ns2 += latency_ns * latency_ns

    @property
    def avg_ns(self) -> float:
        return self.total_ns / self.samples if self.samples else 0.0

    @property
    def stddev_pct(self) -> float:
        """Standard deviation of the mean, relative to the mean, in percent (as perf prints)."""
        return _rel_stddev_pct(self.samples, self.total_ns, self.sumsq_ns2)


@dataclass
class PortStats:
    """I/O exits on one port in one direction; `count` sums the elements (string I/O moves many)."""

    port: int
    direction: str
    samples: int = 0
    count: int = 0
    total_ns: int = 0
    min_ns: int = 0
    max_ns: int = 0

    def add(self, elements: int, latency_ns: int) -> None:
        if self.samples == 0:
            self.min_ns = self.max_ns = latency_ns
        else:
            self.min_ns = min(self.min_ns, latency_ns)
            self.max_ns = max(self.max_ns, latency_ns)
        self.samples += 1
        self.count += elements
        self.total_ns += latency_ns

    @property
    def avg_ns(self) -> float:
        return self.total_ns / self.samples if self.samples else 0.0


@dataclass
class Summary:
    """Per-reason and per-port aggregates of one trace."""

    by_reason: list[ReasonStats]
    by_port: list[PortStats]
    total_samples: int
    total_ns: int

    @property
    def io_samples(self) -> int:
        return sum(p.samples for p in self.by_port)


def _rel_stddev_pct(n: int, total: int, sumsq: int) -> float:
    # Sample variance s^2 = (n*sumsq - total^2) / (n*(n-1)), kept in integers until the end;
    # the stddev of the mean is s / sqrt(n), reported relative to the mean.
    if n < 2 or total == 0:
        return 0.0
    variance = (n * sumsq - total * total) / (n * (n - 1))
    stddev_mean = math.sqrt(max(variance, 0.0) / n)
    return 100.0 * stddev_mean / (total / n)


def _io_elements(record: dict[str, Any]) -> int:
    count = record.get("count")
    return count if isinstance(count, int) and not isinstance(count, bool) else 1


def summarize(records: Iterable[dict[str, Any]]) -> Summary:
    """Aggregate exit records by reason and, for those naming a port, by (port, direction)."""
    reasons: dict[str, ReasonStats] = {}
    ports: dict[tuple[int, str], PortStats] = {}
    total_samples = 0
    total_ns = 0
    for record in records:
        latency = record["latency_ns"]
        reason = record["reason"]
        stats = reasons.get(reason)
        if stats is None:
            stats = reasons[reason] = ReasonStats(reason)
        stats.add(latency)
        total_samples += 1
        total_ns += latency
        port = record.get("port")
        # I/O ports only: PV records name event-channel ports, which are not I/O.
        if isinstance(port, int) and not isinstance(port, bool) and reason in IO_REASONS:
            direction = str(record.get("direction", "?"))
            key = (port, direction)
            pstats = ports.get(key)
            if pstats is None:
                pstats = ports[key] = PortStats(port, direction)
            pstats.add(_io_elements(record), latency)
    by_reason = sorted(reasons.values(), key=lambda s: (-s.samples, -s.total_ns, s.reason))
    by_port = sorted(ports.values(), key=lambda s: (-s.samples, s.port, s.direction))
    return Summary(by_reason, by_port, total_samples, total_ns)


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _us(ns: float) -> str:
    return f"{ns / 1000:.2f}us"


def render_summary(summary: Summary, console: Console) -> None:
    """Print the per-reason table (columns as `perf kvm stat report`) and the per-port table."""
    if summary.total_samples == 0:
        console.print("No VM exits in trace.")
        return
    reasons = Table(
        title="VM exits, all vCPUs",
        caption=(
            f"Total Samples: {summary.total_samples}, "
            f"Total exit-to-entry time: {_us(summary.total_ns)}"
        ),
        box=None,
        header_style="bold",
    )
    reasons.add_column("VM-EXIT", justify="right")
    for name in ("Samples", "Samples%", "Time%", "Min Time", "Max Time", "Avg time"):
        reasons.add_column(name, justify="right")
    for r in summary.by_reason:
        reasons.add_row(
            r.reason,
            str(r.samples),
            f"{_pct(r.samples, summary.total_samples):.2f}%",
            f"{_pct(r.total_ns, summary.total_ns):.2f}%",
            _us(r.min_ns),
            _us(r.max_ns),
            f"{_us(r.avg_ns)} ( +-{r.stddev_pct:7.2f}% )",
        )
    console.print(reasons)
    if not summary.by_port:
        return
    io_samples = summary.io_samples
    ports = Table(title="I/O exits by port", box=None, header_style="bold")
    for name in ("Port", "Dir", "Exits", "Elements", "Samples%", "Avg time"):
        ports.add_column(name, justify="right")
    for p in summary.by_port:
        ports.add_row(
            f"{p.port:#06x}",
            p.direction,
            str(p.samples),
            str(p.count),
            f"{_pct(p.samples, io_samples):.2f}%",
            _us(p.avg_ns),
        )
    console.print(ports)


def summary_to_dict(summary: Summary) -> dict[str, Any]:
    """The summary as plain JSON-ready data (for `--json`); percentages are of all exits,
    except a port's `samples_pct`, which is of all I/O exits, as in the port table."""
    io_samples = summary.io_samples
    return {
        "total_samples": summary.total_samples,
        "total_ns": summary.total_ns,
        "by_reason": [
            {
                "reason": r.reason,
                "samples": r.samples,
                "samples_pct": _pct(r.samples, summary.total_samples),
                "time_pct": _pct(r.total_ns, summary.total_ns),
                "total_ns": r.total_ns,
                "min_ns": r.min_ns,
                "max_ns": r.max_ns,
                "avg_ns": r.avg_ns,
                "stddev_pct": r.stddev_pct,
            }
            for r in summary.by_reason
        ],
        "by_port": [
            {
                "port": p.port,
                "direction": p.direction,
                "samples": p.samples,
                "count": p.count,
                "samples_pct": _pct(p.samples, io_samples),
                "total_ns": p.total_ns,
                "min_ns": p.min_ns,
                "max_ns": p.max_ns,
                "avg_ns": p.avg_ns,
            }
            for p in summary.by_port
        ],
    }
