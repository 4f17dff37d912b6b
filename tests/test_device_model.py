"""Integration: I/O that reaches the device-model thread through ioreqs on the shared I/O page."""

from __future__ import annotations

import os
import struct

import pytest

from hvm.ioreq import IoReq


def asm(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


SCRATCH_IN_OUT = """bits 16
org 0x7c00
    cli
    mov dx, 0x3ff          ; COM1 scratch register (UART, in the device model)
    mov al, 0x5a
    out dx, al
    in al, dx
    out 0xe9, al
    hlt
"""


def test_a_port_in_the_device_model_is_an_ioreq_and_the_answer_comes_back(tmp_path, run_guest):
    result, records = run_guest(asm(tmp_path, "scratch.asm", SCRATCH_IN_OUT))
    assert result.console == "Z"  # 0x5a written, read back through two ioreqs
    assert result.ioreqs == 2 and result.ioreqs_by_type == {"pio": 2}
    dm = [r for r in records if r["handled_by"] == "device-model"]
    assert [(r["port"], r["direction"]) for r in dm] == [(0x3FF, "out"), (0x3FF, "in")]
    posted = IoReq.unpack(bytes.fromhex(dm[1]["ioreq"]["hex"]))
    answered = IoReq.unpack(bytes.fromhex(dm[1]["ioreq"]["answer_hex"]))
    assert (posted.addr, posted.size, posted.dir, posted.state, posted.type) == (0x3FF, 1, 1, 1, 0)
    assert (answered.state, answered.data) == (3, 0x5A)  # IORESP_READY with the value in data
    steps = dm[1]["steps"]
    order = ["2_posted_and_notified", "6_dm_woke_in_select", "7_dm_copied_ioreq",
             "8_dm_answered_and_notified", "9_hypervisor_woke"]
    assert [steps[k] for k in order] == sorted(steps[k] for k in order)
    assert result.device_accesses["uart16550"] == 2


def test_placement_all_dm_sends_the_hypervisor_ports_to_the_device_model(run_guest):
    xen, xen_records = run_guest("hello")
    all_dm, dm_records = run_guest("hello", placement="all-dm")
    assert xen.console == all_dm.console and xen.exit_status == all_dm.exit_status == 1
    assert xen.exits == all_dm.exits  # the same exits...
    assert xen.ioreqs == 0 and all_dm.ioreqs == xen.exits_total  # ...but every one is now an ioreq
    assert {r["handled_by"] for r in xen_records} == {"hypervisor"}
    assert {r["handled_by"] for r in dm_records} == {"device-model"}


SECTOR_READ = """bits 16
org 0x7c00
    cli
    xor ax, ax
    mov es, ax
    mov dx, 0x1f6
    mov al, 0xe0
    out dx, al
    mov dx, 0x1f2
    mov al, 1
    out dx, al
    mov dx, 0x1f3
    mov al, 3              ; LBA 3
    out dx, al
    mov dx, 0x1f4
    xor al, al
    out dx, al
    mov dx, 0x1f5
    out dx, al
    mov dx, 0x1f7
    mov al, 0x20           ; READ SECTORS
    out dx, al
.wait:
    in al, dx
    test al, 0x80
    jnz .wait
    mov di, 0x8000
    mov cx, 256
    mov dx, 0x1f0
    cld
    rep insw
    mov si, 0x8000
    mov cx, 8
    mov dx, 0xe9
    rep outsb
    hlt
"""


def test_rep_insw_of_a_sector_is_one_exit_and_one_ioreq(tmp_path, run_guest):
    disk = tmp_path / "disk.img"
    image = bytearray(os.urandom(512 * 8))
    image[3 * 512:3 * 512 + 8] = b"LBA3DATA"
    disk.write_bytes(image)
    result, records = run_guest(asm(tmp_path, "sector.asm", SECTOR_READ), disk=disk, keep_ioreqs=True)
    assert result.console == "LBA3DATA"
    insw = [r for r in records if r.get("port") == 0x1F0]
    assert len(insw) == 1 and insw[0]["count"] == 256 and insw[0]["string"]
    assert insw[0]["ioreqs"] == 1
    string_reqs = [rec.request for rec in result.ioreq_records if rec.request.data_is_ptr]
    assert len(string_reqs) == 1
    req = string_reqs[0]
    assert (req.addr, req.count, req.size, req.data, req.dir) == (0x1F0, 256, 2, 0x8000, 1)


def test_string_io_is_capped_at_a_page_boundary(tmp_path, run_guest):
    # 64 bytes starting 16 bytes before a page boundary: two ioreqs, one exit.
    src = asm(tmp_path, "cross.asm", """bits 32
org 0x100000
    cli
    mov esi, 0x200ff0
    mov ecx, 64
    mov dx, 0x3ff
    rep outsb
    hlt
""")
    result, records = run_guest(src, keep_ioreqs=True)
    outs = [r for r in records if r.get("string")]
    assert len(outs) == 1 and outs[0]["ioreqs"] == 2
    counts = [rec.request.count for rec in result.ioreq_records if rec.request.data_is_ptr]
    assert counts == [16, 48]


def test_pci_config_space_through_pci_config_ioreqs(tmp_path, run_guest):
    src = asm(tmp_path, "pci.asm", """bits 32
org 0x100000
    cli
    mov dx, 0xcf8
    mov eax, 0x80000000    ; 00:00.0, register 0
    out dx, eax
    mov dx, 0xcfc
    in eax, dx
    mov [0x9000], eax
    mov dx, 0xcf8
    mov eax, 0x80000800    ; 00:01.0, register 0
    out dx, eax
    mov dx, 0xcfe          ; the device-ID word at byte lane 2
    in ax, dx
    mov [0x9004], ax
    hlt
""")
    result, records = run_guest(src, keep_ioreqs=True)
    config = [rec.request for rec in result.ioreq_records]
    assert [hex(r.addr) for r in config] == ["0x0", hex((0x0008 << 32) | 2)]  # sbdf << 32 | reg
    assert all(r.type == 2 for r in config)  # IOREQ_TYPE_PCI_CONFIG
    reads = [r["data"] for r in records if r.get("port") in (0xCFC, 0xCFE)]
    assert reads == [0x1237_8086, 0x7000]
    assert [r["handled_by"] for r in records if r.get("port") == 0xCF8] == ["hypervisor"] * 2


def test_pci_with_all_dm_is_plain_port_io(tmp_path, run_guest):
    src = asm(tmp_path, "pci2.asm", """bits 32
org 0x100000
    cli
    mov dx, 0xcf8
    mov eax, 0x80000000
    out dx, eax
    mov dx, 0xcfc
    in eax, dx
    hlt
""")
    result, records = run_guest(src, placement="all-dm")
    assert result.ioreqs_by_type == {"pio": 2}
    assert records[1]["data"] == 0x1237_8086


def test_vga_text_memory_is_mmio_with_buffered_writes(tmp_path, run_guest):
    src = asm(tmp_path, "vga.asm", """bits 32
org 0x100000
    cli
    mov edi, 0xb8000
    mov byte [edi], 'H'
    mov byte [edi + 2], 'i'
    mov al, [edi]          ; a read: synchronous COPY ioreq
    out 0xe9, al
    hlt
""")
    result, records = run_guest(src)
    assert result.screen == "Hi"
    ept = [r for r in records if r["reason"] == "EPT_VIOLATION"]
    assert len(ept) == 3 and all(r["handled_by"] == "device-model" for r in ept)
    assert [r["qualification"] & 3 for r in ept] == [2, 2, 1]  # write, write, read
    assert result.buffered_ioreqs == 2 and result.ioreqs_by_type == {"copy": 1}
    assert result.console == "H"


def test_buffered_ports_keep_order_and_lose_nothing_when_the_page_fills(tmp_path, run_guest):
    # 3000 console writes through the 511-slot buffered page: some find it full and go
    # synchronously; every byte arrives, in order.
    src = asm(tmp_path, "flood.asm", """bits 32
org 0x100000
    cli
    mov ecx, 3000
    mov dx, 0xe9
.l: mov eax, ecx
    and al, 0x0f
    add al, 'a'
    out dx, al
    dec ecx
    jnz .l
    hlt
""")
    result, _ = run_guest(src, placement="all-dm", buffered_ports=[0xE9])
    expected = "".join(chr(ord("a") + (n & 15)) for n in range(3000, 0, -1))
    assert result.console == expected
    assert result.buffered_ioreqs + result.ioreqs_by_type.get("pio", 0) == 3000
    assert result.buffered_ioreqs > 0


def test_a_device_model_that_fails_ends_the_run_with_status_8(tmp_path, run_guest, monkeypatch):
    from devicemodel import uart16550

    def broken(self, offset, size):
        raise RuntimeError("the UART model crashed")

    monkeypatch.setattr(uart16550.Uart16550, "read", broken)
    result, _ = run_guest(asm(tmp_path, "scratch.asm", SCRATCH_IN_OUT), dm_timeout_s=2)
    assert (result.ended_by, result.exit_status) == ("error", 8)
    assert "device model" in result.message and "UART model crashed" in result.message


def test_a_device_model_that_never_answers_is_bounded(tmp_path, run_guest, monkeypatch):
    import time

    from devicemodel import uart16550

    def slow(self, offset, size):
        time.sleep(1.5)
        return 0

    monkeypatch.setattr(uart16550.Uart16550, "read", slow)
    result, _ = run_guest(asm(tmp_path, "scratch.asm", SCRATCH_IN_OUT), dm_timeout_s=0.3)
    assert (result.ended_by, result.exit_status) == ("error", 8)
    assert "no answer from the device model" in result.message


def test_missing_disk_image_is_a_clear_error_before_the_guest_starts(tmp_path, run_guest):
    from hvm.loader import LoadError

    with pytest.raises(LoadError, match="missing.img"):
        run_guest("hello", disk=tmp_path / "missing.img")


def test_pit_interrupts_wake_a_halted_guest(tmp_path, run_guest):
    src = asm(tmp_path, "pit.asm", """bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    mov word [8 * 4], timer
    mov word [8 * 4 + 2], 0
    mov al, 0x34
    out 0x43, al
    mov ax, 1193           ; 1 kHz
    out 0x40, al
    mov al, ah
    out 0x40, al
    mov al, 0xfe
    out 0x21, al
    sti
.wait:
    hlt
    cmp word [ticks], 10
    jb .wait
    cli
    hlt
timer:
    inc word [ticks]
    mov al, 0x20
    out 0x20, al
    iret
ticks: dw 0
""")
    result, records = run_guest(src)
    assert result.exit_status == 0 and result.interrupts_injected == 10
    assert result.exits["HLT"] >= 2  # halts between ticks, and a last one with IF=0


def test_interrupt_window_exit_when_an_interrupt_waits_for_sti(tmp_path, run_guest):
    # A one-shot PIT interrupt (mode 0) becomes pending while IF=0; when the guest executes STI
    # the window opens after the next instruction: an INTERRUPT_WINDOW exit, then the injection.
    src = asm(tmp_path, "window.asm", """bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    mov word [8 * 4], timer
    mov word [8 * 4 + 2], 0
    mov al, 0x30           ; channel 0, lobyte/hibyte, mode 0: one interrupt at terminal count
    out 0x43, al
    mov ax, 119            ; 0.1 ms
    out 0x40, al
    mov al, ah
    out 0x40, al
    mov al, 0xfe
    out 0x21, al
    mov ecx, 30000000      ; tens of milliseconds with IF=0: the interrupt stays pending
.spin:
    dec ecx
    jnz .spin
    mov al, 'S'
    out 0xe9, al
    sti
    nop
.wait:
    cmp byte [seen], 0
    je .wait
    cli
    hlt
timer:
    mov byte [seen], 1
    mov al, 'I'
    out 0xe9, al
    mov al, 0x20
    out 0x20, al
    iret
seen: db 0
""")
    result, records = run_guest(src)
    assert result.console.startswith("SI")
    reasons = [r["reason"] for r in records]
    assert "INTERRUPT_WINDOW" in reasons
    window = reasons.index("INTERRUPT_WINDOW")
    assert reasons.index("INTERRUPT_WINDOW") > reasons.index("IO_INSTRUCTION")
    assert records[window]["rip"] > 0x7C00 and result.exit_status == 0


def test_ioreq_bytes_are_xens_layout(tmp_path, run_guest):
    result, records = run_guest(asm(tmp_path, "scratch.asm", SCRATCH_IN_OUT))
    raw = bytes.fromhex([r for r in records if r["handled_by"] == "device-model"][0]["ioreq"]["hex"])
    addr, data, count, size, eport, _pad, flags, kind = struct.unpack("<QQIIIHBB", raw)
    assert (addr, data, count, size, flags & 0xF, flags >> 5 & 1, kind) == (0x3FF, 0x5A, 1, 1, 1, 0, 0)


def test_port_accesses_that_wrap_past_0xffff_are_harmless(tmp_path, run_guest):
    src = asm(tmp_path, "edge.asm", """bits 32
org 0x100000
    cli
    mov dx, 0xfffe
    in eax, dx
    out dx, eax
    mov dx, 0xffff
    in ax, dx
    mov al, 'k'
    out 0xe9, al
    hlt
""")
    for placement in ("xen", "all-dm"):
        result, records = run_guest(src, placement=placement)
        assert result.console == "k" and result.exit_status == 0
        assert records[0]["data"] == 0xFFFF_FFFF  # nothing answers there: all ones


def test_timer_interrupts_never_run_a_guest_instruction_twice(tmp_path, run_guest):
    # `add dword [count], 1` and `inc ecx` in lockstep while a 1 kHz timer interrupts the guest
    # hundreds of times: if a stop ever re-ran an instruction, memory and register would differ.
    src = asm(tmp_path, "lockstep.asm", """bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    mov word [8 * 4], timer
    mov word [8 * 4 + 2], 0
    mov al, 0x34
    out 0x43, al
    mov ax, 1193
    out 0x40, al
    mov al, ah
    out 0x40, al
    mov al, 0xfe
    out 0x21, al
    xor ecx, ecx
    sti
.loop:
    add dword [count], 1
    inc ecx
    cmp ecx, 30000000
    jne .loop
    cli
    cmp ecx, [count]
    jne .bad
    mov al, 'Y'
    out 0xe9, al
    hlt
.bad:
    mov al, 'N'
    out 0xe9, al
    hlt
timer:
    inc word [ticks]
    push ax
    mov al, 0x20
    out 0x20, al
    pop ax
    iret
count: dd 0
ticks: dw 0
""")
    result, _ = run_guest(src, timeout_s=60)
    assert result.console == "Y" and result.exit_status == 0
    assert result.interrupts_injected >= 10
