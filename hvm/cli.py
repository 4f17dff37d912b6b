"""The `hvmlab` command: run guests, assemble them, read traces, benchmark, show the ABI."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import status
from .affinity import DM_AFFINITIES
from .status import STATUS_HELP

DESCRIPTION = """\
hvmlab runs tiny x86 guest kernels as real machine code under the Unicorn CPU emulator.
Their IN/OUT, CPUID, HLT, RDTSC, VMCALL, faults and unmapped accesses are VM exits recorded
in a VMCS exactly as Intel's SDM reports them, and handled by a Xen-style hypervisor."""

RUN_EPILOG = f"""\
GUEST is a .asm file (NASM syntax; `bits` and `org` choose the mode and load address), a
flat .bin (loaded at --load), an ELF executable (PT_LOAD segments, entry point), or the
name of a shipped guest (see `hvmlab guests`).

examples:
  hvmlab run hello                      real-mode hello through the 0xE9 console
  hvmlab run string_io --trace t.jsonl  one exit for a whole `rep outsb`; then
  hvmlab trace summary t.jsonl          a perf-kvm-stat style table of the exits
  hvmlab run cpuid --dump-vmcs 0        the VMCS at the first exit, by area
  hvmlab run pass_through --pass-through 0x80 --json

{STATUS_HELP}"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line and status 2, and every --help ends with the
    exit statuses."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("epilog", STATUS_HELP)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(status.BAD_INPUT, f"hvmlab: error: {message} (see '{self.prog} --help')\n")


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgKMG]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 16M, 64MiB, 1G or bytes")
    value = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    if value < 1 << 20 or value > 4 << 30 or value % 4096:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r}: 1 MiB to 4 GiB, a multiple of 4 KiB")
    return value


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a timeout cannot be negative")
    return value


def _ports(text: str) -> list[int]:
    from .controls import parse_ports

    try:
        return parse_ports(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hvmlab", description=DESCRIPTION, epilog=STATUS_HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    explain = sub.add_parser("explain", help="walk one I/O through the 9 steps of the HVM flow "
                                             "(--pv: one packet through the 7 steps of the PV flow)",
                             description="Run a guest and walk one of its device-model I/Os through "
                                         "the nine steps of Xen's HVM I/O path: the VMCS at the exit, "
                                         "the ioreq bytes, the device's answer, and when each step "
                                         "happened. With --pv, run a PV machine file (default: "
                                         "examples/pv-net.toml) and walk one network packet (or, "
                                         "without vifs, one blkif request) through the seven steps "
                                         "of the PV flow: the ring entries and grant entries as "
                                         "bytes, and when each step happened.", epilog=STATUS_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    explain.add_argument("guest", metavar="GUEST", nargs="?",
                         help=".asm, .bin, ELF, or a shipped guest's name (with --pv: MACHINE.toml, "
                              "optional)")
    explain.add_argument("--pv", action="store_true",
                         help="explain the PV path: GUEST is a machine file as for `hvmlab up`")
    explain.add_argument("--io", type=_nonneg_int, default=None, metavar="N",
                         help="which device-model I/O to explain (0 = the first); with --pv, which "
                              "packet (default: the first that reached another domain)")
    explain.add_argument("--placement", choices=["xen", "all-dm"], default="xen",
                         help="where devices are emulated (all-dm: every port reaches the device model)")
    explain.add_argument("--disk", type=Path, metavar="FILE", help="raw disk image for the IDE master")
    explain.add_argument("--mode", choices=["real", "protected", "long", "16", "32", "64"])
    explain.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS")

    run = sub.add_parser("run", help="run a guest and report every VM exit",
                         description="Run a guest kernel to its end and report how it ended and every VM exit.",
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("guest", metavar="GUEST", help=".asm, .bin, ELF, or a shipped guest's name")
    run.add_argument("--mode", choices=["real", "protected", "long", "16", "32", "64"],
                     help="CPU mode (default: from `bits` in .asm, the ELF class, or real for .bin)")
    run.add_argument("--load", type=_int, metavar="ADDR",
                     help="load address (default: `org` in .asm; 0x7C00 real, 0x100000 protected/long)")
    run.add_argument("--mem", type=_size, default=16 << 20, metavar="SIZE", help="guest RAM (default 16M)")
    run.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                     help="stop a guest still running after this long, status 6 (default 10; 0 = never)")
    run.add_argument("--max-exits", type=_nonneg_int, metavar="N", help="stop after N exits, status 6")
    run.add_argument("--pass-through", type=_ports, default=[], metavar="PORTS",
                     help="ports whose I/O-bitmap bit is clear: accesses do not exit and are counted as "
                          "direct_port_accesses (e.g. 0x80,0x3F8-0x3FF)")
    run.add_argument("--no-io-bitmaps", action="store_true",
                     help="clear 'use I/O bitmaps': then only --unconditional-io-exiting makes I/O exit")
    run.add_argument("--unconditional-io-exiting", action="store_true",
                     help="set 'unconditional I/O exiting' (used when I/O bitmaps are off)")
    run.add_argument("--rdtsc-exiting", action="store_true", help="RDTSC exits (reason 16); virtual TSC")
    run.add_argument("--pv", action="store_true",
                     help="run GUEST as a 32-bit Xen PV domain (start_info in ESI, hypercalls by int "
                          "0x82) with Domain 0's xenstored and console backend; --disk gives it an xvda")
    run.add_argument("--placement", choices=["xen", "all-dm"], default="xen",
                     help="xen (default): PIC, PIT, RTC, PM timer and 0xE9/0xF4 in the hypervisor, "
                          "the rest in the device model; all-dm: every device in the device model")
    run.add_argument("--disk", type=Path, metavar="FILE", help="raw disk image for the IDE primary master")
    run.add_argument("--serial", type=Path, metavar="FILE",
                     help="COM1 output to FILE (default: stdout, after the 0xE9 console's bytes)")
    run.add_argument("--serial-in", type=Path, metavar="FILE", help="bytes the guest reads from COM1")
    run.add_argument("--pcap", type=Path, metavar="FILE", help="write every frame the NE2000 sends to FILE")
    run.add_argument("--buffered-ports", type=_ports, default=[], metavar="PORTS",
                     help="writes to these ports go through the buffered ioreq page (no waiting)")
    run.add_argument("--dm-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                     help="how long the vCPU waits for the device model to answer an ioreq (default 5)")
    run.add_argument("--dm-affinity", choices=DM_AFFINITIES, default="vcpu",
                     help="vcpu (default): the device-model thread runs on the vCPU thread's host CPU, "
                          "so an ioreq is a switch between two threads, not a wake-up on another CPU "
                          "(2-3x faster here: hvmlab bench ioreq); with --pv, Dom0's backend threads "
                          "run on the vCPU's CPU; any: the host scheduler places them")
    run.add_argument("--trace", type=Path, metavar="FILE", help="write one JSON object per exit to FILE")
    run.add_argument("--dump-vmcs", type=_nonneg_int, metavar="N",
                     help="print the VMCS as it was at exit N (0 = first), by area")
    run.add_argument("--json", action="store_true",
                     help="print exactly one JSON object on stdout (the console is in it)")
    run.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")

    asm = sub.add_parser("asm", help="assemble a NASM-syntax guest to a flat binary",
                         description="Assemble FILE.asm with hvmlab's NASM front end over keystone.",
                         epilog=STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    asm.add_argument("source", metavar="FILE.asm")
    asm.add_argument("-o", "--output", type=Path, metavar="FILE.bin",
                     help="output file (default: FILE.bin beside the source)")

    sub.add_parser("guests", help="list the shipped guests", description="List the guests shipped in guests/.")

    demo = sub.add_parser("demo", help="a short tour: several guests, then a trace summary",
                          description="Run a short tour of shipped guests and end with a trace summary.")
    demo.add_argument("--out", type=Path, default=Path("hvmlab-demo"), metavar="DIR",
                      help="where the demo writes its traces (default ./hvmlab-demo)")

    trace = sub.add_parser("trace", help="summarize or export a trace written by --trace",
                           description="Read a trace file written by `hvmlab run --trace`.")
    tsub = trace.add_subparsers(dest="trace_command", metavar="ACTION", parser_class=_Parser)
    summary = tsub.add_parser("summary", help="perf-kvm-stat style tables of exits and ports",
                              description="Exits by reason (VM-EXIT, Samples, Samples%%, Time%%, Min, Max, "
                                          "Avg) and I/O by port.")
    summary.add_argument("file", type=Path, metavar="FILE")
    summary.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    export = tsub.add_parser("export", help="convert to CSV or Perfetto/Chrome trace-event JSON",
                             description="Convert a trace for spreadsheets (csv) or ui.perfetto.dev (perfetto).")
    export.add_argument("file", type=Path, metavar="FILE")
    export.add_argument("--format", choices=["csv", "perfetto"], required=True)
    export.add_argument("-o", "--output", type=Path, metavar="OUT", help="output file (default stdout)")

    bench = sub.add_parser("bench", help="benchmarks that print figures (not tests)",
                           description="Measure costs in one run and print each figure with its ratio "
                                       "to a baseline measured in the same run.")
    bench.add_argument("what", choices=["vmexit", "ioreq", "pv"],
                       help="vmexit: exit costs vs a bare Unicorn hook; ioreq: device-model round trips "
                            "vs a bare thread hand-off; pv: blkback and netback round trips vs the same "
                            "hand-off")
    bench.add_argument("--json", action="store_true", help="one JSON object")
    bench.add_argument("--exits", type=_nonneg_int, default=200_000, metavar="N",
                       help="exits per measurement (default 200000)")
    bench.add_argument("--ios", type=_nonneg_int, default=None, metavar="N",
                       help="I/Os per measurement for `bench ioreq` (default 5000) and `bench pv` "
                            "(requests or packets; default there 2000)")
    bench.add_argument("--memory-exits", type=_nonneg_int, default=1_000_000, metavar="N",
                       help="exits for the memory-growth check (default 1000000)")

    up = sub.add_parser("up", help="start the domains of a machine file and run them to their end",
                        description="Start the domains described in MACHINE.toml (xl.cfg-like: name, "
                                    "kind hvm|pv, guest, memory, disks, vifs) with Domain 0's "
                                    "services: xenstored, console, blkback, netback and a bridge.")
    up.add_argument("machine", type=Path, metavar="MACHINE.toml")
    up.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                    help="where disk images and captures named in the file live (default .)")
    up.add_argument("--json", action="store_true", help="one JSON object with every domain's ending")
    up.add_argument("--trace", type=Path, metavar="FILE",
                    help="one trace of every PV domain and Dom0's backends (hypercalls, events, ring "
                         "takes and pushes, grant ops, the bridge); an HVM domain writes its own "
                         "beside it as FILE.<name>.jsonl")

    abi = sub.add_parser("abi", help="sizes and offsets of the Xen structures hvmlab shares",
                         description="Every shared structure's size and field offsets (Xen public headers).")
    abi.add_argument("--json", action="store_true", help="one JSON object")
    _add_compare_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "asm":
            return _asm(args)
        if args.command == "guests":
            return _guests()
        if args.command == "demo":
            from .demo import demo

            return demo(args.out)
        if args.command == "trace":
            return _trace(args, parser)
        if args.command == "bench":
            from .bench import bench_ioreq, bench_vmexit

            if args.what == "ioreq":
                return bench_ioreq(5000 if args.ios is None else args.ios, args.json)
            if args.what == "pv":
                from pv.bench_pv import DEFAULT_IOS, bench_pv

                return bench_pv(DEFAULT_IOS if args.ios is None else args.ios, args.json)
            return bench_vmexit(args.exits, args.memory_exits, args.json)
        if args.command == "up":
            from pv.toolstack import main_up

            return main_up(args.machine, args.out, args.json, args.trace)
        if args.command == "abi":
            return _abi(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "calibrate":
            return _calibrate(args)
        parser.print_help()
        return status.BAD_INPUT
    except UsageError as exc:
        print(f"hvmlab: error: {exc}", file=sys.stderr)
        return status.BAD_INPUT
    except BrokenPipeError:
        return 0


def _run_pv(args: argparse.Namespace) -> int:
    from devicemodel.ide_disk import DiskError
    from pv.domain import PvOptions, run_pv
    from pv.evtchn_echo import EvtchnEcho
    from pv.services import ConsoleService, blk_factory

    from .console import ConsoleSink
    from .loader import LoadError, load

    try:
        image = load(args.guest, 32, args.load)
        if args.disk is not None and not args.disk.is_file():
            raise LoadError(f"{args.disk}: no such disk image")
        backends: list[Any] = [EvtchnEcho.attach, ConsoleService]
        if args.disk is not None:
            backends.append(blk_factory(args.disk))
        options = PvOptions(mem=args.mem, timeout_s=args.timeout or None, max_hypercalls=args.max_exits,
                            trace=args.trace, backends=backends, affinity=args.dm_affinity)
        result = run_pv(image, options, ConsoleSink(None if args.json else sys.stdout.buffer))
    except (LoadError, DiskError) as exc:
        print(f"hvmlab: error: {exc}", file=sys.stderr)
        return status.BAD_INPUT
    if args.json:
        print(json.dumps(result.to_json()))
    if not args.quiet:
        calls = ", ".join(f"{name} {n}" for name, n in result.hypercalls.items()) or "none"
        print(f"hvmlab: {result.guest} (PV domain {result.domid}) ended by {result.ended_by}: "
              f"{result.message}; status {result.exit_status}; {result.hypercalls_total} hypercalls "
              f"({calls}) in {result.wall_s * 1000:.1f} ms", file=sys.stderr)
    return result.exit_status


def _run(args: argparse.Namespace) -> int:
    if args.pv:
        return _run_pv(args)
    from .console import ConsoleSink
    from .loader import LoadError, load, parse_mode
    from .machine import RunOptions, run

    serial_file = None
    try:
        image = load(args.guest, parse_mode(args.mode), args.load)
        serial_in = None
        if args.serial_in is not None:
            try:
                serial_in = args.serial_in.read_bytes()
            except OSError as exc:
                raise LoadError(f"{args.serial_in}: cannot read serial input: {exc.strerror}") from None
        options = RunOptions(mem=args.mem, timeout_s=args.timeout or None, max_exits=args.max_exits,
                             pass_through=args.pass_through, use_io_bitmaps=not args.no_io_bitmaps,
                             unconditional_io_exiting=args.unconditional_io_exiting,
                             rdtsc_exiting=args.rdtsc_exiting, trace=args.trace,
                             dump_vmcs=args.dump_vmcs, placement=args.placement, disk=args.disk,
                             pcap=args.pcap, serial_in=serial_in, buffered_ports=args.buffered_ports,
                             dm_timeout_s=args.dm_timeout, dm_affinity=args.dm_affinity)
        console = ConsoleSink(None if args.json else sys.stdout.buffer)
        if args.serial is not None:
            serial_file = open(args.serial, "wb")  # noqa: SIM115 - closed below
        serial = ConsoleSink(serial_file if serial_file is not None else
                             (None if args.json else sys.stdout.buffer))
        result = run(image, options, console, serial)
    except LoadError as exc:
        print(f"hvmlab: error: {exc}", file=sys.stderr)
        return status.BAD_INPUT
    except OSError as exc:
        print(f"hvmlab: error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return status.BAD_INPUT
    finally:
        if serial_file is not None:
            serial_file.close()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        if result.console and not result.console.endswith("\n"):
            sys.stdout.write("\n")
        if result.vmcs_dump is not None:
            from .report import print_vmcs

            print_vmcs(result.vmcs_dump)
        elif args.dump_vmcs is not None:
            print(f"hvmlab: the guest ended after {result.exits_total} exits; there was no exit "
                  f"{args.dump_vmcs} to dump", file=sys.stderr)
        sys.stdout.flush()
    if not args.quiet:
        exits = ", ".join(f"{name} {count}" for name, count in result.exits.items()) or "none"
        print(f"hvmlab: {result.guest} ({result.mode} mode) ended by {result.ended_by}: {result.message}; "
              f"status {result.exit_status}; {result.exits_total} exits ({exits}) in "
              f"{result.wall_s * 1000:.1f} ms", file=sys.stderr)
    return result.exit_status


def _explain(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.pv:
        from pv.explain_pv import ExplainPvError, explain_pv

        try:
            return explain_pv(Path(args.guest) if args.guest else None, args.io, Console())
        except ExplainPvError as exc:
            print(f"hvmlab: error: {exc}", file=sys.stderr)
            return status.BAD_INPUT
    from .explain import ExplainError, explain
    from .loader import LoadError, load, parse_mode
    from .machine import RunOptions

    if args.guest is None:
        raise UsageError("explain needs GUEST (or --pv [MACHINE.toml]); see 'hvmlab explain --help'")
    try:
        image = load(args.guest, parse_mode(args.mode))
        options = RunOptions(timeout_s=args.timeout or None, placement=args.placement, disk=args.disk)
        return explain(image, options, args.io or 0, Console())
    except (LoadError, ExplainError) as exc:
        print(f"hvmlab: error: {exc}", file=sys.stderr)
        return status.BAD_INPUT


def _asm(args: argparse.Namespace) -> int:
    from .nasm import AsmError, assemble_file

    source = Path(args.source)
    if not source.is_file():
        raise UsageError(f"{source}: no such file")
    try:
        result = assemble_file(source)
    except AsmError as exc:
        print(f"hvmlab: error: {exc}", file=sys.stderr)
        return status.BAD_INPUT
    output = args.output or source.with_suffix(".bin")
    output.write_bytes(result.code)
    print(f"hvmlab: {source.name}: {len(result.code)} bytes, {result.bits}-bit, "
          f"org {result.org if result.org is not None else 0:#x} -> {output}", file=sys.stderr)
    return 0


def _guests() -> int:
    from rich.console import Console
    from rich.table import Table

    from .loader import guest_name, shipped_guests

    table = Table(title="shipped guests (hvmlab run NAME)", show_lines=False)
    table.add_column("name", style="bold")
    table.add_column("what it shows")
    for path in shipped_guests():
        table.add_row(guest_name(path), describe(path))
    Console().print(table)
    return 0


def describe(path: Path) -> str:
    """The first sentence of a guest's header comment."""
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith(";"):
            break
        lines.append(line.lstrip("; ").strip())
    text = " ".join(lines)
    text = re.sub(rf"^{re.escape(path.stem)}:\s*", "", text)
    return text.split(". ")[0].rstrip(".") + "." if text else ""


