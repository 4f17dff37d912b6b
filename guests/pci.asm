; pci: enumerates PCI bus 0 through configuration mechanism #1 and prints every function.
; A dword written to CONFIG_ADDRESS (0xCF8: enable bit 31, bus, device, function, register)
; selects a register, a dword read of CONFIG_DATA (0xCFC) returns it. For each device 0-31 it
; reads function 0's vendor ID (FFFFh: nobody answered, a master abort) and looks at functions
; 1-7 only when the header type says multi-function. One line per function, "00:01.1 8086:7010
; class 010180", then it checks the i440FX host bridge (8086:1237) at 00:00.0 and the PIIX3
; ISA bridge (8086:7000) at 00:01.0 are there. Halts with IF=0 (status 0).
bits 16
org 0x7c00

%include "lib/ports.inc"

CONFIG_ENABLE   equ 0x80000000
REG_ID          equ 0x00            ; device ID << 16 | vendor ID
REG_CLASS       equ 0x08            ; class code << 8 | revision
REG_HEADER      equ 0x0C            ; header type in bits 23:16
HEADER_MULTI    equ 0x80
HOST_BRIDGE_ID  equ 0x12378086      ; i440FX PMC
ISA_BRIDGE_ID   equ 0x70008086      ; PIIX3 function 0

start:
    cli
    cld
    xor ax, ax
    mov ds, ax

    ; Mechanism #1 is there if CONFIG_ADDRESS keeps a dword written to it.
    mov dx, PCI_CONFIG_ADDRESS
    mov eax, CONFIG_ENABLE
    out dx, eax
    in eax, dx
    mov esi, no_mechanism1
    cmp eax, CONFIG_ENABLE
    jne fail
    mov esi, mechanism1
    call puts

    xor bx, bx                      ; BH = device, BL = function (bus 0)
.device:
    mov bl, 0
    call probe                      ; function 0 answers, or the slot is empty
    jc .next_device
    mov al, REG_HEADER
    call config_read
    test eax, HEADER_MULTI << 16
    jz .next_device
.function:
    inc bl
    cmp bl, 8
    je .next_device
    call probe
    jmp .function
.next_device:
    inc bh
    cmp bh, 32
    jb .device

    movzx eax, word [functions]
    call putdec
    mov esi, found_text
    call puts
    mov esi, no_host_bridge
    cmp dword [id_00_0], HOST_BRIDGE_ID
    jne fail
    mov esi, no_isa_bridge
    cmp dword [id_01_0], ISA_BRIDGE_ID
    jne fail
    mov esi, bridges_found
    call puts
    jmp test_success

; probe: read the ID of 00:BH.BL; if a function answers, print its line and set CF clear,
; else set CF. Remembers the IDs of 00:00.0 and 00:01.0.
probe:
    mov al, REG_ID
    call config_read
    cmp ax, 0xFFFF                  ; vendor FFFFh: master abort, nothing there
    je .absent
    mov [id], eax
    cmp bx, 0x0000
    jne .not_00_0
    mov [id_00_0], eax
.not_00_0:
    cmp bx, 0x0100
    jne .not_01_0
    mov [id_01_0], eax
.not_01_0:
    inc word [functions]
    mov al, 0                       ; "00:" bus 0
    call puthex8
    mov al, ':'
    call putc
    mov al, bh
    call puthex8
    mov al, '.'
    call putc
    mov al, bl
    add al, '0'
    call putc
    mov al, ' '
    call putc
    mov ax, [id]                    ; vendor
    call puthex16
    mov al, ':'
    call putc
    mov ax, [id + 2]                ; device
    call puthex16
    mov esi, class_text
    call puts
    mov al, REG_CLASS
    call config_read
    shr eax, 8                      ; base class, subclass, programming interface
    ror eax, 16
    call puthex8
    ror eax, 16
    call puthex16
    mov al, 10
    call putc
    clc
    ret
.absent:
    stc
    ret

; config_read: EAX = the dword register AL of bus 0, device BH, function BL.
config_read:
    push dx
    push ecx
    movzx ecx, al
    and cl, 0xFC
    movzx eax, bh
    shl eax, 11
    or ecx, eax
    movzx eax, bl
    shl eax, 8
    or eax, ecx
    or eax, CONFIG_ENABLE
    mov dx, PCI_CONFIG_ADDRESS
    out dx, eax
    mov dx, PCI_CONFIG_DATA
    in eax, dx
    pop ecx
    pop dx
    ret

fail:
    jmp test_failure

id:             dd 0
id_00_0:        dd 0xFFFFFFFF
id_01_0:        dd 0xFFFFFFFF
functions:      dw 0
mechanism1:     db "PCI configuration mechanism #1 at 0xcf8/0xcfc; bus 0:", 10, 0
class_text:     db " class ", 0
found_text:     db " functions answer on bus 0", 10, 0
bridges_found:  db "i440FX host bridge at 00:00.0, PIIX3 ISA bridge at 00:01.0", 10, 0
no_mechanism1:  db "CONFIG_ADDRESS (0xcf8) does not keep a dword: no configuration mechanism #1", 0
no_host_bridge: db "00:00.0 is not the i440FX host bridge 8086:1237", 0
no_isa_bridge:  db "00:01.0 is not the PIIX3 ISA bridge 8086:7000", 0

%include "lib/format.inc"
%include "lib/xtf.inc"
