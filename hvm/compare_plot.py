"""PNG figures for `hvmlab compare` and `hvmlab sweep` (matplotlib's object API on the Agg canvas; no pyplot state)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from .compare import Comparison, format_number

# Component colours: one qualitative palette (colour-blind safe, Okabe-Ito), in a fixed order
# so the same component keeps its colour across the bars of one figure.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000", "#999999", "#882255", "#44AA99", "#117733")
LOG_SPREAD = 30.0  # a log axis once the largest value is this many times the smallest


def _path_colour(path: str, index: int) -> str:
    shades_hvm = ("#D55E00", "#E69F00", "#CC79A7")
    shades_pv = ("#0072B2", "#009E73", "#56B4E9")
    shades = shades_hvm if path.startswith("hvm") else shades_pv
    return shades[index % len(shades)]


def path_colours(paths: Sequence[str]) -> dict[str, str]:
    seen = {"hvm": 0, "pv": 0}
    colours = {}
    for path in paths:
        kind = "hvm" if path.startswith("hvm") else "pv"
        colours[path] = _path_colour(path, seen[kind])
        seen[kind] += 1
    return colours


def format_us(us: float) -> str:
    if us >= 10_000:
        return f"{us / 1000:,.0f} ms"
    if us >= 1000:
        return f"{us / 1000:.1f} ms"
    if us >= 100:
        return f"{us:,.0f} \u00b5s"
    return f"{us:.1f} \u00b5s" if us >= 10 else f"{us:.2f} \u00b5s"


def _wants_log(values: Iterable[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) >= LOG_SPREAD


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", facecolor="white")
    return out


def plot_comparison(cmp: Comparison, out: Path) -> Path:
    """Two panels: modeled cycles per I/O stacked by component for each path (log scale when the
    paths are far apart), and the wall time per I/O measured here (median, min-max whiskers)."""
    paths = list(cmp.paths)
    results = [cmp.paths[p] for p in paths]
    per_io = [r.components_per_io() for r in results]
    components = sorted({k for parts in per_io for k, v in parts.items() if v > 0},
                        key=lambda k: -max(parts.get(k, 0.0) for parts in per_io))
    totals = [sum(parts.values()) for parts in per_io]

    fig = Figure(figsize=(12, 5.4), dpi=150, layout="constrained")
    ax_model, ax_wall = fig.subplots(1, 2, width_ratios=(1.6, 1))
    x = list(range(len(paths)))
    log_model = _wants_log(totals)
    if log_model:
        ax_model.set_yscale("log")
    bottoms = [0.0] * len(paths)
    for i, name in enumerate(components):
        heights = [parts.get(name, 0.0) for parts in per_io]
        ax_model.bar(x, heights, bottom=bottoms, width=0.6, color=PALETTE[i % len(PALETTE)],
                     edgecolor="white", linewidth=0.6, label=name.replace("_", " "))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for xi, total in zip(x, totals, strict=True):
        label = f"{format_number(round(total))} cycles"
        if cmp.ghz > 0:
            label += f"\n{format_us(total / (cmp.ghz * 1000))} at {cmp.ghz:g} GHz"
        ax_model.annotate(label, (xi, max(total, 1e-9)), xytext=(0, 4), textcoords="offset points",
                          ha="center", va="bottom", fontsize=9)
    positive = [t for t in totals if t > 0]
    if positive:
        if log_model:
            ax_model.set_ylim(min(positive) / 4, max(positive) * 8)
        else:
            ax_model.set_ylim(0, max(positive) * 1.25)
            ax_model.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax_model.set_xticks(x, paths, fontsize=11)
    ax_model.set_ylabel(f"modeled cycles per {cmp.unit}" + (" (log scale)" if log_model else ""))
    ax_model.set_title(f"modeled: counts x per-event costs ({cmp.profile_name})", fontsize=11)
    if components:
        ax_model.legend(title="component", fontsize=8, title_fontsize=9, frameon=False,
                        loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _style(ax_model)

    walls = [r.wall_per_io() for r in results]
    med = [w[0] / 1000 for w in walls]
    lo = [(w[0] - w[1]) / 1000 for w in walls]
    hi = [(w[2] - w[0]) / 1000 for w in walls]
    colours = path_colours(paths)
    log_wall = _wants_log(med)
    if log_wall:
        ax_wall.set_yscale("log")
    ax_wall.bar(x, med, width=0.6, color=[colours[p] for p in paths], alpha=0.85,
                yerr=[lo, hi], capsize=4, error_kw={"linewidth": 1, "ecolor": "#333333"})
    tops = [m + h for m, h in zip(med, hi, strict=True)]
    for xi, value, top in zip(x, med, tops, strict=True):
        ax_wall.annotate(format_us(value), (xi, max(top, 1e-9)), xytext=(0, 4),
                         textcoords="offset points", ha="center", va="bottom", fontsize=9)
    if med and max(tops) > 0:
        if log_wall:
            ax_wall.set_ylim(min(v for v in med if v > 0) / 4, max(tops) * 8)
        else:
            ax_wall.set_ylim(0, max(tops) * 1.2)
    ax_wall.set_xticks(x, paths, fontsize=11)
    ax_wall.set_ylabel(f"\u00b5s per {cmp.unit}" + (" (log scale)" if log_wall else ""))
    ax_wall.set_title(f"measured here (median of {cmp.repeats}, min\u2013max)", fontsize=11)
    _style(ax_wall)

    batch = f", batch {cmp.batch}" if cmp.batch > 1 else ""
    fig.suptitle(f"{cmp.workload}: cost of one {cmp.io_phrase()} ({cmp.ios} I/Os{batch})",
                 fontsize=14, fontweight="bold")
    return _save(fig, out)


def _label(value: Any) -> str:
    return str(value)


def _tick(param: str, value: float) -> str:
    if param == "size":
        n = int(value)
        for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if n >= scale and n % scale == 0:
                return f"{n // scale} {unit}"
        return f"{n} B"
    return format_number(value)


def plot_sweep(rows: Sequence[Mapping[str, Any]], x_param: str, other_params: Sequence[str],
               out: Path, title: str, unit: str = "I/O") -> Path:
    """Cost per I/O against one swept parameter, one line per path (and per value of the other
    swept parameters): modeled cycles on the left, wall time measured here on the right."""
    fig = Figure(figsize=(12, 5), dpi=150, layout="constrained")
    ax_model, ax_wall = fig.subplots(1, 2)
    paths = list(dict.fromkeys(str(r["path"]) for r in rows))
    colours = path_colours(paths)
    groups = list(dict.fromkeys(tuple(r[p] for p in other_params) for r in rows))
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v")
    xs_all = [float(r[x_param]) for r in rows]
    model_all = [float(r["modeled_cycles"]) for r in rows]
    wall_all = [float(r["wall_ns"]) / 1000 for r in rows]
    for path in paths:
        for gi, group in enumerate(groups):
            points = sorted((float(r[x_param]), r) for r in rows if r["path"] == path
                            and tuple(r[p] for p in other_params) == group)
            if not points:
                continue
            xs = [p[0] for p in points]
            suffix = ", ".join(f"{k}={_label(v)}" for k, v in zip(other_params, group, strict=True))
            label = f"{path} ({suffix})" if suffix else path
            style = {"color": colours[path], "linestyle": styles[gi % len(styles)],
                     "marker": markers[gi % len(markers)], "linewidth": 1.8, "markersize": 5}
            ax_model.plot(xs, [float(p[1]["modeled_cycles"]) for p in points], label=label, **style)
            med = [float(p[1]["wall_ns"]) / 1000 for p in points]
            lo = [m - float(p[1].get("wall_ns_min", p[1]["wall_ns"])) / 1000 for m, p in zip(med, points, strict=True)]
            hi = [float(p[1].get("wall_ns_max", p[1]["wall_ns"])) / 1000 - m for m, p in zip(med, points, strict=True)]
            ax_wall.errorbar(xs, med, yerr=[lo, hi], capsize=3, label=label, **style)
    for ax, values, ylabel in ((ax_model, model_all, f"modeled cycles per {unit}"),
                               (ax_wall, wall_all, f"\u00b5s per {unit}, measured here")):
        if _wants_log(xs_all) and min(xs_all) > 0:
            ax.set_xscale("log", base=2)
        if _wants_log(values):
            ax.set_yscale("log")
            ylabel += " (log scale)"
        ax.set_xlabel({"size": f"bytes per {unit}", "ios": f"{unit}s per run",
                       "batch": "requests per notification (batch)"}.get(x_param, x_param))
        ax.set_ylabel(ylabel)
        ticks = sorted(set(xs_all))
        ax.set_xticks(ticks, [_tick(x_param, t) for t in ticks])
        ax.minorticks_off()
        _style(ax)
    ax_model.set_title("modeled", fontsize=11)
    ax_wall.set_title("measured (median, min-max)", fontsize=11)
    ax_wall.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=14, fontweight="bold")
    return _save(fig, out)
