; events: event channels between a PV guest and Domain 0, in four ways. The guest makes a
; port with EVTCHNOP_alloc_unbound(DOMID_SELF, remote 0) and writes its number to XenStore
; (XS_WRITE data/echo-port over the xenstore ring, start_info.store_mfn, waiting with
; SCHEDOP_poll on start_info.store_evtchn). Dom0's echo binds the port, notifies once, then
; answers every EVTCHNOP_send with one notification. Then:
;   poll    3 x send + SCHEDOP_poll on the port: each returns with the port's bit set in
;           shared_info.evtchn_pending (upcalls masked: evtchn_upcall_mask = 1 from the start);
;   block   send + SCHEDOP_block: it clears evtchn_upcall_mask and returns once
;           evtchn_upcall_pending is set (no callback yet, so no upcall);
;   upcall  set_callbacks(0x08, upcall): the echo of a send enters `upcall` (frame EIP, CS,
;           EFLAGS; evtchn_upcall_mask set), which acknowledges the port and returns with iret.
;           The guest looks at its counter with upcalls masked and then blocks: SCHEDOP_block
;           unmasks and checks atomically, so an upcall cannot slip in between;
;   mask    with the port's evtchn_mask bit set, an echo makes it pending but raises no upcall
;           (SCHEDOP_poll still sees it); EVTCHNOP_unmask then delivers the upcall at once,
;           before the hypercall returns to the next instruction.
; It also checks EVTCHNOP_status (interdomain with domain 0) and that a send on a free port is
; -EINVAL. It reports XTF-style and ends with SCHEDOP_shutdown(poweroff), or crash on failure.
bits 32
org 0x100000

HYPERCALL_PAGE                  equ 0x3000
SHARED_INFO                     equ 0x2000
__HYPERVISOR_set_callbacks      equ 4
__HYPERVISOR_console_io         equ 18
__HYPERVISOR_sched_op           equ 29
__HYPERVISOR_event_channel_op   equ 32
CONSOLEIO_write                 equ 0
SCHEDOP_block                   equ 1
SCHEDOP_shutdown                equ 2
SCHEDOP_poll                    equ 3
SHUTDOWN_poweroff               equ 0
SHUTDOWN_crash                  equ 3
EVTCHNOP_send                   equ 4
EVTCHNOP_status                 equ 5
EVTCHNOP_alloc_unbound          equ 6
EVTCHNOP_unmask                 equ 9
EVTCHNSTAT_interdomain          equ 2
DOMID_SELF                      equ 0x7FF0
EINVAL                          equ 22
FLAT_CODE                       equ 0x08    ; the flat code segment the callback runs in
POLL_ROUNDS                     equ 3
FREE_PORT                       equ 1000    ; a port no one allocates here

; start_info (x86_32)
SI_STORE_MFN                    equ 44
SI_STORE_EVTCHN                 equ 48
; shared_info / vcpu_info[0] (x86_32)
UPCALL_PENDING                  equ SHARED_INFO + 0
UPCALL_MASK                     equ SHARED_INFO + 1
PENDING_SEL                     equ SHARED_INFO + 4
EVTCHN_PENDING                  equ SHARED_INFO + 2048
EVTCHN_MASK                     equ SHARED_INFO + 2176
; xenstore_domain_interface and xsd_sockmsg
XS_REQ                          equ 0
XS_RSP                          equ 1024
XS_REQ_CONS                     equ 2048
XS_REQ_PROD                     equ 2052
XS_RSP_CONS                     equ 2056
XS_RSP_PROD                     equ 2060
XS_RING_MASK                    equ 1023
XS_WRITE                        equ 11
XSD_SOCKMSG_SIZE                equ 16

%define HYPERCALL(n) (HYPERCALL_PAGE + (n) * 32)

