; net_pv: the net-send and net-recv workloads on the PV path: WL_IOS Ethernet frames of WL_SIZE
; bytes through a network frontend (netfront) on vif 0, the same frames net_hvm.asm moves
; through the NE2000. Before the phase: the xenbus handshake as pv/net.asm does it (a tx and
; an rx ring granted to the backend, one event channel, request-rx-copy = 1 - WL_FLIP,
; Initialised, wait for Connected); for sending, one read-only grant per tx page.
; Send (WL_RECV 0): WL_BATCH frames at a time are built in their tx pages (workloads/common.inc:
; to ff:ff:ff:ff:ff:ff from wl_mac, ethertype 0x88B5, the sequence number, pattern bytes),
; queued as one tx request each (the whole frame in one slot) and published with one
; RING_PUSH_REQUESTS_AND_CHECK_NOTIFY (EVTCHNOP_send only if it says so); then the tx
; responses are taken (NETIF_RSP_OKAY each), blocking while there are none. netback
; grant-copies each frame out and hands it to the bridge; the runner finds the frames in the
; bridge's capture.
; Receive (WL_RECV 1): RX_BUFS rx buffers are offered (WL_FLIP 0: a writable grant of the
; page, the backend grant-copies the frame in; WL_FLIP 1: GTF_accept_transfer, the backend
; transfers a whole page of its own onto the grant: page flipping, no byte copied) and
; pushed; then, while fewer than WL_IOS frames came, the guest takes every rx response (the
; frame must be WL_SIZE bytes of ethertype 0x88B5; flipped: gnttab_end_transfer says at which
; frame the page arrived), adds the frame to the workload checksum, offers the buffer again
; and pushes the new offers with one notify check; with nothing to take it blocks. Frames
; come from the runner through the bridge.
; The phase (buffers offered and pushed in it) is bracketed by the marker hypercalls; after
; it the guest reports through console_io: "wl: frames", "wl: checksum", "wl: errors" (frames
; of another size or type) and "wl: notifies". Ends with SCHEDOP_shutdown(poweroff), or crash.
; Parameters (prepended by hvm/workloads.py as %define lines; these are the defaults):
; WL_IOS frames, WL_SIZE bytes a frame (60..1514), WL_RECV (0 send, 1 receive), WL_FLIP
; (receive by page flipping), WL_BATCH frames sent behind one push (1..64).
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 4
%endif
%ifndef WL_SIZE
%define WL_SIZE 1514
%endif
%ifndef WL_RECV
%define WL_RECV 0
%endif
%ifndef WL_FLIP
%define WL_FLIP 0
%endif
%ifndef WL_BATCH
%define WL_BATCH 1
%endif
%if WL_SIZE < 60 || WL_SIZE > 1514
%error "WL_SIZE must be 60..1514 (an Ethernet frame without its FCS)"
%endif
%if WL_BATCH < 1 || WL_BATCH > 64
%error "WL_BATCH must be 1..64"
%endif

RX_BUFS         equ 16              ; rx buffers (pages) offered to the backend
NET_TX_SRING    equ 0x10000
NET_RX_SRING    equ 0x11000
NET_RX_PAGES    equ 0x20000         ; RX_BUFS pages
NET_TX_PAGES    equ 0x200000        ; WL_BATCH pages, one frame each
GREF_TX_RING    equ 8
GREF_RX_RING    equ 9
GREF_RX         equ 16              ; + the rx buffer's id
GREF_TX         equ 64              ; + the tx page's slot

start:
        cld
        call pv_start
        jc .bad_start
        call evtchn_init
        call gnttab_init
        jc wl_fail
        call xs_init
        call connect
        jc wl_fail
%if WL_RECV == 0
        xor esi, esi
.grant:
        lea eax, [esi + GREF_TX]
        lea ebx, [esi + (NET_TX_PAGES >> PAGE_SHIFT)]
        mov ecx, [xenbus_backend_id]
        mov edx, GTF_readonly
        call gnttab_grant_access
        inc esi
        cmp esi, WL_BATCH
        jb .grant
%endif

        mov ebx, WL_MARK_START
        call wl_marker
%if WL_RECV
        xor eax, eax
.post:
        call rx_post
        inc eax
        cmp eax, RX_BUFS
        jb .post
        call rx_push
