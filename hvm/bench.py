"""`hvmlab bench vmexit`: what an exit costs here, against a bare Unicorn hook measured in the same run."""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .affinity import pair_cpu, pin_current_thread
from .console import ConsoleSink
from .engine import bare_out_hook_loop, bare_run
from .loader import GuestImage, Segment
from .machine import RunOptions, run
from .nasm import assemble_text

REPEATS = 3
# Below these counts a measurement lasts a few tens of ms and a run's start-up noise can
# outweigh the difference it measures: the ratios are then printed with a warning.
STEADY_EXITS = 50_000
STEADY_IOS = 2_000
GUEST_CODE_REPEATS = 11  # its pairs are the noisiest (a whole run's speed moves with the host)
PAIRED_REPEATS = 7  # a ratio near its target: more pairs, so a noisy pair or two cannot decide it

OUT_LOOP = """bits 32
org 0x100000
    cli
    mov ecx, {n}
    mov dx, 0xe9
.l: out dx, al
    dec ecx
    jnz .l
    hlt
"""
CPUID_LOOP = """bits 32
org 0x100000
    cli
    mov esi, {n}
.l: xor eax, eax
    cpuid
    dec esi
    jnz .l
    hlt
"""
COMPUTE_LOOP = """bits 32
org 0x100000
    cli
    mov ecx, {n}
    xor eax, eax
.l: add eax, ecx
    xor eax, 0x5a5a
    dec ecx
    jnz .l
    hlt
"""


DM_IN_LOOP = """bits 32
org 0x100000
    cli
    mov ecx, {n}
    mov dx, 0x3ff          ; COM1 scratch register: the device model answers
.l: in al, dx
    dec ecx
    jnz .l
    hlt
"""
DM_OUT_LOOP = DM_IN_LOOP.replace("in al, dx", "out dx, al")
MMIO_READ_LOOP = """bits 32
org 0x100000
    cli
    mov ecx, {n}
.l: mov al, [0xb8000]      ; VGA text memory: an EPT violation, then a COPY ioreq
    dec ecx
    jnz .l
    hlt
"""
BUFFERED_WRITE_LOOP = MMIO_READ_LOOP.replace("mov al, [0xb8000]", "mov [0xb8000], al")


def _image(source: str, n: int) -> GuestImage:
    asm = assemble_text(source.format(n=n), name="bench.asm")
    return GuestImage("bench", "asm", 32, 0x100000, (Segment(0x100000, asm.code, len(asm.code)),))


def _timed_run(source: str, n: int, trace: Path | None = None, dm_affinity: str = "vcpu") -> float:
    image = _image(source, n)
    start = time.perf_counter()
    result = run(image, RunOptions(timeout_s=600, trace=trace, dm_affinity=dm_affinity), ConsoleSink(limit=0))
    elapsed = time.perf_counter() - start
    if result.ended_by != "halt":
        raise RuntimeError(f"benchmark guest ended by {result.ended_by}: {result.message}")
    return elapsed


def _run_guest_loop(source: str, n: int, dm_affinity: str = "vcpu") -> float:
    return _timed_run(source, n, dm_affinity=dm_affinity)


def _per_item(measure: Callable[[int], float], n: int) -> tuple[float, float, float]:
    """Seconds per item from the difference of runs with 2n and n items (fixed costs cancel);
    median, min and max over REPEATS."""
    values = []
    for _ in range(REPEATS):
        values.append((measure(2 * n) - measure(n)) / n)
    return _spread(values)


