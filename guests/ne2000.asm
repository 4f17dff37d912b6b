; ne2000: brings up the NE2000 ISA card at 0x300 as the DP8390 datasheet says and sends one
; Ethernet frame, polling (IRQ 9 stays unused).
; It resets the card (read then write the reset port 0x31F, wait for ISR.RST), stops the NIC,
; sets word-wide DMA, clears the remote byte count, receives in monitor mode and transmits in
; internal loopback while it sets up the ring, reads the station address from the PROM by
; remote DMA, loads PAR0-5 and CURR, starts, and leaves loopback. The frame: broadcast
; destination, the card's MAC as source, ethertype 0x88B5 (IEEE local experimental), payload
; "hello from ne2000", padded to 60 bytes; remote-DMA written to the transmit page, sent with
; TPSR/TBCR and CR.TXP, and done when ISR.PTX rises. Halts with IF=0 (status 0).
bits 16
org 0x7c00

%include "lib/ports.inc"

%include "lib/ne2000.inc"

FRAME_LEN       equ 60                  ; the shortest Ethernet frame without its FCS
POLL_LIMIT      equ 0xFFFF

start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax

    call ne_reset_init                  ; reset, then the DP8390 initialization sequence
    jc fail

    ; The station address PROM through remote DMA: 32 bytes from card address 0, each
    ; PROM byte doubled on the 16-bit card, so the MAC is the low byte of words 0-5.
    mov bx, 0
    mov cx, 32
    call remote_setup
    mov dx, NE_CR
    mov al, CR_RD_READ | CR_STA         ; started, but looped back and storing nothing
    out dx, al
    mov dx, NE_DATA
    mov di, prom
    mov cx, 16
    rep insw
    call remote_done
    jc fail
    mov esi, bad_prom
    cmp word [prom + 28], 0x5757        ; bytes 14 and 15: 'W' 'W', a 16-bit NE2000
    jne fail
    mov si, prom
    mov di, mac
    mov cx, 6
.mac:
    lodsw
    stosb
    dec cx
    jnz .mac

    ; Page 1: the physical address the receiver matches, and CURR, the first page it fills.
    mov dx, NE_CR
    mov al, CR_PAGE1 | CR_RD_ABORT | CR_STP
    out dx, al
    mov si, mac
    mov dx, NE_PAR0
    mov cx, 6
.par:
    lodsb
    out dx, al
    inc dx
    dec cx
    jnz .par
    mov dx, NE_CURR
    mov al, RX_START + 1
    out dx, al
    ; Start on page 0, then leave loopback: frames now go on the wire.
    mov dx, NE_CR
    mov al, CR_RD_ABORT | CR_STA
    out dx, al
    mov dx, NE_TCR
    mov al, TCR_NORMAL
    out dx, al
    mov dx, NE_RCR
    mov al, RCR_BROADCAST
    out dx, al

    mov esi, mac_text
    call puts
    mov si, mac
    mov cx, 6
.print_mac:
    lodsb
    call puthex8
    dec cx
    jz .mac_done
    mov al, ':'
    call putc
    jmp .print_mac
.mac_done:
    mov al, 10
    call putc

    ; The frame: destination, source, ethertype, payload, zero padding.
    mov di, frame + 6
    mov si, mac
    mov cx, 6
    rep movsb

    ; Remote DMA write of the frame into the transmit page.
    mov bx, TX_PAGE << 8
    mov cx, FRAME_LEN
    call remote_setup
    mov dx, NE_CR
    mov al, CR_RD_WRITE | CR_STA
    out dx, al
    mov dx, NE_DATA
    mov si, frame
    mov cx, FRAME_LEN / 2
    rep outsw
    call remote_done
    jc fail

    call ne_transmit                    ; TPSR, TBCR, CR.TXP; until PTX (or TXE)
    jc fail
    mov esi, sent_text
    call puts
    jmp test_success

%include "lib/ne2000_16.inc"

fail:
    jmp test_failure

prom:       times 32 db 0
mac:        times 6 db 0
frame:      db 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF  ; broadcast
            times 6 db 0                        ; our MAC, filled in
            db 0x88, 0xB5                       ; ethertype, big-endian on the wire
            db "hello from ne2000"
            times FRAME_LEN - ($ - frame) db 0
mac_text:   db "NE2000 at 0x300: station address ", 0
sent_text:  db "sent a 60-byte broadcast frame, ethertype 88b5: hello from ne2000", 10, 0
no_card:    db "no NE2000 at 0x300: ISR.RST never set after a reset", 0
bad_prom:   db "the PROM lacks the NE2000 signature 57 57 in bytes 14-15", 0
no_rdc:     db "remote DMA never completed (ISR.RDC)", 0
no_ptx:     db "the transmission never completed (ISR.PTX)", 0
tx_error:   db "the transmission failed (ISR.TXE)", 0

%include "lib/format.inc"
%include "lib/xtf.inc"
