; evtchn_pv: the event-channel microbenchmark (PV only): WL_IOS round trips with Domain 0 on
; one event channel. The guest allocates a port for domain 0 (EVTCHNOP_alloc_unbound) and
; writes its number to XenStore as data/echo-port; Dom0's echo (pv/evtchn_echo.py) binds it,
; notifies once to say so, then answers every notification with one. Each round trip in the
; phase: EVTCHNOP_send on the port, then SCHEDOP_poll on it until the echo makes it pending
; (the port is masked in shared_info and upcalls stay masked, so no upcall: the guest sleeps
; in the hypervisor until the event), then the port's pending bit is cleared with a locked
; BTR. After the phase, bracketed by the marker hypercalls, it reports through console_io:
; "wl: trips" and "wl: port". Ends with SCHEDOP_shutdown(poweroff).
; Parameter (prepended by hvm/workloads.py as a %define line; this is the default): WL_IOS trips.
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 16
%endif
%if WL_IOS < 1
%error "WL_IOS must be at least 1"
%endif

DOM0            equ 0
POLL_BUDGET     equ 1000            ; polls that wake without our port before giving up

start:
        cld
        call pv_start
        jc .bad_start
        call evtchn_init
        call xs_init
        mov eax, DOM0
        call evtchn_alloc_unbound
        mov esi, alloc_failed
        jc wl_fail
        mov [echo_port], eax
        ; Masked: the event-channel library acknowledges the pending bits of unmasked ports
        ; while it waits for XenStore, and the echo's notifications are ours to take.
        mov edi, [pv_shared_info]
        lock bts [edi + shared_info.evtchn_mask], eax
        mov esi, key_echo_port
        call xs_write_uint
        jc wl_fail
        call wait_echo              ; "bound": the echo is listening
        jc wl_fail

        mov ebx, WL_MARK_START
        call wl_marker
        xor ebp, ebp
.trip:
        mov eax, [echo_port]
        call evtchn_send
        test eax, eax
        mov esi, send_failed
        jnz wl_fail
        call wait_echo
        jc wl_fail
        inc ebp
        cmp ebp, WL_IOS
        jb .trip
        mov ebx, WL_MARK_END
        call wl_marker

        mov esi, key_trips
        mov eax, ebp
        call wl_report
        mov esi, key_port
        mov eax, [echo_port]
        call wl_report
        jmp wl_success

.bad_start:
        mov ebx, SHUTDOWN_crash
        jmp sched_shutdown

; wait_echo: SCHEDOP_poll on the echo port (no timeout) until its pending bit is set, then
; clear that bit. CF set (ESI = reason) if POLL_BUDGET polls wake for something else.
wait_echo:
        push eax
        push ebx
        push ecx
        push edi
        mov ecx, POLL_BUDGET
        mov edi, [pv_shared_info]
        mov eax, [echo_port]
.look:
        lock btr [edi + shared_info.evtchn_pending], eax
        jc .out                     ; CF: the bit was set, the echo came
        dec ecx
        jz .gave_up
        push ecx
        mov [poll_port], eax
        mov ebx, SCHEDOP_poll
        mov ecx, poll_arg
        call hypervisor_sched_op
        pop ecx
        mov eax, [echo_port]
        jmp .look
.gave_up:
        mov esi, no_echo
        stc
        jmp .done
.out:
        clc
.done:
        pop edi
        pop ecx
        pop ebx
        pop eax
        ret

%include "pv/lib/xenstore.inc"
%include "workloads/pv.inc"

echo_port:      dd 0
poll_arg:       dd poll_port        ; struct sched_poll: ports, nr_ports, timeout (0: none)
                dd 1
                dq 0
poll_port:      dd 0
key_echo_port:  db "data/echo-port", 0
key_trips:      db "trips", 0
key_port:       db "port", 0
alloc_failed:   db "EVTCHNOP_alloc_unbound failed", 0
send_failed:    db "EVTCHNOP_send on the echo port failed", 0
no_echo:        db "the echo never answered (SCHEDOP_poll kept waking without our port)", 0
