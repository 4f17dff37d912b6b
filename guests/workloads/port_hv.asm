; port_hv: the port-hv microbenchmark (HVM only): WL_IOS 32-bit reads of the ACPI PM timer
; (PM_TMR at 0xB008), a port the hypervisor answers itself (Xen emulates the PM timer in the
; hypervisor): each `in eax, dx` is one IO_INSTRUCTION exit served on the vCPU thread, with no
; ioreq and no device-model hand-off. The guest checks every value as ACPI says it must look
; (a 24-bit counter: bits 31:24 read 0) and counts the reads that went backwards (the counter
; wraps every 2^24 ticks of 3.579545 MHz, about 4.7 s). After the phase, bracketed by the
; markers (reads of port 0xE9), it reports on the debug console: "wl: reads", "wl: errors"
; (values with bits 31:24 set), "wl: backsteps", "wl: first" and "wl: last" (the values).
; Protected mode, halts with IF=0 (status 0).
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

start:
        cli
        cld
        mov dx, PM_TIMER_PORT
        xor ebp, ebp                ; errors
        xor esi, esi                ; backsteps
        mov ecx, WL_IOS
        mov ebx, WL_MARK_START
        call wl_marker
        in eax, dx
        mov [first], eax
        jmp .check
.read:
        in eax, dx
        cmp eax, edi
        jae .check
        inc esi                     ; went backwards: the 24-bit counter wrapped
.check:
        test eax, 0xFF000000
        jz .fine
        inc ebp
.fine:
        mov edi, eax                ; the previous value
        dec ecx
        jnz .read
        mov ebx, WL_MARK_END
        call wl_marker

        mov [last], edi
        mov [backsteps], esi
        mov esi, key_reads
        mov eax, WL_IOS
        call wl_report
        mov esi, key_errors
        mov eax, ebp
        call wl_report
        mov esi, key_backsteps
        mov eax, [backsteps]
        call wl_report
        mov esi, key_first
        mov eax, [first]
        call wl_report
        mov esi, key_last
        mov eax, [last]
        call wl_report
        jmp wl_success

%include "workloads/hvm.inc"

first:          dd 0
last:           dd 0
backsteps:      dd 0
key_reads:      db "reads", 0
key_errors:     db "errors", 0
key_backsteps:  db "backsteps", 0
key_first:      db "first", 0
key_last:       db "last", 0
