; pit: counts ten 8254 timer interrupts in real mode, through the IVT.
; The guest points IVT entry 0x20 at its own handler, reprograms the 8259A pair (ICW1-ICW4:
; IRQ 0-7 at vectors 0x20-0x27, IRQ 8-15 at 0x28-0x2F), unmasks only IRQ 0, and sets 8254
; channel 0 to mode 2 (rate generator) with a count of 1193: about 1000 interrupts a second.
; Then `sti` and HLT until the handler (EOI, count) has run ten times; a handler on the old
; BIOS vector 0x08 catches a PIC that was not remapped. Prints what it set up and "10 timer
; interrupts", then halts with IF=0 (status 0).
bits 16
org 0x7c00

%include "lib/ports.inc"

ICW1_INIT_ICW4  equ 0x11        ; edge triggered, cascade, ICW4 follows
ICW4_8086       equ 0x01
OCW2_EOI        equ 0x20        ; non-specific end of interrupt
MASTER_VECTORS  equ 0x20
SLAVE_VECTORS   equ 0x28
PIT_MODE2_CH0   equ 0x34        ; channel 0, LSB then MSB, mode 2, binary
PIT_LATCH_CH0   equ 0x00        ; counter latch command for channel 0
PIT_COUNT       equ 1193        ; 1193182 Hz / 1193 = 1000.15 Hz
WANTED_TICKS    equ 10

start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax
    ; The IVT at 0000:0000: four bytes a vector, offset then segment.
    mov word [MASTER_VECTORS * 4], timer_handler
    mov word [MASTER_VECTORS * 4 + 2], 0
    mov word [0x08 * 4], stray_handler
    mov word [0x08 * 4 + 2], 0

    ; ICW1 starts initialization on both chips; ICW2-ICW4 follow on the data ports.
    mov al, ICW1_INIT_ICW4
    out PIC1_COMMAND, al
    out PIC2_COMMAND, al
    mov al, MASTER_VECTORS
    out PIC1_DATA, al           ; ICW2: vector base
    mov al, SLAVE_VECTORS
    out PIC2_DATA, al
    mov al, 0x04
    out PIC1_DATA, al           ; ICW3 master: a slave on IR2
    mov al, 0x02
    out PIC2_DATA, al           ; ICW3 slave: my cascade identity is 2
    mov al, ICW4_8086
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov al, 0xFE
    out PIC1_DATA, al           ; OCW1: only IRQ 0 unmasked
    mov al, 0xFF
    out PIC2_DATA, al
    in al, PIC1_DATA
    mov si, bad_imr
    cmp al, 0xFE
    jne fail
    mov si, pic_line
    call puts

    ; Channel 0: control word, then the count low byte and high byte.
    mov al, PIT_MODE2_CH0
    out PIT_COMMAND, al
    mov al, PIT_COUNT & 0xFF
    out PIT_CHANNEL0, al
    mov al, PIT_COUNT >> 8
    out PIT_CHANNEL0, al
    ; Latch and read the counter: a running mode 2 counter is between 1 and the count.
    mov al, PIT_LATCH_CH0
    out PIT_COMMAND, al
    in al, PIT_CHANNEL0
    mov ah, al
    in al, PIT_CHANNEL0
    xchg al, ah
    mov si, bad_count
    test ax, ax
    jz fail
    cmp ax, PIT_COUNT
    ja fail
    mov si, pit_line
    call puts

    ; Interrupts on; each HLT waits for the next tick. An interrupt landing between the
    ; compare and the HLT only makes the HLT wait one more millisecond.
    sti
.wait:
    hlt
    cmp word [ticks], WANTED_TICKS
    jb .wait
    cli
    mov al, 0xFF
    out PIC1_DATA, al           ; mask the timer again: the guest is done with it
    mov si, stray_seen
    cmp word [strays], 0
    jne fail
    mov ax, [ticks]
    movzx eax, ax
    call putdec
    mov si, ticks_line
    call puts
    jmp test_success

; IRQ 0 at vector 0x20: count, then EOI so the PIC lets the next one through.
timer_handler:
    push ax
    inc word [cs:ticks]
    mov al, OCW2_EOI
    out PIC1_COMMAND, al
    pop ax
    iret

; Vector 0x08, where a BIOS leaves IRQ 0: reached only if the remap did not happen.
stray_handler:
    push ax
    inc word [cs:strays]
    mov al, OCW2_EOI
    out PIC1_COMMAND, al
    pop ax
    iret

fail:
    jmp test_failure

ticks:      dw 0
strays:     dw 0
pic_line:   db "8259A pair: IRQ 0-7 at vectors 20-27, IRQ 8-15 at 28-2f; only IRQ 0 unmasked", 10, 0
pit_line:   db "8254 channel 0: mode 2, count 1193 (1000 Hz), counting", 10, 0
ticks_line: db " timer interrupts", 10, 0
bad_imr:    db "the master PIC's IMR does not read back fe", 0
bad_count:  db "8254 channel 0 does not count down from 1193 after it was programmed", 0
stray_seen: db "a timer interrupt came through vector 08: the PIC was not remapped", 0

%include "lib/format.inc"
%include "lib/xtf.inc"
