"""Integration: PV guests under Unicorn: int 0x82 hypercalls, start_info read back, Dom0 event round trips, block and upcalls, shutdown reasons, grant setup, faults, limits and a page flip into a running guest."""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path

import pytest

from hvm.loader import GuestImage, load
from hvm.memory import PAGE_SIZE
from pv.dom0 import Dom0
from pv.domain import (
    CONSOLE_PFN,
    GRANT_FRAMES,
    SHARED_INFO,
    START_INFO,
    STORE_PFN,
    PvDomain,
    PvOptions,
    PvRunResult,
    run_pv,
)
from pv.evtchn_echo import EvtchnEcho
from pv.evtchn_pv import EVTCHNSTAT_unbound
from pv.grant_table import GTF_accept_transfer
from pv.shared_info import StartInfo
from pv.trace_pv import BLOCK, EVENT_SEND, HYPERCALL_BASE, UPCALL, reason_name

REPO = Path(__file__).resolve().parents[1]
PV_GUESTS = REPO / "guests" / "pv"
SCRATCH = 0x20000  # where the test guests leave what they saw

HEADER = """bits 32
org 0x100000
%define HC(n) (0x3000 + (n) * 32)
"""
SHUTDOWN = """
    mov dword [reason], 0
    mov ebx, 2
    mov ecx, reason
    call HC(29)
    hlt
reason: dd 0
"""


def image_of(tmp_path: Path, body: str, name: str = "t") -> GuestImage:
    src = tmp_path / f"{name}.asm"
    src.write_text(HEADER + body)
    return load(str(src))


def boot(image: GuestImage, timeout_s: float = 5.0, with_echo: bool = False,
         during=None, **options) -> tuple[PvRunResult, PvDomain]:
    """Run `image` in a fresh Dom0; `during(dom0, domain)` runs on a thread of its own."""
    dom0 = Dom0(pool_bytes=1 << 20)
    dom0.start()
    services = []
    helper = None
    try:
        domain = dom0.create_pv_domain(image, mem=options.pop("mem", 4 << 20), **options)
        if with_echo:
            services.append(EvtchnEcho.attach(dom0, domain))
        if during is not None:
            helper = threading.Thread(target=during, args=(dom0, domain), daemon=True)
            helper.start()
        dom0.run_domains([domain], timeout_s)
        for s in services:
            s.stop()
        if helper is not None:
            helper.join(5.0)
        return domain.result(0.0), domain
    finally:
        for s in services:
            s.stop()
        dom0.stop()


def records(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if "seq" in r]


