; cmos: reads the MC146818 RTC and CMOS RAM through index port 0x70 and data port 0x71, as
; a PC BIOS and OS do. It reads the memory-size bytes (0x15/0x16 base, 0x17/0x18 and 0x30/0x31
; extended above 1 MiB, 0x34/0x35 above 16 MiB in 64 KiB units), works out the RAM size and says
; whether the checksum at 0x2E/0x2F is kept (a PC BIOS keeps it; QEMU's leaves 0000); then waits for register A's update-in-progress bit to clear,
; reads the time and date twice until both reads agree, decodes them as register B says
; (BCD or binary, 12- or 24-hour) and prints "YYYY-MM-DD HH:MM:SS". Halts with IF=0.
bits 16
org 0x7c00

%include "lib/ports.inc"

REG_SECONDS     equ 0x00
REG_MINUTES     equ 0x02
REG_HOURS       equ 0x04
REG_DAY         equ 0x07
REG_MONTH       equ 0x08
REG_YEAR        equ 0x09
REG_A           equ 0x0A
REG_B           equ 0x0B
REG_D           equ 0x0D
REG_BASE_LO     equ 0x15
REG_EXT_LO      equ 0x17
REG_CHECKSUM_HI equ 0x2E
REG_EXT2_LO     equ 0x30
REG_CENTURY     equ 0x32
REG_HIGH_LO     equ 0x34
A_UIP           equ 0x80
B_DM_BINARY     equ 0x04
B_24H           equ 0x02
D_VRT           equ 0x80
HOUR_PM         equ 0x80
NFIELDS         equ 7           ; seconds, minutes, hours, day, month, year, century

start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax

    mov al, REG_D
    call cmos_read
    mov si, bad_battery
    test al, D_VRT
    jz fail

    ; -- memory size ------------------------------------------------------------------
    mov al, REG_BASE_LO
    call cmos_read16
    mov [base_kib], ax
    mov al, REG_EXT_LO
    call cmos_read16
    mov [ext_kib], ax
    mov bx, ax
    mov al, REG_EXT2_LO
    call cmos_read16
    mov si, ext_disagree
    cmp ax, bx                  ; POST's copy of the extended size must agree
    jne fail
    mov al, REG_HIGH_LO
    call cmos_read16
    mov [high_64k], ax

    ; Checksum: the 16-bit sum of bytes 0x10-0x2D, stored big-endian at 0x2E/0x2F.
    xor bx, bx
    mov cl, 0x10
.sum:
    mov al, cl
    call cmos_read
    xor ah, ah
    add bx, ax
    inc cl
    cmp cl, REG_CHECKSUM_HI
    jb .sum
    mov al, REG_CHECKSUM_HI
    call cmos_read
    mov ah, al
    mov al, REG_CHECKSUM_HI + 1
    call cmos_read
    mov [checksum_stored], ax
    mov [checksum_sum], bx

    mov si, base_text
    call puts
    movzx eax, word [base_kib]
    call putdec
    mov si, ext_text
    call puts
    movzx eax, word [ext_kib]
    call putdec
    mov si, high_text
    call puts
    movzx eax, word [high_64k]
    call putdec
    mov si, high_unit_text
    call puts
    mov ax, [checksum_stored]
    call puthex16
    mov si, checksum_kept
    cmp ax, [checksum_sum]
    je .checksum
    mov si, checksum_sum_text
    call puts
    mov ax, [checksum_sum]
    call puthex16
    mov si, checksum_not_kept
.checksum:
    call puts
    ; RAM: with memory above 16 MiB, 16 MiB + 64 KiB per unit of 0x34/0x35 (the extended size
    ; at 0x17/0x18 then counts the same memory again, capped); else 1 MiB + extended KiB.
    movzx eax, word [high_64k]
    test eax, eax
    jz .below_16m
    shl eax, 6
    add eax, 16 * 1024
    jmp .ram_known
.below_16m:
    movzx eax, word [ext_kib]
    add eax, 1024
.ram_known:
    mov si, ram_text
    call puts
    call putdec
    mov si, kib_text
    call puts
    shr eax, 10
    call putdec
    mov si, mib_text
    call puts

    ; -- time and date ------------------------------------------------------------------
    mov al, REG_B
    call cmos_read
    mov [reg_b], al
    mov bp, 8                   ; tries: an update may land between two reads
.read_time:
    call wait_no_update
    mov di, fields
    call read_fields
    call wait_no_update
    mov di, fields2
    call read_fields
    mov si, fields
    mov di, fields2
    mov cx, NFIELDS
    repe cmpsb
    je .stable
    dec bp
    jnz .read_time
    mov si, unstable
    jmp fail
.stable:
    ; Decode every field but the hours as register B says; the hours carry the PM flag.
    mov si, fields
    mov cx, NFIELDS
.decode:
    cmp si, fields + 2          ; the hours
    je .next
    mov al, [si]
    call decode
    mov [si], al
.next:
    inc si
    dec cx
    jnz .decode
    mov al, [fields + 2]
    mov bl, al                  ; keep the PM flag: decode uses AH
    and al, 0x7F
    call decode                 ; hours without the PM flag
    test byte [reg_b], B_24H
    jnz .hours_done
    cmp al, 12                  ; 12-hour mode: 12 AM is 0, 1-11 PM are 13-23
    jne .not12
    xor al, al
.not12:
    test bl, HOUR_PM
    jz .hours_done
    add al, 12
.hours_done:
    mov [fields + 2], al

    mov si, bad_time
    cmp byte [fields + 0], 59
    ja fail
    cmp byte [fields + 1], 59
    ja fail
    cmp byte [fields + 2], 23
    ja fail
    mov al, [fields + 3]
    dec al
    cmp al, 30                  ; day 1-31
    ja fail
    mov al, [fields + 4]
    dec al
    cmp al, 11                  ; month 1-12
    ja fail

    mov si, rtc_text
    call puts
    mov al, [fields + 6]        ; century
    call put2
    mov al, [fields + 5]        ; year
    call put2
    mov al, '-'
    call putc
    mov al, [fields + 4]
    call put2
    mov al, '-'
    call putc
    mov al, [fields + 3]
    call put2
    mov al, ' '
    call putc
    mov al, [fields + 2]
    call put2
    mov al, ':'
    call putc
    mov al, [fields + 1]
    call put2
    mov al, ':'
    call putc
    mov al, [fields + 0]
    call put2
    mov si, bcd_text
    test byte [reg_b], B_DM_BINARY
    jz .format
    mov si, binary_text
.format:
    call puts
    mov si, h24_text
    test byte [reg_b], B_24H
    jnz .hours_format
    mov si, h12_text
.hours_format:
    call puts
    jmp test_success

; cmos_read: AL = the CMOS byte at index AL. Writing 0x70 with bit 7 clear keeps NMI enabled.
cmos_read:
    out CMOS_INDEX, al
    in al, CMOS_DATA
    ret

; cmos_read16: AX = the little-endian word at CMOS indexes AL, AL + 1.
cmos_read16:
    push bx
    mov bl, al
    call cmos_read
    mov bh, al
    mov al, bl
    inc al
    call cmos_read
    mov ah, al
    mov al, bh
    pop bx
    ret

; wait_no_update: until register A's UIP bit is clear, the time registers are stable for at
; least 244 us (bounded: a stuck UIP is reported by the two reads disagreeing, or not).
wait_no_update:
    mov cx, 0xFFFF
.poll:
    mov al, REG_A
    call cmos_read
    test al, A_UIP
    jz .done
    dec cx
    jnz .poll
.done:
    ret

; read_fields: the seven raw time registers to DI.
read_fields:
    mov si, field_regs
    mov cx, NFIELDS
.one:
    lodsb
    call cmos_read
    stosb
    dec cx
    jnz .one
    ret

; decode: AL as stored (BCD unless register B says binary) to binary.
decode:
    test byte [reg_b], B_DM_BINARY
    jnz .done
    mov ah, al
    shr ah, 4
    and al, 0x0F
    aad                         ; AL = AH * 10 + AL
.done:
    ret

; put2: AL (0-99) as two decimal digits.
put2:
    aam                         ; AH = AL / 10, AL = AL mod 10
    add ax, '00'
    xchg al, ah
    call putc
    mov al, ah
    jmp putc

fail:
    jmp test_failure

base_kib:       dw 0
ext_kib:        dw 0
high_64k:       dw 0
checksum_stored: dw 0
checksum_sum:   dw 0
reg_b:          db 0
field_regs:     db REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY
fields:         times NFIELDS db 0
fields2:        times NFIELDS db 0
base_text:      db "CMOS memory: base ", 0
ext_text:       db " KiB, extended ", 0
high_text:      db " KiB, above 16 MiB ", 0
high_unit_text: db " x 64 KiB", 10, "CMOS checksum at 0x2e: ", 0
checksum_kept:  db ", the sum of 0x10-0x2d", 10, 0
checksum_sum_text: db ", not the sum of 0x10-0x2d (", 0
checksum_not_kept: db "): not kept", 10, 0
ram_text:       db "RAM: ", 0
kib_text:       db " KiB (", 0
mib_text:       db " MiB)", 10, 0
rtc_text:       db "RTC: ", 0
bcd_text:       db " (BCD, ", 0
binary_text:    db " (binary, ", 0
h24_text:       db "24-hour)", 10, 0
h12_text:       db "12-hour)", 10, 0
bad_battery:    db "register D: VRT clear, the RTC's battery is dead", 0
ext_disagree:   db "extended memory at 0x17/0x18 and 0x30/0x31 disagree", 0
unstable:       db "two reads of the time never agreed", 0
bad_time:       db "the RTC reads an impossible time or date", 0

%include "lib/format.inc"
%include "lib/xtf.inc"
