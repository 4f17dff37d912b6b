; console_hvm: the console workload on the HVM path: WL_IOS lines of WL_SIZE bytes out of the
; 16550 UART at COM1 (0x3F8, in the device model), the way a polled serial driver sends them.
; Before the phase the UART is set to 115200 8N1 with its FIFOs on and no interrupts. In the
; phase each line (workloads/common.inc: its number in hex, ':', letters, a line feed) is
; built in memory and sent in chunks of up to 16 bytes (the transmit FIFO): one read of the
; Line Status Register until THRE says the FIFO is empty, then one `out` to THR per byte;
; every access is an IO_INSTRUCTION exit and an ioreq. The runner compares the UART's output
; with the lines it expects. The phase is bracketed by the markers (reads of port 0xE9); "wl:
; lines N" is reported on the debug console after it. Protected mode, halts with IF=0 (status
; 0).
; Parameters (prepended by hvm/workloads.py as %define lines; these are the defaults):
; WL_IOS lines, WL_SIZE bytes a line (10..4096).
bits 32
org 0x100000

%ifndef WL_IOS
%define WL_IOS 4
%endif
%ifndef WL_SIZE
%define WL_SIZE 64
%endif
%if WL_SIZE < 10 || WL_SIZE > 4096
%error "WL_SIZE (bytes a line) must be 10..4096"
%endif

%include "lib/ports.inc"

UART_THR        equ COM1_PORT + 0
UART_DLL        equ COM1_PORT + 0   ; with LCR.DLAB
UART_IER        equ COM1_PORT + 1
UART_DLM        equ COM1_PORT + 1   ; with LCR.DLAB
UART_FCR        equ COM1_PORT + 2
UART_LCR        equ COM1_PORT + 3
UART_MCR        equ COM1_PORT + 4
UART_LSR        equ COM1_PORT + 5
LCR_DLAB        equ 0x80
LCR_8N1         equ 0x03
FCR_FIFO_ON     equ 0x07            ; enable, clear both FIFOs
MCR_DTR_RTS     equ 0x03
LSR_THRE        equ 0x20
TX_FIFO         equ 16
THRE_POLLS      equ 0x100000        ; LSR reads before the transmitter is declared stuck
LINE_BUF        equ 0x200000

start:
        cli
        cld
        mov dx, UART_IER
        xor al, al                  ; no interrupts: this driver polls
        out dx, al
        mov dx, UART_LCR
        mov al, LCR_DLAB
        out dx, al
        mov dx, UART_DLL
        mov al, 1                   ; divisor 1: 115200 baud
        out dx, al
        mov dx, UART_DLM
        xor al, al
        out dx, al
        mov dx, UART_LCR
        mov al, LCR_8N1
        out dx, al
        mov dx, UART_FCR
        mov al, FCR_FIFO_ON
        out dx, al
        mov dx, UART_MCR
        mov al, MCR_DTR_RTS
        out dx, al

        mov ebx, WL_MARK_START
        call wl_marker
        mov ebp, 1                  ; the line number
.line:
        mov eax, ebp
        mov edi, LINE_BUF
        mov ecx, WL_SIZE
        call wl_make_line
        mov esi, LINE_BUF
        mov ecx, WL_SIZE
.chunk:
        mov dx, UART_LSR
        mov ebx, THRE_POLLS
.thre:
        in al, dx
        test al, LSR_THRE
        jnz .empty
        dec ebx
        jnz .thre
        mov esi, stuck
        jmp wl_fail
.empty:
        mov dx, UART_THR
        mov ebx, TX_FIFO
.byte:
        lodsb
        out dx, al
        dec ecx
        jz .sent
        dec ebx
        jnz .byte
        jmp .chunk
.sent:
        inc ebp
        cmp ebp, WL_IOS
        jbe .line
        mov ebx, WL_MARK_END
        call wl_marker

        mov esi, key_lines
        mov eax, ebp
        dec eax
        call wl_report
        jmp wl_success

%include "workloads/hvm.inc"

key_lines:      db "lines", 0
stuck:          db "the UART never reports THRE: its transmitter is stuck", 0
