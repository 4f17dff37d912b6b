"""`hvmlab explain --pv`: one packet (or blkif request) of a PV machine walked through the seven steps of the PV flow, with the ring and grant bytes and the times the trace recorded (SEED.md §1; Xen io/netif.h, io/blkif.h, grant_table.h)."""

from __future__ import annotations

import ctypes
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pv.grant_table import (
    GTF_accept_transfer,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_transfer_committed,
    GTF_transfer_completed,
    GTF_transitive,
    GTF_type_mask,
    GTF_writing,
)
from pv.layouts import (
    X86_32,
    blkif_request,
    blkif_response,
    netif_rx_request,
    netif_rx_response,
    netif_tx_request,
)
from pv.toolstack import DomainSpec, MachineError, MachineResult, MachineSpec, parse_machine, up
from pv.trace_walk import (
    BlkWalk,
    PacketWalk,
    Record,
    TraceWalkError,
    Wake,
    blk_requests,
    packet_numbers,
    read_records,
    walk_blk,
    walk_packet,
)

DEFAULT_MACHINE = Path(__file__).resolve().parent.parent / "examples" / "pv-net.toml"
US = 1000


class ExplainPvError(Exception):
    """The machine could not be traced, or the request asked for is not in its trace."""


def default_machine(out_dir: Path) -> MachineSpec:
    """examples/pv-net.toml, or the same two domains when examples/ is not installed."""
    if DEFAULT_MACHINE.is_file():
        return parse_machine(DEFAULT_MACHINE, out_dir)
    return MachineSpec("pv-net", [
        DomainSpec("net-copy", "pv", "pv/net", vifs=[{"mac": "00:16:3e:00:00:01"}]),
        DomainSpec("net-flip", "pv", "pv/net_flip", vifs=[{"mac": "00:16:3e:00:00:02"}]),
    ], timeout_s=20.0, pcap=out_dir / "pv-net.pcap")


def trace_machine(machine: Path | None, out_dir: Path) -> tuple[MachineResult, Path]:
    """Run `machine` (default: pv-net) with its outputs in `out_dir` and one trace there."""
    try:
        spec = parse_machine(machine, out_dir) if machine is not None else default_machine(out_dir)
        trace = out_dir / "explain-pv.jsonl"
        return up(spec, None, None, trace), trace
    except MachineError as exc:
        raise ExplainPvError(str(exc)) from None


# -- showing it -------------------------------------------------------------------------------------

def gtf_text(flags: int) -> str:
    """A grant entry's flags by grant_table.h's names."""
    kind = flags & GTF_type_mask
    names = {0: "GTF_invalid", GTF_permit_access: "GTF_permit_access",
             GTF_accept_transfer: "GTF_accept_transfer", GTF_transitive: "GTF_transitive"}
    parts = [names[kind]]
    sub: tuple[tuple[int, str], ...]
    if kind == GTF_accept_transfer:
        sub = ((GTF_transfer_committed, "GTF_transfer_committed"),
               (GTF_transfer_completed, "GTF_transfer_completed"))
    else:
        sub = ((GTF_readonly, "GTF_readonly"), (GTF_reading, "GTF_reading"),
               (GTF_writing, "GTF_writing"))
    parts += [name for bit, name in sub if flags & bit]
    return "|".join(parts)


def entry_text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "(no such entry)"
    raw = bytes.fromhex(entry["hex"])
    return (f"{raw[0:2].hex(' ')} | {raw[2:4].hex(' ')} | {raw[4:8].hex(' ')}   flags "
            f"{entry['flags']:#06x} ({gtf_text(entry['flags'])}), domid {entry['domid']}, "
            f"frame {entry['frame']:#x}")


def struct_table(ctype: type[ctypes.Structure], hex_bytes: str) -> Table:
    """offset, field, bytes, value of a ring entry, by the layout in pv/layouts.py."""
    raw = bytes.fromhex(hex_bytes)
    table = Table(show_header=True, box=None, padding=(0, 2))
    for col in ("offset", "field", "bytes", "value"):
        table.add_column(col)
    for name, ftype, *_ in ctype._fields_:
        desc = getattr(ctype, name)
        chunk = raw[desc.offset:desc.offset + desc.size]
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Array):
            value = f"{len(ftype())} x {ftype._type_.__name__}"  # type: ignore[attr-defined]
            chunk = chunk[:16]
            shown = chunk.hex(" ") + " ..."
        else:
            signed = ftype in (ctypes.c_int8, ctypes.c_int16, ctypes.c_int32, ctypes.c_int64)
            number = int.from_bytes(chunk, "little", signed=signed)
            value, shown = f"{number} ({number & ((1 << (8 * desc.size)) - 1):#x})", chunk.hex(" ")
        table.add_row(f"{desc.offset:3d}", name, shown, value)
    return table


