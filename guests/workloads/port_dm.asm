; port_dm: the port-dm microbenchmark (HVM only): WL_IOS reads of the 16550 UART's Scratch
; Register (COM1 + 7 = 0x3FF), a port the device model answers: each `in al, dx` is one
; IO_INSTRUCTION exit, one ioreq on the shared I/O page and a round trip to the device-model
; thread (Xen: the hypervisor blocks the vCPU, QEMU answers through the event channel). Before
; the phase the guest writes WL_SCRATCH to the register; every read must give it back (the
; 16550 keeps what was written there, PC16550D datasheet). After the phase, bracketed by the
; markers (reads of port 0xE9), it reports on the debug console: "wl: reads", "wl: errors"
; (reads that differed) and "wl: value" (the last value read). Protected mode, halts with IF=0
; (status 0).
; Parameter (prepended by hvm/workloads.py as a %define line; this is the default): WL_IOS reads.
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 16
%endif
%if WL_IOS < 1
%error "WL_IOS must be at least 1"
%endif

%include "lib/ports.inc"

UART_SCR        equ COM1_PORT + 7
WL_SCRATCH      equ 0xA5

start:
        cli
        cld
        mov dx, UART_SCR
        mov al, WL_SCRATCH
        out dx, al
        xor ebp, ebp                ; errors
        mov ecx, WL_IOS
        mov ebx, WL_MARK_START
        call wl_marker
.read:
        in al, dx
        cmp al, WL_SCRATCH
        je .fine
        inc ebp
.fine:
        dec ecx
        jnz .read
        mov ebx, WL_MARK_END
        call wl_marker

        movzx edi, al
        mov esi, key_reads
        mov eax, WL_IOS
        call wl_report
        mov esi, key_errors
        mov eax, ebp
        call wl_report
        mov esi, key_value
        mov eax, edi
        call wl_report
        jmp wl_success

%include "workloads/hvm.inc"

key_reads:      db "reads", 0
key_errors:     db "errors", 0
key_value:      db "value", 0
