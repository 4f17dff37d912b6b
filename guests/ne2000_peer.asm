; ne2000_peer: an HVM guest that greets a peer on the bridge through its NE2000 (0x300) and
; waits for the peer's greeting, polling (IRQ 9 stays unused; DP8390D datasheet).
; It brings the card up as ne2000.asm does, with a receive ring in pages 0x46-0x7F: BNRY
; trails the next packet to read by one page (the way the Linux 8390 driver keeps it), so
; the card never stores into the page the host reads next; RCR accepts broadcast. It sends
; a broadcast frame (ethertype 0x88B5, payload "hello from hvm ne2000") and waits for ISR.PRX,
; sending its greeting again every 20 ms, at most SEND_LIMIT times, so a peer that connects
; late (a PV netfront still doing its xenbus handshake) still gets one. The 20 ms are a
; one-shot of 8254 channel 2 (mode 0, gated by port 0x61 bit 0, no IRQ), over when port
; 0x61 bit 5 (OUT2) rises: a timer every PC has, so the guest ends the same way on QEMU's pc.
; Each received packet is read through remote DMA: the 4-byte header (receive status, next
; page, length) at BNRY + 1, then the frame; BNRY moves to the page before the next packet.
; The first frame of ethertype 0x88B5 from another station is printed with its payload, the
; greeting goes out once more, and the guest halts with IF=0 (status 0). With no such frame
; after SEND_LIMIT greetings and one more interval: FAILURE (status 3).
bits 16
org 0x7c00

%include "lib/ports.inc"

%include "lib/ne2000.inc"

ETH_ALEN        equ 6
ETH_HLEN        equ 14
ETH_FRAME_MAX   equ 1514                ; the longest frame the card stores, without FCS
ETHERTYPE_HI    equ 0x88                ; 0x88B5: IEEE 802 local experimental, big-endian
ETHERTYPE_LO    equ 0xB5
FRAME_LEN       equ 60                  ; the shortest Ethernet frame without its FCS
RX_READ_MAX     equ ETH_HLEN + 64       ; how much of a received frame is read (and shown)

PIT_CHANNEL2    equ 0x42
PORT_B          equ 0x61                ; system control port B: bit 0 gate 2, bit 1 speaker
PORT_B_GATE2    equ 0x01
PORT_B_SPEAKER  equ 0x02
PORT_B_OUT2     equ 0x20                ; the 8254 channel 2 OUT pin
PIT_CH2_MODE0   equ 0xB0                ; channel 2, LSB then MSB, mode 0 (one-shot), binary
PIT_20MS        equ 23864               ; 20 ms of the 1.193182 MHz input clock
SEND_LIMIT      equ 60                  ; greetings before giving up: 60 x 20 ms = 1.2 s
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
    mov dx, NE_CR
    mov al, CR_RD_ABORT | CR_STA        ; started, but looped back and storing nothing
    out dx, al
    mov bx, 0
    mov cx, 32
    mov di, prom
    call remote_read
    jc fail
    mov esi, bad_prom
    cmp word [prom + 28], 0x5757        ; bytes 14 and 15: 'W' 'W', a 16-bit NE2000
    jne fail
    mov si, prom
    mov di, mac
    mov cx, ETH_ALEN
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
    mov cx, ETH_ALEN
.par:
    lodsb
    out dx, al
    inc dx
    dec cx
    jnz .par
    mov dx, NE_CURR
    mov al, RX_START + 1
    out dx, al
    ; Start on page 0, then leave loopback and accept broadcast: frames now come and go.
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
    call print_mac
    mov al, 10
    call putc

    ; Our greeting, written once into the transmit page: every send reuses it.
    mov di, frame + ETH_ALEN
    mov si, mac
    mov cx, ETH_ALEN
    rep movsb
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
    mov esi, sending_text
    call puts

    ; Channel 2 counts with its gate high and the speaker off (OUT2 drives nothing).
    in al, PORT_B
    and al, ~PORT_B_SPEAKER & 0x0F
    or al, PORT_B_GATE2
    out PORT_B, al

    call send_greeting
    jc fail

    ; Wait for a packet; every 20 ms without one, greet again (SEND_LIMIT in all).