def _print_struct(console: Console, ctype: type[ctypes.Structure], hex_bytes: str,
                  title: str) -> None:
    console.print(title, highlight=False)
    console.print(struct_table(ctype, hex_bytes))


class _Clock:
    def __init__(self, t0: int) -> None:
        self.t0 = t0

    def __call__(self, r: Record | int | None) -> str:
        if r is None:
            return " " * 13
        t = r if isinstance(r, int) else r["t_ns"]
        return f"{(t - self.t0) / US:+9.1f} us"


def _name(domains: dict[int, str], domid: int) -> str:
    name = domains.get(domid)
    return f"domain {domid} ({name})" if name else f"domain {domid}"


def render_packet(walk: PacketWalk, index: int, total: int, domains: dict[int, str],
                  console: Console) -> None:
    at = _Clock(walk.t0)
    take = walk.take
    sender = take["domid"]
    req = take["fields"]
    copy = walk.copies[0] if walk.copies else None
    console.width = max(console.width, 110)
    console.rule(f"[bold]packet {index} of {total}: {_name(domains, sender)} -> "
                 f"{_name(domains, walk.delivery['domid']) if walk.delivery else '?'}")
    tx_entry = copy["entry_before"] if copy else None
    console.print(f"[bold]1.[/] {'(before +0)':>13} guest code in {_name(domains, sender)}: the frame "
                  f"is written into its page (frame {tx_entry['frame']:#x}) and the page is granted "
                  f"to Dom0: grant entry {req['gref']} (grant_entry_v1: flags | domid | frame) = "
                  f"{entry_text(tx_entry)}" if tx_entry else
                  f"[bold]1.[/] {'(before +0)':>13} guest code: the frame is put in a granted page "
                  "(no grant copy of it is in the trace)", highlight=False)
    console.print(f"[bold]2.[/] {'(before +0)':>13} netfront puts a netif_tx_request in slot "
                  f"{take['index']} of {take['ring']} and advances req_prod to {take['req_prod']} "
                  "(guest code: no exit, nothing recorded until the notify):", highlight=False)
    _print_struct(console, netif_tx_request(X86_32), take["hex"],
                  f"     netif_tx_request as netback copied it out ({len(take['hex']) // 2} bytes)")
    if walk.notify is not None:
        n = walk.notify
        console.print(f"[bold]3.[/] {at(n)} the frontend notifies: EVTCHNOP_send on port {n['port']} "
                      f"(int 0x82 at {n['rip']:#x}) -> Dom0's port {n['remote_port']} becomes "
                      f"readable; netback's thread wakes from poll().", highlight=False)
    else:
        console.print(f"[bold]3.[/] {at(take)} no notification of its own: netback was already "
                      "serving this ring (an earlier notify, or its final check found the request; "
                      "req_event not reached). +0 is the take.", highlight=False)
    console.print(f"[bold]4.[/] {at(take)} netback takes the request off the ring: req_cons -> "
                  f"{take['req_cons']} (req_prod {take['req_prod']}). In Xen's own netback the "
                  "backend, not the hypervisor, advances req_cons, as here.", highlight=False)
    for c in walk.copies:
        console.print(f"   {at(c)} GNTTABOP_copy {c['len']} bytes from grant {c['ref']} of domain "
                      f"{c['granter']} (offset {c['offset']}) into Dom0's frame {c['dom0_pfn']:#x}: "
                      f"{c['status_name']} ({c['status']}); the entry during the copy had "
                      "GTF_reading set, after it:", highlight=False)
        console.print(f"                  {entry_text(c['entry_after'])}", highlight=False)
    if walk.tx_response is not None:
        rsp = walk.tx_response
        push = walk.tx_push
        console.print(f"   {at(rsp)} netif_tx_response {{id {rsp['fields']['id']}, status "
                      f"{rsp['fields']['status']}}} (bytes {bytes.fromhex(rsp['hex']).hex(' ')}); "
                      + (f"pushed at {at(push).strip()}: rsp_prod {push['prod']}, rsp_event "
                         f"{push['event']} -> notify {'yes' if push['notify'] else 'no'}"
                         if push else "not pushed in the trace"), highlight=False)
    if walk.bridge_tx is not None:
        b = walk.bridge_tx
        console.print(f"   {at(b)} netback hands the {b['len']}-byte frame to the bridge from "
                      f"{b['vif']} (dst {b['dst']}, src {b['src']}, ethertype {b['ethertype']}).",
                      highlight=False)
    d = walk.delivery
    if d is None:
        console.print("[bold]5-7.[/] the bridge queued this frame for no netback vif: no PV "
                      "domain was there to take it yet, or it went to an HVM domain's NE2000 "
                      "(whose exits are in its own trace, FILE.<name>.jsonl).", highlight=False)
        return
    receiver = d["domid"]
    others = [x["vif"] for x in walk.deliveries if x is not d]
    console.print(f"   {at(d)} the bridge queues it for {d['vif']} (rx_seq {d['rx_seq']})"
                  + (f"; also flooded to {', '.join(others)}" if others else "") + ".",
                  highlight=False)
    rt, g = walk.rx_take, walk.rx_grant
    if rt is None:
        console.print(f"[bold]5.[/] {_name(domains, receiver)} never posted an rx buffer for it.",
                      highlight=False)
        return
    offered = g["entry_before"] if g else None
    posted = walk.rx_posted
    last = (f" (its last notify on port {posted['port']} before the take, for its rx or its tx "
            f"ring: they share the port, was at {at(posted).strip()})" if posted is not None else "")
    console.print(f"[bold]5.[/] {'(guest code)':>13} {_name(domains, receiver)}'s netfront posted a "
                  f"netif_rx_request with a free page's grant ref {rt['fields']['gref']}{last}; "
                  f"the entry offers {entry_text(offered)}", highlight=False)
    _print_struct(console, netif_rx_request(X86_32), rt["hex"],
                  f"     netif_rx_request in slot {rt['index']} of {rt['ring']}")
    flip = rt.get("rx_mode") == "flip"
    waited = (rt["t_ns"] - d["t_ns"]) / US
    console.print(f"[bold]6.[/] {at(rt)} netback takes that rx request (req_cons -> {rt['req_cons']}, "
                  f"the frame waited {waited:.1f} us in the queue) and "
                  + ("flips the page:" if flip else "grant-copies the frame into the page:"),
                  highlight=False)
    if g is not None:
        if flip:
            console.print(f"   {at(g)} GNTTABOP_transfer of Dom0's frame {g['dom0_pfn']:#x} onto "
                          f"grant {g['ref']}: {g['status_name']} ({g['status']}), "
                          f"{(g['t_ns'] - rt['t_ns']) / US:.1f} us after the take (the p2m change "
                          f"waits until domain {receiver}'s vCPU is out of guest code). The entry now "
                          f"reads {entry_text(g['entry_after'])}: domain {receiver}'s frame "
                          f"{g['entry_after']['frame']:#x} is backed by what was Dom0's page (its "
                          f"p2m entry changed, so the frame number stays; on Xen the entry would "
                          f"carry the new MFN), and its old page is Dom0's frame {g['dom0_pfn']:#x}."
                          if g.get("entry_after") else
                          f"   {at(g)} GNTTABOP_transfer: {g['status_name']} ({g['status']})",
                          highlight=False)
        else:
            console.print(f"   {at(g)} GNTTABOP_copy {g['len']} bytes from Dom0's frame "
                          f"{g['dom0_pfn']:#x} into grant {g['ref']}: {g['status_name']} "
                          f"({g['status']}); entry after: {entry_text(g['entry_after'])}",
                          highlight=False)
        if g.get("page_head"):
            console.print(f"                  the receiver's page now starts "
                          f"{bytes.fromhex(g['page_head']).hex(' ')}", highlight=False)
    rr, rp, ev = walk.rx_response, walk.rx_push, walk.rx_event
    if rr is not None:
        console.print(f"   {at(rr)} netif_rx_response written in slot {rr['index']}:", highlight=False)
        _print_struct(console, netif_rx_response(X86_32), rr["hex"],
                  "     netif_rx_response (status = the frame's length)")
    if rp is not None:
        console.print(f"   {at(rp)} RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: rsp_prod {rp['prod']}, "
                      f"rsp_event {rp['event']} -> notify {'yes' if rp['notify'] else 'no'}.",
                      highlight=False)
    if ev is not None:
        console.print(f"   {at(ev)} netback notifies Dom0's port {ev['port']}: domain "
                      f"{ev['remote_dom']}'s port {ev['remote_port']} becomes pending.",
                      highlight=False)
    _render_wake(walk.wake, at, receiver, domains, console,
                 "its netfront takes the rx response and hands the frame up (App2 has it)", rp, ev)
    console.print(f"\n{total} packets crossed netback in this run; `--io N` picks another. "
                  f"Raw: {json.dumps({'tx_request': take['hex'], 'rx_request': rt['hex'], 'rx_response': rr['hex'] if rr else None})}",
                  highlight=False, soft_wrap=True)


