; hello: the smallest PV guest. It starts as a Xen x86_32 PV kernel does, with ESI pointing
; at start_info (0x1000), checks the magic "xen-3.0-x86_32p", prints through the console_io
; hypercall (CONSOLEIO_write: `call` stub 18 of the hypercall page at 0x3000, which does
; `mov eax, 18; int 0x82; ret`) and ends with SCHEDOP_shutdown(SHUTDOWN_poweroff). Each
; hypercall is one HYPERCALL trace record; the run ends with ended_by shutdown_poweroff and
; status 0. It needs no backend. With a wrong magic it shuts down with SHUTDOWN_crash (4).
bits 32
org 0x100000

HYPERCALL_PAGE          equ 0x3000
__HYPERVISOR_console_io equ 18
__HYPERVISOR_sched_op   equ 29
CONSOLEIO_write         equ 0
SCHEDOP_shutdown        equ 2
SHUTDOWN_poweroff       equ 0
SHUTDOWN_crash          equ 3

start:
    cld
    mov edi, magic                  ; start_info.magic is the first field
    mov ecx, magic_end - magic      ; the 15 characters and their NUL
    repe cmpsb
    jne .bad_magic

    mov ebx, CONSOLEIO_write
    mov ecx, message_end - message
    mov edx, message
    call HYPERCALL_PAGE + __HYPERVISOR_console_io * 32
    mov dword [shutdown_reason], SHUTDOWN_poweroff
    jmp .shutdown

.bad_magic:
    mov ebx, CONSOLEIO_write
    mov ecx, bad_end - bad
    mov edx, bad
    call HYPERCALL_PAGE + __HYPERVISOR_console_io * 32
    mov dword [shutdown_reason], SHUTDOWN_crash

.shutdown:
    mov ebx, SCHEDOP_shutdown
    mov ecx, shutdown_reason        ; struct sched_shutdown { unsigned int reason; }
    call HYPERCALL_PAGE + __HYPERVISOR_sched_op * 32
.stop:
    hlt                             ; not reached: the domain is gone
    jmp .stop

magic:   db "xen-3.0-x86_32p", 0
magic_end:
message: db "Hello from a PV guest: start_info says xen-3.0-x86_32p", 10
         db "Test result: SUCCESS", 10
message_end:
bad:     db "start_info magic is not xen-3.0-x86_32p", 10
         db "Test result: FAILURE", 10
bad_end:
shutdown_reason: dd 0
