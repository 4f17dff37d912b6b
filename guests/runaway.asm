; runaway: a guest that never ends (`jmp $` with interrupts off). Only the host timer
; stops it: at --timeout the timer kicks the vCPU out of the guest, an EXTERNAL_INTERRUPT
; exit (reason 1) is recorded and the run ends with status 6.
bits 16
org 0x7c00

start:
    cli
    mov al, '>'
    out 0xe9, al
    jmp $