def _render_wake(wake: Wake, at: _Clock, domid: int, domains: dict[int, str], console: Console,
                 then: str, push: Record | None, event: Record | None) -> None:
    who = _name(domains, domid)
    if push is not None and not push["notify"] and event is None:
        console.print(f"[bold]7.[/] {'':13} no event for it: {who} had not re-armed rsp_event "
                      f"(it was still taking responses), so its RING_FINAL_CHECK_FOR_RESPONSES "
                      f"finds this one without a notification; {then}.", highlight=False)
        return
    if wake.t_ns is None:
        nxt = wake.next
        did = ""
        if nxt is not None:
            what = nxt.get("op") or nxt.get("hypercall") or nxt["reason"]
            did = f"; its next record: {nxt['reason']} {what} at {at(nxt).strip()}"
        console.print(f"[bold]7.[/] {'':13} {who}: no wake-up of its own for this event in the "
                      f"trace (the port was still pending from an earlier event, or the domain was "
                      f"ending){did}.", highlight=False)
        return
    parts = []
    if wake.block is not None:
        b = wake.block
        parts.append(f"asleep in {b['op']} since {at(b).strip()}, woken at "
                     f"{at(b['t_ns'] + b['latency_ns']).strip()}")
    if wake.event_in is not None:
        parts.append(f"port {wake.event_in['port']} set pending in shared_info at "
                     f"{at(wake.event_in).strip()}")
    if wake.upcall is not None:
        parts.append(f"upcall into its callback {wake.upcall['callback']:#x} at "
                     f"{at(wake.upcall).strip()}")
    console.print(f"[bold]7.[/] {at(wake.t_ns)} {_name(domains, domid)} learns of it: "
                  f"{'; '.join(parts)}; {then}.", highlight=False)


