; disk_hvm: the disk-read and disk-write workloads on the HVM path: WL_IOS requests of WL_SIZE
; bytes at increasing LBAs (request i covers LBAs i * WL_SIZE / 512 on) on the primary ATA
; master (0x1F0-0x1F7, 0x3F6, in the device model), by polled PIO as ATA-6 says. Each request
; is READ SECTORS (0x20) or WRITE SECTORS (0x30) with LBA28 for up to 256 sectors at a time:
; the six task-file writes, then for every 512-byte block a Status read until BSY clears with
; DRQ set, and the block's 256 words moved with `rep insw` / `rep outsw` (WL_STRING 1: one
; IO_INSTRUCTION exit and one ioreq a block, the device model copying the guest buffer) or
; with a loop of `in ax, dx` / `out dx, ax` (WL_STRING 0: 256 exits and ioreqs a block). A
; write ends with one more Status read: BSY clear, no ERR or DF. Interrupts stay off (nIEN).
; Reads: every byte read goes into the workload checksum (workloads/common.inc), reported
; after the phase as "wl: checksum"; writes: each sector holds the disk pattern (its LBA, then
; (j + LBA) & 0xFF), which the runner looks for in the image afterwards. The phase is
; bracketed by the markers (reads of port 0xE9); the report goes to the debug console.
; Protected mode, halts with IF=0 (status 0); a drive error: FAILURE (status 3).
; Parameters (prepended by hvm/workloads.py as %define lines; these are the defaults):
; WL_IOS requests, WL_SIZE bytes a request (a multiple of 512, at most 1 MiB), WL_WRITE
; (0 read, 1 write), WL_STRING (1 `rep insw`/`rep outsw`, 0 one word per instruction).
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 4
%endif
%ifndef WL_SIZE
%define WL_SIZE 4096
%endif
%ifndef WL_WRITE
%define WL_WRITE 0
%endif
%ifndef WL_STRING
%define WL_STRING 1
%endif
%if WL_SIZE < 512 || WL_SIZE % 512 || WL_SIZE > 1048576
%error "WL_SIZE must be a multiple of 512, at most 1 MiB"
%endif

%include "lib/ports.inc"

ATA_DATA        equ IDE_PRIMARY_DATA + 0
ATA_NSECTOR     equ IDE_PRIMARY_DATA + 2
ATA_LBA_LOW     equ IDE_PRIMARY_DATA + 3
ATA_LBA_MID     equ IDE_PRIMARY_DATA + 4
ATA_LBA_HIGH    equ IDE_PRIMARY_DATA + 5
ATA_DEVICE      equ IDE_PRIMARY_DATA + 6
ATA_STATUS      equ IDE_PRIMARY_DATA + 7    ; write: Command
ATA_CONTROL     equ IDE_PRIMARY_CONTROL     ; write: Device Control
ST_BSY          equ 0x80
ST_DF           equ 0x20
ST_DRQ          equ 0x08
ST_ERR          equ 0x01
CTL_NIEN        equ 0x02
DEV_MASTER      equ 0xA0
DEV_LBA_MASTER  equ 0xE0
CMD_READ        equ 0x20
CMD_WRITE       equ 0x30
MAX_SECTORS     equ 256                     ; a sector count of 0 in the register means 256
POLL_LIMIT      equ 0x100000
WORDS           equ WL_SECTOR / 2
IO_SECTORS      equ WL_SIZE / WL_SECTOR
BUFFER          equ 0x200000                ; one request's data

start:
        cli
        cld
        mov dx, ATA_CONTROL
        mov al, CTL_NIEN            ; no INTRQ: this driver polls
        out dx, al
        mov dx, ATA_DEVICE
        mov al, DEV_MASTER
        out dx, al
        call wait_not_busy
        jc wl_fail

        mov ebx, WL_MARK_START
        call wl_marker
        xor ebp, ebp                ; the request's first LBA
.request:
%if WL_WRITE
        mov edi, BUFFER
        mov eax, ebp
        mov ecx, IO_SECTORS
        call wl_fill_sectors
%endif
        mov edi, BUFFER             ; rep insw stores at ES:EDI
        mov esi, BUFFER             ; rep outsw loads from DS:ESI
        mov ebx, ebp                ; the next LBA
        mov ecx, IO_SECTORS         ; sectors still to move
.command:
        mov eax, ecx
        cmp eax, MAX_SECTORS
        jbe .count
        mov eax, MAX_SECTORS
.count:
        push ecx
        mov ecx, eax
        call transfer               ; ECX sectors at LBA EBX
        pop ecx
        jc wl_fail
        sub ecx, eax
        add ebx, eax
        test ecx, ecx
        jnz .command
%if WL_WRITE == 0
        mov esi, BUFFER
        mov ecx, WL_SIZE
        call wl_sum
%endif
        add ebp, IO_SECTORS
        cmp ebp, WL_IOS * IO_SECTORS
        jb .request
        mov ebx, WL_MARK_END
        call wl_marker

        mov esi, key_requests
        mov eax, WL_IOS
        call wl_report
        mov esi, key_checksum
        mov eax, [wl_checksum]
        call wl_report
        jmp wl_success

; transfer: one READ SECTORS / WRITE SECTORS of ECX (1..256) sectors at LBA EBX, data at
; EDI (read) or ESI (write), both advanced past it. CF set (ESI = reason) on a drive error.
transfer:
        push eax
        push ebx
        push ecx
        push edx
        mov dx, ATA_NSECTOR
        mov al, cl                  ; 256 goes as 0
        out dx, al
        mov eax, ebx
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
        mov dx, ATA_STATUS
%if WL_WRITE
        mov al, CMD_WRITE
%else
        mov al, CMD_READ
%endif
        out dx, al
.block:
        call wait_data
        jc .out
        push ecx
        mov ecx, WORDS
        mov dx, ATA_DATA
%if WL_WRITE && WL_STRING
        rep outsw
%elif WL_WRITE
.word:
        lodsw
        out dx, ax
        dec ecx
        jnz .word
%elif WL_STRING
        rep insw
%else
.word:
        in ax, dx
        stosw
        dec ecx
        jnz .word
%endif
        pop ecx
        dec ecx
        jnz .block
%if WL_WRITE
        call wait_not_busy          ; the drive writes the last block, then drops BSY
        jc .out
        test al, ST_ERR | ST_DF | ST_DRQ
        jz .out                     ; CF is clear after TEST
        mov esi, write_failed
        stc
%else
        clc
%endif
.out:
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret

; wait_not_busy: poll Status until BSY clears; AL = the status. CF set (ESI = reason) if the
; drive stays busy.
wait_not_busy:
        push ecx
        push edx
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
        pop edx
        pop ecx
        ret

; wait_data: BSY clear, then DRQ without ERR or DF: the drive has a block for us (or wants
; one). CF set (ESI = reason) otherwise.
wait_data:
        call wait_not_busy
        jc .out
        test al, ST_ERR | ST_DF
        jnz .error
        test al, ST_DRQ
        jnz .out                    ; CF is clear after TEST
        mov esi, no_drq
        stc
        ret
.error:
        mov esi, drive_error
        stc
.out:
        ret

%include "workloads/hvm.inc"

key_requests:   db "requests", 0
key_checksum:   db "checksum", 0
hung:           db "the drive stays busy (BSY never clears)", 0
drive_error:    db "the drive reports ERR or DF", 0
no_drq:         db "the drive has no data block ready (DRQ clear)", 0
write_failed:   db "WRITE SECTORS ended with ERR, DF or DRQ still set", 0
