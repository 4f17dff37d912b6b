; unmapped: a guest that writes to guest-physical 0xE0000000, where there is neither RAM
; nor a device. The write is an EPT_VIOLATION exit (reason 48) with the guest-physical
; address and a qualification saying "data write"; the run ends with status 4.
bits 32
org 0x100000

start:
    cli
    mov al, 'w'
    out 0xe9, al
    mov dword [0xe0000000], 0x12345678
    mov al, '!'
    out 0xe9, al
    hlt
