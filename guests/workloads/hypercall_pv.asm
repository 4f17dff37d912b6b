; hypercall_pv: the hypercall microbenchmark on the PV path: WL_IOS calls of
; xen_version(XENVER_version) through the hypercall page (pv/lib/hypercall.inc: the stub
; `mov eax, 17; int 0x82; ret`, EBX = 0), each one trap into the hypervisor and back.
; Every answer must be the same version (major << 16 | minor, not negative). After the
; phase, bracketed by the marker hypercalls, it reports through console_io: "wl: calls",
; "wl: errors" (answers that differ from the first) and "wl: version". Ends with
; SCHEDOP_shutdown(poweroff).
; Parameter (prepended by hvm/workloads.py as a %define line; this is the default): WL_IOS calls.
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 16
%endif
%if WL_IOS < 1
%error "WL_IOS must be at least 1"
%endif

start:
        cld
        call pv_start
        jc .bad_start
        xor ebp, ebp                ; errors
        mov edi, -1                 ; the first answer, once known
        mov esi, WL_IOS
        mov ebx, WL_MARK_START
        call wl_marker
.call:
        mov ebx, XENVER_version
        xor ecx, ecx
        call hypervisor_xen_version
        test eax, eax
        js .wrong
        cmp edi, -1
        jne .compare
        mov edi, eax
.compare:
        cmp eax, edi
        je .fine
.wrong:
        inc ebp
.fine:
        dec esi
        jnz .call
        mov ebx, WL_MARK_END
        call wl_marker

        mov esi, key_calls
        mov eax, WL_IOS
        call wl_report
        mov esi, key_errors
        mov eax, ebp
        call wl_report
        mov esi, key_version
        mov eax, edi
        call wl_report
        jmp wl_success

.bad_start:
        mov ebx, SHUTDOWN_crash
        jmp sched_shutdown

%include "workloads/pv.inc"

key_calls:      db "calls", 0
key_errors:     db "errors", 0
key_version:    db "version", 0