def _trace(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.console import Console

    from .trace_export import export_csv, export_perfetto
    from .trace_summary import TraceError, read_trace, render_summary, summarize, summary_to_dict

    if args.trace_command is None:
        raise UsageError("trace needs an action: summary or export (see 'hvmlab trace --help')")
    try:
        if args.trace_command == "summary":
            result = summarize(read_trace(args.file))
            if args.json:
                print(json.dumps(summary_to_dict(result)))
            else:
                render_summary(result, Console())
            return 0
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
        try:
            exporter = export_csv if args.format == "csv" else export_perfetto
            rows = exporter(read_trace(args.file), out)
        finally:
            if args.output:
                out.close()
        if args.output:
            print(f"hvmlab: wrote {rows} exits to {args.output}", file=sys.stderr)
        return 0
    except TraceError as exc:
        print(f"hvmlab: error: {exc}", file=sys.stderr)
        return status.BAD_INPUT


def _abi(args: argparse.Namespace) -> int:
    from .abi import abi_facts

    facts = abi_facts()
    if args.json:
        print(json.dumps(facts))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="shared structures (Xen public headers)")
    for col in ("structure", "size", "fields (offset)"):
        table.add_column(col)
    for name, info in facts.items():
        fields = ", ".join(f"{f}@{o}" for f, o in info.get("fields", {}).items())
        table.add_row(name, str(info["size"]), fields)
    Console().print(table)
    return 0


