; ide: drives the primary ATA channel (0x1F0-0x1F7, control 0x3F6) by polling, as ATA-6 says.
; With nIEN set (no IRQ 14) it selects the master, sends IDENTIFY DEVICE and prints the model
; (words 27-46, each word's first character in its high byte) and the LBA28 capacity (words
; 60-61); reads LBA 1 with READ SECTORS and `rep insw` and prints its first 16 bytes; writes
; LBA 2 with WRITE SECTORS and `rep outsw`: "hvmlab was here: LBA 2", a newline, then bytes
; whose value is their offset in the sector (i & 0xFF); FLUSH CACHE; reads LBA 2 back and
; compares. Every step waits for BSY to clear and checks ERR, DF and DRQ. Needs a disk of
; at least 3 sectors as the primary master; halts with IF=0 (status 0).
bits 16
org 0x7c00

%include "lib/ports.inc"

ATA_DATA        equ IDE_PRIMARY_DATA + 0
ATA_ERROR       equ IDE_PRIMARY_DATA + 1
ATA_NSECTOR     equ IDE_PRIMARY_DATA + 2
ATA_LBA_LOW     equ IDE_PRIMARY_DATA + 3
ATA_LBA_MID     equ IDE_PRIMARY_DATA + 4
ATA_LBA_HIGH    equ IDE_PRIMARY_DATA + 5
ATA_DEVICE      equ IDE_PRIMARY_DATA + 6
ATA_STATUS      equ IDE_PRIMARY_DATA + 7    ; write: Command
ATA_ALT_STATUS  equ IDE_PRIMARY_CONTROL     ; write: Device Control

ST_BSY          equ 0x80
ST_DRDY         equ 0x40
ST_DF           equ 0x20
ST_DRQ          equ 0x08
ST_ERR          equ 0x01
CTL_NIEN        equ 0x02                    ; no INTRQ: this guest polls
DEV_MASTER      equ 0xA0                    ; bits 7 and 5 set (obsolete, still expected)
DEV_LBA_MASTER  equ 0xE0                    ; LBA addressing, device 0, LBA bits 27:24 = 0
CMD_READ        equ 0x20
CMD_WRITE       equ 0x30
CMD_FLUSH       equ 0xE7
CMD_IDENTIFY    equ 0xEC
POLL_LIMIT      equ 0x100000                ; status reads before a drive is declared hung
WRITE_LBA       equ 2

; Sector buffers above the guest's code, below the 0x9FC00 EBDA.
IDENTIFY_BUF    equ 0x9000
READ_BUF        equ 0x9200
WRITE_BUF       equ 0x9400
VERIFY_BUF      equ 0x9600

start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax

    mov dx, ATA_ALT_STATUS
    mov al, CTL_NIEN
    out dx, al
    mov dx, ATA_DEVICE
    mov al, DEV_MASTER
    out dx, al
    call delay400
    mov dx, ATA_STATUS
    in al, dx
    mov esi, no_drive
    cmp al, 0xFF                ; nothing drives the bus: no controller
    je fail
    call wait_not_busy
    jc fail
    mov esi, no_drive
    test al, ST_DRDY            ; an empty channel reads 00h: no drive ready
    jz fail

    ; -- IDENTIFY DEVICE: one 512-byte block of PIO data in --------------------------
    mov al, CMD_IDENTIFY
    call command
    mov esi, identify_failed
    call wait_data
    jc fail
    mov di, IDENTIFY_BUF
    call read_block
    call wait_not_busy
    jc fail
    mov esi, drq_stuck
    test al, ST_DRQ | ST_ERR    ; the block was the whole transfer
    jnz fail_ata

    mov esi, model_text
    call puts
    ; Words 27-46: 40 characters, the first of each pair in the high byte; trailing
    ; spaces are padding.
    mov si, IDENTIFY_BUF + 27 * 2
    mov cx, 20
    mov di, model
.model:
    lodsw
    xchg al, ah
    stosw
    dec cx
    jnz .model
.trim:
    cmp di, model
    je .trimmed
    cmp byte [di - 1], ' '
    jne .trimmed
    dec di
    jmp .trim
.trimmed:
    mov byte [di], 0
    mov esi, model
    call puts
    mov esi, lba_text
    call puts
    mov esi, no_lba
    test word [IDENTIFY_BUF + 49 * 2], 0x0200   ; capabilities: LBA supported
    jz fail
    mov eax, [IDENTIFY_BUF + 60 * 2]            ; words 60-61: LBA28 sectors
    mov [sectors], eax
    call putdec
    mov esi, sectors_text
    call puts
    shr eax, 1
    call putdec
    mov esi, kib_text
    call puts
    mov esi, too_small
    cmp dword [sectors], WRITE_LBA + 1
    jb fail

    ; -- READ SECTORS: LBA 1 ------------------------------------------------------------
    mov eax, 1
    call set_lba
    mov al, CMD_READ
    call command
    mov esi, read_failed
    call wait_data
    jc fail
    mov di, READ_BUF
    call read_block
    call wait_not_busy
    jc fail
    mov esi, drq_stuck
    test al, ST_DRQ | ST_ERR
    jnz fail_ata
    mov esi, read_text
    call puts
    mov si, READ_BUF
    mov cx, 16
.hex:
    lodsb
    call puthex8
    mov al, ' '
    call putc
    dec cx
    jnz .hex
    mov al, 10
    call putc

    ; -- WRITE SECTORS: LBA 2 ----------------------------------------------------------
    mov si, signature
    mov di, WRITE_BUF
.copy:
    lodsb
    test al, al
    jz .pattern
    stosb
    jmp .copy
