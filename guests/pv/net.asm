; net: a PV network frontend (netfront) for vif 0. Through xenstore it finds the backend
; (device/vif/0/backend, backend-id), grants it a tx and an rx ring page, allocates one
; event channel, publishes tx-ring-ref, rx-ring-ref, event-channel and request-rx-copy
; (1: the backend grant-copies received frames into our pages; 0 with RX_FLIP: it
; transfers whole pages onto GTF_accept_transfer grants, page flipping), goes Initialised
; and waits for Connected (io/netif.h, io/xenbus.h). It posts NET_RX_BUFS rx buffers, sends
; one broadcast Ethernet frame (ethertype 0x88B5, payload "hello from pv net <domid>") from
; a page granted read-only, and waits for a frame of that ethertype from another station
; (another domain through the bridge), whose payload it prints. When that first frame
; arrives it sends its own frame once more, so a peer that was not connected yet when the
; first one went out still gets one. Output through console_io; XTF-style ending with
; SCHEDOP_shutdown(poweroff), or crash on a failure. The MAC is device/vif/0/mac if the toolstack wrote one,
; else 00:16:3e:00:00:<domid>. net_flip.asm is this guest with RX_FLIP 1.
bits 32
org 0x100000

%ifndef RX_FLIP
%define RX_FLIP 0                   ; 1: receive by page flipping (GTF_accept_transfer)
%endif
%ifndef NET_RX_BUFS
%define NET_RX_BUFS 8               ; rx buffers (pages) posted to the backend
%endif
%if NET_RX_BUFS < 1 || NET_RX_BUFS > 32
%error "NET_RX_BUFS must be 1..32"
%endif

ETH_ALEN        equ 6
ETH_HLEN        equ 14
ETHERTYPE_HI    equ 0x88            ; 0x88B5: IEEE 802 local experimental, big-endian
ETHERTYPE_LO    equ 0xB5
FRAME_LEN       equ 60              ; the shortest Ethernet frame without its FCS
PAYLOAD_SHOWN   equ 64              ; at most this much of a received payload is printed

