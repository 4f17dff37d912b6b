; long_hello: 64-bit long mode. The loader built identity-mapped page tables (CR4.PAE,
; EFER.LME/LMA, CR0.PG) and a 64-bit code segment, so the guest starts in long mode at
; 1 MiB. It prints with `out dx, al` from a RIP-relative string and halts with IF=0.
bits 64
org 0x100000

start:
    cli
    lea rsi, [rel message]
    mov dx, 0xe9
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    hlt

message: db "Hello from long mode", 10
         db "Test result: SUCCESS", 10, 0