.pattern:
    mov ax, di
    sub ax, WRITE_BUF
    stosb                       ; byte i of the sector is i & 0xFF after the text
    cmp di, WRITE_BUF + 512
    jb .pattern
    mov eax, WRITE_LBA
    call set_lba
    mov al, CMD_WRITE
    call command
    mov esi, write_failed
    call wait_data              ; PIO data out: DRQ says the drive wants the block
    jc fail
    mov si, WRITE_BUF
    mov cx, 256
    mov dx, ATA_DATA
    rep outsw
    call delay400
    call wait_not_busy          ; the drive writes the block, then drops BSY
    jc fail
    mov esi, write_failed
    test al, ST_ERR | ST_DF | ST_DRQ
    jnz fail_ata
    mov esi, written_text
    call puts

    ; -- FLUSH CACHE -------------------------------------------------------------------
    mov al, CMD_FLUSH
    call command
    call wait_not_busy
    jc fail
    mov esi, flush_failed
    test al, ST_ERR | ST_DF
    jnz fail_ata
    mov esi, flushed_text
    call puts

    ; -- read LBA 2 back ---------------------------------------------------------------
    mov eax, WRITE_LBA
    call set_lba
    mov al, CMD_READ
    call command
    mov esi, read_failed
    call wait_data
    jc fail
    mov di, VERIFY_BUF
    call read_block
    call wait_not_busy
    jc fail
    mov si, WRITE_BUF
    mov di, VERIFY_BUF
    mov cx, 256
    repe cmpsw
    mov esi, verify_failed
    jne fail
    mov esi, verified_text
    call puts
    jmp test_success

; command: write the Command register (AL) after the task file is set, then wait the
; 400 ns the drive has to raise BSY before its status means anything.
command:
    mov dx, ATA_STATUS
    out dx, al
    jmp delay400

; delay400: four reads of Alternate Status (about 100 ns each on ISA timing), which also
; leave the interrupt pending.
delay400:
    push ax
    push dx
    mov dx, ATA_ALT_STATUS
    in al, dx
    in al, dx
    in al, dx
    in al, dx
    pop dx
    pop ax
    ret

; wait_not_busy: poll Status until BSY clears; AL = the status. CF set, ESI = the reason,
; if the drive stays busy.
wait_not_busy:
    push ecx
    push dx
    mov ecx, POLL_LIMIT
    mov dx, ATA_STATUS
.poll:
    in al, dx
    test al, ST_BSY
    jz .ready
    dec ecx
    jnz .poll
    mov esi, hung
    stc
    jmp .out
.ready:
    clc
.out:
    pop dx
    pop ecx
    ret

; wait_data: after a data command, wait for BSY to clear, then require DRQ without ERR or
; DF. CF set on failure (ESI keeps the caller's reason; the registers are printed).
wait_data:
    call wait_not_busy
    jc .out
    test al, ST_ERR | ST_DF
    jnz .error
    test al, ST_DRQ
    jnz .out                    ; CF is clear after TEST
.error:
    call show_registers
    stc
.out:
    ret

; read_block: 256 words from the data register to ES:DI.
read_block:
    mov cx, 256
    mov dx, ATA_DATA
    rep insw
    jmp delay400

; set_lba: one sector at LBA EAX (28 bits): sector count, LBA bits 7:0, 15:8, 23:16, then
; the device register with LBA mode, device 0 and bits 27:24.
set_lba:
    push eax
    mov dx, ATA_NSECTOR
    mov al, 1
    out dx, al
    pop eax
    mov dx, ATA_LBA_LOW
    out dx, al
    shr eax, 8
    mov dx, ATA_LBA_MID
    out dx, al
    shr eax, 8
    mov dx, ATA_LBA_HIGH
    out dx, al
    shr eax, 8
    and al, 0x0F
    or al, DEV_LBA_MASTER
    mov dx, ATA_DEVICE
    out dx, al
    ret

; show_registers: "ata: status XX error XX" on the console.
show_registers:
    push eax
    push esi
    mov esi, status_text
    call puts
    mov dx, ATA_ALT_STATUS
    in al, dx
    call puthex8
    mov esi, error_text
    call puts
    mov dx, ATA_ERROR
    in al, dx
    call puthex8
    mov al, 10
    call putc
    pop esi
    pop eax
    ret

fail_ata:
    call show_registers
fail:
    jmp test_failure

sectors:        dd 0
model:          times 41 db 0
signature:      db "hvmlab was here: LBA 2", 10, 0
model_text:     db "IDENTIFY DEVICE: model ", 0
lba_text:       db 10, "LBA28 capacity: ", 0
sectors_text:   db " sectors (", 0
kib_text:       db " KiB)", 10, 0
read_text:      db "LBA 1, first 16 bytes: ", 0
written_text:   db "LBA 2 written: hvmlab was here, then bytes i & 0xff", 10, 0
flushed_text:   db "FLUSH CACHE done", 10, 0
verified_text:  db "LBA 2 read back: the same 512 bytes", 10, 0
status_text:    db "ata: status ", 0
error_text:     db " error ", 0
no_drive:       db "no ATA drive answers as primary master", 0
hung:           db "the drive stays busy (BSY never clears)", 0
identify_failed: db "IDENTIFY DEVICE failed", 0
no_lba:         db "the drive does not support LBA (IDENTIFY word 49 bit 9)", 0
too_small:      db "the disk has fewer than 3 sectors", 0
drq_stuck:      db "DRQ or ERR still set after the data block", 0
read_failed:    db "READ SECTORS failed", 0
write_failed:   db "WRITE SECTORS failed", 0
flush_failed:   db "FLUSH CACHE failed", 0
verify_failed:  db "LBA 2 reads back different from what was written", 0

%include "lib/format.inc"
%include "lib/xtf.inc"