# -- the shipped guests -------------------------------------------------------------------------
def test_hello_prints_through_console_io_and_powers_off(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    result = run_pv(load(str(PV_GUESTS / "hello.asm")), PvOptions(timeout_s=5, trace=trace))
    assert (result.ended_by, result.exit_status, result.mode) == ("shutdown_poweroff", 0, "pv")
    assert result.console.splitlines()[-1] == "Test result: SUCCESS"
    assert "xen-3.0-x86_32p" in result.console
    assert result.hypercalls == {"console_io": 1, "sched_op": 1}
    recs = records(trace)
    assert [r["reason_code"] for r in recs] == [HYPERCALL_BASE + 18, HYPERCALL_BASE + 29]
    write, shutdown = recs
    assert (write["hypercall"], write["op"], write["result"]) == ("console_io", "CONSOLEIO_write", 0)
    assert write["args"][0] == 0 and write["args"][1] == len(result.console)
    assert write["insn"] == "int 0x82" and write["rip"] == 0x3000 + 18 * 32 + 5
    assert (shutdown["op"], shutdown["args"][0]) == ("SCHEDOP_shutdown", 2)
    assert reason_name(write["reason_code"]) == "HYPERCALL"
    summary = json.loads(trace.read_text().splitlines()[-1])["summary"]
    assert summary["ended_by"] == "shutdown_poweroff"


def test_events_guest_round_trips_with_the_dom0_echo(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    result = run_pv(load(str(PV_GUESTS / "events.asm")), PvOptions(timeout_s=10, trace=trace))
    assert (result.ended_by, result.exit_status) == ("shutdown_poweroff", 0), result.console
    assert result.console.splitlines()[-1] == "Test result: SUCCESS"
    recs = records(trace)
    sends = [r for r in recs if r["reason_code"] == EVENT_SEND and r["direction"] == "out"]
    echo_port = max(r["port"] for r in sends)  # ports 1 (store) and 2 (console) come first
    to_echo = [r for r in sends if r["port"] == echo_port]
    assert all(r["remote_dom"] == 0 for r in to_echo)
    arrived = [r for r in recs if r["reason_code"] == EVENT_SEND and r["direction"] == "in"
               and r["port"] == echo_port]
    assert len(arrived) == len(to_echo) + 1  # every send echoed, after the "bound" event
    upcalls = [r for r in recs if r["reason_code"] == UPCALL]
    assert result.upcalls == len(upcalls) == 2
    assert all(r["port"] == echo_port and r["callback"] > 0x100000 for r in upcalls)
    blocks = [r for r in recs if r["reason_code"] == BLOCK]
    assert {r["op"] for r in blocks} >= {"SCHEDOP_poll", "SCHEDOP_block"}
    assert all(r["woken_by"] == "event" for r in blocks)
    assert result.events_sent == len(sends)


# -- the ABI as guest code sees it ----------------------------------------------------------------
def test_guest_reads_start_info_and_its_pages(tmp_path: Path) -> None:
    body = f"""
    mov [{SCRATCH}], esi            ; where ESI pointed
    mov [{SCRATCH} + 4], esp
    pushfd
    pop eax
    mov [{SCRATCH} + 8], eax
    mov ecx, 64                     ; start_info's first 64 bytes
    mov edi, {SCRATCH} + 16
    rep movsb
    mov esi, [{SCRATCH}]
    mov esi, [esi + 36]             ; start_info.shared_info
    mov al, [esi + 1]               ; vcpu_info[0].evtchn_upcall_mask
    mov [{SCRATCH} + 12], al
""" + SHUTDOWN
    result, domain = boot(image_of(tmp_path, body))
    assert result.ended_by == "shutdown_poweroff"
    mem = domain.memory
    esi, esp, eflags = struct.unpack("<III", mem.read(SCRATCH, 12))
    assert (esi, esp) == (START_INFO, 0x80000)
    assert not eflags & (1 << 9)  # IF = 0
    assert mem.read(SCRATCH + 12, 1) == b"\x01"  # upcalls masked at entry
    seen = mem.read(SCRATCH + 16, 64)
    assert seen[:16] == b"xen-3.0-x86_32p\0"
    nr_pages, shared, flags, store_mfn, store_evtchn, cons_mfn, cons_evtchn = \
        struct.unpack("<7I", seen[32:60])
    assert nr_pages == domain.memory.nr_pages == (4 << 20) // PAGE_SIZE
    assert (shared, flags) == (SHARED_INFO, 0)
    assert (store_mfn, cons_mfn) == (STORE_PFN, CONSOLE_PFN)
    assert (store_evtchn, cons_evtchn) == (domain.store_port, domain.console_port)
    assert StartInfo.unpack(mem.read(START_INFO, 1112)).store_evtchn == store_evtchn


def test_int_0x82_directly_with_results_and_registers(tmp_path: Path) -> None:
    body = f"""
    mov ebp, 0x55aa55aa
    mov eax, 11                     ; no such hypercall
    mov ebx, 0x11111111
    mov ecx, 0x22222222
    mov edx, 0x33333333
    mov esi, 0x44444444
    mov edi, 0x66666666
    int 0x82
    mov [{SCRATCH}], eax
    mov [{SCRATCH} + 4], ebx
    mov [{SCRATCH} + 8], ecx
    mov [{SCRATCH} + 12], edx
    mov [{SCRATCH} + 16], esi
    mov [{SCRATCH} + 20], edi
    mov [{SCRATCH} + 24], ebp
    mov [{SCRATCH} + 28], esp
    mov eax, 17                     ; xen_version(XENVER_version)
    xor ebx, ebx
    int 0x82
    mov [{SCRATCH} + 32], eax
    mov eax, 18                     ; console_io write from a bad pointer
    xor ebx, ebx
    mov ecx, 4
    mov edx, 0xfffff000
    int 0x82
    mov [{SCRATCH} + 36], eax
    mov eax, 32                     ; event_channel_op send on port 1023
    mov ebx, 4
    mov ecx, port
    int 0x82
    mov [{SCRATCH} + 40], eax
    jmp done
port: dd 1023
done:
""" + SHUTDOWN
    result, domain = boot(image_of(tmp_path, body))
    assert result.ended_by == "shutdown_poweroff"
    got = struct.unpack("<11i", domain.memory.read(SCRATCH, 44))
    assert got[0] == -38  # -ENOSYS
    assert [v & 0xFFFF_FFFF for v in got[1:8]] == [0x11111111, 0x22222222, 0x33333333,
                                                    0x44444444, 0x66666666, 0x55AA55AA, 0x80000]
    assert got[8] == (4 << 16) | domain.hypercalls.version[1]
    assert got[9:] == (-14, -22)  # -EFAULT, -EINVAL
    assert result.hypercalls["unknown_11"] == 1


def test_grant_setup_table_returns_frames_8_and_up(tmp_path: Path) -> None:
    body = f"""
    mov word [op], 0x7ff0           ; DOMID_SELF
    mov dword [op + 4], 4           ; nr_frames
    mov dword [op + 12], {SCRATCH}  ; frame_list
    mov eax, 20
    mov ebx, 2                      ; GNTTABOP_setup_table
    mov ecx, op
    mov edx, 1
    int 0x82
    mov [{SCRATCH} + 32], eax
    mov ax, [op + 8]
    mov [{SCRATCH} + 36], ax        ; status
    mov dword [op + 4], 5           ; more frames than there are
    mov eax, 20
    mov ebx, 2
    mov ecx, op
    mov edx, 1
    int 0x82
    mov ax, [op + 8]
    mov [{SCRATCH} + 38], ax
    jmp done
op: times 16 db 0
done:
""" + SHUTDOWN
    result, domain = boot(image_of(tmp_path, body))
    assert result.ended_by == "shutdown_poweroff"
    frames = struct.unpack("<4I", domain.memory.read(SCRATCH, 16))
    assert list(frames) == list(GRANT_FRAMES) == [8, 9, 10, 11]
    assert struct.unpack("<ihh", domain.memory.read(SCRATCH + 32, 8)) == (0, 0, -1)
    assert result.grant_ops == {"setup_table": 2}


def test_a_preempted_hypercall_is_continued_by_the_guest(tmp_path: Path) -> None:
    body = f"""
    mov edi, 0x40000                ; 600 zero-length gnttab_copy of our frame 0x30
    mov ecx, 600
fill:
    mov dword [edi], 0x30
    mov dword [edi + 4], 0x7ff0
    mov dword [edi + 8], 0x30
    mov dword [edi + 12], 0x7ff0
    mov dword [edi + 16], 0
    mov dword [edi + 20], 99        ; status, overwritten by Xen
    add edi, 24
    loop fill
    mov eax, 20
    mov ebx, 5                      ; GNTTABOP_copy
    mov ecx, 0x40000
    mov edx, 600
    int 0x82
    mov [{SCRATCH}], eax
""" + SHUTDOWN
    trace = tmp_path / "t.jsonl"
    from hvm.trace import TraceWriter
    from pv.trace_pv import PvTracer
    tracer = PvTracer(TraceWriter(trace, {"guest": "copies"}, offload=False))
    result, domain = boot(image_of(tmp_path, body), tracer=tracer)
    tracer.close()
    assert result.ended_by == "shutdown_poweroff", result.message
    assert domain.memory.read_uint(SCRATCH, 4) == 0
    statuses = [domain.memory.read_uint(0x40000 + 24 * i + 20, 2) for i in range(600)]
    assert statuses == [0] * 600
    copies = [r for r in records(trace) if r.get("op") == "GNTTABOP_copy"]
    assert [r["args"][2] for r in copies] == [600, 344, 88]
    assert [r.get("preempted", False) for r in copies] == [True, True, False]
    assert copies[-1]["result"] == 0 and len({r["rip"] for r in copies}) == 1
    assert result.grant_ops == {"copy": 600}


# -- events with a Dom0 thread --------------------------------------------------------------------
BLOCKER = f"""
    mov word [op], 0x7ff0
    mov word [op + 2], 0            ; remote: Dom0
    mov eax, 32
    mov ebx, 6                      ; EVTCHNOP_alloc_unbound
    mov ecx, op
    int 0x82
    mov eax, [op + 4]
    mov [{SCRATCH}], eax
wait:
    mov eax, 29
    mov ebx, 1                      ; SCHEDOP_block
    xor ecx, ecx
    int 0x82
    inc dword [{SCRATCH} + 4]       ; times the block returned
    mov eax, [{SCRATCH}]
    lock btr dword [0x2000 + 2048], eax
    jnc wait                        ; woken without our port: block again
    jmp done
op: times 8 db 0
done:
""" + SHUTDOWN


def test_block_sleeps_until_a_dom0_thread_notifies(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def dom0_side(dom0: Dom0, domain: PvDomain) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # wait for the guest's port, then for its block
            unbound = [p for p, s in domain.evtchn.ports().items()
                       if s.status == EVTCHNSTAT_unbound and p != domain.console_port]
            if unbound and domain.vcpu.blocks:
                break
            time.sleep(0.002)
        end = domain.bind_evtchn(unbound[0])
        end.consume()
        seen["blocks_before"] = domain.vcpu.blocks
        end.notify()
        seen["port"] = unbound[0]
        seen["end"] = end

    trace = tmp_path / "t.jsonl"
    from hvm.trace import TraceWriter
    from pv.trace_pv import PvTracer
    tracer = PvTracer(TraceWriter(trace, {"guest": "blocker"}, offload=False))
    result, domain = boot(image_of(tmp_path, BLOCKER), during=dom0_side, tracer=tracer)
    tracer.close()
    assert result.ended_by == "shutdown_poweroff", result.message
    port, returned = struct.unpack("<II", domain.memory.read(SCRATCH, 8))
    assert port == seen["port"]
    assert returned >= 1 and seen["blocks_before"] == 1
    seen["end"].close()  # type: ignore[attr-defined]
    block = [r for r in records(trace) if r["reason_code"] == BLOCK]
    assert block[-1]["op"] == "SCHEDOP_block" and block[-1]["woken_by"] == "event"
    assert block[-1]["port"] == port


# -- endings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("reason, ended_by, status", [
    (0, "shutdown_poweroff", 0), (1, "shutdown_reboot", 0), (2, "shutdown_suspend", 0),
    (3, "shutdown_crash", 4), (4, "shutdown_watchdog", 4), (9, "shutdown_unknown", 4)])
def test_shutdown_reasons(tmp_path: Path, reason: int, ended_by: str, status: int) -> None:
    body = f"""
    mov eax, 29
    mov ebx, 2
    mov ecx, why
    int 0x82
    hlt
why: dd {reason}
"""
    result, _ = boot(image_of(tmp_path, body))
    assert (result.ended_by, result.exit_status) == (ended_by, status)


@pytest.mark.parametrize("body, message", [
    ("ud2", "#UD"),
    ("mov eax, [0x7ffff00]", "outside the domain"),
    ("int 0x80", "int 0x80"),
    ("xor edx, edx\n    xor ecx, ecx\n    div ecx", "#DE")])
def test_a_faulting_guest_crashes(tmp_path: Path, body: str, message: str) -> None:
    result, _ = boot(image_of(tmp_path, "    " + body + "\n    hlt\n"))
    assert (result.ended_by, result.exit_status) == ("fault", 4)
    assert message in result.message


def test_a_runaway_guest_times_out(tmp_path: Path) -> None:
    result, _ = boot(image_of(tmp_path, "spin: jmp spin\n"), timeout_s=0.3)
    assert (result.ended_by, result.exit_status) == ("timeout", 6)


def test_a_blocked_guest_times_out_too(tmp_path: Path) -> None:
    result, _ = boot(image_of(tmp_path, BLOCKER), timeout_s=0.3)
    assert (result.ended_by, result.exit_status) == ("timeout", 6)
    assert result.blocks >= 1


def test_max_hypercalls_and_halt(tmp_path: Path) -> None:
    body = """
again:
    mov eax, 29
    xor ebx, ebx                    ; SCHEDOP_yield
    int 0x82
    jmp again
"""
    result, _ = boot(image_of(tmp_path, body), max_hypercalls=5)
    assert (result.ended_by, result.exit_status, result.hypercalls_total) == ("max_hypercalls", 6, 5)
    result, _ = boot(image_of(tmp_path, "    in al, 0x60\n    out 0x80, al\n    hlt\n"))
    assert (result.ended_by, result.exit_status, result.port_accesses) == ("halt", 0, 2)


# -- a page flip from a Dom0 thread while the guest runs -----------------------------------------
def test_dom0_flips_a_page_into_a_running_guest(tmp_path: Path) -> None:
    body = f"""
    mov dword [0x30000], 0x11111111 ; the page the guest gives up
    mov dword [0x8004], 0x30        ; grant entry 0: frame 0x30, domid 0 ...
    mov word [0x8000], {GTF_accept_transfer} ; ... flags last
spin:
    test word [0x8000], 8           ; GTF_transfer_completed
    jz spin                         ; busy: only a kick gets this vCPU out of the guest
    mov eax, [0x30000]
    mov [{SCRATCH}], eax
""" + SHUTDOWN
    flipped: dict[str, int] = {}

    def dom0_side(dom0: Dom0, domain: PvDomain) -> None:
        table = dom0.grant_ops.tables[domain.domid]
        deadline = time.monotonic() + 5
        while table.flags(0) != GTF_accept_transfer and time.monotonic() < deadline:
            time.sleep(0.002)
        gfn = dom0.alloc_frame()
        dom0.memory.write_uint(gfn * PAGE_SIZE, 4, 0xD0D0CAFE)
        flipped["status"] = dom0.grant_ops.transfer(0, gfn, domain.domid, 0)
        flipped["dom0_sees"] = dom0.memory.read_uint(gfn * PAGE_SIZE, 4)

    result, domain = boot(image_of(tmp_path, body), during=dom0_side)
    assert flipped["status"] == 0
    assert result.ended_by == "shutdown_poweroff", result.message
    # the guest read Dom0's page at its frame 0x30; Dom0 got the guest's old page
    assert domain.memory.read_uint(SCRATCH, 4) == 0xD0D0CAFE
    assert domain.memory.read_uint(0x30000, 4) == 0xD0D0CAFE
    assert flipped["dom0_sees"] == 0x11111111
