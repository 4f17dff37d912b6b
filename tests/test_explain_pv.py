"""The PV trace of a pv-net machine (`hvmlab up --trace`) follows each packet through the seven steps in causal order with the ring and grant bytes, `hvmlab explain --pv` walks one, and a guest's own grant ops are records too."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from devicemodel.pcap import read_pcap
from hvm.cli import main
from hvm.exit_reasons import PV_RECORD_NAMES
from hvm.loader import GuestImage, Segment
from hvm.memory import PAGE_SIZE
from hvm.trace import TraceWriter
from hvm.trace_summary import read_trace
from pv.dom0 import Dom0
from pv.grant_table import (
    DOMID_SELF,
    GNTCOPY_source_gref,
    GNTST_bad_gntref,
    GNTST_okay,
    GTF_accept_transfer,
    GTF_permit_access,
    GTF_readonly,
    GTF_transfer_completed,
    GTF_type_mask,
)
from pv.layouts import X86_32, netif_rx_response, netif_tx_request
from pv.trace_pv import PvTracer
from pv.trace_walk import PacketWalk, packet_numbers, read_records, walk_packet

EXAMPLES = Path(__file__).parent.parent / "examples"
CORE_STEPS = ["tx_take", "tx_grant_copy", "bridge_tx", "bridge_rx", "rx_take", "rx_grant",
              "rx_response", "rx_push"]


@pytest.fixture(scope="module")
def pv_net(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[bytes]]:
    out = tmp_path_factory.mktemp("pv-net")
    trace = out / "pv-net.jsonl"
    assert main(["up", str(EXAMPLES / "pv-net.toml"), "--out", str(out), "--json",
                 "--trace", str(trace)]) == 0
    records = read_records(trace)
    frames = [frame for _t, frame in read_pcap(out / "pv-net.pcap")]
    return records, frames


def delivered(records: list[dict]) -> list[PacketWalk]:
    walks = [walk_packet(records, p) for p in packet_numbers(records)]
    return [w for w in walks if w.rx_take is not None]


def test_step_records_are_named_and_coded(pv_net):
    records, _ = pv_net
    reasons = {r["reason"]: r["reason_code"] for r in records if r.get("handled_by") == "dom0"}
    for name in ("RING_TAKE", "GRANT_OP", "BRIDGE_TX", "BRIDGE_RX", "RING_RESPONSE", "RING_PUSH",
                 "EVENT_SEND"):
        assert name in reasons, name
        assert PV_RECORD_NAMES[reasons[name]] == name


def test_each_delivered_packet_follows_the_chain_in_causal_order(pv_net):
    records, frames = pv_net
    walks = delivered(records)
    # each guest receives the other's frame: one rx by grant copy, one by page flip at least
    assert {w.rx_take["rx_mode"] for w in walks} == {"copy", "flip"}
    assert any(w.notify is not None for w in walks)
    for w in walks:
        chain = w.chain()
        names = [name for name, _t in chain]
        assert all(step in names for step in CORE_STEPS), names
        times = [t for _name, t in chain]
        assert times == sorted(times), chain
        if w.notify is not None:  # the sender's EVTCHNOP_send, on the ring's port
            assert w.notify["op"] == "EVTCHNOP_send" and w.notify["domid"] == w.take["domid"]
            assert w.notify["port"] == w.take["frontend_port"]
        # the frame that crossed the bridge is a frame of the pcap, from the sender's vif
        assert w.bridge_tx is not None and w.delivery is not None
        assert w.bridge_tx["crc32"] in {zlib.crc32(f) for f in frames}
        assert w.delivery["domid"] != w.take["domid"]
        assert w.rx_take["crc32"] == w.bridge_tx["crc32"]


def test_tx_request_and_grant_bytes_are_what_explain_shows(pv_net):
    records, frames = pv_net
    for w in delivered(records):
        req = netif_tx_request(X86_32).from_buffer_copy(bytes.fromhex(w.take["hex"]))
        assert w.take["fields"] == {"gref": req.gref, "offset": req.offset, "flags": req.flags,
                                    "id": req.id, "size": req.size}
        assert req.size == w.bridge_tx["len"] == 60
        copy = w.copies[0]
        assert copy["op"] == "copy" and copy["status"] == 0 and copy["ref"] == req.gref
        entry = copy["entry_before"]
        raw = bytes.fromhex(entry["hex"])
        assert int.from_bytes(raw[0:2], "little") == entry["flags"] == GTF_permit_access | GTF_readonly
        assert int.from_bytes(raw[2:4], "little") == entry["domid"] == 0
        assert int.from_bytes(raw[4:8], "little") == entry["frame"]
        g = w.rx_grant
        assert g is not None and g["status"] == 0 and g["ref"] == w.rx_take["fields"]["gref"]
        frame = next(f for f in frames if zlib.crc32(f) == w.bridge_tx["crc32"])
        if w.rx_take["rx_mode"] == "flip":
            assert g["op"] == "transfer"
            assert g["entry_before"]["flags"] == GTF_accept_transfer
            after = g["entry_after"]["flags"]
            assert after & GTF_type_mask == GTF_accept_transfer and after & GTF_transfer_completed
            assert g["entry_after"]["frame"] == g["entry_before"]["frame"]
        else:
            assert g["op"] == "copy" and g["entry_before"]["flags"] == GTF_permit_access
        assert bytes.fromhex(g["page_head"]) == frame[:16]  # the frame is in the receiver's page
        rsp = netif_rx_response(X86_32).from_buffer_copy(bytes.fromhex(w.rx_response["hex"]))
        assert rsp.status == len(frame) and rsp.id == w.rx_take["fields"]["id"]
        if w.rx_push is not None and w.rx_push["notify"] and w.rx_event is not None:
            assert w.rx_event["remote_dom"] == w.delivery["domid"]


def test_explain_pv_walks_a_packet_through_the_seven_steps(capsys):
    assert main(["explain", "--pv"]) == 0  # the first packet another domain received
    out = capsys.readouterr().out
    for step in range(1, 8):
        assert re.search(rf"^{step}\. ", out, re.M), step
    assert "netif_tx_request" in out and "netif_rx_request" in out
    for field in ("gref", "offset", "flags", "id", "size"):
        assert f" {field} " in out, field
    assert "EVTCHNOP_send" in out or "no notification of its own" in out
    assert "grant_entry_v1" in out and "GTF_permit_access|GTF_readonly" in out
    raw = json.loads(out[out.index("Raw: ") + 5:].splitlines()[0])
    assert len(bytes.fromhex(raw["tx_request"])) == 12  # sizeof(netif_tx_request)


def test_explain_pv_errors_and_the_hvm_form(tmp_path, capsys):
    assert main(["explain", "--pv", str(tmp_path / "none.toml")]) == 2
    assert "no such machine file" in capsys.readouterr().err
    assert main(["explain"]) == 2
    assert "explain needs GUEST" in capsys.readouterr().err
    assert main(["explain", "hello", "--placement", "all-dm"]) == 0
    assert "VM exit IO_INSTRUCTION" in capsys.readouterr().out


def test_a_guests_own_grant_copy_is_a_grant_op_record(tmp_path):
    trace = tmp_path / "gnttab.jsonl"
    tracer = PvTracer(TraceWriter(trace, {"mode": "pv"}, offload=False))
    dom0 = Dom0(pool_bytes=1 << 20)
    try:
        code = b"\xfa\xf4"  # never run: the hypercall is dispatched directly
        image = GuestImage("tiny", "bin", 32, 0x100000, (Segment(0x100000, code, len(code)),))
        domain = dom0.create_pv_domain(image, mem=2 << 20, tracer=tracer)
        frame = dom0.alloc_frame()
        dom0.memory.write(frame * PAGE_SIZE + 100, b"from dom0")
        dom0.grant_ops.tables[0].grant_foreign_access(5, domain.domid, frame, readonly=True)
        # two gnttab_copy (x86_32): Dom0's grant 5 -> our frame 0x30; then a ref never granted
        ops = b"".join(struct.pack("<IHHIHHHHhxx", ref, 0, 100, 0x30, DOMID_SELF, 8, 9,
                                   GNTCOPY_source_gref, 99) for ref in (5, 4000))
        domain.memory.write(0x20000, ops)
        assert domain.hypercalls.dispatch(20, (5, 0x20000, 2, 0, 0)) == 0  # GNTTABOP_copy
        assert domain.memory.read(0x30 * PAGE_SIZE + 8, 9) == b"from dom0"
    finally:
        dom0.stop()
        tracer.close()
    grant_ops = [r for r in read_trace(trace) if r["reason"] == "GRANT_OP"]
    assert [(r["op"], r["by"], r["granter"], r["ref"], r["status"]) for r in grant_ops] == [
        ("copy", "guest", 0, 5, GNTST_okay), ("copy", "guest", 0, 4000, GNTST_bad_gntref)]
    first = grant_ops[0]
    assert first["domid"] == domain.domid and first["handled_by"] == "hypervisor"
    assert first["entry_before"]["flags"] == GTF_permit_access | GTF_readonly
    assert (first["entry_before"]["domid"], first["entry_before"]["frame"]) == (domain.domid, frame)
    assert first["entry_after"] == first["entry_before"]  # GTF_reading only while copying
    assert grant_ops[1]["entry_before"] is None  # no such entry in a 4-frame table