def render_blk(walk: BlkWalk, index: int, total: int, domains: dict[int, str],
               console: Console) -> None:
    at = _Clock(walk.t0)
    take = walk.take
    domid = take["domid"]
    f = take["fields"]
    console.width = max(console.width, 110)
    console.rule(f"[bold]blkif request {index} of {total}: {_name(domains, domid)}, "
                 f"{take['op']} id {take['id']}")
    console.print("(A disk request walks the same path as the seed's packet: steps 5 and 6 "
                  "are the backend's work and its answer.)", highlight=False)
    first_map = next((g for g in walk.grants if g["op"] == "map"), None)
    console.print(f"[bold]1.[/] {'(before +0)':>13} guest code: the data page(s) are granted to "
                  f"Dom0: " + (f"grant {first_map['ref']} = {entry_text(first_map['entry_before'])}"
                               if first_map else "(no segment: nothing to map)"), highlight=False)
    console.print(f"[bold]2.[/] {'(before +0)':>13} blkfront puts a blkif_request in slot "
                  f"{take['index']} of {take['ring']} and advances req_prod to {take['req_prod']}:",
                  highlight=False)
    _print_struct(console, blkif_request(X86_32), take["hex"],
                  f"     blkif_request (x86_32, {len(take['hex']) // 2} bytes)")
    for i, s in enumerate(f["seg"]):
        console.print(f"     seg[{i}]: gref {s['gref']}, first_sect {s['first_sect']}, "
                      f"last_sect {s['last_sect']}", highlight=False)
    if walk.notify is not None:
        n = walk.notify
        console.print(f"[bold]3.[/] {at(n)} EVTCHNOP_send on port {n['port']} -> Dom0's port "
                      f"{n['remote_port']}; blkback's thread wakes.", highlight=False)
    else:
        console.print(f"[bold]3.[/] {at(take)} no notification of its own: it came in a batch "
                      "behind an earlier request's notify (or the final check found it).",
                      highlight=False)
    console.print(f"[bold]4.[/] {at(take)} blkback copies the request out: req_cons -> "
                  f"{take['req_cons']}.", highlight=False)
    for g in walk.grants:
        what = "GNTTABOP_map_grant_ref" if g["op"] == "map" else "GNTTABOP_unmap_grant_ref"
        ro = " readonly" if g.get("readonly") else ""
        console.print(f"[bold]5.[/] {at(g)} {what}{ro} grant {g['ref']} of domain {g['granter']}: "
                      f"{g['status_name']} ({g['status']}); entry now {entry_text(g['entry_after'])}",
                      highlight=False)
    r = walk.response
    if r is not None:
        console.print(f"[bold]6.[/] {at(r)} the response, with the request's id:", highlight=False)
        _print_struct(console, blkif_response(X86_32), r["hex"], "     blkif_response")
    if walk.push is not None:
        p = walk.push
        console.print(f"   {at(p)} pushed: rsp_prod {p['prod']}, rsp_event {p['event']} -> notify "
                      f"{'yes' if p['notify'] else 'no'} ({p.get('batch', 1)} response(s) in this "
                      "push).", highlight=False)
    if walk.event is not None:
        e = walk.event
        console.print(f"   {at(e)} blkback notifies Dom0's port {e['port']}: domain "
                      f"{e['remote_dom']}'s port {e['remote_port']} becomes pending.",
                      highlight=False)
    _render_wake(walk.wake, at, domid, domains, console,
                 "blkfront matches the response to its request by id", walk.push, walk.event)
    console.print(f"\n{total} blkif requests in this run; `--io N` picks another.", highlight=False)


