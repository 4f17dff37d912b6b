"""`hvmlab compare`: one workload on every HVM and PV path, counted from the real runs, timed, and modeled per I/O (issue 5)."""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

# The counters a comparison reports per I/O, in the order of the table, the JSON and the CSV.
COUNTERS: tuple[str, ...] = (
    "vmexits", "ioreqs", "hypercalls", "evtchn_notifications", "domain_switches", "interrupts",
    "bytes_copied", "grant_ops", "page_flips", "wall_ns", "modeled_cycles",
)
COUNTED: tuple[str, ...] = COUNTERS[:9]  # straight from PathCounts; wall and model are derived

# Microbenchmarks run beside every compare at small N, so wall times can be read as ratios
# against figures measured on the same machine in the same run (issue 5 section 7):
# (workload, preferred path, what one operation is).
MICROBENCHMARKS: tuple[tuple[str, str, str], ...] = (
    ("port-hv", "hvm", "one port read answered in the hypervisor"),
    ("hypercall", "pv", "one PV hypercall"),
)
MICRO_IOS = 100
DEFAULT_PROFILE = "kvm-2012"
DEFAULT_REPEATS = 3


class CompareError(ValueError):
    """Bad input to a comparison: an unknown workload, path or parameter."""


class UnverifiedData(RuntimeError):  # noqa: N818 - what the user is told: the data is wrong
    """A run finished but its data was not verified: a compare never reports its cost."""


Runner = Callable[..., Any]          # run_workload(name, path, ios, size, out_dir, batch) -> PathCounts
ProfileLoader = Callable[[str], Any]  # load_profile(name_or_path) -> Profile
Modeler = Callable[[Any, Any], dict[str, float]]  # model(counts, profile) -> component -> cycles


def _real_runner() -> Runner:
    from .workloads import run_workload

    return run_workload


def _real_workloads() -> Mapping[str, Any]:
    from .workloads import WORKLOADS

    return WORKLOADS


def _real_profile_loader() -> ProfileLoader:
    from .costmodel import load_profile

    return load_profile


def _real_modeler() -> Modeler:
    from .costmodel import model

    return model


@dataclass
class PathResult:
    """One path of a comparison: the counts of its first run and the wall times of every repeat."""

    path: str
    counts: Any                               # PathCounts of the first repeat
    wall_ns: list[int]                        # I/O-phase wall time of each repeat (whole run)
    components: dict[str, float]              # modeled cycles by component (whole run)
    micro_ratios: dict[str, float] = field(default_factory=dict)  # wall per I/O / micro op

    @property
    def ios(self) -> int:
        return max(1, int(self.counts.ios))

    def total(self, counter: str) -> float:
        if counter == "wall_ns":
            return float(statistics.median(self.wall_ns))
        if counter == "modeled_cycles":
            return float(sum(self.components.values()))
        return float(getattr(self.counts, counter, 0) or 0)

    def per_io(self, counter: str) -> float:
        return self.total(counter) / self.ios

    def wall_per_io(self) -> tuple[float, float, float]:
        """Median, min and max over the repeats of wall ns per I/O."""
        return (statistics.median(self.wall_ns) / self.ios, min(self.wall_ns) / self.ios,
                max(self.wall_ns) / self.ios)

    def components_per_io(self) -> dict[str, float]:
        return {name: cycles / self.ios for name, cycles in self.components.items()}

    def to_json(self) -> dict[str, Any]:
        med, lo, hi = self.wall_per_io()
        return {
            "ios": int(self.counts.ios),
            "per_io": {counter: self.per_io(counter) for counter in COUNTERS},
            "exits_by_reason": {k: v / self.ios for k, v in
                                dict(getattr(self.counts, "exits_by_reason", {}) or {}).items()},
            # beyond compare.md's fields: the spread of the wall time, the model's parts and
            # the wall time against the microbenchmarks of the same run
            "wall_ns_per_io": {"median": med, "min": lo, "max": hi, "repeats": len(self.wall_ns)},
            "modeled_cycles_by_component": self.components_per_io(),
            "wall_vs_microbenchmarks": dict(self.micro_ratios),
        }