def _paired(base: Callable[[int], float], other: Callable[[int], float], n: int,
            repeats: int = PAIRED_REPEATS, same_repeat: bool = False) -> tuple[list[float], list[float]]:
    """Seconds per item of `base` and of `other` in each repeat. A repeat runs both with n
    items, back to back, so a machine that changes speed between repeats changes both alike,
    and with n // 2 items. A run's fixed cost (start-up, tear-down) is taken off as the fastest
    of the `repeats` shorter runs: a noisy host only ever adds time, so the fastest is the best
    estimate of that cost, and each repeat's figure has the noise of one run, not of two. With
    `same_repeat`, the shorter run of the same repeat is taken off instead (for a fixed cost
    that is not steady from run to run)."""
    small = max(1, n // 2)
    base_big, other_big, base_small, other_small = [], [], [], []
    for _ in range(repeats):
        base_big.append(base(n))
        other_big.append(other(n))
        base_small.append(base(small))
        other_small.append(other(small))
    if same_repeat:
        return ([(t - f) / (n - small) for t, f in zip(base_big, base_small, strict=True)],
                [(t - f) / (n - small) for t, f in zip(other_big, other_small, strict=True)])
    base_fixed, other_fixed = min(base_small), min(other_small)
    return ([(t - base_fixed) / (n - small) for t in base_big],
            [(t - other_fixed) / (n - small) for t in other_big])


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _ratios(base_values: list[float], other_values: list[float]) -> list[float]:
    return [o / b for b, o in zip(base_values, other_values, strict=True)]


def _fastest_ratio(base_values: list[float], other_values: list[float]) -> float:
    """other / base, each side's fastest repeat: a shared host only ever adds time, so the
    fastest is the closest to what the code itself costs (as timeit advises)."""
    return min(other_values) / min(base_values)


def _on_cpu(cpu: int | None, fn: Callable[..., float], *args: Any) -> float:
    """fn(*args) on a thread of its own, pinned to `cpu` (None: anywhere)."""
    import threading

    result: list[float] = []

    def body() -> None:
        pin_current_thread(cpu)
        result.append(fn(*args))

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed on its thread")
    return result[0]


def _floor_round_trip(n: int, cpu: int | None = None) -> float:
    """Seconds for n blocking hand-offs to another thread and back, through the same event
    channels the ioreq path uses: the floor a device-model round trip cannot beat. `cpu`: both
    threads on that host CPU, as a vCPU and its device model are (hvm.affinity)."""
    import threading

    from .evtchn import make_interdomain_pair

    mine, theirs = make_interdomain_pair(name="bench")

    def echo() -> None:
        pin_current_thread(cpu)
        for _ in range(n):
            theirs.wait(5.0)
            theirs.notify()

    result: list[float] = []

    def ask() -> None:  # its own thread too, so pinning it leaves the caller's CPUs alone
        pin_current_thread(cpu)
        start = time.perf_counter()
        for _ in range(n):
            mine.notify()
            mine.wait(5.0)
        result.append(time.perf_counter() - start)

    threads = [threading.Thread(target=echo, daemon=True), threading.Thread(target=ask, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    mine.close()
    theirs.close()
    return result[0]


def bench_ioreq(ios: int, as_json: bool) -> int:
    n = max(200, ios)
    console = Console(stderr=True)
    figures: dict[str, dict[str, Any]] = {}

    def record(key: str, label: str, triple: tuple[float, float, float]) -> None:
        med, lo, hi = triple
        figures[key] = {"label": label, "median": med * 1e6, "min": lo * 1e6, "max": hi * 1e6, "unit": "us"}

    # The floor and the round trip are measured in pairs, back to back: how fast a thread
    # hand-off is here drifts (which cores the threads land on, what else the host runs).
    # Both with the placement a run has by default: the two threads on one host CPU.
    cpu = pair_cpu(0)
    with console.status(f"the floor and an IN round trip, {PAIRED_REPEATS} pairs"):
        floor, dm_in = _paired(functools.partial(_floor_round_trip, cpu=cpu),
                               functools.partial(_run_guest_loop, DM_IN_LOOP), n)
        round_trip_ratios = _ratios(floor, dm_in)
        record("floor", "thread hand-off and back through an event channel, both threads on one "
               "host CPU (the floor)", _spread(floor))
        record("dm_in", "IN served by the device-model thread (ioreq round trip)", _spread(dm_in))
    steps = (
        ("dm_out", "OUT served by the device-model thread", DM_OUT_LOOP, None),
        ("mmio_read", "MMIO read (EPT violation, COPY ioreq)", MMIO_READ_LOOP, None),
        ("buffered_write", "MMIO write through the buffered ioreq page", BUFFERED_WRITE_LOOP, None),
        ("floor_any_cpu", "the floor with its threads placed by the host scheduler", None, _floor_round_trip),
        ("dm_in_any_cpu", "the IN round trip with --dm-affinity any", None,
         functools.partial(_run_guest_loop, DM_IN_LOOP, dm_affinity="any")),
    )
    for key, label, source, fn in steps:
        with console.status(label):
            if fn is not None:
                record(key, label, _per_item(fn, n))
            else:
                assert source is not None
                record(key, label, _per_item(functools.partial(_run_guest_loop, source), n))
    floor_us = figures["floor"]["median"]
    ratios = {"dm_round_trip_vs_floor": _fastest_ratio(floor, dm_in),
              "buffered_write_vs_round_trip": figures["buffered_write"]["median"] / figures["dm_out"]["median"]}
    targets = {"dm_round_trip_vs_floor": ("<=", 1.5)}
    if as_json:
        print(json.dumps({"figures": figures, "ratios": ratios, "repeats": REPEATS,
                          "paired_repeats": PAIRED_REPEATS, "dm_round_trip_vs_floor_each": round_trip_ratios,
                          "ios_per_measurement": n, "targets": {k: f"{op} {v}" for k, (op, v) in targets.items()}}))
        return 0
    out = Console()
    if n < STEADY_IOS:
        out.print(f"note: {n:,} I/Os per measurement is too few for steady figures (start-up noise "
                  f"dominates); use --ios {STEADY_IOS:,} or more (default 5,000)")
    table = Table(title=f"hvmlab bench ioreq (median of {REPEATS}; the floor and IN: of "
                        f"{PAIRED_REPEATS} pairs; {n:,} I/Os per measurement)")
    for col in ("figure", "median", "min", "max", "x floor"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for fig in figures.values():
        table.add_row(str(fig["label"]), f"{fig['median']:.2f} us", f"{fig['min']:.2f}", f"{fig['max']:.2f}",
                      f"{fig['median'] / floor_us:.2f}x")
    out.print(table)
    for key, value in ratios.items():
        target = targets.get(key)
        verdict = f"  (target {target[0]} {target[1]}: {'met' if value <= target[1] else 'NOT met'})" if target else ""
        if key == "dm_round_trip_vs_floor":
            verdict += (f"  (fastest of {PAIRED_REPEATS} runs each; each pair: "
                        f"{', '.join(f'{r:.2f}' for r in round_trip_ratios)})")
        out.print(f"{key}: {value:.2f}{verdict}")
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_during_run(exits: int) -> tuple[int, int]:
    """RSS sampled inside ONE run of `exits` exits: after the first fifth (warmed up) and at
    the end. Per-exit growth is the difference over the other four fifths."""
    import threading

    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            samples.append((time.perf_counter(), _rss_bytes()))

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    try:
        _timed_run(OUT_LOOP, exits)
    finally:
        done.set()
        sampler.join()
    end = time.perf_counter()
    if len(samples) < 5:
        return _rss_bytes(), _rss_bytes()
    warm = start + (end - start) / 5
    first = next(rss for t, rss in samples if t >= warm)
    return first, samples[-1][1]


def bench_vmexit(exits: int, memory_exits: int, as_json: bool) -> int:
    n = max(1000, exits)
    console = Console(stderr=True)
    figures: dict[str, dict[str, Any]] = {}

    def record(key: str, label: str, triple: tuple[float, float, float], unit: str = "us") -> None:
        med, lo, hi = triple
        scale = 1e6 if unit == "us" else 1e9
        figures[key] = {"label": label, "median": med * scale, "min": lo * scale, "max": hi * scale,
                        "unit": unit}

    with console.status("bare Unicorn OUT hook (baseline)"):
        code = _image(OUT_LOOP, 1).segments[0].data
        record("bare_hook", "bare Unicorn OUT hook (Python binding), the baseline",
               _per_item(lambda k: bare_out_hook_loop(_image(OUT_LOOP, k).segments[0].data), n))
    del code
    with console.status("exit handled in the hypervisor (0xE9 out)"):
        record("hv_exit", "IO_INSTRUCTION exit handled in the hypervisor (out dx, al to 0xE9)",
               _per_item(lambda k: _timed_run(OUT_LOOP, k), n))
    with console.status("CPUID exit"):
        record("cpuid_exit", "CPUID exit", _per_item(lambda k: _timed_run(CPUID_LOOP, k), n))
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "bench.trace"
        with console.status("exit with --trace (each run paired with one without)"):
            untraced, traced = _paired(lambda k: _timed_run(OUT_LOOP, k),
                                       lambda k: _timed_run(OUT_LOOP, k, trace), n)
            trace_ratios = _ratios(untraced, traced)
            record("hv_exit_traced", "the same exit with --trace on", _spread(traced))
    loops = max(50_000_000, 500 * n)  # long enough that start-up noise cannot hide in it
    with console.status("guest code without exits, in pairs with bare Unicorn"):
        # The bare loop runs on the host CPU hvmlab's vCPU thread is pinned to (hvm.affinity).
        bare, guest = _paired(lambda k: _on_cpu(pair_cpu(0), bare_run, _image(COMPUTE_LOOP, k).segments[0].data),
                              lambda k: _timed_run(COMPUTE_LOOP, k), loops, GUEST_CODE_REPEATS, same_repeat=True)
        speed_ratios = _ratios(guest, bare)  # bare / hvmlab: above 1, hvmlab is faster
        record("guest_loop", "guest loop iteration, no exits (hvmlab)", _spread(guest), "ns")
        record("bare_loop", "the same loop on bare Unicorn, no hooks", _spread(bare), "ns")
    with console.status(f"memory over {memory_exits:,} exits"):
        before, after = _rss_during_run(memory_exits)
    base = figures["bare_hook"]["median"]
    ratios = {
        "hv_exit_vs_bare_hook": figures["hv_exit"]["median"] / base,
        "cpuid_exit_vs_bare_hook": figures["cpuid_exit"]["median"] / base,
        # Each side's fastest repeat (the pairs ran back to back; see _paired, _fastest_ratio).
        "trace_on_vs_off": _fastest_ratio(untraced, traced),
        # Guest code: the median pair (a run of hvmlab's fixed cost varies more than a bare one's).
        "guest_code_speed_vs_bare_unicorn": statistics.median(speed_ratios),
    }
    memory = {"rss_before": before, "rss_after": after, "exits": memory_exits,
              "growth_bytes_per_exit": (after - before) / (memory_exits * 0.8)}
    targets = {"hv_exit_vs_bare_hook": ("<=", 5.0), "trace_on_vs_off": ("<=", 1.2),
               "guest_code_speed_vs_bare_unicorn": (">=", 0.9)}
    if as_json:
        print(json.dumps({"figures": figures, "ratios": ratios, "memory": memory,
                          "targets": {k: f"{op} {v}" for k, (op, v) in targets.items()},
                          "repeats": REPEATS, "paired_repeats": PAIRED_REPEATS,
                          "trace_on_vs_off_each": trace_ratios,
                          "guest_code_speed_vs_bare_unicorn_each": speed_ratios, "exits_per_measurement": n}))
        return 0
    out = Console()
    if n < STEADY_EXITS:
        out.print(f"note: {n:,} exits per measurement is too few for steady figures (start-up noise "
                  f"dominates); use --exits {STEADY_EXITS:,} or more (default 200,000)")
    table = Table(title=f"hvmlab bench vmexit (median of {REPEATS}, {n:,} exits per measurement)")
    for col in ("figure", "median", "min", "max", "x baseline"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for fig in figures.values():
        ratio = ""
        if fig["unit"] == "us":
            ratio = f"{fig['median'] / base:.2f}x"
        table.add_row(str(fig["label"]), f"{fig['median']:.3f} {fig['unit']}", f"{fig['min']:.3f}",
                      f"{fig['max']:.3f}", ratio)
    out.print(table)
    for key, value in ratios.items():
        target = targets.get(key)
        verdict = ""
        if target:
            op, limit = target
            ok = value <= limit if op == "<=" else value >= limit
            verdict = f"  (target {op} {limit}: {'met' if ok else 'NOT met'})"
        detail = ""
        each = {"trace_on_vs_off": trace_ratios, "guest_code_speed_vs_bare_unicorn": speed_ratios}.get(key)
        if each:
            how = (f"median of {GUEST_CODE_REPEATS} pairs" if key.startswith("guest_code")
                   else f"fastest of {PAIRED_REPEATS} runs each")
            detail = f"  ({how}; each pair: {', '.join(f'{r:.2f}' for r in each)})"
        out.print(f"{key}: {value:.2f}{verdict}{detail}")
    out.print(f"memory: RSS {before / 2**20:.1f} MiB a fifth of the way through {memory_exits:,} exits, "
              f"{after / 2**20:.1f} MiB at the end: {memory['growth_bytes_per_exit']:.4f} bytes per exit")
    return 0