def domain_names(result: MachineResult) -> dict[int, str]:
    """domid -> name: PV domains get ids from 1 in machine-file order."""
    pv = [d.name for d in result.domains if d.kind == "pv"]
    return {i + 1: name for i, name in enumerate(pv)}


def explain_trace(records: list[Record], io_index: int | None, domains: dict[int, str],
                  console: Console) -> int:
    """Walk packet `io_index` (or, with no packets, blkif request `io_index`) of a trace. None:
    the first packet that reached another domain's rx ring (the first request)."""
    packets = packet_numbers(records)
    if packets and io_index is None:
        io_index = next((i for i, p in enumerate(packets)
                         if walk_packet(records, p).rx_take is not None), 0)
    io_index = io_index or 0
    if packets:
        if not 0 <= io_index < len(packets):
            raise ExplainPvError(f"--io {io_index}: {len(packets)} packets crossed netback "
                                 f"(0-{len(packets) - 1})")
        render_packet(walk_packet(records, packets[io_index]), io_index, len(packets), domains,
                      console)
        return 0
    requests = blk_requests(records)
    if requests:
        if not 0 <= io_index < len(requests):
            raise ExplainPvError(f"--io {io_index}: {len(requests)} blkif requests "
                                 f"(0-{len(requests) - 1})")
        render_blk(walk_blk(records, requests[io_index]), io_index, len(requests), domains,
                   console)
        return 0
    raise ExplainPvError("no packet crossed netback and no blkif request reached blkback "
                         "(does the machine have vifs or disks?)")


def explain_pv(machine: Path | None, io_index: int | None, console: Console) -> int:
    """`hvmlab explain --pv [MACHINE.toml] [--io N]`: run the machine (default pv-net) into a
    temporary directory with a trace, then walk one packet or request through it (without
    --io: the first packet another domain received)."""
    with tempfile.TemporaryDirectory(prefix="hvmlab-explain-pv-") as tmp:
        result, trace = trace_machine(machine, Path(tmp))
        try:
            records = read_records(trace)
        except TraceWalkError as exc:
            raise ExplainPvError(str(exc)) from None
    code = explain_trace(records, io_index, domain_names(result), console)
    ends = ", ".join(f"{d.name} {d.ended_by}" for d in result.domains)
    console.print(f"(machine {result.name}: {ends})", highlight=False)
    return code
