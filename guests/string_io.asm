; string_io: protected mode, flat 32-bit at 1 MiB. One `rep outsb` sends a whole line to
; the 0xE9 debug console: ONE IO_INSTRUCTION exit for the whole instruction (qualification
; 0x00E90030: string, REP, port 0xE9), its count the number of bytes and its guest linear
; address the buffer. Then a single `outsb` without REP, and halts with IF=0 (status 0).
bits 32
org 0x100000

start:
    cli
    cld
    mov esi, line
    mov ecx, line_end - line
    mov dx, 0xe9
    rep outsb
    mov esi, bang
    outsb
    mov esi, result
    mov ecx, result_end - result
    rep outsb
    hlt

line:   db "One rep outsb, one exit, many bytes"
line_end:
bang:   db 10
result: db "Test result: SUCCESS", 10
result_end:
