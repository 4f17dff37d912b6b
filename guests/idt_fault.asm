; idt_fault: a protected-mode guest that loads an IDT with a #UD handler, then executes UD2.
; The fault is still an EXCEPTION_NMI exit (reason 0, vector 6: every exception exits), but
; this time the hypervisor's reflection succeeds: VM entry delivers the #UD through the
; guest's interrupt gate (EFLAGS, CS, EIP pushed), the handler steps over the UD2 and IRETs.
bits 32
org 0x100000

start:
    cli
    mov eax, ud_handler
    mov edi, idt + 6 * 8
    mov [edi], ax                   ; offset 15:0
    mov word [edi + 2], 0x08        ; the loader's flat code segment
    mov byte [edi + 4], 0
    mov byte [edi + 5], 0x8e        ; present, ring 0, 32-bit interrupt gate
    shr eax, 16
    mov [edi + 6], ax               ; offset 31:16
    lidt [idtr]
    ud2
    mov esi, after
    call puts
    hlt

ud_handler:
    add dword [esp], 2              ; return past the 2-byte UD2
    mov esi, caught
    call puts
    iretd

; puts: print the NUL-terminated string at ESI to the debug console.
puts:
    mov dx, 0xe9
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    ret

caught: db "caught #UD in the guest's own handler", 10, 0
after:  db "resumed after ud2", 10, "Test result: SUCCESS", 10, 0

align 8
idtr:   dw 256 * 8 - 1
        dd idt
align 8
idt:    times 256 * 8 db 0
