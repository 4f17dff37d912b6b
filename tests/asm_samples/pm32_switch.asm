; pm32_switch.asm - real mode to 32-bit protected mode: load a GDT, set CR0.PE, far jump
; into a flat 32-bit code segment, then print with rep outsb and exit.
; Shows: bits 16 then bits 32 in one file, lgdt, mov cr0, jmp dword sel:label, align.
        bits 16
        org 0x7C00
%include "lib/ports.inc"
CODE_SEL equ gdt.code - gdt
DATA_SEL equ gdt.data - gdt

        cli
        xor ax, ax
        mov ds, ax
        lgdt [gdt_descriptor]
        mov eax, cr0
        or eax, 1                   ; CR0.PE
        mov cr0, eax
        jmp dword CODE_SEL:protected

        align 8, db 0
gdt:
        dq 0                        ; null descriptor
.code:  dw 0xFFFF, 0x0000           ; base 0, limit 4 GiB, 32-bit, execute/read
        db 0x00, 10011010b, 11001111b, 0x00
.data:  dw 0xFFFF, 0x0000           ; base 0, limit 4 GiB, read/write
        db 0x00, 10010010b, 11001111b, 0x00
gdt_end:
gdt_descriptor:
        dw gdt_end - gdt - 1
        dd gdt

        bits 32
protected:
        mov ax, DATA_SEL
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, 0x90000
        mov esi, message
        mov ecx, message_len
        mov dx, CONSOLE_PORT
        rep outsb
        mov al, 0
        out EXIT_PORT, al
        cli
        hlt

message:    db "in protected mode", 10, "Test result: SUCCESS", 10
message_len equ $ - message
