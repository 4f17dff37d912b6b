"""`hvmlab demo`: a short guided tour of shipped guests, ending with a trace summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from .console import ConsoleSink
from .loader import LoadError, load
from .machine import RunOptions, RunResult, run
from .qualification import decode_io
from .trace_summary import read_trace, render_summary, summarize

TOUR: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("hello", {}, "Real mode at 0000:7C00: every `out dx, al` to the 0xE9 console is an "
                  "IO_INSTRUCTION exit; `out 0xF4, al` ends the run with status (0<<1)|1."),
    ("string_io", {}, "Protected mode: one `rep outsb` is ONE exit for the whole line "
                      "(qualification 0x00E90030: string, REP, port 0xE9)."),
    ("long_hello", {}, "Long mode with identity-mapped page tables built by the loader."),
    ("cpuid", {}, "CPUID exits (reason 10): the hypervisor leaf 0x40000000 says XenVMMXenVMM."),
    ("vmcall", {}, "VMCALL exits (reason 18): Xen hypercalls xen_version and console_io."),
    ("uart", {}, "COM1 is the device model's: each access is an ioreq on the shared I/O page, "
                 "served by the device-model thread blocked in poll()."),
    ("pit", {}, "The PIT is the hypervisor's: ten IRQ0s injected at VM entry, HLT between them."),
    ("pass_through", {"pass_through": [0x80]},
     "With port 0x80 cleared in I/O bitmap A, POST-code writes no longer exit."),
    ("fault", {}, "UD2 without an IDT: EXCEPTION_NMI (vector 6), delivery fails, TRIPLE_FAULT."),
    ("unmapped", {}, "A write where there is no RAM and no device: EPT_VIOLATION, status 4."),
)


def _row(result: RunResult) -> str:
    exits = ", ".join(f"{name} {count}" for name, count in result.exits.items())
    return f"ended by [bold]{result.ended_by}[/] (status {result.exit_status}); exits: {exits}"


def _pv_tour(console: Console, out: Path) -> None:
    """The paravirtual side: two PV guests exchanging frames through netback and the bridge."""
    from pv.toolstack import MachineError, parse_machine, up

    console.rule("[bold]PV: hvmlab up examples/pv-net.toml")
    console.print("Two PV guests (frontends in guest code) send frames through shared rings, event "
                  "channels and grant copies to netback; one receives by grant copy, the other by "
                  "page flipping.")
    machine = Path(__file__).resolve().parent.parent / "examples" / "pv-net.toml"
    if not machine.exists():
        console.print("  (examples/ is not installed here: skipped)")
        return
    try:
        result = up(parse_machine(machine, out))
    except MachineError as exc:
        console.print(f"[red]  {exc}")
        return
    for d in result.domains:
        got = [line for line in d.console.splitlines() if "received" in line or "rx by" in line]
        for line in got:
            console.print(Text.assemble((f"  {d.name}> ", "green"), line))
        console.print(f"  {d.name}: ended by [bold]{d.ended_by}[/] (status {d.exit_status}); "
                      f"{d.counters.get('hypercalls_total', 0)} hypercalls, "
                      f"{d.counters.get('upcalls', 0)} upcalls", highlight=False)
    console.print(f"  {result.frames} frames crossed the bridge; capture in {out}/pv-net.pcap",
                  highlight=False)


def _compare_tour(console: Console, out: Path) -> None:
    """The point of it all: one disk read on every path, counted, timed and modeled."""
    from .compare import compare, render_table
    from .compare_plot import plot_comparison

    console.rule("[bold]hvmlab compare disk-read: one disk read, HVM against PV")
    console.print("The same 4 KiB reads from an HVM guest (IDE PIO, with and without string I/O: "
                  "every access an exit, most of them device-model round trips) and from a PV guest "
                  "(blkfront: requests on a shared ring, data by grant, one notification per batch).")
    with console.status("running disk-read on every path"):
        cmp = compare("disk-read", 20, 4096, "kvm-2012", out / "compare", repeats=1, micro=False)
    render_table(cmp, console)
    png = plot_comparison(cmp, out / "compare-disk-read.png")
    console.print(f"  figure: {png}  (medians over 3 runs and microbenchmark ratios: "
                  f"hvmlab compare disk-read)", highlight=False)


def demo(out: Path) -> int:
    console = Console()
    console.width = max(console.width, 100)
    out.mkdir(parents=True, exist_ok=True)
    console.print(Panel.fit("hvmlab: tiny x86 guests as real machine code under Unicorn; every VM exit "
                            "recorded in a VMCS as Intel's SDM reports it.", title="hvmlab demo"))
    traces: dict[str, Path] = {}
    for step, (name, extra, what) in enumerate(TOUR, 1):
        console.rule(f"[bold]{step}. {name}")
        console.print(what)
        trace = out / f"{name}.trace.jsonl"
        try:
            image = load(name)
        except LoadError as exc:
            console.print(f"[red]cannot load {name}: {exc}")
            return 2
        sink = ConsoleSink()
        result = run(image, RunOptions(trace=trace, timeout_s=10, **extra), sink)
        traces[name] = trace
        for line in result.console.splitlines():
            console.print(Text.assemble(("  guest> ", "green"), line))
        console.print(f"  {_row(result)}", highlight=False)
        if result.ioreqs:
            console.print(f"  {result.ioreqs} ioreqs to the device model: {result.ioreqs_by_type}", highlight=False)
        if result.interrupts_injected:
            console.print(f"  {result.interrupts_injected} interrupts injected", highlight=False)
        if name == "string_io":
            first = next(read_trace(trace))
            q = decode_io(first["qualification"])
            console.print(f"  first exit: qualification {first['qualification']:#010x} = port {q.port:#x}, "
                          f"string={q.string}, rep={q.rep}; {first['count']} bytes from guest linear "
                          f"address {first.get('linear_address', 0):#x}", highlight=False)
    _pv_tour(console, out)
    console.rule("[bold]trace summary of the uart guest (hvmlab trace summary)")
    render_summary(summarize(read_trace(traces["uart"])), console)
    console.print(f"\nTraces are in {out}/ (one JSON object per exit). Try:\n"
                  f"  hvmlab trace summary {out}/hello.trace.jsonl\n"
                  f"  hvmlab trace export {out}/hello.trace.jsonl --format perfetto -o hello.perfetto.json\n"
                  f"  hvmlab run cpuid --dump-vmcs 0\n  hvmlab guests", highlight=False)
    _compare_tour(console, out)
    return 0
