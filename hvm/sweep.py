"""`hvmlab sweep`: `hvmlab compare` over a grid of parameters, run in worker processes, written as CSV and a PNG of cost per I/O against the parameter."""

from __future__ import annotations

import csv
import itertools
import multiprocessing
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compare import COUNTERS, CompareError, Comparison, compare, csv_number

SWEEPABLE = ("size", "ios", "batch")
SWEEP_COLUMNS = ("workload", "size", "ios", "batch", "path", *COUNTERS, "wall_ns_min",
                 "wall_ns_max", "repeats", "profile")
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_value(text: str) -> int:
    """'4096', '4K', '4KiB', '0x1000' -> 4096."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)(?:i?[bB])?\s*", text)
    if m:
        return int(m.group(1)) * _SUFFIX[m.group(2).lower()]
    try:
        return int(text, 0)
    except ValueError:
        raise CompareError(f"bad value {text!r}: use a number such as 512, 4K or 64KiB") from None


def parse_param(text: str) -> tuple[str, list[int]]:
    """'size=512,4096,65536' -> ('size', [512, 4096, 65536])."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not values.strip():
        raise CompareError(f"bad --param {text!r}: use NAME=V1,V2,... (NAME one of "
                           f"{', '.join(SWEEPABLE)})")
    if name not in SWEEPABLE:
        raise CompareError(f"cannot sweep {name!r}: sweepable parameters are {', '.join(SWEEPABLE)}")
    parsed = [parse_value(v) for v in values.split(",") if v.strip()]
    if any(v < 1 for v in parsed):
        raise CompareError(f"--param {name}: every value must be at least 1")
    return name, list(dict.fromkeys(parsed))


def parse_params(texts: Sequence[str]) -> dict[str, list[int]]:
    params: dict[str, list[int]] = {}
    for text in texts:
        name, values = parse_param(text)
        if name in params:
            raise CompareError(f"--param {name} given twice: list every value in one --param")
        params[name] = values
    if not params:
        raise CompareError("sweep needs at least one --param NAME=V1,V2,...")
    return params


def grid(params: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """Every combination of the parameters' values, the first parameter varying slowest."""
    names = list(params)
    return [dict(zip(names, combo, strict=True)) for combo in
            itertools.product(*(params[n] for n in names))]


def rows_of(cmp: Comparison) -> list[dict[str, Any]]:
    """One CSV row per path of one comparison: every counter per I/O."""
    rows = []
    for path, result in cmp.paths.items():
        _, lo, hi = result.wall_per_io()
        row: dict[str, Any] = {"workload": cmp.workload, "size": cmp.size, "ios": cmp.ios,
                               "batch": cmp.batch, "path": path}
        row.update({counter: result.per_io(counter) for counter in COUNTERS})
        row.update({"wall_ns_min": lo, "wall_ns_max": hi, "repeats": cmp.repeats,
                    "profile": cmp.profile_name})
        rows.append(row)
    return rows


def run_point(workload: str, point: Mapping[str, int], profile: str, work_dir: Path, repeats: int,
              runner: Callable[..., Any] | None, profile_loader: Callable[[str], Any] | None,
              modeler: Callable[[Any, Any], dict[str, float]] | None,
              workloads: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One grid point, in a worker process: a compare without microbenchmarks, in a scratch
    directory removed afterwards (only the counts are kept)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        cmp = compare(workload, point.get("ios"), point.get("size"), profile, Path(scratch),
                      point.get("batch", 1), repeats=repeats, micro=False, runner=runner,
                      profile_loader=profile_loader, modeler=modeler, workloads=workloads)
    return rows_of(cmp)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    csv_path: Path
    png_path: Path
    x_param: str


def write_sweep_csv(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    with open(out, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SWEEP_COLUMNS, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (csv_number(v) if isinstance(v, float) else v) for k, v in row.items()})
    return out


def sweep(workload: str, params: Mapping[str, Sequence[int]], profile: str, out_dir: Path, *,
          workers: int = 2, repeats: int = 1, runner: Callable[..., Any] | None = None,
          profile_loader: Callable[[str], Any] | None = None,
          modeler: Callable[[Any, Any], dict[str, float]] | None = None,
          workloads: Mapping[str, Any] | None = None, console: Any = None) -> SweepResult:
    """Run `compare` at every point of the grid in `workers` processes (with a progress bar on
    `console`), then write OUT_DIR/WORKLOAD-sweep.csv and WORKLOAD-sweep.png. The first failing
    point (a WorkloadError: wrong data) stops the sweep and is raised; nothing is written."""
    from .compare import _real_workloads

    known = workloads if workloads is not None else _real_workloads()
    if workload not in known:
        raise CompareError(f"unknown workload {workload!r}; known: {', '.join(sorted(known))}")
    if workers < 1:
        raise CompareError("--workers must be at least 1")
    if repeats < 1:
        raise CompareError("--repeats must be at least 1")
    points = grid(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir / "runs"
    rows: list[dict[str, Any]] = []
    # spawn, not fork: the parent runs rich's refresh thread and perhaps trace writer threads,
    # and a forked child would inherit their locks in whatever state they were in
    context = multiprocessing.get_context("spawn")
    progress = _progress(console)
    with progress, ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        task = progress.add_task(f"sweep {workload}", total=len(points))
        pending: set[Future[list[dict[str, Any]]]] = {
            pool.submit(run_point, workload, point, profile, work_dir, repeats, runner,
                        profile_loader, modeler, workloads) for point in points}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                rows.extend(future.result())
                progress.advance(task)
    order = {tuple(p.items()): i for i, p in enumerate(points)}
    rows.sort(key=lambda r: (order.get(tuple((k, r[k]) for k in params), 0), r["path"]))
    x_param = next((name for name, values in params.items() if len(values) > 1), next(iter(params)))
    others = [name for name in params if name != x_param and len(params[name]) > 1]
    csv_path = write_sweep_csv(rows, out_dir / f"{workload}-sweep.csv")
    from .compare_plot import plot_sweep

    unit = str(getattr(known[workload], "unit", "I/O"))
    profile_name = rows[0]["profile"] if rows else profile
    png_path = plot_sweep(rows, x_param, others, out_dir / f"{workload}-sweep.png",
                          f"{workload}: cost per {unit} against {x_param} ({profile_name})", unit)
    return SweepResult(rows, csv_path, png_path, x_param)


def _progress(console: Any) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console or Console(stderr=True), transient=True)
