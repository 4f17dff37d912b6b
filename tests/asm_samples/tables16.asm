; tables16.asm - a real-mode guest that dispatches through a jump table and prints the
; names of three commands; exercises what the front end itself must handle.
; Shows: %define with arguments, %assign, %ifdef, equ chains, local labels, dw label tables,
; jmp [table+bx], times of instructions, align with NOP fill, character constants.
        [bits 16]
        [org 0x7C00]
%include "lib/ports.inc"
%define ENTRY(name) dw name
%assign COMMANDS 3
%ifndef VERBOSE
%define VERBOSE 0
%endif
FIRST   equ 0
LAST    equ FIRST + COMMANDS - 1

main:
        xor ax, ax
        mov ds, ax
        xor bx, bx
.next:
        push bx
        shl bx, 1
        jmp [handlers + bx]
.return:
        pop bx
        inc bx
        cmp bx, LAST
        jbe .next
        mov si, done_text
        call puts
        mov al, VERBOSE
        out EXIT_PORT, al
        hlt

cmd_a:  mov si, name_a
        jmp short say
cmd_b:  mov si, name_b
        jmp short say
cmd_c:  mov si, name_c
say:    call puts
        mov al, ':'
        call putc
        mov al, ' '
        call putc
        times 2 nop
        jmp main.return

        align 4
handlers:
        ENTRY(cmd_a)
        ENTRY(cmd_b)
        ENTRY(cmd_c)
name_a: db 'alpha', 0
name_b: db "beta", 0
name_c: db `gamma\0`
done_text: db 10, "Test result: SUCCESS", 10, 0
magic:  dw 'OK', 'K' << 8 | 'O'

%include "lib/console.inc"
