; irq: IRQ 0 through a 32-bit IDT gate, and a pending interrupt held back while IF=0 until STI
; opens the interrupt window.
; The guest builds an IDT with 32-bit interrupt gates for IRQ 0 (vector 0x20, after it
; reprograms the 8259A pair to 0x20/0x28) and the 8259A's spurious IRQ 7, starts 8254 channel
; 0 at about 1000 Hz, and takes three timer interrupts with HLT. Then it clears IF and spins,
; reading the PIC's IRR, until IRQ 0 is pending: the interrupt waits, undelivered, however
; long IF stays 0 (a hypervisor asks for an INTERRUPT_WINDOW exit to learn when it can
; inject). After `sti` and one more instruction (STI's shadow) the handler runs at once. Halts
; with IF=0 (status 0).
bits 32
org 0x100000

%include "lib/ports.inc"

CODE_SELECTOR   equ 0x08            ; the loader's flat 32-bit code segment
GATE_INT32      equ 0x8E            ; present, DPL 0, 32-bit interrupt gate (clears IF)
ICW1_INIT_ICW4  equ 0x11
ICW4_8086       equ 0x01
OCW2_EOI        equ 0x20
OCW3_READ_IRR   equ 0x0A
MASTER_VECTORS  equ 0x20
SLAVE_VECTORS   equ 0x28
PIT_MODE2_CH0   equ 0x34
PIT_COUNT       equ 1193            ; 1193182 Hz / 1193 = 1000.15 Hz
WARM_UP_TICKS   equ 3
PENDING_LIMIT   equ 1000000         ; IRR reads before giving up on IRQ 0 ever pending
HOLD_READS      equ 1000            ; IRR reads with IF=0 after IRQ 0 is seen pending

start:
    cli
    cld
    mov eax, timer_handler
    mov edi, idt + MASTER_VECTORS * 8
    call set_gate
    mov eax, spurious_handler
    mov edi, idt + (MASTER_VECTORS + 7) * 8
    call set_gate
    lidt [idtr]

    mov al, ICW1_INIT_ICW4
    out PIC1_COMMAND, al
    out PIC2_COMMAND, al
    mov al, MASTER_VECTORS
    out PIC1_DATA, al
    mov al, SLAVE_VECTORS
    out PIC2_DATA, al
    mov al, 0x04
    out PIC1_DATA, al
    mov al, 0x02
    out PIC2_DATA, al
    mov al, ICW4_8086
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov al, 0xFE                    ; IRQ 0 only
    out PIC1_DATA, al
    mov al, 0xFF
    out PIC2_DATA, al
    mov al, OCW3_READ_IRR           ; from now on, reading 0x20 returns IRR
    out PIC1_COMMAND, al

    mov al, PIT_MODE2_CH0
    out PIT_COMMAND, al
    mov al, PIT_COUNT & 0xFF
    out PIT_CHANNEL0, al
    mov al, PIT_COUNT >> 8
    out PIT_CHANNEL0, al

    ; Interrupts on: each HLT waits for a tick delivered through the IDT gate.
    sti
.warm_up:
    hlt
    cmp dword [ticks], WARM_UP_TICKS
    jb .warm_up
    cli
    mov esi, warm_text
    call puts

    ; IF = 0: spin until IRQ 0 is requested (IRR bit 0), then keep spinning a while.
    mov ebx, [ticks]
    mov ecx, PENDING_LIMIT
.wait_pending:
    in al, PIC1_COMMAND
    test al, 0x01
    jnz .pending
    dec ecx
    jnz .wait_pending
    mov esi, never_pending
    jmp fail
.pending:
    mov ecx, HOLD_READS
.hold:
    in al, PIC1_COMMAND
    dec ecx
    jnz .hold
    mov esi, lost_pending
    test al, 0x01                   ; still requested: nothing took it while IF was 0
    jz fail
    mov esi, delivered_early
    cmp [ticks], ebx                ; and the handler never ran
    jne fail
    mov esi, pending_text
    call puts

    ; The interrupt window opens: STI takes effect after the next instruction, and the
    ; pending IRQ 0 is taken before the one after that.
    sti
    nop
    mov eax, [ticks]
    cli
    mov esi, not_delivered
    cmp eax, ebx
    je fail
    mov esi, window_text
    call puts

    mov al, 0xFF
    out PIC1_DATA, al               ; timer masked again: the guest is done with it
    jmp test_success

; set_gate: a 32-bit interrupt gate to EAX in the IDT entry at EDI.
set_gate:
    mov [edi], ax                   ; offset 15:0
    mov word [edi + 2], CODE_SELECTOR
    mov byte [edi + 4], 0
    mov byte [edi + 5], GATE_INT32
    shr eax, 16
    mov [edi + 6], ax               ; offset 31:16
    ret

; IRQ 0 through vector 0x20 (the gate cleared IF): count, EOI, return.
timer_handler:
    push eax
    inc dword [ticks]
    mov al, OCW2_EOI
    out PIC1_COMMAND, al
    pop eax
    iretd

; Vector 0x27: the 8259A's answer when a request vanished before INTA. Not in service, so
; no EOI.
spurious_handler:
    iretd

fail:
    jmp test_failure

ticks:          dd 0
warm_text:      db "3 timer interrupts through the IDT gate for vector 0x20", 10, 0
pending_text:   db "IF=0: IRQ 0 pending in the PIC's IRR, not delivered", 10, 0
window_text:    db "sti: the pending IRQ 0 was delivered right after the STI shadow", 10, 0
never_pending:  db "IRQ 0 never showed up in IRR while IF was 0", 0
lost_pending:   db "IRQ 0 left IRR while IF was 0", 0
delivered_early: db "the timer handler ran while IF was 0", 0
not_delivered:  db "the pending IRQ 0 was not delivered right after sti; nop", 0

align 8
idtr:   dw 256 * 8 - 1
        dd idt
align 8
idt:    times 256 * 8 db 0

%include "lib/xtf.inc"
