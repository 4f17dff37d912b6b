; rdtsc: reads the time-stamp counter twice. Run with --rdtsc-exiting and each RDTSC is an
; exit (reason 16) answered from the virtual TSC; the guest checks that time went forward
; and reports like XTF. Without the control, RDTSC runs in the guest without exiting.
bits 32
org 0x100000

start:
    cli
    rdtsc
    mov ebx, eax
    mov edi, edx
    mov ecx, 1000
.spin:
    loop .spin
    rdtsc
    cmp edx, edi
    jb .fail
    ja .ok
    cmp eax, ebx
    jbe .fail
.ok:
    mov esi, success
    jmp print
.fail:
    mov esi, failure
print:
    mov dx, 0xe9
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    hlt

success: db "tsc went forward", 10, "Test result: SUCCESS", 10, 0
failure: db "tsc did not advance", 10, "Test result: FAILURE", 10, 0
