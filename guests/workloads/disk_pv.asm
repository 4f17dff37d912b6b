; disk_pv: the disk-read and disk-write workloads on the PV path: WL_IOS requests of WL_SIZE
; bytes at increasing sectors (request i covers sectors i * WL_SIZE / 512 on) through a block
; frontend (blkfront) on vbd 51712 (xvda), the same I/O disk_hvm.asm does with ATA PIO. Before
; the phase: the xenbus handshake (as pv/blk.asm: find the backend, grant it the blkif ring,
; an event channel, Initialised, wait for Connected) and one grant per data page (read-only
; for writes, writable for reads). In the phase the guest queues WL_BATCH requests at a time,
; each as one blkif request of up to 11 segments (4 KiB pages; a request bigger than 44 KiB
; takes several), publishes them with one RING_PUSH_REQUESTS_AND_CHECK_NOTIFY (and an
; EVTCHNOP_send only if that says so), then takes the responses (status okay, operation as
; asked), blocking in SCHEDOP_block while there are none. No data byte crosses by copy:
; blkback maps the granted pages. Reads: every byte read goes into the workload checksum
; (workloads/common.inc), request by request in sector order; writes: each sector is filled
; with the disk pattern before it is queued, and the runner finds it in the image afterwards.
; The phase is bracketed by the marker hypercalls; after it the guest reports through
; console_io: "wl: requests", "wl: checksum", "wl: pushes" and "wl: notifies" (the pushes
; whose check asked for a notification). Ends with SCHEDOP_shutdown(poweroff), or crash.
; Parameters (prepended by hvm/workloads.py as %define lines; these are the defaults):
; WL_IOS requests, WL_SIZE bytes a request (a multiple of 512), WL_WRITE (0 read, 1 write),
; WL_BATCH requests queued behind one push (the blkif ring's 32 slots bound the batch).
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 4
%endif
%ifndef WL_SIZE
%define WL_SIZE 4096
%endif
%ifndef WL_WRITE
%define WL_WRITE 0
%endif
%ifndef WL_BATCH
%define WL_BATCH 1
%endif
%if WL_SIZE < 512 || WL_SIZE % 512
%error "WL_SIZE must be a multiple of 512"
%endif
%assign IO_PAGES (WL_SIZE + 4095) / 4096       ; data pages a request uses
%assign IO_RINGREQS (IO_PAGES + 10) / 11       ; blkif requests (11 segments each at most)
%if WL_BATCH < 1 || WL_BATCH * IO_RINGREQS > 32
%error "WL_BATCH * the blkif requests of one request must fit the ring's 32 slots"
%endif
%assign DATA_PAGES WL_BATCH * IO_PAGES
%if DATA_PAGES > 480
%error "WL_BATCH * WL_SIZE is more than 480 pages of grants"
%endif

BLK_VDEV        equ 51712           ; xvda: (202 << 8) | (0 << 4)
SEGS_MAX        equ 11              ; BLKIF_MAX_SEGMENTS_PER_REQUEST
SECTORS_PER_PAGE equ 8
IO_SECTORS      equ WL_SIZE / 512
BLK_SRING       equ 0x10000
DATA            equ 0x200000        ; DATA_PAGES pages: request slot s at DATA + s * IO_PAGES pages
GREF_RING       equ 8
GREF_DATA       equ 16              ; + the page's index in DATA

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
        ; The data pages, granted once: the backend reads them (writes) or fills them (reads).
        xor esi, esi
.grant:
        lea eax, [esi + GREF_DATA]
        lea ebx, [esi + (DATA >> PAGE_SHIFT)]
        mov ecx, [xenbus_backend_id]
%if WL_WRITE
        mov edx, GTF_readonly
%else
        xor edx, edx
%endif
        call gnttab_grant_access
        inc esi
        cmp esi, DATA_PAGES
        jb .grant

        mov ebx, WL_MARK_START
        call wl_marker
        xor ebp, ebp                ; requests done
.batch:
        mov eax, WL_IOS
        sub eax, ebp
        cmp eax, WL_BATCH
        jbe .sized
        mov eax, WL_BATCH
.sized:
        mov [batch_n], eax
        xor edx, edx                ; the slot
.queue:
        lea eax, [ebp + edx]        ; the request's number
        call queue_request
        jc wl_fail
        inc edx
        cmp edx, [batch_n]
        jb .queue
        call blk_push
        mov eax, [batch_n]
        imul eax, IO_RINGREQS
        mov [awaited], eax
.collect:
        call take_response
        jc wl_fail
        dec dword [awaited]
        jnz .collect
%if WL_WRITE == 0
        xor edx, edx
.sum:
        mov esi, edx
        imul esi, IO_PAGES * PAGE_SIZE
        add esi, DATA
        mov ecx, WL_SIZE
        call wl_sum
        inc edx
        cmp edx, [batch_n]
        jb .sum
%endif
        add ebp, [batch_n]
        cmp ebp, WL_IOS
        jb .batch
        mov ebx, WL_MARK_END
        call wl_marker

        mov esi, key_requests
        mov eax, ebp
        call wl_report
        mov esi, key_checksum
        mov eax, [wl_checksum]
        call wl_report
        mov esi, key_pushes
        mov eax, [blk_pushes]
        call wl_report
        mov esi, key_notifies
        mov eax, [blk_notifies]
        call wl_report
        jmp wl_success

.bad_start:
        mov ebx, SHUTDOWN_crash
        jmp sched_shutdown

; connect: the xenbus handshake of a blkfront (pv/blk.asm's): CF set, ESI = reason, on failure.
connect:
        mov esi, vbd_dir
        call xenbus_probe
        jc .out
        mov ebx, blk_ring
        call front_ring_init
        mov eax, GREF_RING
        mov ebx, BLK_SRING >> PAGE_SHIFT
        mov ecx, [xenbus_backend_id]
        xor edx, edx
        call gnttab_grant_access
        mov eax, [xenbus_backend_id]
        call evtchn_alloc_unbound
        mov esi, alloc_failed
        jc .out
        mov [blk_port], eax
        call evtchn_unmask
        mov edi, key_ring_ref
        mov eax, GREF_RING
        call xenbus_write_uint
        jc .out
        mov edi, key_event_channel
        mov eax, [blk_port]
        call xenbus_write_uint
        jc .out
        mov edi, key_protocol
        mov edx, protocol_x86_32
        call xenbus_write_str
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

; queue_request: request number EAX into slot EDX (its pages DATA + EDX * IO_PAGES pages on):
; IO_RINGREQS blkif requests, not pushed yet. A write fills the pages with the disk pattern
; first. CF set (ESI = reason) if the ring is full.
queue_request:
        push eax
        push ebx
        push ecx
        push edx
        push edi
        push ebp
        imul eax, IO_SECTORS
        mov [next_sector], eax
        imul edx, IO_PAGES
        mov [next_page], edx
%if WL_WRITE
        mov edi, edx
        shl edi, PAGE_SHIFT
        add edi, DATA
        mov ecx, IO_SECTORS
        call wl_fill_sectors
%endif
        mov dword [sectors_left], IO_SECTORS
.ringreq:
        mov ebx, blk_ring
        call ring_next_request      ; EDI = a zeroed slot
        mov esi, ring_full
        jc .out
%if WL_WRITE
        mov byte [edi + blkif_request.operation], BLKIF_OP_WRITE
%else
        mov byte [edi + blkif_request.operation], BLKIF_OP_READ
%endif
        mov word [edi + blkif_request.handle], BLK_VDEV
        mov eax, [request_ids]
        inc dword [request_ids]
        mov [edi + blkif_request.id], eax
        mov eax, [next_sector]
        mov [edi + blkif_request.sector_number], eax
        lea ebx, [edi + blkif_request.seg]
        xor ebp, ebp                ; segments in this request
.segment:
        mov eax, [next_page]
        add eax, GREF_DATA
        mov [ebx + blkif_request_segment.gref], eax
        mov byte [ebx + blkif_request_segment.first_sect], 0
        mov eax, [sectors_left]
        cmp eax, SECTORS_PER_PAGE
        jbe .last
        mov eax, SECTORS_PER_PAGE
.last:
        sub [sectors_left], eax
        add [next_sector], eax
        dec eax
        mov [ebx + blkif_request_segment.last_sect], al
        inc dword [next_page]
        add ebx, SIZEOF_blkif_request_segment
        inc ebp
        cmp dword [sectors_left], 0
        je .full_request
        cmp ebp, SEGS_MAX
        jb .segment
.full_request:
        mov eax, ebp
        mov [edi + blkif_request.nr_segments], al
        cmp dword [sectors_left], 0
        jne .ringreq
        clc
.out:
        pop ebp
        pop edi
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret

; blk_push: RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, and EVTCHNOP_send if it says so.
blk_push:
        push eax
        push ebx
        mov ebx, blk_ring
        call ring_push_requests
        inc dword [blk_pushes]
        test eax, eax
        jz .quiet
        inc dword [blk_notifies]
        mov eax, [blk_port]
        call evtchn_send
.quiet:
        pop ebx
        pop eax
        ret

; take_response: wait for the next response (blocking while there is none); it must say
; okay for the operation asked, for an id we gave. CF set (ESI = reason) otherwise.
take_response:
        push eax
        push ebx
        push ecx
        mov ebx, blk_ring
.wait:
        call evtchn_ack_all
        call ring_final_check_for_responses
        mov esi, ring_broken
        jc .out
        test eax, eax
        jnz .take
        call evtchn_block
        jnc .wait
        mov esi, no_response
        jmp .out
.take:
        call ring_next_response     ; ESI = the slot: each field is read once
        mov eax, [esi + blkif_response.id]
        movzx ecx, byte [esi + blkif_response.operation]
        movsx ebx, word [esi + blkif_response.status]
        cmp eax, [request_ids]
        mov esi, unknown_id
        jae .bad
%if WL_WRITE
        cmp ecx, BLKIF_OP_WRITE
%else
        cmp ecx, BLKIF_OP_READ
%endif
        mov esi, wrong_op
        jne .bad
        cmp ebx, BLKIF_RSP_OKAY
        mov esi, failed_status
        jne .bad
        clc
        jmp .out
.bad:
        stc
.out:
        pop ecx
        pop ebx
        pop eax
        ret

%include "pv/lib/xenbus.inc"
%include "pv/lib/grant.inc"
%include "pv/lib/ring.inc"
%include "workloads/pv.inc"

blk_ring:       dd BLK_SRING, 0, 0, BLKIF_RING_SIZE, SIZEOF_blkif_sring_entry
blk_port:       dd 0
blk_pushes:     dd 0
blk_notifies:   dd 0
request_ids:    dd 0                ; blkif request ids given so far (the next one)
batch_n:        dd 0
awaited:        dd 0
next_sector:    dd 0
next_page:      dd 0
sectors_left:   dd 0
vbd_dir:        db "device/vbd/51712", 0
key_ring_ref:   db "ring-ref", 0
key_event_channel: db "event-channel", 0
key_protocol:   db "protocol", 0
protocol_x86_32: db "x86_32-abi", 0
key_requests:   db "requests", 0
key_checksum:   db "checksum", 0
key_pushes:     db "pushes", 0
key_notifies:   db "notifies", 0
alloc_failed:   db "disk: EVTCHNOP_alloc_unbound failed", 0
ring_full:      db "disk: the blkif ring is full", 0
ring_broken:    db "disk: the backend produced more responses than requests", 0
no_response:    db "disk: no response came (block budget spent)", 0
unknown_id:     db "disk: a response carries an id never given", 0
wrong_op:       db "disk: a response names another operation", 0
failed_status:  db "disk: the backend answered a request with an error", 0