COMPARE_STATUS_HELP = """\
exit statuses:
  0          the comparison was printed and the files asked for were written
  2          bad input: unknown workload or profile, bad option or --param
  8          a workload's data came back wrong (sector bytes, frame bytes, console text) or a
             run failed: the command says which in one line and reports no cost at all"""

COMPARE_EPILOG = f"""\
Every path of the workload runs --repeats times: counts come from the real trace of the
first run, wall times are medians over the runs (min-max shown). Modeled cycles are the
counts times the per-event costs of --profile (shipped: kvm-2012, kvm-2024, vmware-2001; or
a TOML file written by `hvmlab calibrate`).

workloads: console, disk-read, disk-write, net-send, net-recv, port-hv, port-dm, hypercall,
evtchn

examples:
  hvmlab compare disk-read --ios 100 --size 4K
  hvmlab compare disk-read --batch 8 --json
  hvmlab compare net-recv --plot net-recv.png --timeline net-recv.perfetto.json
  hvmlab sweep disk-read --param size=512,4096,65536 --param ios=10,100 -o sweep/

{COMPARE_STATUS_HELP}"""


def _byte_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmKM]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 512, 4K or 64KiB")
    value = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError("a size must be at least 1 byte")
    return value


def _pos_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _add_compare_parsers(sub: Any) -> None:
    from .compare import DEFAULT_PROFILE, DEFAULT_REPEATS

    compare = sub.add_parser(
        "compare", help="one workload on the HVM and PV paths: counts, wall time, modeled cost per I/O",
        description="Run one workload as an HVM guest (emulated device: exits and device-model "
                    "round trips) and as a PV guest (split driver: rings, event channels, grants), "
                    "verify its data, and show what one I/O costs on each path: every counter per "
                    "I/O side by side, the HVM/PV ratio, and where the difference comes from.",
        epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("workload", metavar="WORKLOAD", help="e.g. disk-read, net-send, console")
    compare.add_argument("--ios", type=_pos_int, metavar="N", help="I/Os per run (default: the workload's)")
    compare.add_argument("--size", type=_byte_size, metavar="BYTES",
                         help="bytes per I/O where it applies: request or frame size (e.g. 4K)")
    compare.add_argument("--batch", type=_pos_int, default=1, metavar="N",
                         help="PV: requests queued per notification (default 1)")
    compare.add_argument("--profile", default=DEFAULT_PROFILE, metavar="NAME|FILE",
                         help=f"cost profile for the modeled cycles (default {DEFAULT_PROFILE})")
    compare.add_argument("--repeats", type=_pos_int, default=DEFAULT_REPEATS, metavar="N",
                         help=f"runs per path; wall times are their median (default {DEFAULT_REPEATS})")
    compare.add_argument("--no-microbench", action="store_true",
                         help="skip the microbenchmarks (port-hv, hypercall) the wall times are read against")
    fmt = compare.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="exactly one JSON object on stdout")
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout: one row per path x counter")
    compare.add_argument("--plot", type=Path, metavar="FILE.png",
                         help="a PNG: modeled cost per I/O by component, and measured wall time")
    compare.add_argument("--timeline", type=Path, metavar="FILE.json",
                         help="Perfetto trace (ui.perfetto.dev) of one I/O on each path, side by side")
    compare.add_argument("--out", type=Path, metavar="DIR",
                         help="keep the runs' traces and images in DIR (default: a temporary directory)")

    sweep = sub.add_parser(
        "sweep", help="compare over a grid of parameters in worker processes: CSV and a plot",
        description="Run `hvmlab compare WORKLOAD` at every combination of the --param values in "
                    "worker processes, and write DIR/WORKLOAD-sweep.csv (one row per point and path) "
                    "and DIR/WORKLOAD-sweep.png (cost per I/O against the parameter, every path).",
        epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("workload", metavar="WORKLOAD")
    sweep.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2,...",
                       help="a swept parameter: size, ios or batch (repeat for a grid)")
    sweep.add_argument("--profile", default=DEFAULT_PROFILE, metavar="NAME|FILE",
                       help=f"cost profile (default {DEFAULT_PROFILE})")
    sweep.add_argument("--workers", type=_pos_int, default=2, metavar="N",
                       help="worker processes (default 2)")
    sweep.add_argument("--repeats", type=_pos_int, default=1, metavar="N",
                       help="runs per path at each point (default 1: a sweep shows trends)")
    sweep.add_argument("-o", "--out", type=Path, default=Path("hvmlab-sweep"), metavar="DIR",
                       help="where the CSV and PNG go (default ./hvmlab-sweep)")

    calibrate = sub.add_parser(
        "calibrate", help="write a cost profile measured on this machine",
        description="Measure hvmlab's own costs (exits, device-model round trips, PV hypercalls "
                    "and events) and, when /dev/kvm is usable, real KVM exit costs, and write them "
                    "as a profile for `hvmlab compare --profile FILE`.")
    calibrate.add_argument("-o", "--output", type=Path, default=Path("hvmlab-profile.toml"),
                           metavar="FILE", help="the profile to write (default ./hvmlab-profile.toml)")
    calibrate.add_argument("--no-kvm", action="store_true",
                           help="do not measure real KVM exits through /dev/kvm")
    calibrate.add_argument("--exits", type=_pos_int, default=20_000, metavar="N",
                           help="exits per measurement of the cheap events (default 20000)")
    calibrate.add_argument("--ios", type=_pos_int, default=2_000, metavar="N",
                           help="I/Os per measurement of device-model round trips (default 2000)")


