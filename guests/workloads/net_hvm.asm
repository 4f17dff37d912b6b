; net_hvm: the net-send and net-recv workloads on the HVM path: WL_IOS Ethernet frames of
; WL_SIZE bytes through the NE2000 at 0x300 (a DP8390, in the device model; IRQ 9).
; Before the phase the card is reset and set up as ne2000_peer.asm does (a receive ring in
; pages 0x46-0x7F with BNRY one page behind the next packet, word transfers), with wl_mac as
; its station address and broadcast accepted.
; Send (WL_RECV 0), polled: each frame (workloads/common.inc: to ff:ff:ff:ff:ff:ff from
; wl_mac, ethertype 0x88B5, its sequence number, pattern bytes) is built in memory, copied
; into the transmit page by remote DMA (RSAR, RBCR, CR, one `rep outsw`, ISR.RDC polled and
; acknowledged), then sent (TPSR, TBCR, CR.TXP, ISR.PTX polled and acknowledged). The runner
; finds the frames in the capture (--pcap).
; Receive (WL_RECV 1), by interrupt: the 8259A pair is moved to vectors 0x20/0x28 with only
; IRQ 9 (through the cascade) unmasked, the IDT gate for vector 0x29 acknowledges it (EOI to
; both PICs) and notes it, and IMR enables PRX. The card stays stopped until the phase, whose
; first act is to start it (a stopped card takes no frame: the runner offers them until it
; does, as a wire would). Then, with IF=1, the guest acknowledges PRX, reads every packet
; between BNRY + 1 and CURR (its 4-byte header, then the frame, each by remote DMA with one
; `rep insw`), adds the frame to the workload checksum, moves BNRY, and when the ring is
; empty and no interrupt came meanwhile waits with `sti; hlt` for the next one. Frames come
; from the runner; each must be WL_SIZE bytes of ethertype 0x88B5.
; The phase is bracketed by the markers (reads of port 0xE9); interrupts are on only inside
; it. After it the guest reports on the debug console: "wl: frames", "wl: checksum" and
; "wl: errors" (frames of another size or type). Protected mode, halts with IF=0 (status 0).
; Parameters (prepended by hvm/workloads.py as %define lines; these are the defaults):
; WL_IOS frames, WL_SIZE bytes a frame (60..1514, without the FCS), WL_RECV (0 send, 1 receive).
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
%if WL_SIZE < 60 || WL_SIZE > 1514
%error "WL_SIZE must be 60..1514 (an Ethernet frame without its FCS)"
%endif

%include "lib/ports.inc"

%include "lib/ne2000.inc"

POLL_LIMIT      equ 0x100000
FRAME_BUF       equ 0x200000            ; page-aligned: one `rep insw/outsw` is one ioreq
DMA_BYTES       equ (WL_SIZE + 1) & ~1  ; word transfers move an even count

CODE_SELECTOR   equ 0x08
GATE_INT32      equ 0x8E
ICW1_INIT_ICW4  equ 0x11
ICW4_8086       equ 0x01
OCW2_EOI        equ 0x20
MASTER_VECTORS  equ 0x20
SLAVE_VECTORS   equ 0x28
NE_IRQ          equ 9
NE_VECTOR       equ SLAVE_VECTORS + NE_IRQ - 8

start:
        cli
        cld
        call nic_init
        jc wl_fail
%if WL_RECV
        call irq_init
%endif
        mov ebx, WL_MARK_START
        call wl_marker
        xor ebp, ebp                    ; frames
%if WL_RECV
        mov dx, NE_CR
        mov al, CR_RD_ABORT | CR_STA    ; the receiver starts: frames come in from now on
        out dx, al
        sti
.round:
        mov byte [irq_seen], 0
        mov dx, NE_ISR
        mov al, ISR_PRX | ISR_OVW       ; a packet stored after this raises PRX again
        out dx, al
