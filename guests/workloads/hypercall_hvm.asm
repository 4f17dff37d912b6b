; hypercall_hvm: the hypercall microbenchmark on the HVM path: WL_IOS calls of
; xen_version(XENVER_version) by VMCALL (Xen's HVM hypercall ABI: EAX = 17, EBX = 0), each
; one VMCALL exit (reason 18) handled in the hypervisor. Every answer must be the same
; version (major << 16 | minor, not negative). After the phase, bracketed by the marker
; VMCALLs, it reports on the debug console: "wl: calls", "wl: errors" (answers that differ
; from the first) and "wl: version". Protected mode, halts with IF=0 (status 0).
; Parameter (prepended by hvm/workloads.py as a %define line; this is the default): WL_IOS calls.
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 16
%endif
%if WL_IOS < 1
%error "WL_IOS must be at least 1"
%endif

HYPERVISOR_xen_version  equ 17
XENVER_version          equ 0

start:
        cli
        cld
        xor ebp, ebp                ; errors
        mov edi, -1                 ; the first answer, once known
        mov esi, WL_IOS
        mov ebx, WL_MARK_START
        call wl_marker
.call:
        mov eax, HYPERVISOR_xen_version
        mov ebx, XENVER_version
        xor ecx, ecx
        vmcall
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

%include "workloads/hvm.inc"

key_calls:      db "calls", 0
key_errors:     db "errors", 0
key_version:    db "version", 0