@dataclass
class Comparison:
    """The result of `compare`: every path of one workload, per I/O."""

    workload: str
    unit: str
    describe: str
    ios: int
    size: int | None
    batch: int
    repeats: int
    profile: Any                              # costmodel.Profile
    paths: dict[str, PathResult]
    micro_ns: dict[str, float] = field(default_factory=dict)  # name -> wall ns per operation

    @property
    def profile_name(self) -> str:
        return str(getattr(self.profile, "name", self.profile))

    @property
    def ghz(self) -> float:
        return float(getattr(self.profile, "ghz", 0.0) or 0.0)

    def params(self) -> dict[str, Any]:
        return {"ios": self.ios, "size": self.size, "batch": self.batch, "repeats": self.repeats}

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "params": self.params(),
            "profile": self.profile_name,
            "paths": {name: result.to_json() for name, result in self.paths.items()},
        }

    def io_phrase(self) -> str:
        """'4 KiB request', 'frame of 1514 bytes', 'line': what one I/O is."""
        if self.size and self.unit in ("sector", "request", "block"):
            return f"{format_bytes(self.size)} {self.unit}"
        if self.size and self.unit in ("frame", "packet"):
            return f"{self.size}-byte {self.unit}"
        return self.unit

    def explanation(self) -> str:
        return explain_difference(self)