.packet:
        call receive_one                ; CF: the ring is empty
        jc .empty
        inc ebp
        cmp ebp, WL_IOS
        jb .packet
        jmp .done
.empty:
        cli
        cmp byte [irq_seen], 0
        jne .again                      ; an interrupt came while we looked: look again
        sti
        hlt                             ; STI's shadow: no interrupt slips in before HLT
        jmp .round
.again:
        sti
        jmp .round
.done:
        cli
%else
.frame:
        mov edi, FRAME_BUF
        mov eax, ebp
        mov ecx, WL_SIZE
        call wl_make_frame
        call send_frame
        jc wl_fail
        inc ebp
        cmp ebp, WL_IOS
        jb .frame
%endif
        mov ebx, WL_MARK_END
        call wl_marker

        mov esi, key_frames
        mov eax, ebp
        call wl_report
        mov esi, key_checksum
        mov eax, [wl_checksum]
        call wl_report
        mov esi, key_errors
        mov eax, [errors]
        call wl_report
        jmp wl_success

; nic_init: reset the card and bring it up (DP8390D's initialization order). CF set
; (ESI = reason) if no card answers.
nic_init:
        mov dx, NE_RESET
        in al, dx
        out dx, al
        mov dx, NE_ISR
        mov ecx, POLL_LIMIT
.reset:
        in al, dx
        test al, ISR_RST
        jnz .was_reset
        dec ecx
        jnz .reset
        mov esi, no_card
        stc
        ret
.was_reset:
        mov dx, NE_CR
        mov al, CR_RD_ABORT | CR_STP
        out dx, al
        mov dx, NE_DCR
        mov al, DCR_WORD
        out dx, al
        xor al, al
        mov dx, NE_RBCR0
        out dx, al
        mov dx, NE_RBCR1
        out dx, al
        mov dx, NE_RCR
        mov al, RCR_MONITOR
        out dx, al
        mov dx, NE_TCR
        mov al, TCR_LOOPBACK
        out dx, al
        mov dx, NE_TPSR
        mov al, TX_PAGE
        out dx, al
        mov dx, NE_PSTART
        mov al, RX_START
        out dx, al
        mov dx, NE_BNRY
        out dx, al
        mov [bnry], al
        mov dx, NE_PSTOP
        mov al, RX_STOP
        out dx, al
        mov dx, NE_ISR
        mov al, 0xFF
        out dx, al
        mov dx, NE_IMR
%if WL_RECV
        mov al, ISR_PRX                 ; IRQ 9 for every packet stored
%else
        xor al, al
%endif
        out dx, al
        mov dx, NE_CR
        mov al, CR_PAGE1 | CR_RD_ABORT | CR_STP
        out dx, al
        mov esi, wl_mac
        mov dx, NE_PAR0
        mov ecx, WL_ETH_ALEN
.par:
        lodsb
        out dx, al
        inc dx
        dec ecx
        jnz .par
        mov dx, NE_CURR
        mov al, RX_START + 1
        out dx, al
        mov dx, NE_CR
%if WL_RECV
        mov al, CR_RD_ABORT | CR_STP    ; stays stopped: the phase starts it
%else
        mov al, CR_RD_ABORT | CR_STA
%endif
        out dx, al
        mov dx, NE_TCR
        mov al, TCR_NORMAL
        out dx, al
        mov dx, NE_RCR
        mov al, RCR_BROADCAST
        out dx, al
        clc
        ret

%if WL_RECV
; irq_init: the IDT (gates for IRQ 9 and the two spurious vectors) and the 8259A pair at
; 0x20/0x28, every line masked but the cascade (IRQ 2) and IRQ 9.
irq_init:
        mov eax, nic_irq
        mov edi, idt + NE_VECTOR * 8
        call set_gate
        mov eax, spurious_irq
        mov edi, idt + (MASTER_VECTORS + 7) * 8
        call set_gate
        mov edi, idt + (SLAVE_VECTORS + 7) * 8
        call set_gate
        lidt [idtr]
        mov al, ICW1_INIT_ICW4
        out PIC1_COMMAND, al
        out PIC2_COMMAND, al
        mov al, MASTER_VECTORS
        out PIC1_DATA, al
        mov al, SLAVE_VECTORS
        out PIC2_DATA, al
        mov al, 0x04                    ; the slave on IR2
        out PIC1_DATA, al
        mov al, 0x02                    ; cascade identity 2
        out PIC2_DATA, al
        mov al, ICW4_8086
        out PIC1_DATA, al
        out PIC2_DATA, al
        mov al, ~(1 << 2) & 0xFF
        out PIC1_DATA, al
        mov al, ~(1 << (NE_IRQ - 8)) & 0xFF
        out PIC2_DATA, al
        ret

; set_gate: a 32-bit interrupt gate to EAX in the IDT entry at EDI.
set_gate:
        mov [edi], ax
        mov word [edi + 2], CODE_SELECTOR
        mov byte [edi + 4], 0
        mov byte [edi + 5], GATE_INT32
        shr eax, 16
        mov [edi + 6], ax
        ret

; IRQ 9 (the gate cleared IF): note it, EOI to the slave and the master, return.
nic_irq:
        push eax
        mov byte [irq_seen], 1
        mov al, OCW2_EOI
        out PIC2_COMMAND, al
        out PIC1_COMMAND, al
        pop eax
        iretd

; A request that vanished before INTA: nothing in service, no EOI.
spurious_irq:
        iretd

; receive_one: the next packet of the ring into FRAME_BUF, checked and summed; BNRY moved
; past it. CF set if the ring is empty (BNRY + 1 == CURR).
receive_one:
        push eax
        push ebx
        push ecx
        push edx
        push edi
        mov dx, NE_CR
        mov al, CR_PAGE1 | CR_RD_ABORT | CR_STA
        out dx, al
        mov dx, NE_CURR
        in al, dx
        mov ah, al
        mov dx, NE_CR
        mov al, CR_RD_ABORT | CR_STA
        out dx, al
        mov al, [bnry]
        inc al                          ; the next packet is one page after BNRY
        cmp al, RX_STOP
        jb .in_ring
        mov al, RX_START
.in_ring:
        cmp al, ah
        je .empty
        mov [packet_page], al
        mov bh, al
        xor bl, bl
        mov ecx, RX_HEADER
        mov edi, rx_header
        call remote_read
        jc .broken
        test byte [rx_header], RSR_PRX
        jz .broken
        mov al, [rx_header + 1]         ; the next packet's page
        cmp al, RX_START
        jb .broken
        cmp al, RX_STOP
        jae .broken
        movzx ecx, word [rx_header + 2] ; the byte count includes the header
        sub ecx, RX_HEADER
        cmp ecx, WL_SIZE
        jne .wrong
        mov ecx, DMA_BYTES
        mov bh, [packet_page]
        mov bl, RX_HEADER
        mov edi, FRAME_BUF
        call remote_read
        jc .broken
        cmp byte [FRAME_BUF + 12], WL_ETHERTYPE_HI
        jne .wrong
        cmp byte [FRAME_BUF + 13], WL_ETHERTYPE_LO
        jne .wrong
        push esi
        mov esi, FRAME_BUF
        mov ecx, WL_SIZE
        call wl_sum
        pop esi
        jmp .release
.wrong:
        inc dword [errors]
.release:
        mov al, [rx_header + 1]         ; BNRY to the page before the next packet
        dec al
        cmp al, RX_START
        jae .bnry
        mov al, RX_STOP - 1
.bnry:
        mov [bnry], al
        mov dx, NE_BNRY
        out dx, al
        clc
        jmp .out
.broken:
        mov esi, bad_header             ; a broken ring: give up on the run
        jmp wl_fail
.empty:
        stc
.out:
        pop edi
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret

; remote_read: ECX bytes (even) from card address BX to EDI by remote DMA. CF set (ESI =
; reason) if ISR.RDC never comes.
remote_read:
        call remote_setup
        mov dx, NE_CR
        mov al, CR_RD_READ | CR_STA
        out dx, al
        mov dx, NE_DATA
        shr ecx, 1
        rep insw
        jmp remote_done
%else
; send_frame: the WL_SIZE bytes at FRAME_BUF into the transmit page by remote DMA, then out
; on the wire. CF set (ESI = reason) on a failure.
send_frame:
        push eax
        push ebx
        push ecx
        push edx
        push esi
        mov bx, TX_PAGE << 8
        mov ecx, DMA_BYTES
        call remote_setup
        mov dx, NE_CR
        mov al, CR_RD_WRITE | CR_STA
        out dx, al
        mov dx, NE_DATA
        mov esi, FRAME_BUF
        mov ecx, DMA_BYTES / 2
        rep outsw
        call remote_done
        jc .failed
        mov dx, NE_TPSR
        mov al, TX_PAGE
        out dx, al
        mov dx, NE_TBCR0
        mov al, WL_SIZE & 0xFF
        out dx, al
        mov dx, NE_TBCR1
        mov al, WL_SIZE >> 8
        out dx, al
        mov dx, NE_CR
        mov al, CR_RD_ABORT | CR_TXP | CR_STA
        out dx, al
        mov dx, NE_ISR
        mov ecx, POLL_LIMIT
.wait_tx:
        in al, dx
        test al, ISR_PTX | ISR_TXE
        jnz .tx_over
        dec ecx
        jnz .wait_tx
        mov esi, no_ptx
        jmp .failed
.tx_over:
        mov bl, al
        mov al, ISR_PTX | ISR_TXE
        out dx, al
        test bl, ISR_TXE
        jz .sent
        mov esi, tx_error
.failed:
        add esp, 4                      ; ESI is the reason, not the caller's value
        stc
        jmp .out
.sent:
        pop esi
        clc
.out:
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret
%endif

; remote_setup: remote DMA of ECX bytes at card address BX (RSAR, RBCR); ISR.RDC cleared.
remote_setup:
        mov dx, NE_ISR
        mov al, ISR_RDC
        out dx, al
        mov dx, NE_RSAR0
        mov al, bl
        out dx, al
        mov dx, NE_RSAR1
        mov al, bh
        out dx, al
        mov dx, NE_RBCR0
        mov al, cl
        out dx, al
        mov dx, NE_RBCR1
        mov al, ch
        out dx, al
        ret

; remote_done: wait for ISR.RDC (the byte count reached 0), acknowledge it. CF set (ESI =
; reason) if it never comes.
remote_done:
        mov dx, NE_ISR
        mov ecx, POLL_LIMIT
.poll:
        in al, dx
        test al, ISR_RDC
        jnz .done
        dec ecx
        jnz .poll
        mov esi, no_rdc
        stc
        ret
.done:
        mov al, ISR_RDC
        out dx, al
        clc
        ret

%include "workloads/hvm.inc"

errors:         dd 0
irq_seen:       db 0
bnry:           db 0                    ; what the guest last wrote to BNRY
packet_page:    db 0
                align 4
rx_header:      times RX_HEADER db 0    ; receive status, next page, byte count
idtr:           dw 48 * 8 - 1
                dd idt
                align 8
idt:            times 48 * 8 db 0
key_frames:     db "frames", 0
key_checksum:   db "checksum", 0
key_errors:     db "errors", 0
no_card:        db "no NE2000 at 0x300: ISR.RST never set after a reset", 0
bad_header:     db "a receive ring packet header makes no sense", 0
no_rdc:         db "remote DMA never completed (ISR.RDC)", 0
no_ptx:         db "the transmission never completed (ISR.PTX)", 0
tx_error:       db "the transmission failed (ISR.TXE)", 0