; Guest pages (0x10000 and up are the guest's own).
NET_TX_SRING    equ 0x10000
NET_RX_SRING    equ 0x11000
NET_TX_PAGE     equ 0x12000         ; the frame we send (granted read-only)
NET_RX_PAGES    equ 0x20000         ; one page per rx buffer

; Grant references (0-7 are the toolstack's).
GREF_TX_RING    equ 8
GREF_RX_RING    equ 9
GREF_TX_PAGE    equ 10
GREF_RX         equ 16              ; + the buffer's id

start:
        cld
        call pv_start
        jc fail
        call evtchn_init
        mov esi, hello
        call pv_puts
        call gnttab_init
        jc fail
        call xs_init

        ; Who are we? The toolstack writes /local/domain/<domid>/domid.
        mov esi, key_domid
        call xs_read_uint
        jc fail
        mov [net_domid], eax

        mov esi, vif_dir
        call xenbus_probe
        jc fail
        mov esi, found_backend
        call pv_puts
        mov esi, xenbus_backend
        call pv_puts
        mov esi, in_domain
        call pv_puts
        mov eax, [xenbus_backend_id]
        call pv_putdec
        call pv_newline

        ; Our MAC address.
        mov edi, key_mac
        call xenbus_read
        jc .default_mac
        call parse_mac
        jnc .have_mac
.default_mac:
        mov eax, [net_domid]
        mov [net_mac + 5], al
.have_mac:
        mov esi, mac_text
        call pv_puts
        mov esi, net_mac
        call print_mac
        call pv_newline

        ; Both rings, granted to the backend's domain, and one port for both.
        mov ebx, tx_ring
        call front_ring_init
        mov ebx, rx_ring
        call front_ring_init
        mov ecx, [xenbus_backend_id]
        xor edx, edx
        mov eax, GREF_TX_RING
        mov ebx, NET_TX_SRING >> PAGE_SHIFT
        call gnttab_grant_access
        mov eax, GREF_RX_RING
        mov ebx, NET_RX_SRING >> PAGE_SHIFT
        call gnttab_grant_access
        mov eax, [xenbus_backend_id]
        call evtchn_alloc_unbound
        mov esi, alloc_failed
        jc fail
        mov [net_port], eax
        call evtchn_unmask

        mov edi, key_tx_ring_ref
        mov eax, GREF_TX_RING
        call xenbus_write_uint
        jc fail
        mov edi, key_rx_ring_ref
        mov eax, GREF_RX_RING
        call xenbus_write_uint
        jc fail
        mov edi, key_event_channel
        mov eax, [net_port]
        call xenbus_write_uint
        jc fail
        mov edi, key_rx_copy
        mov eax, 1 - RX_FLIP
        call xenbus_write_uint
        jc fail
        mov edi, key_rx_notify
        mov eax, 1
        call xenbus_write_uint
        jc fail
        mov eax, XenbusStateInitialised
        call xenbus_switch_state
        jc fail
        mov eax, XenbusStateConnected
        call xenbus_wait_backend_state
        jc fail
        mov eax, XenbusStateConnected
        call xenbus_switch_state
        jc fail
        mov esi, connected
        call pv_puts
        mov eax, [net_port]
        call pv_putdec
        mov esi, rx_mode_text
        call pv_puts

        ; Buffers for the backend to receive into, then our frame.
        xor eax, eax
.post:
        call rx_post
        inc eax
        cmp eax, NET_RX_BUFS
        jb .post
        call rx_push

        call build_frame
        mov eax, GREF_TX_PAGE
        mov ebx, NET_TX_PAGE >> PAGE_SHIFT
        mov ecx, [xenbus_backend_id]
        mov edx, GTF_readonly
        call gnttab_grant_access
        call tx_send
        jc fail

        ; Until one frame has come in and every frame we sent is answered.
.loop:
        call evtchn_ack_all
        call tx_collect
        jc fail
        call rx_collect
        jc fail
        cmp dword [net_received], 0
        je .wait
        cmp dword [tx_outstanding], 0
        je .done
.wait:
        mov esi, ring_broken
        mov ebx, tx_ring
        call ring_final_check_for_responses
        jc fail
        test eax, eax
        jnz .loop
        mov ebx, rx_ring
        call ring_final_check_for_responses
        jc fail
        test eax, eax
        jnz .loop
        call evtchn_block
        jnc .loop
        mov esi, nothing_came
        jmp fail

.done:
        mov esi, summary
        call pv_puts
        mov eax, [net_sent]
        call pv_putdec
        mov esi, summary_received
        call pv_puts
        mov eax, [net_received]
        call pv_putdec
        mov esi, summary_notifies
        call pv_puts
        mov eax, [net_notifies]
        call pv_putdec
        call pv_newline
        jmp pv_test_success

fail:
        jmp pv_test_failure

; rx_post: EAX = buffer id: offer its page to the backend (copy: write access; flip: accept
; a transfer into it) and queue an rx request {id, gref}. Pushed by rx_push.
rx_post:
        push eax
        push ebx
        push ecx
        push edx
        push edi
        mov edx, eax
        lea ebx, [eax + (NET_RX_PAGES >> PAGE_SHIFT)]
        add eax, GREF_RX
        mov ecx, [xenbus_backend_id]
%if RX_FLIP
        call gnttab_grant_transfer
%else
        push edx
        xor edx, edx
        call gnttab_grant_access
        pop edx
%endif
        mov ebx, rx_ring
        call ring_next_request              ; cannot be full: one slot per buffer
        mov [edi + netif_rx_request.id], dx
        mov [edi + netif_rx_request.gref], eax
        pop edi
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret

; rx_push / tx_push: publish the queued requests, notify the backend if the ring says so.
rx_push:
        push ebx
        mov ebx, rx_ring
        jmp net_push
tx_push:
        push ebx
        mov ebx, tx_ring
net_push:
        push eax
        call ring_push_requests
        test eax, eax
        jz .quiet
        inc dword [net_notifies]
        mov eax, [net_port]
        call evtchn_send
.quiet:
        pop eax
        pop ebx
        ret

; tx_send: queue our frame (one slot, the whole frame) and push it. CF: ESI = reason.
tx_send:
        push ebx
        push edi
        mov ebx, tx_ring
        call ring_next_request
        mov esi, tx_full
        jc .out
        mov dword [edi + netif_tx_request.gref], GREF_TX_PAGE
        mov word [edi + netif_tx_request.offset], 0
        mov word [edi + netif_tx_request.flags], 0
        mov ebx, [net_sent]
        mov [edi + netif_tx_request.id], bx
        mov word [edi + netif_tx_request.size], FRAME_LEN
        inc dword [net_sent]
        inc dword [tx_outstanding]
        call tx_push
        clc
.out:
        pop edi
        pop ebx
        ret

; tx_collect: take every tx response there is; each must be NETIF_RSP_OKAY. CF: ESI = reason.
tx_collect:
        push eax
        push ebx
        mov ebx, tx_ring
.next:
        mov esi, ring_broken
        call ring_unconsumed_responses
        jc .out
        test eax, eax
        jz .out
        call ring_next_response
        movsx eax, word [esi + netif_tx_response.status]
        dec dword [tx_outstanding]
        mov esi, tx_failed
        cmp eax, NETIF_RSP_OKAY
        je .next
        stc
.out:
        pop ebx
        pop eax
        ret

; rx_collect: take every rx response there is: show the frame, give the buffer back.
; CF: ESI = reason.
rx_collect:
        push eax
        push ebx
        push ecx
        push edx
        mov dword [rx_reposted], 0
.next:
        mov ebx, rx_ring
        mov esi, ring_broken
        call ring_unconsumed_responses
        jc .out
        test eax, eax
        jz .push
        call ring_next_response             ; ESI = the slot: each field read once
        movzx edx, word [esi + netif_rx_response.id]
        movzx ecx, word [esi + netif_rx_response.offset]
        movsx eax, word [esi + netif_rx_response.status]
        mov esi, rx_bad_id
        cmp edx, NET_RX_BUFS
        jae .failed
        test eax, eax
        jg .data
        inc dword [rx_errors]               ; the backend could not fill this buffer
%if RX_FLIP
        push eax
        lea eax, [edx + GREF_RX]
        call gnttab_end_transfer            ; withdraw the offer (nothing arrived)
        pop eax
%endif
        jmp .repost
.data:
        mov esi, rx_too_big
        lea ebx, [ecx + eax]
        cmp ebx, PAGE_SIZE
        ja .failed
%if RX_FLIP
        ; The page arrived in place of ours: the entry says at which frame.
        push eax
        lea eax, [edx + GREF_RX]
        call gnttab_end_transfer
        mov ebx, eax
        pop eax
        mov esi, rx_no_page
        jc .failed
        shl ebx, PAGE_SHIFT
%else
        mov ebx, edx
        shl ebx, PAGE_SHIFT
        add ebx, NET_RX_PAGES
%endif
        lea esi, [ebx + ecx]                ; the frame
        mov ecx, eax                        ; its length
        call rx_frame
.repost:
        mov eax, edx
        call rx_post
        inc dword [rx_reposted]
        jmp .next
.push:
        cmp dword [rx_reposted], 0
        je .done
        call rx_push
.done:
        clc
        jmp .out
.failed:
        stc
.out:
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret

; rx_frame: ESI = a received frame, ECX = its length. One of ethertype 0x88B5 from another
; station is printed and counted; the first such frame is answered with our frame again.
rx_frame:
        push eax
        push ecx
        push esi
        push edi
        cmp ecx, ETH_HLEN
        jb .ignored
        cmp byte [esi + 12], ETHERTYPE_HI
        jne .ignored
        cmp byte [esi + 13], ETHERTYPE_LO
        jne .ignored
        push ecx
        push esi
        add esi, ETH_ALEN                   ; the source address
        mov edi, net_mac
        mov ecx, ETH_ALEN
        call mem_equal
        pop esi
        pop ecx
        je .ignored                         ; our own frame
        mov edi, esi
        mov esi, received_text
        call pv_puts
        mov eax, ecx
        call pv_putdec
        mov esi, received_from
        call pv_puts
        lea esi, [edi + ETH_ALEN]
        call print_mac
        mov esi, received_says
        call pv_puts
        lea esi, [edi + ETH_HLEN]
        sub ecx, ETH_HLEN
        call print_payload
        call pv_newline
        inc dword [net_received]
        cmp dword [net_received], 1
        jne .out
        call tx_send                        ; once: for a peer that missed our first frame
        jmp .out
.ignored:
        inc dword [rx_ignored]
.out:
        pop edi
        pop esi
        pop ecx
        pop eax
        ret

; print_payload: ESI = bytes, ECX = how many; printed up to the first NUL, at most
; PAYLOAD_SHOWN.
print_payload:
        push eax
        push ecx
        push edi
        cmp ecx, PAYLOAD_SHOWN
        jbe .scan
        mov ecx, PAYLOAD_SHOWN
.scan:
        mov edi, esi
        xor eax, eax
.byte:
        test ecx, ecx
        jz .print
        cmp byte [edi], 0
        je .print
        inc edi
        dec ecx
        jmp .byte
.print:
        mov ecx, edi
        sub ecx, esi
        call pv_write
        pop edi
        pop ecx
        pop eax
        ret

; build_frame: our broadcast frame in NET_TX_PAGE: destination ff:ff:ff:ff:ff:ff, our MAC,
; ethertype 0x88B5, "hello from pv net <domid>", zeros up to FRAME_LEN.
build_frame:
        mov edi, NET_TX_PAGE
        xor eax, eax
        mov ecx, PAGE_SIZE / 4
        rep stosd
        mov edi, NET_TX_PAGE
        mov al, 0xFF
        mov ecx, ETH_ALEN
        rep stosb
        mov esi, net_mac
        mov ecx, ETH_ALEN
        rep movsb
        mov al, ETHERTYPE_HI
        stosb
        mov al, ETHERTYPE_LO
        stosb
        mov esi, payload_text
        call str_copy
        mov eax, [net_domid]
        call fmt_dec
        mov byte [edi], 0
        mov esi, sending
        call pv_puts
        mov esi, NET_TX_PAGE + ETH_HLEN
        call pv_puts
        call pv_newline
        ret

; print_mac: the 6 bytes at ESI as xx:xx:xx:xx:xx:xx.
print_mac:
        push eax
        push ecx
        push esi
        mov ecx, ETH_ALEN
.byte:
        lodsb
        call pv_puthex8
        dec ecx
        jz .done
        mov al, ':'
        call pv_putc
        jmp .byte
.done:
        pop esi
        pop ecx
        pop eax
        ret

; parse_mac: ESI = "xx:xx:xx:xx:xx:xx" -> net_mac; CF set (net_mac unchanged) if malformed.
parse_mac:
        push eax
        push ebx
        push ecx
        push esi
        push edi
        mov edi, mac_parsed
        mov ecx, ETH_ALEN
.byte:
        call hex_digit
        jc .out
        mov bl, al
        shl bl, 4
        call hex_digit
        jc .out
        or bl, al
        mov [edi], bl
        inc edi
        dec ecx
        jz .end
        lodsb
        cmp al, ':'
        je .byte
        stc
        jmp .out
.end:
        cmp byte [esi], 0
        jne .bad
        mov esi, mac_parsed
        mov edi, net_mac
        mov ecx, ETH_ALEN
        rep movsb
        clc
        jmp .out
.bad:
        stc
.out:
        pop edi
        pop esi
        pop ecx
        pop ebx
        pop eax
        ret

; hex_digit: AL = the value of the hex digit at ESI (ESI advances); CF if not a hex digit.
hex_digit:
        lodsb
        sub al, '0'
        cmp al, 9
        jbe .ok
        or al, 0x20                         ; 'A'-'F' -> 'a'-'f' (as offsets from '0')
        sub al, 'a' - '0'
        cmp al, 5
        ja .bad
        add al, 10
.ok:
        clc
        ret
.bad:
        stc
        ret

%include "pv/lib/xenbus.inc"
%include "pv/lib/grant.inc"
%include "pv/lib/ring.inc"
%include "pv/lib/print.inc"

tx_ring:        dd NET_TX_SRING, 0, 0, NET_TX_RING_SIZE, SIZEOF_netif_tx_sring_entry
rx_ring:        dd NET_RX_SRING, 0, 0, NET_RX_RING_SIZE, SIZEOF_netif_rx_sring_entry
net_domid:      dd 0
net_port:       dd 0
net_sent:       dd 0                ; frames queued on the tx ring (also the next tx id)
net_received:   dd 0                ; frames of ours from other stations
net_notifies:   dd 0                ; notifications the ring checks asked for
tx_outstanding: dd 0
rx_reposted:    dd 0
rx_errors:      dd 0
rx_ignored:     dd 0
net_mac:        db 0x00, 0x16, 0x3E, 0x00, 0x00, 0x00   ; Xen's OUI; the last byte: domid
mac_parsed:     times ETH_ALEN db 0

vif_dir:        db "device/vif/0", 0
key_domid:      db "domid", 0
key_mac:        db "mac", 0
key_tx_ring_ref: db "tx-ring-ref", 0
key_rx_ring_ref: db "rx-ring-ref", 0
key_event_channel: db "event-channel", 0
key_rx_copy:    db "request-rx-copy", 0
key_rx_notify:  db "feature-rx-notify", 0
payload_text:   db "hello from pv net ", 0

hello:          db "net: netfront for device/vif/0", 10, 0
found_backend:  db "net: backend ", 0
in_domain:      db " in domain ", 0
mac_text:       db "net: MAC ", 0
connected:      db "net: Connected: tx-ring-ref 8, rx-ring-ref 9, event-channel ", 0
%if RX_FLIP
rx_mode_text:   db ", rx by page flipping (GTF_accept_transfer)", 10, 0
%else
rx_mode_text:   db ", rx by grant copy", 10, 0
%endif
sending:        db "net: sending a broadcast frame, ethertype 88b5: ", 0
received_text:  db "net: received ", 0
received_from:  db " bytes from ", 0
received_says:  db ": ", 0
summary:        db "net: frames sent ", 0
summary_received: db ", received ", 0
summary_notifies: db ", notifications ", 0

alloc_failed:   db "net: EVTCHNOP_alloc_unbound failed", 0
ring_broken:    db "net: the backend produced more responses than requests", 0
tx_full:        db "net: the tx ring is full", 0
tx_failed:      db "net: the backend answered a tx request with an error", 0
rx_bad_id:      db "net: an rx response names a buffer we never posted", 0
rx_too_big:     db "net: an rx response runs past the end of its page", 0
rx_no_page:     db "net: an rx response came but no page was transferred", 0
nothing_came:   db "net: no frame came from another domain (wait budget spent)", 0