def format_bytes(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def format_number(value: float) -> str:
    """Per-I/O figures: integers with thousands separators, fractions with 3 significant digits."""
    if value == int(value):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def ratio_text(a: float, b: float) -> str:
    if b == 0:
        return "-" if a == 0 else "inf"
    r = a / b
    if r == 0:
        return "0"
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def ratio_pairs(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(HVM path, PV path) pairs to show ratios for: every hvm* path against every pv* path."""
    names = list(paths)
    return [(h, p) for h in names if h.startswith("hvm") for p in names if p.startswith("pv")]


def _plural(n: float, word: str) -> str:
    return f"{format_number(n)} {word}{'' if n == 1 else 's'}"


def _describe_path(result: PathResult, cmp: Comparison) -> str:
    """One clause of the explanation, computed from this path's counts."""
    exits = result.per_io("vmexits")
    ioreqs = result.per_io("ioreqs")
    notes = result.per_io("evtchn_notifications")
    copied = result.per_io("bytes_copied")
    flips = result.per_io("page_flips")
    parts: list[str] = []
    if exits > 0:
        clause = _plural(exits, "exit")
        reasons = dict(getattr(result.counts, "exits_by_reason", {}) or {})
        if reasons:
            top, n = max(reasons.items(), key=lambda kv: kv[1])
            share = n / max(1, int(getattr(result.counts, "vmexits", 0) or 0))
            clause += f" ({'all ' if share >= 1 else f'{share:.0%} '}{top})"
        parts.append(clause)
        if ioreqs >= exits:
            parts.append("each a device-model round trip")
        elif ioreqs > 0:
            parts.append(f"{format_number(ioreqs)} of them device-model round trips")
        if cmp.size and exits >= 1:
            per_exit = cmp.size / exits
            if per_exit <= 4:
                parts.append(f"one per {format_number(round(per_exit, 1))} bytes without string I/O")
            elif per_exit >= 64:
                parts.append(f"{format_number(round(per_exit))} bytes per exit with string I/O")
    else:
        parts.append(f"0 exits, {_plural(result.per_io('hypercalls'), 'hypercall')}")
        if cmp.batch > 1 and notes > 0:
            parts.append(f"{_plural(notes * cmp.batch, 'notification')} per batch of {cmp.batch}")
        else:
            parts.append(_plural(notes, "notification"))
    if flips > 0:
        parts.append(f"{_plural(flips, 'page flip')}, {format_number(copied)} bytes copied")
    elif copied > 0:
        parts.append(f"{format_number(copied)} bytes copied")
    return f"{result.path}: " + ", ".join(parts)


def explain_difference(cmp: Comparison) -> str:
    """ONE line: which path costs more and by how much, which modeled component makes the
    largest part of the gap, and what each path does per I/O, all computed from the counts."""
    if not cmp.paths:
        return "no paths were run"
    by_cost = sorted(cmp.paths.values(), key=lambda r: r.per_io("modeled_cycles"))
    cheap, dear = by_cost[0], by_cost[-1]
    clauses = "; ".join(_describe_path(r, cmp) for r in cmp.paths.values())
    per = f"per {cmp.io_phrase()}"
    if cheap is dear or dear.per_io("modeled_cycles") <= cheap.per_io("modeled_cycles"):
        return f"{per}: {clauses}"
    lead = (f"{dear.path} models {ratio_text(dear.per_io('modeled_cycles'), cheap.per_io('modeled_cycles'))}"
            f" the cycles of {cheap.path} {per}")
    dear_parts, cheap_parts = dear.components_per_io(), cheap.components_per_io()
    deltas = {k: dear_parts.get(k, 0.0) - cheap_parts.get(k, 0.0)
              for k in set(dear_parts) | set(cheap_parts)}
    if deltas:
        top = max(deltas, key=lambda k: deltas[k])
        lead += (f", most of the gap in {top.replace('_', ' ')} "
                 f"({format_number(round(deltas[top]))} cycles)")
    return f"{lead}. {clauses}"


def _check(counts: Any, workload: str, path: str) -> None:
    if not getattr(counts, "verified", False):
        raise UnverifiedData(f"{workload} on {path}: the data was not verified at the end of the "
                             f"run; no cost is reported")


# A path whose runs take longer than this (seconds each) is not repeated further, so a compare of
# 100 disk requests stays within a minute even when one path needs 200,000 device-model round
# trips; the table and --json give the number of runs behind each median.
REPEAT_BUDGET_S = 10.0


def _run_repeats(runner: Runner, workload: str, path: str, ios: int, size: int | None,
                 out_dir: Path, batch: int, repeats: int,
                 on_run: Callable[[str], None] | None) -> tuple[Any, list[int]]:
    first = None
    walls: list[int] = []
    started = time.monotonic()
    for rep in range(repeats):
        if rep and time.monotonic() - started > REPEAT_BUDGET_S * rep:
            break  # a path this slow is not repeated: its wall time is one run's (shown as n)
        if on_run is not None:
            on_run(f"{workload} on {path} ({rep + 1}/{repeats})")
        run_dir = out_dir / workload / path / f"run{rep}"
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            counts = runner(workload, path, ios, size, run_dir, batch)
        except ValueError as exc:  # the runner's word for parameters it cannot run
            raise CompareError(str(exc)) from None
        _check(counts, workload, path)
        walls.append(int(counts.wall_ns))
        if first is None:
            first = counts
    return first, walls


def compare(workload: str, ios: int | None, size: int | None, profile: str, out_dir: Path,
            batch: int = 1, *, repeats: int = DEFAULT_REPEATS, micro: bool = True,
            runner: Runner | None = None, profile_loader: ProfileLoader | None = None,
            modeler: Modeler | None = None, workloads: Mapping[str, Any] | None = None,
            on_run: Callable[[str], None] | None = None) -> Comparison:
    """Run every path of `workload` `repeats` times (counts from the first run, wall times from
    all of them), model each path's cost under `profile`, and, with `micro`, run the
    microbenchmarks at small N for the wall-time ratios. A run whose data is wrong raises
    (WorkloadError from the runner, UnverifiedData here) and nothing is reported."""
    runner = runner or _real_runner()
    workloads = workloads if workloads is not None else _real_workloads()
    profile_loader = profile_loader or _real_profile_loader()
    modeler = modeler or _real_modeler()
    spec = workloads.get(workload)
    if spec is None:
        raise CompareError(f"unknown workload {workload!r}; known: {', '.join(sorted(workloads))}")
    if repeats < 1:
        raise CompareError("--repeats must be at least 1")
    if batch < 1:
        raise CompareError("--batch must be at least 1")
    try:
        loaded = profile_loader(profile)
    except (OSError, LookupError, ValueError) as exc:
        text = str(exc.args[0]) if exc.args else str(exc)
        raise CompareError(text if profile in text else f"profile {profile!r}: {text}") from None
    ios = spec.default_ios if ios is None else ios
    if ios < 1:
        raise CompareError("--ios must be at least 1")
    effective_size = spec.default_size if size is None else size
    out_dir = Path(out_dir)
    results: dict[str, PathResult] = {}
    for path in spec.paths:
        counts, walls = _run_repeats(runner, workload, path, ios, size, out_dir, batch, repeats,
                                     on_run)
        results[path] = PathResult(path, counts, walls, dict(modeler(counts, loaded)))
    micro_ns: dict[str, float] = {}
    if micro:
        for name, preferred, _what in MICROBENCHMARKS:
            mspec = workloads.get(name)
            if mspec is None:
                continue
            mpath = preferred if preferred in mspec.paths else mspec.paths[0]
            counts, walls = _run_repeats(runner, name, mpath, MICRO_IOS, None, out_dir / "micro",
                                         1, repeats, on_run)
            micro_ns[name] = statistics.median(walls) / max(1, int(counts.ios))
    for result in results.values():
        wall = result.wall_per_io()[0]
        result.micro_ratios = {name: wall / ns for name, ns in micro_ns.items() if ns > 0}
    return Comparison(workload, spec.unit, spec.describe, ios, effective_size, batch, repeats,
                      loaded, results, micro_ns)


def modeled_per_io(counts: Any, profile: Any, modeler: Modeler | None = None) -> float:
    """Modeled cycles per I/O of one run under `profile` (to re-model counts under other profiles)."""
    modeler = modeler or _real_modeler()
    return sum(modeler(counts, profile).values()) / max(1, int(counts.ios))


# ---- output: JSON, CSV, the table ----

def csv_number(value: float) -> int | float:
    """A CSV cell for a count or a time: an integer where it is one, else 3 decimals."""
    return int(value) if float(value).is_integer() else round(float(value), 3)


CSV_COLUMNS = ("workload", "path", "counter", "per_io", "total", "per_io_min", "per_io_max",
               "ios", "size", "batch", "profile")


def write_csv(cmp: Comparison, out: TextIO) -> int:
    """One row per path x counter; wall_ns is the median with min/max over the repeats."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = 0
    for path, result in cmp.paths.items():
        for counter in COUNTERS:
            lo: int | float | str = ""
            hi: int | float | str = ""
            if counter == "wall_ns":
                _, lo_v, hi_v = result.wall_per_io()
                lo, hi = csv_number(lo_v), csv_number(hi_v)
            writer.writerow([cmp.workload, path, counter, csv_number(result.per_io(counter)),
                             csv_number(result.total(counter)), lo, hi, result.counts.ios,
                             cmp.size if cmp.size is not None else "", cmp.batch, cmp.profile_name])
            rows += 1
    return rows


def to_json_text(cmp: Comparison) -> str:
    return json.dumps(cmp.to_json())


def to_csv_text(cmp: Comparison) -> str:
    buf = io.StringIO()
    write_csv(cmp, buf)
    return buf.getvalue()


COUNTER_LABELS = {
    "vmexits": "VM exits", "ioreqs": "ioreqs", "hypercalls": "hypercalls",
    "evtchn_notifications": "evtchn notifications", "domain_switches": "domain switches",
    "interrupts": "interrupts/upcalls", "bytes_copied": "bytes copied", "grant_ops": "grant ops",
    "page_flips": "page flips", "wall_ns": "wall us (median)", "modeled_cycles": "modeled cycles",
}


def _us(ns: float) -> str:
    us = ns / 1000
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def _per_io_of(counter: str) -> Callable[[PathResult], float]:
    return lambda r: r.per_io(counter)


def _component_of(name: str) -> Callable[[PathResult], float]:
    return lambda r: r.components_per_io().get(name, 0.0)


def render_table(cmp: Comparison, console: Any) -> None:
    """The rich table: one row per counter, every path side by side per I/O, HVM/PV ratios,
    then the one-line explanation."""
    from rich.table import Table

    pairs = ratio_pairs(cmp.paths)
    results = list(cmp.paths.values())
    size = f" of {format_bytes(cmp.size)}" if cmp.size else ""
    batch = f", batch {cmp.batch}" if cmp.batch > 1 else ""
    table = Table(title=f"{cmp.workload}: cost per {cmp.unit} ({cmp.ios} {cmp.unit}s{size}{batch}; "
                        f"profile {cmp.profile_name})", title_justify="left")
    table.add_column(f"per {cmp.unit}", no_wrap=True)
    for path in cmp.paths:
        table.add_column(path, justify="right", no_wrap=True)
    for h, p in pairs:
        table.add_column(f"{h}/{p}", justify="right", style="bold", no_wrap=True)
    blank = [""] * len(pairs)

    def ratios(values: Callable[[PathResult], float]) -> list[str]:
        return [ratio_text(values(cmp.paths[h]), values(cmp.paths[p])) for h, p in pairs]

    for counter in COUNTERS:
        if counter == "wall_ns":
            table.add_row(COUNTER_LABELS[counter], *[_us(r.wall_per_io()[0]) for r in results],
                          *ratios(lambda r: r.wall_per_io()[0]))
            table.add_row("  min-max", *[f"{_us(r.wall_per_io()[1])}-{_us(r.wall_per_io()[2])}"
                                         for r in results], *blank, style="dim", end_section=True)
            continue
        table.add_row(COUNTER_LABELS[counter], *[format_number(r.per_io(counter)) for r in results],
                      *ratios(_per_io_of(counter)))
        if counter == "vmexits":
            by_reason = [{k: v / r.ios for k, v in
                          dict(getattr(r.counts, "exits_by_reason", {}) or {}).items()}
                         for r in results]
            for name in sorted({k for rs in by_reason for k in rs},
                               key=lambda k: -max(rs.get(k, 0.0) for rs in by_reason)):
                table.add_row(f"  {name}", *[format_number(rs.get(name, 0.0)) for rs in by_reason],
                              *blank, style="dim")
        if counter == "page_flips":
            table.add_section()
    if cmp.ghz > 0:
        table.add_row(f"  us at {cmp.ghz:g} GHz",
                      *[_us(r.per_io("modeled_cycles") / cmp.ghz) for r in results], *blank,
                      style="dim")
    components = sorted({k for r in results for k in r.components},
                        key=lambda k: -max(r.components_per_io().get(k, 0.0) for r in results))
    for name in components:
        if all(r.components.get(name, 0.0) == 0 for r in results):
            continue
        table.add_row(f"  {name.replace('_', ' ')}",
                      *[format_number(round(r.components_per_io().get(name, 0.0))) for r in results],
                      *ratios(_component_of(name)),
                      style="dim")
    if cmp.micro_ns:
        table.add_section()
        for name in cmp.micro_ns:
            table.add_row(f"wall / {name}", *[f"{r.micro_ratios.get(name, 0.0):,.1f}x" for r in results],
                          *blank)
    console.print(table)
    if cmp.micro_ns:
        figures = "; ".join(f"{name} {_us(ns)} us: {what}" for name, ns in cmp.micro_ns.items()
                            for n, _, what in MICROBENCHMARKS if n == name)
        console.print(f"wall / X: the path's wall time per {cmp.unit} over a microbenchmark of this "
                      f"run (median of {cmp.repeats}, {MICRO_IOS} each): {figures}", highlight=False)
    console.print(f"[bold]why:[/] {cmp.explanation()}", highlight=False)


# ---- --timeline: one I/O of each path as Perfetto trace-event JSON ----

DOM0_TID = 1000  # Dom0's backends get their own track beside the guest's vCPUs


def _signature(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (record.get("reason"), record.get("port"), record.get("direction"),
            record.get("hypercall"), record.get("op"))


def _marker_test() -> Callable[[Mapping[str, Any]], bool] | None:
    """The workloads' phase markers (hvm/workloads.py): an HVM `in al, 0xE9`, a PV hypercall 63."""
    try:
        from pv.trace_pv import HYPERCALL_BASE

        from . import workloads
        port, call = workloads.HVM_MARKER_PORT, workloads.PV_MARKER_HYPERCALL
    except (ImportError, AttributeError):
        return None

    def is_marker(r: Mapping[str, Any]) -> bool:
        return ((r.get("reason") == "IO_INSTRUCTION" and r.get("port") == port
                 and r.get("direction") == "in") or r.get("reason_code") == HYPERCALL_BASE + call)

    return is_marker


def _io_phase(recs: list[dict[str, Any]], wall_ns: int) -> tuple[list[dict[str, Any]], int]:
    """The records of the I/O phase and its length: between the guest's two phase markers when
    the trace has them; otherwise the last `wall_ns` of the trace (setup comes first)."""
    is_marker = _marker_test()
    if is_marker is not None:
        marks = [i for i, r in enumerate(recs) if is_marker(r)]
        if len(marks) >= 2:
            first = recs[marks[0]]
            end = next((i for i in marks[1:] if recs[i].get("domid") == first.get("domid")),
                       marks[1])
            return recs[marks[0] + 1:end], recs[end]["t_ns"] - first["t_ns"]
    end = max(r["t_ns"] + r.get("latency_ns", 0) for r in recs)
    start = max(recs[0]["t_ns"], end - max(0, wall_ns))
    return [r for r in recs if r["t_ns"] >= start] or recs, max(0, wall_ns)


def one_io_records(records: Iterable[dict[str, Any]], ios: int, wall_ns: int) -> list[dict[str, Any]]:
    """The records of one I/O from the middle of a run's I/O phase.

    An I/O starts with a record like the phase's first (same reason, port, direction,
    hypercall). When such records come a whole number of times per I/O, I/O number ios // 2 is
    the records from its first such record to the next I/O's; otherwise it is a window
    (phase length) / ios long from the first such record in the middle of the phase."""
    recs = sorted(records, key=lambda r: (r["t_ns"], r.get("seq", 0)))
    if not recs:
        return []
    phase, length = _io_phase(recs, wall_ns)
    if not phase:
        return []
    ios = max(1, ios)
    starts = [i for i, r in enumerate(phase) if _signature(r) == _signature(phase[0])]
    if len(starts) >= ios and len(starts) % ios == 0:
        k, middle = len(starts) // ios, ios // 2
        end = starts[(middle + 1) * k] if (middle + 1) * k < len(starts) else len(phase)
        return phase[starts[middle * k]:end]
    per = max(1, length // ios) if length > 0 else phase[-1]["t_ns"] - phase[0]["t_ns"] + 1
    target = phase[0]["t_ns"] + (ios // 2) * per
    sig = _signature(phase[0])
    anchor = (next((r for r in phase if r["t_ns"] >= target and _signature(r) == sig), None)
              or next((r for r in phase if r["t_ns"] >= target), None) or phase[0])
    lo = anchor["t_ns"]
    return [r for r in phase if lo <= r["t_ns"] < lo + per]


def _rebased(record: dict[str, Any], t0: int) -> dict[str, Any]:
    """The record with times from the window's start and its track: Dom0's records on their own
    track, each PV domain's vCPU on one of its own."""
    out = dict(record)
    out["t_ns"] = record["t_ns"] - t0
    steps = record.get("steps")
    if isinstance(steps, dict):
        out["steps"] = {k: (v - t0 if isinstance(v, int | float) and not isinstance(v, bool) else v)
                        for k, v in steps.items()}
    domid = record.get("domid")
    if record.get("handled_by") == "dom0" or domid == 0:
        out["vcpu"] = DOM0_TID
    elif isinstance(domid, int):
        out["vcpu"] = 100 * domid + int(record.get("vcpu", 0))
    return out


def _track_name(tid: int) -> str:
    if tid == DOM0_TID:
        return "Dom0 (backends, device model)"
    if tid >= 100:
        return f"dom{tid // 100} vCPU {tid % 100}"
    return f"vCPU {tid}"


def write_timeline(cmp: Comparison, out: TextIO) -> int:
    """Chrome trace-event JSON (ui.perfetto.dev): ONE I/O of each path, each path its own process,
    all starting at 0 so they sit side by side. Returns the number of exit/event slices."""
    from .trace_export import export_perfetto
    from .trace_summary import read_trace

    events: list[dict[str, Any]] = []
    slices = 0
    for pid, (path, result) in enumerate(cmp.paths.items(), 1):
        label = f"{path}: one {cmp.io_phrase()} ({cmp.workload})"
        trace = getattr(result.counts, "trace", None)
        window: list[dict[str, Any]] = []
        if trace is not None and Path(trace).exists():
            window = one_io_records(read_trace(trace), result.ios, int(result.counts.wall_ns))
        if not window:
            events.append({"ph": "M", "name": "process_name", "pid": pid,
                           "args": {"name": f"{label}: no trace records"}})
            continue
        t0 = window[0]["t_ns"]
        buf = io.StringIO()
        slices += export_perfetto((_rebased(r, t0) for r in window), buf, process_name=label)
        for event in json.loads(buf.getvalue())["traceEvents"]:
            event["pid"] = pid
            if event.get("ph") == "M" and event.get("name") == "thread_name":
                event["args"] = {"name": _track_name(int(event.get("tid", 0)))}
            events.append(event)
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid,
                       "args": {"sort_index": pid}})
    json.dump({"displayTimeUnit": "ns", "traceEvents": events}, out)
    out.write("\n")
    return slices
