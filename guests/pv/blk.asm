; blk: a PV block frontend (blkfront) for vbd 51712 (xvda). It finds the backend through
; xenstore (device/vbd/51712/backend, backend-id), grants it a blkif ring page, allocates an
; event channel for it, publishes ring-ref, event-channel and protocol, goes Initialised
; and waits for the backend to be Connected (io/xenbus.h). Then, by grant reference only:
; WRITE sector 5 from a page granted read-only, FLUSH_DISKCACHE, READ sector 5 into another
; granted page and compare. Then a batch: BLK_BATCH WRITEs of sectors 8 on, queued from the
; highest sector down and pushed with ONE notification check while the backend is idle (so
; exactly one notification), every response matched by its id: a backend that serves by
; sector answers them in another order than they were queued. The same batch is READ back
; and compared. Each sector holds the text
; "hvmlab pv blk sector N" and then, at every later offset i of the sector, the byte i & 0xFF.
; The guest prints each step through console_io and ends XTF-style with
; SCHEDOP_shutdown(poweroff), or crash on a failure. For another batch size (1..32), a file
; with `%define BLK_BATCH n` and `%include "pv/blk.asm"` (or nasm -DBLK_BATCH=n).
bits 32
org 0x100000

%ifndef BLK_BATCH
%define BLK_BATCH 4                 ; requests per notification in the batch test
%endif
%if BLK_BATCH < 1 || BLK_BATCH > 32
%error "BLK_BATCH must be 1..32: a blkif ring has 32 slots"
%endif

BLK_VDEV        equ 51712           ; xvda: (202 << 8) | (0 << 4)
TEST_SECTOR     equ 5
BATCH_SECTOR    equ 8               ; the batch writes sectors 8 .. 8 + BLK_BATCH - 1
BATCH_PAGES     equ (BLK_BATCH + 7) / 8     ; 8 sectors of 512 bytes per granted page

