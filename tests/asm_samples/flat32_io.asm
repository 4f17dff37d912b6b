; flat32_io.asm - a flat 32-bit guest loaded at 1 MiB: the exits hvmlab traces (CPUID, RDTSC,
; VMCALL, IN, OUT, HLT), a loop over a table of dwords, and the console library.
; Shows: bits 32, org 0x100000, [base+index*scale+disp] addressing, dd tables, local labels.
        bits 32
        org 0x100000
%include "lib/ports.inc"
%define ENTRIES ((table_end - table) / 4)

entry:
        mov esp, stack_top
        xor eax, eax
        cpuid                       ; exit 10 CPUID
        rdtsc                       ; exit 16 RDTSC (when RDTSC exiting is on)
        mov eax, 34                 ; hvm_op
        vmcall                      ; exit 18 VMCALL
        in al, CMOS_DATA            ; an IN the device model answers
        xor ebx, ebx
        xor ecx, ecx
.sum:
        add ebx, [table + ecx*4]
        inc ecx
        cmp ecx, ENTRIES
        jb .sum
        cmp ebx, 1 + 2 + 3 + 0x100
        jne .fail
        mov esi, ok_text
        call puts
        mov al, 0
        jmp short .exit
.fail:
        mov esi, fail_text
        call puts
        mov al, 1
.exit:
        out EXIT_PORT, al
        cli
        hlt

%include "lib/console.inc"

        align 4
table:      dd 1, 2, 3, 0x100
table_end:
ok_text:    db "Test result: SUCCESS", 10, 0
fail_text:  db "Test result: FAILURE", 10, 0
        align 16
stack:      times 256 db 0
stack_top:
