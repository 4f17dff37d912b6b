; console: a PV guest that prints through its console ring, not a hypercall. Every line goes
; into out[] of the xencons_interface page named by start_info.console.domU.mfn (0x5000),
; out_prod moves after the bytes, and once a line is complete EVTCHNOP_send on
; start_info.console.domU.evtchn wakes Dom0's console backend, which reads up to out_prod
; and moves out_cons. The guest prints
; what start_info tells it, the Xen version (xen_version), then CONSOLE_LINES numbered lines:
; more than the 2048-byte ring holds, so the indices wrap and the guest may wait for
; the backend to make room (the backend notifies as it moves out_cons). It ends XTF-style
; and with SCHEDOP_shutdown(poweroff), after the backend has read everything.
bits 32
org 0x100000

%define PV_CONSOLE_RING             ; print.inc writes into the console ring
CONSOLE_LINES   equ 40

start:
        cld
        call pv_start
        jc .no_start_info
        call evtchn_init

        mov esi, hello
        call pv_puts

        mov esi, about_ring
        call pv_puts
        mov esi, [pv_start_info]
        mov eax, [esi + start_info.console.domU.mfn]
        shl eax, PAGE_SHIFT
        call pv_puthex32
        mov esi, about_evtchn
        call pv_puts
        mov esi, [pv_start_info]
        mov eax, [esi + start_info.console.domU.evtchn]
        call pv_putdec
        call pv_newline

        mov esi, about_memory
        call pv_puts
        mov esi, [pv_start_info]
        mov eax, [esi + start_info.nr_pages]
        call pv_putdec
        mov esi, about_store
        call pv_puts
        mov esi, [pv_start_info]
        mov eax, [esi + start_info.store_mfn]
        shl eax, PAGE_SHIFT
        call pv_puthex32
        mov esi, about_evtchn
        call pv_puts
        mov esi, [pv_start_info]
        mov eax, [esi + start_info.store_evtchn]
        call pv_putdec
        call pv_newline

        ; xen_version(XENVER_version): major << 16 | minor, or a negative errno.
        mov esi, about_version
        call pv_puts
        mov ebx, XENVER_version
        xor ecx, ecx
        call hypervisor_xen_version
        test eax, eax
        js .no_version
        push eax
        shr eax, 16
        call pv_putdec
        mov al, '.'
        call pv_putc
        pop eax
        and eax, 0xFFFF
        call pv_putdec
        call pv_newline
        jmp .lines
.no_version:
        mov esi, version_error
        call pv_puts
        neg eax
        call pv_putdec
        call pv_newline

.lines:
        mov ebx, 1
.line:
        mov esi, line_head
        call pv_puts
        mov eax, ebx
        call pv_putdec
        mov esi, line_of
        call pv_puts
        mov eax, CONSOLE_LINES
        call pv_putdec
        mov esi, line_tail
        call pv_puts
        inc ebx
        cmp ebx, CONSOLE_LINES
        jbe .line

        mov esi, sent_text
        call pv_puts
        jmp pv_test_success

.no_start_info:
        ; Without start_info there is no ring to find: say it through console_io.
        mov esi, bad_start
        call str_len
        call hypervisor_console_write
        mov ebx, SHUTDOWN_crash
        jmp sched_shutdown

%include "pv/lib/print.inc"

hello:          db "console: hello from a PV guest, through the console ring", 10, 0
about_ring:     db "console: xencons_interface at ", 0
about_evtchn:   db ", event channel ", 0
about_memory:   db "console: ", 0
about_store:    db " pages; xenstore ring at ", 0
about_version:  db "console: xen_version says ", 0
version_error:  db "error -", 0
line_head:      db "console: line ", 0
line_of:        db " of ", 0
line_tail:      db ": the quick brown fox jumps over the lazy dog", 10, 0
sent_text:      db "console: every line went through out[] and out_prod", 10, 0
bad_start:      db "console: ESI does not point to a start_info (magic xen-3.0-x86_32p)", 10, 0