; Guest pages (0x10000 and up are the guest's own).
BLK_SRING       equ 0x10000
BLK_WBUF        equ 0x11000         ; sector 5, written from here (granted read-only)
BLK_RBUF        equ 0x12000         ; sector 5, read back here
BATCH_WBUF      equ 0x13000         ; up to 4 pages
BATCH_RBUF      equ 0x17000         ; up to 4 pages

; Grant references (0-7 are the toolstack's).
GREF_RING       equ 8
GREF_WBUF       equ 9
GREF_RBUF       equ 10
GREF_BATCH_W    equ 11              ; one per batch page
GREF_BATCH_R    equ 15

; Request ids: every response must carry one of them back.
ID_WRITE        equ 1
ID_FLUSH        equ 2
ID_READ         equ 3
ID_BATCH_WRITE  equ 0x100           ; + the request's index in the batch
ID_BATCH_READ   equ 0x200
IDLE_POLLS      equ 5000            ; blk_wait_idle: polls of IDLE_POLL_NS at most
IDLE_POLL_NS    equ 100000

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

        ; Where is the backend?
        mov esi, vbd_dir
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

        ; The ring: SHARED_RING_INIT in our page, then granted to the backend's domain.
        mov ebx, blk_ring
        call front_ring_init
        mov eax, GREF_RING
        mov ebx, BLK_SRING >> PAGE_SHIFT
        mov ecx, [xenbus_backend_id]
        xor edx, edx
        call gnttab_grant_access
        ; An unbound port the backend's domain may bind.
        mov eax, [xenbus_backend_id]
        call evtchn_alloc_unbound
        mov esi, alloc_failed
        jc fail
        mov [blk_port], eax
        call evtchn_unmask

        ; Publish them, then Initialised; the backend maps the ring, binds the port and
        ; goes Connected; so do we.
        mov edi, key_ring_ref
        mov eax, GREF_RING
        call xenbus_write_uint
        jc fail
        mov edi, key_event_channel
        mov eax, [blk_port]
        call xenbus_write_uint
        jc fail
        mov edi, key_protocol
        mov edx, protocol_x86_32
        call xenbus_write_str
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
        mov eax, GREF_RING
        call pv_putdec
        mov esi, connected_port
        call pv_puts
        mov eax, [blk_port]
        call pv_putdec
        call pv_newline
        mov edi, key_sectors
        call xenbus_read_backend_uint
        jc .size_unknown
        mov esi, disk_size
        call pv_puts
        call pv_putdec
        mov esi, disk_size_tail
        call pv_puts
.size_unknown:

        ; The data pages: written ones read-only for the backend, read ones writable.
        mov eax, GREF_WBUF
        mov ebx, BLK_WBUF >> PAGE_SHIFT
        mov ecx, [xenbus_backend_id]
        mov edx, GTF_readonly
        call gnttab_grant_access
        mov eax, GREF_RBUF
        mov ebx, BLK_RBUF >> PAGE_SHIFT
        xor edx, edx
        call gnttab_grant_access
        xor esi, esi
.grant_batch:
        lea eax, [esi + GREF_BATCH_W]
        lea ebx, [esi + (BATCH_WBUF >> PAGE_SHIFT)]
        mov edx, GTF_readonly
        call gnttab_grant_access
        lea eax, [esi + GREF_BATCH_R]
        lea ebx, [esi + (BATCH_RBUF >> PAGE_SHIFT)]
        xor edx, edx
        call gnttab_grant_access
        inc esi
        cmp esi, BATCH_PAGES
        jb .grant_batch

        ; --- One request at a time: WRITE, FLUSH_DISKCACHE, READ of sector 5 ------------
        mov edi, BLK_WBUF
        mov eax, TEST_SECTOR
        call fill_sector
        mov edi, BLK_RBUF
        mov ecx, PAGE_SIZE
        call poison

        mov eax, BLKIF_OP_WRITE
        mov edx, ID_WRITE
        mov ecx, TEST_SECTOR
        mov esi, GREF_WBUF
        xor edi, edi
        call blk_queue
        jc fail
        call blk_push
        mov esi, did_write
        call blk_expect
        jc fail

        mov eax, BLKIF_OP_FLUSH_DISKCACHE
        mov edx, ID_FLUSH
        xor ecx, ecx
        mov esi, -1                         ; no data segment
        call blk_queue
        jc fail
        call blk_push
        mov esi, did_flush
        call blk_expect
        jc fail

        mov eax, BLKIF_OP_READ
        mov edx, ID_READ
        mov ecx, TEST_SECTOR
        mov esi, GREF_RBUF
        xor edi, edi
        call blk_queue
        jc fail
        call blk_push
        mov esi, did_read
        call blk_expect
        jc fail
        mov esi, BLK_WBUF
        mov edi, BLK_RBUF
        mov ecx, SECTOR_SIZE
        call mem_equal
        mov esi, read_differs
        jne fail
        mov esi, read_matches
        call pv_puts

        ; --- A batch: BLK_BATCH requests, one push, one notification check -------------
        xor ebx, ebx
.fill:
        lea eax, [ebx + BATCH_SECTOR]
        mov edi, ebx
        shl edi, 9                          ; * SECTOR_SIZE
        add edi, BATCH_WBUF
        call fill_sector
        inc ebx
        cmp ebx, BLK_BATCH
        jb .fill
        mov edi, BATCH_RBUF
        mov ecx, BATCH_PAGES * PAGE_SIZE
        call poison

        mov eax, BLKIF_OP_WRITE
        mov edx, ID_BATCH_WRITE
        mov ebp, GREF_BATCH_W
        call blk_batch
        jc fail
        mov esi, batch_written
        call pv_puts

        mov eax, BLKIF_OP_READ
        mov edx, ID_BATCH_READ
        mov ebp, GREF_BATCH_R
        call blk_batch
        jc fail
        mov esi, BATCH_WBUF
        mov edi, BATCH_RBUF
        mov ecx, BLK_BATCH * SECTOR_SIZE
        call mem_equal
        mov esi, batch_differs
        jne fail
        mov esi, batch_matches
        call pv_puts

        call revoke_data_grants
        jc fail
        mov esi, summary
        call pv_puts
        mov eax, [blk_pushes]
        call pv_putdec
        mov esi, summary_pushes
        call pv_puts
        mov eax, [blk_notifies]
        call pv_putdec
        mov esi, summary_notifies
        call pv_puts
        jmp pv_test_success

fail:
        jmp pv_test_failure

; revoke_data_grants: done with the data pages, end every grant of them. A grant the
; backend still has mapped after its request completed is a backend bug: CF, ESI = reason.
revoke_data_grants:
        mov eax, GREF_WBUF
.revoke:
        call gnttab_end_access
        mov esi, still_mapped
        jc .out
        inc eax
        cmp eax, GREF_BATCH_R + BATCH_PAGES
        jae .out                            ; CF clear: all revoked
        cmp eax, GREF_BATCH_W + BATCH_PAGES ; skip the batch refs this batch size leaves unused
        jne .revoke
        mov eax, GREF_BATCH_R
        jmp .revoke
.out:
        ret

; blk_batch: EAX = operation, EDX = the first id, EBP = the first page's grant ref. Queues
; BLK_BATCH requests: request i (id EDX + i) moves sector j = BLK_BATCH - 1 - i of the batch,
; disk sector BATCH_SECTOR + j, sector j % 8 of page j / 8: highest sector first. Pushes
; them once, then takes BLK_BATCH responses, each matched by id: in range, not seen
; before, same operation, status okay. Prints what it did. CF set: ESI = reason.
blk_batch:
        mov [batch_op], eax
        mov [batch_id], edx
        call blk_wait_idle
        mov eax, [blk_notifies]
        mov [batch_notifies], eax
        xor ebx, ebx
.queue:
        mov eax, [batch_op]
        mov edx, [batch_id]
        add edx, ebx
        mov edi, BLK_BATCH - 1
        sub edi, ebx                        ; j
        lea ecx, [edi + BATCH_SECTOR]
        mov esi, edi
        shr esi, 3
        add esi, ebp
        and edi, 7
        call blk_queue
        jc .out
        inc ebx
        cmp ebx, BLK_BATCH
        jb .queue
        call blk_push                       ; one push for the whole batch
        mov esi, batch_head
        call pv_puts
        mov eax, BLK_BATCH
        call pv_putdec
        mov esi, batch_write_name
        cmp dword [batch_op], BLKIF_OP_WRITE
        je .named
        mov esi, batch_read_name
.named:
        call pv_puts
        mov eax, [blk_notifies]
        sub eax, [batch_notifies]
        call pv_putdec
        mov esi, batch_notes
        call pv_puts

        ; The responses, in whatever order the backend chose.
        mov dword [batch_seen], 0
        mov dword [batch_reordered], 0
        xor ebx, ebx                        ; responses taken
.take:
        call blk_get_response
        jc .out
        mov [blk_status], eax
        sub edx, [batch_id]                 ; the request's index
        mov esi, unknown_id
        cmp edx, BLK_BATCH
        jae .bad
        mov esi, twice
        bts [batch_seen], edx
        jc .bad
        mov esi, wrong_op
        cmp ecx, [batch_op]
        jne .bad
        mov esi, failed_status
        cmp dword [blk_status], BLKIF_RSP_OKAY
        jne .bad_status
        cmp edx, ebx
        je .in_order
        mov dword [batch_reordered], 1
.in_order:
        mov [batch_order + ebx * 4], edx
        inc ebx
        cmp ebx, BLK_BATCH
        jb .take

        mov esi, order_head
        call pv_puts
        xor ebx, ebx
.print:
        mov al, ' '
        call pv_putc
        mov eax, [batch_order + ebx * 4]
        add eax, [batch_id]
        call pv_puthex32
        inc ebx
        cmp ebx, BLK_BATCH
        jb .print
        mov esi, in_order
        cmp dword [batch_reordered], 0
        je .said
        mov esi, reordered
.said:
        call pv_puts
        clc
.out:
        ret
.bad_status:
        call print_status
.bad:
        stc
        ret

; blk_queue: one request on the ring, not pushed yet. EAX = operation, EDX = id,
; ECX = sector_number, ESI = the grant ref of its page or -1 for none, EDI = the sector of
; that page it moves (first_sect = last_sect). CF set (ESI = reason) if the ring is full.
blk_queue:
        push ebx
        push edi
        mov ebx, blk_ring
        call ring_next_request              ; EDI = a zeroed slot
        jc .full
        mov [edi + blkif_request.operation], al
        mov word [edi + blkif_request.handle], BLK_VDEV
        mov [edi + blkif_request.id], edx   ; the high half of the u64 stays 0
        mov [edi + blkif_request.sector_number], ecx
        cmp esi, -1
        je .queued
        mov byte [edi + blkif_request.nr_segments], 1
        mov [edi + blkif_request.seg + blkif_request_segment.gref], esi
        mov ebx, [esp]                      ; the sector within the page
        mov [edi + blkif_request.seg + blkif_request_segment.first_sect], bl
        mov [edi + blkif_request.seg + blkif_request_segment.last_sect], bl
.queued:
        pop edi
        pop ebx
        clc
        ret
.full:
        pop edi
        pop ebx
        mov esi, ring_full
        stc
        ret

; blk_wait_idle: wait (polling our port with a short timeout, at most IDLE_POLLS times)
; until the backend has taken every request and re-armed req_event = req_prod + 1, i.e. it
; sleeps until notified. Not needed by ring.h (a busy backend finds new requests in its
; final check): it makes the next push's single notification certain, for the demonstration.
blk_wait_idle:
        push eax
        push ecx
        push edx
        mov edx, IDLE_POLLS
.look:
        call evtchn_ack_all
        mov eax, [BLK_SRING + sring.req_prod]
        inc eax
        cmp eax, [BLK_SRING + sring.req_event]
        je .idle
        mov eax, [blk_port]
        mov ecx, IDLE_POLL_NS
        call sched_poll_for
        dec edx
        jnz .look
.idle:
        pop edx
        pop ecx
        pop eax
        ret

; blk_push: RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, and the notification if it says so.
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

; blk_get_response: wait for the next response -> EDX = its id (-1 if it does not fit in
; 32 bits), ECX = operation, EAX = status. CF set: ESI = reason.
blk_get_response:
        push ebx
        mov ebx, blk_ring
.wait:
        call evtchn_ack_all
        call ring_final_check_for_responses
        jc .broken
        test eax, eax
        jnz .take
        call evtchn_block
        jnc .wait
        mov esi, no_response
        jmp .failed
.broken:
        mov esi, ring_broken
.failed:
        pop ebx
        stc
        ret
.take:
        call ring_next_response             ; ESI = the slot: each field is read once
        mov edx, [esi + blkif_response.id]
        mov eax, [esi + blkif_response.id + 4]
        movzx ecx, byte [esi + blkif_response.operation]
        test eax, eax
        jz .id_fits
        mov edx, -1
.id_fits:
        movsx eax, word [esi + blkif_response.status]
        pop ebx
        clc
        ret

; blk_expect: the response to the one request just pushed (operation EAX, id EDX) must
; come back okay; prints "<ESI text> id N status S". CF set: ESI = reason.
blk_expect:
        push eax
        push ebx
        push ecx
        push edx
        mov [batch_op], eax
        mov [batch_id], edx
        mov ebx, esi
        call blk_get_response
        jc .out
        mov [blk_status], eax
        mov esi, ebx
        call pv_puts
        mov eax, edx
        call pv_putdec
        mov esi, status_text
        call pv_puts
        mov eax, [blk_status]
        call print_signed
        call pv_newline
        mov esi, unknown_id
        cmp edx, [batch_id]
        jne .bad
        mov esi, wrong_op
        cmp ecx, [batch_op]
        jne .bad
        mov esi, failed_status
        cmp dword [blk_status], BLKIF_RSP_OKAY
        jne .bad
        clc
        jmp .out
.bad:
        stc
.out:
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret

; print_status: "blk: request <id> status <S>" for a failed batch response (EDX = index).
print_status:
        push esi
        mov esi, status_head
        call pv_puts
        mov eax, edx
        add eax, [batch_id]
        call pv_puthex32
        mov esi, status_text
        call pv_puts
        mov eax, [blk_status]
        call print_signed
        call pv_newline
        pop esi
        ret

; print_signed: EAX as a signed decimal number.
print_signed:
        push eax
        test eax, eax
        jns .positive
        push eax
        mov al, '-'
        call pv_putc
        pop eax
        neg eax
.positive:
        call pv_putdec
        pop eax
        ret

; fill_sector: the 512 bytes at EDI for sector EAX: "hvmlab pv blk sector N", then at each
; later offset i the byte i & 0xFF.
fill_sector:
        push ecx
        push esi
        push edi
        mov esi, sector_text
        call str_copy
        call fmt_dec
        mov ecx, edi
        sub ecx, [esp]                      ; the offset reached
.rest:
        mov [edi], cl
        inc edi
        inc ecx
        cmp ecx, SECTOR_SIZE
        jb .rest
        pop edi
        pop esi
        pop ecx
        ret

; poison: ECX bytes at EDI set to 0xEE, so a READ that moves nothing cannot pass.
poison:
        push eax
        push ecx
        push edi
        mov al, 0xEE
        rep stosb
        pop edi
        pop ecx
        pop eax
        ret

%include "pv/lib/xenbus.inc"
%include "pv/lib/grant.inc"
%include "pv/lib/ring.inc"
%include "pv/lib/print.inc"

blk_ring:       dd BLK_SRING, 0, 0, BLKIF_RING_SIZE, SIZEOF_blkif_sring_entry
blk_port:       dd 0
blk_pushes:     dd 0
blk_notifies:   dd 0
blk_status:     dd 0
batch_op:       dd 0
batch_id:       dd 0
batch_notifies: dd 0
batch_seen:     dd 0                ; one bit per request of the batch
batch_reordered: dd 0
batch_order:    times 32 dd 0       ; the request index of each response, in arrival order

vbd_dir:        db "device/vbd/51712", 0
key_ring_ref:   db "ring-ref", 0
key_event_channel: db "event-channel", 0
key_protocol:   db "protocol", 0
protocol_x86_32: db "x86_32-abi", 0
key_sectors:    db "sectors", 0
sector_text:    db "hvmlab pv blk sector ", 0

hello:          db "blk: blkfront for device/vbd/51712 (xvda)", 10, 0
found_backend:  db "blk: backend ", 0
in_domain:      db " in domain ", 0
connected:      db "blk: Connected: ring-ref ", 0
connected_port: db ", event-channel ", 0
disk_size:      db "blk: the backend says ", 0
disk_size_tail: db " sectors", 10, 0
did_write:      db "blk: WRITE sector 5 from a read-only grant: id ", 0
did_flush:      db "blk: FLUSH_DISKCACHE: id ", 0
did_read:       db "blk: READ sector 5 into a granted page: id ", 0
status_text:    db " status ", 0
read_matches:   db "blk: sector 5 reads back as written", 10, 0
batch_head:     db "blk: batch of ", 0
batch_write_name: db " WRITEs, one push, notifications: ", 0
batch_read_name: db " READs, one push, notifications: ", 0
batch_notes:    db 10, 0
order_head:     db "blk: responses by id:", 0
in_order:       db " (in order)", 10, 0
reordered:      db " (reordered by the backend; matched by id)", 10, 0
batch_written:  db "blk: every batch WRITE completed exactly once, okay", 10, 0
batch_matches:  db "blk: every batch sector reads back as written", 10, 0
summary:        db "blk: ", 0
summary_pushes: db " pushes, ", 0
summary_notifies: db " notifications", 10, 0
status_head:    db "blk: request ", 0

alloc_failed:   db "blk: EVTCHNOP_alloc_unbound failed", 0
ring_full:      db "blk: the ring is full", 0
ring_broken:    db "blk: the backend produced more responses than requests", 0
no_response:    db "blk: no response from the backend (wait budget spent)", 0
unknown_id:     db "blk: a response carries an id no request had", 0
twice:          db "blk: a request completed twice", 0
wrong_op:       db "blk: a response names another operation than its request", 0
failed_status:  db "blk: the backend answered with an error status", 0
read_differs:   db "blk: sector 5 read back differs from what was written", 0
batch_differs:  db "blk: a batch sector read back differs from what was written", 0
still_mapped:   db "blk: a data grant is still mapped by the backend after its request", 0
