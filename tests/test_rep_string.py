"""REP INS/OUTS end as the CPU ends them (rCX 0, rDI/rSI past the buffer, every element stored) with ONE exit, forwards and backwards, 32- and 16-bit."""

from __future__ import annotations

import pytest

PROTECTED = """bits 32
org 0x100000
    cli
    cld
    mov edi, buf            ; 64 reads of port 0xE9 (the debug console answers 0xE9)
    mov ecx, 64
    mov dx, 0xe9
    rep insb
    test ecx, ecx
    jnz fail
    cmp edi, buf + 64
    jne fail
    mov esi, buf
    mov ecx, 64
check:
    lodsb
    cmp al, 0xe9
    jne fail
    loop check
    cmp byte [buf + 64], 0x55   ; the byte after the buffer is untouched
    jne fail
    std                     ; backwards: from the last byte down
    mov edi, back + 15
    mov ecx, 16
    rep insb
    cld
    test ecx, ecx
    jnz fail
    cmp edi, back - 1
    jne fail
    cmp byte [back - 1], 0x55
    jne fail
    cmp dword [back + 12], 0xe9e9e9e9
    jne fail
    mov esi, text           ; and out: the text on the console, rSI past it
    mov ecx, text_end - text
    rep outsb
    cmp esi, text_end
    jne fail
    test ecx, ecx
    jnz fail
    mov al, 0
    out 0xf4, al
fail:
    mov al, 1
    out 0xf4, al

buf:    times 64 db 0
        db 0x55
        db 0x55
back:   times 16 db 0
text:   db "rep outsb done", 10
text_end:
"""

REAL = """bits 16
org 0x7c00
    cli
    cld
    xor ax, ax
    mov es, ax
    mov ds, ax
    mov di, buf
    mov cx, 8
    mov dx, 0xe9
    rep insw                ; 16-bit addressing: DI and CX only
    test cx, cx
    jnz fail
    cmp di, buf + 16
    jne fail
    mov ax, [buf]           ; every element stored, all the same word read
    cmp ax, 0x7777
    je fail
    cmp ax, [buf + 14]
    jne fail
    mov al, 0
    out 0xf4, al
fail:
    mov al, 1
    out 0xf4, al
buf: times 16 db 0x77
"""


@pytest.mark.parametrize("source", [PROTECTED, REAL], ids=["protected", "real"])
def test_rep_string_io_ends_as_the_cpu_ends_it(tmp_path, run_guest, source: str) -> None:
    guest = tmp_path / "rep.asm"
    guest.write_text(source)
    result, records = run_guest(str(guest))
    assert (result.ended_by, result.exit_status) == ("debug_exit", 1), result.console
    strings = [r for r in records if r.get("string")]
    counts = [r["count"] for r in strings]
    assert counts == ([64, 16, 15] if source is PROTECTED else [8])  # one exit per instruction
    if source is PROTECTED:
        assert result.console.endswith("rep outsb done\n")