start:
    cld
    mov [start_info], esi

    ; -- a port for Dom0 to bind ---------------------------------------------------------
    mov word [alloc_op], DOMID_SELF         ; dom
    mov word [alloc_op + 2], 0              ; remote_dom: Dom0
    mov ebx, EVTCHNOP_alloc_unbound
    mov ecx, alloc_op
    call HYPERCALL(__HYPERVISOR_event_channel_op)
    mov esi, msg_alloc
    test eax, eax
    jnz fail
    mov eax, [alloc_op + 4]
    mov [echo_port], eax
    mov [poll_port], eax

    ; -- publish it: XS_WRITE data/echo-port <port> ----------------------------------------
    mov edi, xs_value
    mov eax, [echo_port]
    call format_dec                         ; EDI past the digits
    sub edi, xs_value
    mov [xs_value_len], edi
    call xs_write_port
    mov esi, msg_xenstore
    jc fail
    mov eax, [store_port]                   ; done with the store: a late notification of it
    lock bts dword [EVTCHN_MASK], eax       ; must not wake or interrupt what follows

    ; -- the echo's first notification says it has bound the port -------------------------
    call poll_echo_port
    call ack_echo_port
    mov esi, msg_never_bound
    jnc fail

    ; -- EVTCHNOP_status: interdomain, with domain 0 -------------------------------------
    mov word [status_op], DOMID_SELF
    mov eax, [echo_port]
    mov [status_op + 4], eax
    mov ebx, EVTCHNOP_status
    mov ecx, status_op
    call HYPERCALL(__HYPERVISOR_event_channel_op)
    mov esi, msg_status
    test eax, eax
    jnz fail
    cmp dword [status_op + 8], EVTCHNSTAT_interdomain
    jne fail
    cmp word [status_op + 16], 0            ; u.interdomain.dom
    jne fail

    ; -- a send on a free port is -EINVAL --------------------------------------------------
    mov dword [port_op], FREE_PORT
    mov ebx, EVTCHNOP_send
    mov ecx, port_op
    call HYPERCALL(__HYPERVISOR_event_channel_op)
    mov esi, msg_einval
    cmp eax, -EINVAL
    jne fail

    ; -- poll: send, SCHEDOP_poll, the port is pending -------------------------------------
    mov ecx, POLL_ROUNDS
.poll_round:
    push ecx
    call send_echo_port
    call poll_echo_port
    call ack_echo_port
    pop ecx
    mov esi, msg_poll
    jnc fail
    inc dword [poll_trips]
    loop .poll_round

    ; -- block: send, SCHEDOP_block until evtchn_upcall_pending ---------------------------
    call ack_all                            ; nothing pending: only the echo can wake us
    call send_echo_port
.block_again:
    mov ebx, SCHEDOP_block
    xor ecx, ecx
    call HYPERCALL(__HYPERVISOR_sched_op)
    mov esi, msg_block_mask
    cmp byte [UPCALL_MASK], 0               ; SCHEDOP_block re-enabled event delivery
    jne fail
    mov esi, msg_block
    cmp byte [UPCALL_PENDING], 0            ; it returns only with an event pending
    je fail
    call ack_all
    call ack_echo_port
    jnc .block_again                        ; woken by another port: block again

    ; -- upcall: register the callback; the echo's event enters it --------------------------
    mov ebx, FLAT_CODE
    mov ecx, upcall
    mov edx, FLAT_CODE
    mov esi, failsafe
    call HYPERCALL(__HYPERVISOR_set_callbacks)
    mov esi, msg_callbacks
    test eax, eax
    jnz fail
    call send_echo_port
.upcall_wait:
    mov byte [UPCALL_MASK], 1               ; no upcall between the look and the block:
    cmp dword [upcall_hits], 1              ; SCHEDOP_block unmasks and checks atomically
    jae .upcall_done
    mov ebx, SCHEDOP_block
    xor ecx, ecx
    call HYPERCALL(__HYPERVISOR_sched_op)   ; the upcall comes right after this returns
    jmp .upcall_wait
.upcall_done:
    mov byte [UPCALL_MASK], 0

    ; -- mask: a masked port gets pending, no upcall, until EVTCHNOP_unmask -------------------
    mov eax, [echo_port]
    lock bts dword [EVTCHN_MASK], eax
    mov eax, [upcalls]
    mov [upcalls_before], eax
    call send_echo_port
    call poll_echo_port                     ; returns: poll looks at masked ports too
    mov eax, [echo_port]
    bt dword [EVTCHN_PENDING], eax
    mov esi, msg_masked_not_pending
    jnc fail
    mov esi, msg_masked_upcall
    cmp byte [UPCALL_PENDING], 0
    jne fail
    mov eax, [upcalls]
    cmp eax, [upcalls_before]
    jne fail
    mov eax, [echo_port]
    mov [port_op], eax
    mov ebx, EVTCHNOP_unmask
    mov ecx, port_op
    call HYPERCALL(__HYPERVISOR_event_channel_op)
    mov eax, [upcalls]                      ; the upcall ran before we got here
    sub eax, [upcalls_before]
    mov esi, msg_unmask
    cmp eax, 1
    jne fail
    cmp dword [upcall_hits], 2
    jne fail

    ; -- report -------------------------------------------------------------------------------
    mov esi, msg_ok
    call puts
    mov esi, msg_success
    call puts
    mov dword [shutdown_reason], SHUTDOWN_poweroff
    jmp shutdown

