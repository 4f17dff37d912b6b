; fault: a guest that executes UD2 in protected mode without an IDT. The #UD is an
; EXCEPTION_NMI exit (reason 0, vector 6 in the exit interruption information); the
; hypervisor reflects it into the guest, delivery finds no IDT (#GP, then #DF), and the
; CPU shuts down: a TRIPLE_FAULT exit (reason 2). The run ends with status 4.
bits 32
org 0x100000

start:
    cli
    mov esi, message
    mov dx, 0xe9
.next:
    lodsb
    test al, al
    jz .crash
    out dx, al
    jmp .next
.crash:
    ud2
    hlt

message: db "about to execute ud2 with no IDT", 10, 0
