; uart: drives COM1, a 16550 UART at 0x3F8, as a PC serial driver does, polling (no IRQ 4).
; It sets 9600 baud 8N1 (divisor 115200 / 9600 = 12 through DLAB), turns the FIFOs on and
; checks IIR says so, sends its report through THR waiting for LSR.THRE before each byte,
; checks the scratch register keeps what is written, and runs the MCR loopback test: the
; modem outputs come back as MSR inputs, and a byte sent in loopback is read back from RBR.
; Every line goes to COM1 and to the 0xE9 debug console; halts with IF=0 (status 0).
bits 16
org 0x7c00

%include "lib/ports.inc"

RBR         equ COM1_PORT + 0          ; receive buffer / transmit holding (THR), DLL with DLAB
IER         equ COM1_PORT + 1          ; interrupt enable, DLM with DLAB
IIR         equ COM1_PORT + 2          ; interrupt identification (read) / FIFO control (write)
LCR         equ COM1_PORT + 3
MCR         equ COM1_PORT + 4
LSR         equ COM1_PORT + 5
MSR         equ COM1_PORT + 6
SCR         equ COM1_PORT + 7

LCR_8N1     equ 0x03                   ; 8 data bits, no parity, 1 stop bit
LCR_DLAB    equ 0x80
FCR_SETUP   equ 0xC7                   ; FIFOs on, both cleared, RX trigger at 14 bytes
IIR_FIFOS   equ 0xC0                   ; bits 7:6: FIFOs enabled (a 16550A)
MCR_NORMAL  equ 0x0B                   ; DTR, RTS, OUT2
MCR_LOOP    equ 0x10
LSR_DR      equ 0x01
LSR_THRE    equ 0x20
LSR_TEMT    equ 0x40
DIVISOR     equ 115200 / 9600
LOOP_BYTE   equ 0xA5
POLL_LIMIT  equ 0xFFFF                 ; LSR reads before giving up on a UART that never answers

start:
    cli
    cld
    mov dx, IER
    xor al, al
    out dx, al                  ; no UART interrupts: this guest polls
    mov dx, LCR
    mov al, LCR_DLAB
    out dx, al                  ; DLAB = 1: offsets 0 and 1 are now the divisor latch
    mov dx, RBR
    mov al, DIVISOR & 0xFF
    out dx, al
    mov dx, IER
    mov al, DIVISOR >> 8
    out dx, al
    mov dx, RBR                 ; read the latch back while DLAB is still set
    in al, dx
    mov bl, al
    mov dx, IER
    in al, dx
    mov bh, al
    mov dx, LCR
    mov al, LCR_8N1
    out dx, al                  ; DLAB = 0 again, 8N1
    in al, dx
    mov esi, bad_lcr
    cmp al, LCR_8N1
    jne fail
    mov esi, bad_divisor
    cmp bx, DIVISOR
    jne fail
    mov dx, IIR
    mov al, FCR_SETUP
    out dx, al                  ; writes FCR: FIFOs on and cleared
    in al, dx                   ; reads IIR
    mov esi, bad_fifo
    and al, IIR_FIFOS
    cmp al, IIR_FIFOS
    jne fail
    mov dx, MCR
    mov al, MCR_NORMAL
    out dx, al

    mov esi, hello_line         ; from here on the UART works: say so on both consoles
    call say
    mov esi, divisor_line
    call say

    ; The scratch register holds any byte: the classic "is there a 16450 or later" probe.
    mov dx, SCR
    mov al, 0x5A
    out dx, al
    in al, dx
    mov esi, bad_scratch
    cmp al, 0x5A
    jne fail
    mov al, 0xA5
    out dx, al
    in al, dx
    cmp al, 0xA5
    jne fail
    mov esi, scratch_line
    call say

    ; Loopback: TX goes to RX inside the chip, and DTR/RTS/OUT1/OUT2 come back as
    ; DSR/CTS/RI/DCD in MSR bits 7:4. Nothing reaches the serial line meanwhile.
    call drain_transmitter      ; the report so far must be out before the line is cut
    mov dx, MCR
    mov al, MCR_NORMAL | MCR_LOOP
    out dx, al
    mov dx, MSR
    in al, dx
    and al, 0xF0
    mov [msr_seen], al
    mov dx, IIR
    mov al, FCR_SETUP
    out dx, al                  ; empty the receiver: only the looped byte will be there
    mov dx, RBR
    mov al, LOOP_BYTE
    out dx, al
    mov cx, POLL_LIMIT
    mov dx, LSR
