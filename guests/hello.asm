; hello: the smallest guest. Real mode at 0000:7C00 prints through the 0xE9 debug
; console (one IO_INSTRUCTION exit per byte, `out dx, al`) and ends by writing 0 to the
; debug-exit port 0xF4 (`out 0xF4, al`: an immediate-port exit), so the run's status is
; (0 << 1) | 1 = 1, as under QEMU's isa-debug-exit.
bits 16
org 0x7c00

start:
    cli
    mov si, message
    mov dx, 0xe9
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    xor al, al
    out 0xf4, al
    hlt

message: db "Hello from a real-mode guest", 10
         db "Test result: SUCCESS", 10, 0