fail:                                       ; ESI = what went wrong
    call puts
    mov esi, msg_failure
    call puts
    mov dword [shutdown_reason], SHUTDOWN_crash
shutdown:
    mov ebx, SCHEDOP_shutdown
    mov ecx, shutdown_reason
    call HYPERCALL(__HYPERVISOR_sched_op)
.stop:
    hlt
    jmp .stop

; The event callback: entered with evtchn_upcall_mask = 1 and EIP, CS, EFLAGS on the stack.
; Acknowledge as evtchn_do_upcall does (upcall_pending, then the selector, then the port's
; bit), count, unmask upcalls and return.
upcall:
    push eax
    inc dword [upcalls]
    mov byte [UPCALL_PENDING], 0
    xor eax, eax
    xchg eax, [PENDING_SEL]
    mov eax, [echo_port]
    lock btr dword [EVTCHN_PENDING], eax
    jnc .not_ours
    inc dword [upcall_hits]
.not_ours:
    mov byte [UPCALL_MASK], 0
    pop eax
    iret

failsafe:
    mov esi, msg_failsafe
    jmp fail

; EVTCHNOP_send on the echo port.
send_echo_port:
    mov eax, [echo_port]
    mov [port_op], eax
    mov ebx, EVTCHNOP_send
    mov ecx, port_op
    call HYPERCALL(__HYPERVISOR_event_channel_op)
    ret