wait_packet:
    mov dx, NE_ISR
    in al, dx
    test al, ISR_OVW
    jnz .overflow
    test al, ISR_PRX
    jnz .packet
    in al, PORT_B
    test al, PORT_B_OUT2                ; the 20 ms since the last greeting are over
    jz wait_packet
    cmp word [sends], SEND_LIMIT
    jae .give_up
    call send_greeting
    jc fail
    jmp wait_packet
.overflow:
    mov esi, ring_overflow
    jmp fail
.give_up:
    mov esi, nothing_came
    call puts
    movzx eax, word [sends]
    call putdec
    mov esi, nothing_came_end
    jmp fail

    ; Acknowledge PRX before looking at CURR: a packet stored after that look raises PRX
    ; again, so none is left in the ring unseen.
.packet:
    mov al, ISR_PRX
    out dx, al
next_packet:
    call read_curr
    mov ah, al                          ; AH = CURR, the page the card fills next
    mov dx, NE_BNRY
    in al, dx
    inc al                              ; the next packet is one page after BNRY
    cmp al, RX_STOP
    jb .in_ring
    mov al, RX_START
.in_ring:
    cmp al, ah
    je wait_packet                      ; caught up with the card: the ring is empty
    mov [packet_page], al

    ; The packet header at the start of its page.
    mov bh, al
    xor bl, bl
    mov cx, RX_HEADER
    mov di, rx_header
    call remote_read
    jc fail
    mov esi, bad_header
    test byte [rx_header], RSR_PRX
    jz fail
    mov al, [rx_header + 1]             ; the next packet's page must be in the ring
    cmp al, RX_START
    jb fail
    cmp al, RX_STOP
    jae fail
    mov ax, [rx_header + 2]             ; the byte count includes the header
    cmp ax, RX_HEADER + ETH_HLEN
    jb fail
    cmp ax, RX_HEADER + ETH_FRAME_MAX
    ja fail
    sub ax, RX_HEADER
    mov [rx_length], ax

    ; The frame (its first RX_READ_MAX bytes, an even count for word transfers); remote
    ; DMA wraps from PSTOP to PSTART by itself.
    cmp ax, RX_READ_MAX
    jbe .length
    mov ax, RX_READ_MAX
.length:
    inc ax
    and ax, 0xFFFE
    mov cx, ax
    mov bh, [packet_page]
    mov bl, RX_HEADER
    mov di, rx_frame
    call remote_read
    jc fail

    ; Give the pages back: BNRY to the page before the next packet.
    mov al, [rx_header + 1]
    dec al
    cmp al, RX_START
    jae .bnry
    mov al, RX_STOP - 1
.bnry:
    mov dx, NE_BNRY
    out dx, al

    ; Ours to show? Ethertype 0x88B5, from another station.
    cmp byte [rx_frame + 12], ETHERTYPE_HI
    jne .skip
    cmp byte [rx_frame + 13], ETHERTYPE_LO
    jne .skip
    mov si, rx_frame + ETH_ALEN
    mov di, mac
    mov cx, ETH_ALEN
    repe cmpsb
    je .skip                            ; our own frame
    jmp got_greeting
.skip:
    inc word [skipped]
    jmp next_packet

got_greeting:
    mov esi, received_text
    call puts
    movzx eax, word [rx_length]
    call putdec
    mov esi, received_from
    call puts
    mov si, rx_frame + ETH_ALEN
    call print_mac
    mov esi, received_says
    call puts
    ; The payload up to its first NUL, at most what was read.
    mov cx, [rx_length]
    cmp cx, RX_READ_MAX
    jbe .shown
    mov cx, RX_READ_MAX
.shown:
    sub cx, ETH_HLEN
    mov si, rx_frame + ETH_HLEN
.payload:
    test cx, cx
    jz .payload_done
    lodsb
    test al, al
    jz .payload_done
    call putc
    dec cx
    jmp .payload
