; boot16_hello.asm - a 512-byte real-mode boot sector: prints a greeting and its own length
; through the shared console library, then exits through the debug-exit port.
; Shows: strings, equ, times with $ and $$, the 0xAA55 signature, %include of guests/lib.
        bits 16
        org 0x7C00
%include "lib/ports.inc"
%define NEWLINE 13, 10

start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7C00
        cld
        mov si, greeting
        call puts
        mov ax, code_end - start    ; bytes of code before the data
        call puthex16
        mov al, 10
        call putc
        mov si, result
        call puts
        mov al, 0
        out EXIT_PORT, al
.halt:
        hlt
        jmp short .halt

%include "lib/console.inc"
code_end:

greeting:   db "Hello from a boot sector", NEWLINE, 0
result:     db `Test result: SUCCESS\n`, 0
signature_check: dw $ - $$

        times 510-($-$$) db 0
        dw 0xAA55