.receive:
        call evtchn_ack_all
        call rx_collect
        jc wl_fail
        cmp dword [net_frames], WL_IOS
        jae .done
        mov ebx, rx_ring
        call ring_final_check_for_responses
        mov esi, ring_broken
        jc wl_fail
        test eax, eax
        jnz .receive
        call evtchn_block
        jnc .receive
        mov esi, nothing_came
        jmp wl_fail
.done:
%else
.batch:
        mov eax, WL_IOS
        sub eax, [net_frames]
        cmp eax, WL_BATCH
        jbe .sized
        mov eax, WL_BATCH
.sized:
        mov [batch_n], eax
        xor edx, edx
.queue:
        call tx_queue               ; frame net_frames + EDX from slot EDX
        jc wl_fail
        inc edx
        cmp edx, [batch_n]
        jb .queue
        call tx_push
        mov eax, [batch_n]
        mov [awaited], eax
.collect:
        call tx_response
        jc wl_fail
        dec dword [awaited]
        jnz .collect
        mov eax, [batch_n]
        add [net_frames], eax
        cmp dword [net_frames], WL_IOS
        jb .batch
%endif
        mov ebx, WL_MARK_END
        call wl_marker

        mov esi, key_frames
        mov eax, [net_frames]
        call wl_report
        mov esi, key_checksum
        mov eax, [wl_checksum]
        call wl_report
        mov esi, key_errors
        mov eax, [net_errors]
        call wl_report
        mov esi, key_notifies
        mov eax, [net_notifies]
        call wl_report
        jmp wl_success

.bad_start:
        mov ebx, SHUTDOWN_crash
        jmp sched_shutdown

; connect: the xenbus handshake of a netfront (pv/net.asm's). CF set, ESI = reason, on failure.
connect:
        mov esi, vif_dir
        call xenbus_probe
        jc .out
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
        jc .out
        mov [net_port], eax
        call evtchn_unmask
        mov edi, key_tx_ring_ref
        mov eax, GREF_TX_RING
        call xenbus_write_uint
        jc .out
        mov edi, key_rx_ring_ref
        mov eax, GREF_RX_RING
        call xenbus_write_uint
        jc .out
        mov edi, key_event_channel
        mov eax, [net_port]
        call xenbus_write_uint
        jc .out
        mov edi, key_rx_copy
        mov eax, 1 - WL_FLIP
        call xenbus_write_uint
        jc .out
        mov edi, key_rx_notify
        mov eax, 1
        call xenbus_write_uint
        jc .out
        mov eax, XenbusStateInitialised
        call xenbus_switch_state
        jc .out
        mov eax, XenbusStateConnected
        call xenbus_wait_backend_state
        jc .out
        mov eax, XenbusStateConnected
        call xenbus_switch_state
.out:
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

%if WL_RECV
; rx_post: EAX = buffer id: offer its page (copy: write access; flip: accept a transfer into
; it) and queue an rx request {id, gref}. Pushed by rx_push.
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
%if WL_FLIP
        call gnttab_grant_transfer
%else
        push edx
        xor edx, edx
        call gnttab_grant_access
        pop edx
%endif
        mov ebx, rx_ring
        call ring_next_request      ; cannot be full: one slot per buffer
        mov [edi + netif_rx_request.id], dx
        mov [edi + netif_rx_request.gref], eax
        pop edi
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret

; rx_collect: take every rx response there is: check and sum the frame, offer the buffer
; again; push the offers once at the end. CF set (ESI = reason) on a broken ring.
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
        call ring_next_response     ; ESI = the slot: each field read once
        movzx edx, word [esi + netif_rx_response.id]
        movzx ecx, word [esi + netif_rx_response.offset]
        movsx eax, word [esi + netif_rx_response.status]
        mov esi, rx_bad_id
        cmp edx, RX_BUFS
        jae .failed
        test eax, eax
        jg .data
        inc dword [net_errors]      ; the backend could not fill this buffer
%if WL_FLIP
        push eax
        lea eax, [edx + GREF_RX]
        call gnttab_end_transfer    ; withdraw the offer (nothing arrived)
        pop eax
%endif
        jmp .repost
.data:
        mov esi, rx_too_big
        lea ebx, [ecx + eax]
        cmp ebx, PAGE_SIZE
        ja .failed
%if WL_FLIP
        push eax
        lea eax, [edx + GREF_RX]
        call gnttab_end_transfer    ; the frame the page arrived in
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
        lea esi, [ebx + ecx]        ; the frame
        cmp eax, WL_SIZE
        jne .wrong
        cmp byte [esi + 12], WL_ETHERTYPE_HI
        jne .wrong
        cmp byte [esi + 13], WL_ETHERTYPE_LO
        jne .wrong
        mov ecx, eax
        call wl_sum
        inc dword [net_frames]
        jmp .repost
.wrong:
        inc dword [net_errors]
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
%else
; tx_queue: frame number [net_frames] + EDX, built in tx slot EDX's page and queued (the whole
; frame in one request). CF set (ESI = reason) if the ring is full.
tx_queue:
        push eax
        push ebx
        push ecx
        push edi
        mov edi, edx
        shl edi, PAGE_SHIFT
        add edi, NET_TX_PAGES
        mov eax, [net_frames]
        add eax, edx
        mov ecx, WL_SIZE
        call wl_make_frame
        mov ebx, tx_ring
        call ring_next_request
        mov esi, tx_full
        jc .out
        lea eax, [edx + GREF_TX]
        mov [edi + netif_tx_request.gref], eax
        mov word [edi + netif_tx_request.offset], 0
        mov word [edi + netif_tx_request.flags], 0
        mov [edi + netif_tx_request.id], dx
        mov word [edi + netif_tx_request.size], WL_SIZE
        clc