.payload_done:
    mov al, 10
    call putc

    ; Once more, for a peer whose receive ring was not ready for the earlier ones.
    call send_greeting
    jc fail
    mov esi, summary
    call puts
    movzx eax, word [sends]
    call putdec
    mov esi, summary_skipped
    call puts
    movzx eax, word [skipped]
    call putdec
    mov al, 10
    call putc
    jmp test_success

; send_greeting: transmit the frame in the transmit page (TPSR, TBCR, then CR.TXP); PTX (or
; TXE) says it is over. Counts it and starts the next 20 ms on channel 2. CF set and ESI =
; the reason on a failure.
send_greeting:
    call ne_transmit
    jc .failed
    inc word [sends]
    ; Mode 0: the control word sets OUT2 low, the count's second byte starts it; OUT2
    ; rises when it reaches 0.
    mov al, PIT_CH2_MODE0
    out PIT_COMMAND, al
    mov al, PIT_20MS & 0xFF
    out PIT_CHANNEL2, al
    mov al, PIT_20MS >> 8
    out PIT_CHANNEL2, al
    clc
    ret
.failed:
    stc
    ret

; read_curr: AL = CURR (page 1), leaving the NIC on page 0, started.
read_curr:
    mov dx, NE_CR
    mov al, CR_PAGE1 | CR_RD_ABORT | CR_STA
    out dx, al
    mov dx, NE_CURR
    in al, dx
    mov ah, al
    mov dx, NE_CR
    mov al, CR_RD_ABORT | CR_STA
    out dx, al
    mov al, ah
    ret

; remote_read: CX bytes (even) from card address BX into DI by remote DMA. CF set and
; ESI = the reason if ISR.RDC never comes.
remote_read:
    call remote_setup
    mov dx, NE_CR
    mov al, CR_RD_READ | CR_STA
    out dx, al
    mov dx, NE_DATA
    shr cx, 1
    rep insw
    jmp remote_done

%include "lib/ne2000_16.inc"

; print_mac: the 6 bytes at SI as xx:xx:xx:xx:xx:xx.
print_mac:
    mov cx, ETH_ALEN
.byte:
    lodsb
    call puthex8
    dec cx
    jz .done
    mov al, ':'
    call putc
    jmp .byte
.done:
    ret

fail:
    jmp test_failure

prom:       times 32 db 0
mac:        times ETH_ALEN db 0
sends:      dw 0                                ; greetings sent
skipped:    dw 0                                ; packets read that were not a greeting
packet_page: db 0
rx_length:  dw 0                                ; the received frame's length
rx_header:  times RX_HEADER db 0
rx_frame:   times RX_READ_MAX db 0
frame:      db 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF  ; broadcast
            times ETH_ALEN db 0                 ; our MAC, filled in
            db ETHERTYPE_HI, ETHERTYPE_LO       ; ethertype, big-endian on the wire
            db "hello from hvm ne2000"
            times FRAME_LEN - ($ - frame) db 0
mac_text:   db "NE2000 at 0x300: station address ", 0
sending_text: db "sending a broadcast frame, ethertype 88b5: hello from hvm ne2000", 10, 0
received_text: db "received ", 0
received_from: db " bytes from ", 0
received_says: db ": ", 0
summary:    db "greetings sent ", 0
summary_skipped: db ", other packets skipped ", 0
nothing_came: db "no frame of ethertype 88b5 came in after ", 0
nothing_came_end: db " greetings, 20 ms apart", 0
ring_overflow: db "the receive ring overflowed (ISR.OVW)", 0
bad_header: db "a receive ring packet header makes no sense", 0
no_card:    db "no NE2000 at 0x300: ISR.RST never set after a reset", 0
bad_prom:   db "the PROM lacks the NE2000 signature 57 57 in bytes 14-15", 0
no_rdc:     db "remote DMA never completed (ISR.RDC)", 0
no_ptx:     db "the transmission never completed (ISR.PTX)", 0
tx_error:   db "the transmission failed (ISR.TXE)", 0

%include "lib/format.inc"
%include "lib/xtf.inc"