; SCHEDOP_poll on [poll_port] (no timeout: the run's own timeout bounds it).
poll_echo_port:
    mov ebx, SCHEDOP_poll
    mov ecx, poll_op
    call HYPERCALL(__HYPERVISOR_sched_op)
    ret

; Acknowledge what an upcall would: evtchn_upcall_pending, then the selector.
ack_all:
    mov byte [UPCALL_PENDING], 0
    xor eax, eax
    xchg eax, [PENDING_SEL]
    ret

; Clear the echo port's pending bit; CF = it was set.
ack_echo_port:
    mov eax, [echo_port]
    lock btr dword [EVTCHN_PENDING], eax
    ret

; XS_WRITE "data/echo-port" = xs_value over the xenstore ring, then wait for the answer,
; polling the store port. CF set if the answer is not XS_WRITE (an XS_ERROR).
xs_write_port:
    mov esi, [start_info]
    mov ebp, [esi + SI_STORE_MFN]
    shl ebp, 12                             ; EBP = the ring page
    mov eax, [esi + SI_STORE_EVTCHN]
    mov [store_port], eax
    mov eax, xs_path_end - xs_path
    add eax, [xs_value_len]
    mov [xs_msg + 12], eax                  ; xsd_sockmsg.len
    mov edx, [ebp + XS_REQ_PROD]
    mov esi, xs_msg
    mov ecx, XSD_SOCKMSG_SIZE
    call ring_put
    mov esi, xs_path
    mov ecx, xs_path_end - xs_path
    call ring_put
    mov esi, xs_value
    mov ecx, [xs_value_len]
    call ring_put
    mov [ebp + XS_REQ_PROD], edx            ; after the bytes: the daemon may read them now
    mov eax, [store_port]
    mov [port_op], eax
    mov ebx, EVTCHNOP_send
    mov ecx, port_op
    call HYPERCALL(__HYPERVISOR_event_channel_op)
    mov eax, [store_port]
    mov [poll_port], eax
.wait:
    mov eax, [store_port]
    lock btr dword [EVTCHN_PENDING], eax    ; acknowledge before looking: no lost wake-up
    mov eax, [ebp + XS_RSP_PROD]
    sub eax, [ebp + XS_RSP_CONS]
    cmp eax, XSD_SOCKMSG_SIZE
    jb .sleep
    mov edx, [ebp + XS_RSP_CONS]
    mov ebx, edx
    and ebx, XS_RING_MASK
    mov ecx, [ebp + XS_RSP + ebx]           ; type (the header starts the answer)
    add ebx, 12
    and ebx, XS_RING_MASK
    mov ebx, [ebp + XS_RSP + ebx]           ; len (no wrap: the ring is fresh)
    add ebx, XSD_SOCKMSG_SIZE
    cmp eax, ebx
    jb .sleep
    add [ebp + XS_RSP_CONS], ebx
    mov eax, [echo_port]
    mov [poll_port], eax
    cmp ecx, XS_WRITE
    jne .error
    clc
    ret
.error:
    stc
    ret
.sleep:
    call poll_echo_port                     ; [poll_port] is the store port meanwhile
    jmp .wait

; Copy ECX bytes from ESI into req[] at index EDX (moved on, masked per byte).
ring_put:
    jecxz .done
.byte:
    mov ebx, edx
    and ebx, XS_RING_MASK
    lodsb
    mov [ebp + XS_REQ + ebx], al
    inc edx
    loop .byte
.done:
    ret

; Write EAX (< 10000) in decimal at EDI; EDI is left after the last digit.
format_dec:
    mov ecx, 1000
    xor ebx, ebx                            ; a digit seen yet?
.digit:
    xor edx, edx
    div ecx
    test eax, eax
    jnz .emit
    test ebx, ebx
    jnz .emit
    cmp ecx, 1
    jne .next
.emit:
    add al, '0'
    stosb
    mov ebx, 1
.next:
    mov eax, edx
    push eax
    mov eax, ecx
    xor edx, edx
    mov ecx, 10
    div ecx
    mov ecx, eax
    pop eax
    test ecx, ecx
    jnz .digit
    ret

; console_io(CONSOLEIO_write) of the NUL-terminated string at ESI.
puts:
    mov edx, esi
    xor ecx, ecx
.len:
    cmp byte [esi + ecx], 0
    je .write
    inc ecx
    jmp .len
.write:
    mov ebx, CONSOLEIO_write
    call HYPERCALL(__HYPERVISOR_console_io)
    ret

start_info:      dd 0
echo_port:       dd 0
store_port:      dd 0
shutdown_reason: dd 0
upcalls:         dd 0
upcall_hits:     dd 0
upcalls_before:  dd 0
poll_trips:      dd 0
port_op:         dd 0
alloc_op:        dw 0, 0
                 dd 0
status_op:       times 24 db 0
poll_op:         dd poll_port                ; sched_poll.ports
                 dd 1                        ; nr_ports
                 dd 0, 0                     ; timeout (u64): none
poll_port:       dd 0
xs_msg:          dd XS_WRITE, 1, 0, 0        ; type, req_id, tx_id, len
xs_path:         db "data/echo-port", 0
xs_path_end:
xs_value:        times 8 db 0
xs_value_len:    dd 0

msg_ok:          db "events: poll x3, block, upcall and masked port round trips with Dom0's echo", 10, 0
msg_success:     db "Test result: SUCCESS", 10, 0
msg_failure:     db "Test result: FAILURE", 10, 0
msg_alloc:       db "EVTCHNOP_alloc_unbound failed", 10, 0
msg_xenstore:    db "XS_WRITE data/echo-port failed", 10, 0
msg_never_bound: db "the echo's first notification did not make the port pending", 10, 0
msg_status:      db "EVTCHNOP_status: not interdomain with domain 0", 10, 0
msg_einval:      db "EVTCHNOP_send on a free port did not return -EINVAL", 10, 0
msg_poll:        db "SCHEDOP_poll returned without the port pending", 10, 0
msg_block_mask:  db "SCHEDOP_block left evtchn_upcall_mask set", 10, 0
msg_block:       db "SCHEDOP_block returned with no event pending", 10, 0
msg_callbacks:   db "set_callbacks failed", 10, 0
msg_masked_not_pending: db "a masked port did not become pending", 10, 0
msg_masked_upcall: db "a masked port raised an upcall", 10, 0
msg_unmask:      db "EVTCHNOP_unmask did not deliver the waiting event at once", 10, 0
msg_failsafe:    db "the failsafe callback ran", 10, 0