.out:
        pop edi
        pop ecx
        pop ebx
        pop eax
        ret

; tx_response: wait for the next tx response (blocking while there is none); it must say
; NETIF_RSP_OKAY. CF set (ESI = reason) otherwise.
tx_response:
        push eax
        push ebx
        mov ebx, tx_ring
.wait:
        call evtchn_ack_all
        call ring_final_check_for_responses
        mov esi, ring_broken
        jc .out
        test eax, eax
        jnz .take
        call evtchn_block
        jnc .wait
        mov esi, nothing_came
        stc
        jmp .out
.take:
        call ring_next_response
        movsx eax, word [esi + netif_tx_response.status]
        mov esi, tx_failed
        cmp eax, NETIF_RSP_OKAY
        je .out                     ; CF clear after an equal compare
        stc
.out:
        pop ebx
        pop eax
        ret
%endif

%include "pv/lib/xenbus.inc"
%include "pv/lib/grant.inc"
%include "pv/lib/ring.inc"
%include "workloads/pv.inc"

tx_ring:        dd NET_TX_SRING, 0, 0, NET_TX_RING_SIZE, SIZEOF_netif_tx_sring_entry
rx_ring:        dd NET_RX_SRING, 0, 0, NET_RX_RING_SIZE, SIZEOF_netif_rx_sring_entry
net_port:       dd 0
net_frames:     dd 0                ; frames sent, or received and checked
net_errors:     dd 0
net_notifies:   dd 0                ; pushes whose check asked for a notification
rx_reposted:    dd 0
batch_n:        dd 0
awaited:        dd 0
vif_dir:        db "device/vif/0", 0
key_tx_ring_ref: db "tx-ring-ref", 0
key_rx_ring_ref: db "rx-ring-ref", 0
key_event_channel: db "event-channel", 0
key_rx_copy:    db "request-rx-copy", 0
key_rx_notify:  db "feature-rx-notify", 0
key_frames:     db "frames", 0
key_checksum:   db "checksum", 0
key_errors:     db "errors", 0
key_notifies:   db "notifies", 0
alloc_failed:   db "net: EVTCHNOP_alloc_unbound failed", 0
ring_broken:    db "net: the backend produced more responses than requests", 0
tx_full:        db "net: the tx ring is full", 0
tx_failed:      db "net: the backend answered a tx request with an error", 0
rx_bad_id:      db "net: an rx response names a buffer we never posted", 0
rx_too_big:     db "net: an rx response runs past the end of its page", 0
rx_no_page:     db "net: an rx response came but no page was transferred", 0
nothing_came:   db "net: the backend stopped answering (block budget spent)", 0
