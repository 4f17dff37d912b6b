; console_pv: the console workload on the PV path: WL_IOS lines of WL_SIZE bytes through the
; PV console ring (xencons_interface at start_info.console.domU.mfn, io/console.h), the way
; pv/lib/print.inc writes with PV_CONSOLE_RING: the bytes into out[], out_prod after them,
; and once a line is complete EVTCHNOP_send on the console port; when out[] is full the guest
; blocks until Dom0's console backend makes room. The lines are those of console_hvm.asm
; (workloads/common.inc); the phase ends once the backend has read everything (pv_flush), and
; the runner compares the console's output with the lines it expects. The phase is bracketed
; by the marker hypercalls; "wl: lines N" is reported after it, through the ring too. Ends
; with SCHEDOP_shutdown(poweroff).
; Parameters (prepended by hvm/workloads.py as %define lines; these are the defaults):
; WL_IOS lines, WL_SIZE bytes a line (10..4096).
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 4
%endif
%ifndef WL_SIZE
%define WL_SIZE 64
%endif
%if WL_SIZE < 10 || WL_SIZE > 4096
%error "WL_SIZE (bytes a line) must be 10..4096"
%endif
%define PV_CONSOLE_RING             ; print.inc writes into the console ring

LINE_BUF        equ 0x200000

start:
        cld
        call pv_start
        jc .bad_start
        call evtchn_init

        mov ebx, WL_MARK_START
        call wl_marker
        mov ebp, 1                  ; the line number
.line:
        mov eax, ebp
        mov edi, LINE_BUF
        mov ecx, WL_SIZE
        call wl_make_line
        mov esi, LINE_BUF
        mov ecx, WL_SIZE
        call pv_write
        inc ebp
        cmp ebp, WL_IOS
        jbe .line
        call pv_flush               ; the backend has taken every byte
        mov ebx, WL_MARK_END
        call wl_marker

        mov esi, key_lines
        mov eax, ebp
        dec eax
        call wl_report
        jmp wl_success

.bad_start:
        mov ebx, SHUTDOWN_crash     ; no start_info: no ring to write to
        jmp sched_shutdown

%include "workloads/pv.inc"

key_lines:      db "lines", 0
