"""`hvmlab explain`: one I/O walked through the nine steps of the HVM flow, with the real VMCS fields, ioreq bytes and times (SEED.md §2)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .ioreq import IOREQ_OFFSETS, IOREQ_SIZE, STATE_NAMES, TYPE_NAMES, IoReq
from .loader import GuestImage
from .machine import RunOptions, run
from .qualification import decode_io
from .trace_summary import read_trace


class ExplainError(Exception):
    pass


def _field_rows(raw: bytes) -> list[tuple[str, str, str]]:
    req = IoReq.unpack(raw)
    rows = []
    for name, size in (("addr", 8), ("data", 8), ("count", 4), ("size", 4), ("vp_eport", 4)):
        offset = IOREQ_OFFSETS[name]
        rows.append((f"{offset:2d}", name, raw[offset:offset + size].hex(" ")))
    rows.append(("30", "state|data_is_ptr<<4|dir<<5|df<<6",
                 f"{raw[30]:02x}  (state {STATE_NAMES.get(req.state, req.state)}, data_is_ptr "
                 f"{int(req.data_is_ptr)}, dir {'read' if req.dir else 'write'}, df {int(req.df)})"))
    rows.append(("31", "type", f"{raw[31]:02x}  ({TYPE_NAMES.get(req.type, req.type)})"))
    return rows


def explain(image: GuestImage, options: RunOptions, io_index: int, console: Console) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "explain.jsonl"
        first = run(image, replace(options, trace=trace, stream_console=False))
        records = [r for r in read_trace(trace) if "ioreq" in r]
    if not records:
        raise ExplainError(f"{image.name} made no I/O that reached the device model "
                           f"(it ended by {first.ended_by} after {first.exits_total} exits); "
                           "try --placement all-dm")
    if not 0 <= io_index < len(records):
        raise ExplainError(f"--io {io_index}: the guest made {len(records)} device-model I/Os (0-{len(records) - 1})")
    rec = records[io_index]
    again = run(image, replace(options, trace=None, dump_vmcs=rec["seq"], stream_console=False))
    vmcs = {f.name: f.value for f in again.vmcs_dump["vmcs"]} if again.vmcs_dump else {}
    steps = rec.get("steps", {})
    t0 = rec["t_ns"]

    def at(key: str) -> str:
        if key == "exit":
            return f"+{0:8.1f} us"
        return f"+{(steps[key] - t0) / 1000:8.1f} us" if key in steps else "           "

    posted = bytes.fromhex(rec["ioreq"]["hex"])
    answered = bytes.fromhex(rec["ioreq"]["answer_hex"])
    assert len(posted) == IOREQ_SIZE
    req = IoReq.unpack(posted)
    console.width = max(console.width, 110)
    insn = escape(rec["insn"])
    console.rule(f"[bold]I/O {io_index} of {image.name}: exit {rec['seq']}, `{insn}` at {rec['rip']:#x}")
    q = rec["qualification"]
    what = ""
    if rec["reason"] == "IO_INSTRUCTION":
        d = decode_io(q)
        what = (f"port {d.port:#x}, {d.size} byte(s), {d.direction}{', string' if d.string else ''}"
                f"{', rep' if d.rep else ''}{', immediate' if d.immediate else ', DX'}")
    else:
        what = f"guest-physical {rec.get('gpa', vmcs.get('GUEST_PHYSICAL_ADDRESS', 0)):#x}"
    console.print(f"[bold]1.[/] {at('exit')} the guest executes `{insn}`: VM exit "
                  f"{rec['reason']} ({rec['reason_code']}). VMCS: VM_EXIT_REASON={vmcs.get('VM_EXIT_REASON', 0):#x}, "
                  f"EXIT_QUALIFICATION={q:#010x} ({what}), VM_EXIT_INSTRUCTION_LEN="
                  f"{vmcs.get('VM_EXIT_INSTRUCTION_LEN', 0)}, GUEST_RIP={vmcs.get('GUEST_RIP', rec['rip']):#x}",
                  highlight=False)
    console.print(f"[bold]2.[/] {at('2_posted_and_notified')} the hypervisor writes the ioreq into vCPU 0's "
                  f"slot of the shared I/O page (all fields, then state READY), notifies event channel "
                  f"port {req.vp_eport} and blocks the vCPU:", highlight=False)
    table = Table(show_header=True, box=None, padding=(0, 2))
    for col in ("offset", "field", "bytes posted"):
        table.add_column(col)
    for row in _field_rows(posted):
        table.add_row(*row)
    console.print(table)
    console.print("[bold]3.[/]              the host scheduler runs Domain 0's device-model thread (no vCPU "
                  "runs meanwhile: this vCPU is blocked on its event channel).", highlight=False)
    console.print("[bold]4-5.[/]            the event-channel upcall: the port's eventfd becomes readable; "
                  "the device model's poll set shows which vCPU port is pending.", highlight=False)
    console.print(f"[bold]6.[/] {at('6_dm_woke_in_select')} the device model returns from select()/poll() "
                  f"with the port.", highlight=False)
    device = rec["ioreq"].get("device") or "?"
    console.print(f"[bold]7.[/] {at('7_dm_copied_ioreq')} it copies the ioreq out once, sets INPROCESS, "
                  f"finds the device by address ({TYPE_NAMES.get(req.type, req.type)} {req.addr:#x} -> "
                  f"[bold]{device}[/]) and calls it.", highlight=False)
    reply = IoReq.unpack(answered)
    if req.data_is_ptr:
        answer = f"copied {req.count} x {req.size} bytes between the device and guest memory at {req.data:#x}"
    elif req.dir == 1:
        answer = f"writes the value {reply.data:#x} into `data` (bytes 8-15: {answered[8:16].hex(' ')})"
    else:
        answer = f"takes the value {req.data:#x} (a write: nothing to return)"
    console.print(f"[bold]8.[/] {at('8_dm_answered_and_notified')} the device {answer}; the device model "
                  f"sets state IORESP_READY and notifies the port.", highlight=False)
    value = rec.get("data")
    done = (f"completes the IN with {value:#x} (masked to {rec.get('size', req.size)} byte(s))"
            if rec.get("direction") == "in" and value is not None else "completes the instruction")
    console.print(f"[bold]9.[/] {at('9_hypervisor_woke')} the hypervisor wakes, {done}, sets the slot back to "
                  f"NONE, checks for interrupts to inject and resumes the guest "
                  f"(exit to entry: {rec['latency_ns'] / 1000:.1f} us).", highlight=False)
    console.print(f"\n{len(records)} I/Os of this run reached the device model; `--io N` picks another. "
                  f"Raw: {json.dumps({'posted': posted.hex(), 'answered': answered.hex()})}", highlight=False)
    return 0