.wait_rx:
    in al, dx
    test al, LSR_DR
    jnz .got
    dec cx
    jnz .wait_rx
.got:
    mov [lsr_seen], al
    mov dx, RBR
    in al, dx
    mov [rbr_seen], al
    mov dx, MCR
    mov al, MCR_NORMAL
    out dx, al                  ; back on the line

    mov esi, bad_msr
    cmp byte [msr_seen], 0xB0   ; DCD (OUT2), DSR (DTR), CTS (RTS); RI clear (OUT1 off)
    jne fail
    mov esi, no_loop_data
    test byte [lsr_seen], LSR_DR
    jz fail
    mov esi, bad_loop_data
    cmp byte [rbr_seen], LOOP_BYTE
    jne fail
    mov esi, loop_line
    call say

    mov esi, success_line
    call say
    call drain_transmitter      ; halt only once the last byte has left the shift register
    hlt

; say: send the NUL-terminated string at SI to the debug console and to COM1, waiting for
; THRE before each byte; a newline goes to the serial line as CR LF, as a terminal wants it.
say:
    lodsb
    test al, al
    jz .done
    out CONSOLE_PORT, al
    cmp al, 10
    jne .byte
    mov al, 13
    call send
    mov al, 10
.byte:
    call send
    jmp say
.done:
    ret

; send: AL to THR once LSR.THRE says the holding register is empty (bounded wait).
send:
    mov ah, al
    mov dx, LSR
    mov cx, POLL_LIMIT
.wait:
    in al, dx
    test al, LSR_THRE
    jnz .send
    dec cx
    jnz .wait
.send:
    mov al, ah
    mov dx, RBR
    out dx, al                  ; THR
    ret

; drain_transmitter: wait (bounded) until LSR.TEMT: THR and the shift register are empty.
drain_transmitter:
    mov dx, LSR
    mov cx, POLL_LIMIT
.wait:
    in al, dx
    test al, LSR_TEMT
    jnz .done
    dec cx
    jnz .wait
.done:
    ret

; fail: the reason at SI on the debug console, with the values read.
fail:
    push esi
    mov esi, read_prefix
    call puts
    mov ax, bx
    call puthex16
    mov al, ' '
    call putc
    mov al, [msr_seen]
    call puthex8
    mov al, ' '
    call putc
    mov al, [rbr_seen]
    call puthex8
    mov al, 10
    call putc
    pop esi
    jmp test_failure

msr_seen:      db 0
lsr_seen:      db 0
rbr_seen:      db 0
hello_line:    db "COM1: 16550A with FIFOs at 0x3f8, 9600 8N1", 10, 0
divisor_line:  db "divisor latch reads 12 (115200 / 9600)", 10, 0
scratch_line:  db "scratch register keeps 5a and a5", 10, 0
loop_line:     db "loopback: MSR b0 from MCR 1b, byte a5 came back through RBR", 10, 0
success_line:  db "Test result: SUCCESS", 10, 0
read_prefix:   db "uart: divisor/MSR/RBR read ", 0
bad_lcr:       db "LCR does not read back 03 (no UART at 0x3f8?)", 0
bad_divisor:   db "the divisor latch does not read back 12", 0
bad_fifo:      db "IIR bits 7:6 are not 11 after FCR c7: no 16550A FIFOs", 0
bad_scratch:   db "the scratch register does not keep what was written", 0
bad_msr:       db "in loopback MSR bits 7:4 are not b0 for MCR DTR+RTS+OUT2", 0
no_loop_data:  db "in loopback LSR.DR never rose after a byte was sent", 0
bad_loop_data: db "in loopback RBR did not return the byte sent", 0

%include "lib/format.inc"
%include "lib/xtf.inc"