def _compare_failed(exc: BaseException) -> int:
    print(f"hvmlab: error: {exc}", file=sys.stderr)
    return status.INTERNAL


def _compare(args: argparse.Namespace) -> int:
    import tempfile

    from rich.console import Console

    from . import compare as cmp_mod
    from .compare import CompareError, UnverifiedData
    from .workloads import WorkloadError

    err = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="hvmlab-compare-") as scratch:
        out_dir = args.out if args.out is not None else Path(scratch)
        try:
            with err.status("compare") as spinner:
                cmp = cmp_mod.compare(args.workload, args.ios, args.size, args.profile, out_dir, args.batch,
                              repeats=args.repeats, micro=not args.no_microbench,
                              on_run=lambda what: spinner.update(f"running {what}"))
        except CompareError as exc:
            raise UsageError(str(exc)) from None
        except (WorkloadError, UnverifiedData) as exc:
            return _compare_failed(exc)
        except Exception as exc:  # noqa: BLE001 - one line and status 8, never a traceback
            return _compare_failed(RuntimeError(f"compare {args.workload} failed: "
                                                f"{type(exc).__name__}: {exc}"))
        if args.json:
            print(json.dumps(cmp.to_json()))
        elif args.csv:
            sys.stdout.write(cmp_mod.to_csv_text(cmp))
        else:
            console = Console()
            if not console.is_terminal:  # a pipe or a file: wide enough for three paths
                console.width = max(console.width, 110)
            cmp_mod.render_table(cmp, console)
        if args.plot is not None:
            from .compare_plot import plot_comparison

            print(f"hvmlab: wrote {plot_comparison(cmp, args.plot)}", file=sys.stderr)
        if args.timeline is not None:
            with open(args.timeline, "w", encoding="utf-8") as handle:
                cmp_mod.write_timeline(cmp, handle)
            print(f"hvmlab: wrote {args.timeline} (open it in ui.perfetto.dev)", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .compare import CompareError, UnverifiedData
    from .sweep import parse_params, sweep
    from .workloads import WorkloadError

    try:
        params = parse_params(args.param)
        result = sweep(args.workload, params, args.profile, args.out, workers=args.workers,
                       repeats=args.repeats, console=Console(stderr=True))
    except CompareError as exc:
        raise UsageError(str(exc)) from None
    except (WorkloadError, UnverifiedData) as exc:
        return _compare_failed(exc)
    except Exception as exc:  # noqa: BLE001 - one line and status 8, never a traceback
        return _compare_failed(RuntimeError(f"sweep {args.workload} failed: "
                                            f"{type(exc).__name__}: {exc}"))
    print(f"hvmlab: {len(result.rows)} rows in {result.csv_path}; cost per I/O against "
          f"{result.x_param} in {result.png_path}", file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .calibrate import calibrate
    from .costmodel import ProfileError

    err = Console(stderr=True)
    try:
        with err.status("calibrate") as spinner:
            profile = calibrate(args.output, exits=args.exits, ios=args.ios, use_kvm=not args.no_kvm,
                                progress=lambda what: spinner.update(f"measuring {what}"))
    except OSError as exc:
        print(f"hvmlab: error: {exc.filename or args.output}: {exc.strerror or exc}", file=sys.stderr)
        return status.BAD_INPUT
    except (ProfileError, RuntimeError) as exc:
        print(f"hvmlab: error: calibrate failed: {exc}", file=sys.stderr)
        return status.INTERNAL
    table = Table(title=f"profile {profile.name}: {profile.description}", title_justify="left")
    out = Console()
    keys = [*profile.figures, *(f"reference {k}" for k in profile.reference)]
    table.add_column("figure", no_wrap=True, min_width=max(map(len, keys), default=6))
    table.add_column("cycles", justify="right", no_wrap=True, min_width=9)
    table.add_column("us", justify="right", no_wrap=True, min_width=8)
    table.add_column("source (whole text in the file)", no_wrap=True, overflow="ellipsis",
                     max_width=max(20, out.width - max(map(len, keys), default=6) - 32))
    for section, figures in (("", profile.figures), ("reference ", profile.reference)):
        for key, fig in figures.items():
            cycles = f"{fig.cycles:,.0f}" if fig.cycles >= 10 else f"{fig.cycles:.3g}"
            table.add_row(f"{section}{key}", cycles, f"{fig.cycles / (profile.ghz * 1000):,.3g}",
                          ("assumed: " if fig.assumed else "") + fig.source)
    out.print(table)
    print(f"hvmlab: wrote {args.output} ({profile.ghz:g} GHz; {profile.ghz_source}); use it with "
          f"`hvmlab compare WORKLOAD --profile {args.output}`", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
