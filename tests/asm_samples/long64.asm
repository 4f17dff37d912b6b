; long64.asm - a 64-bit guest (hvmlab starts it in long mode, identity-mapped, at 1 MiB):
; RIP-relative data, 64-bit immediates, a qword table walked with scaled indexes.
; Shows: bits 64, default rel, [rel x], mov r64 with addresses and numbers, dq, align.
        bits 64
        org 0x100000
        default rel
%include "lib/ports.inc"
MAGIC equ 0x1122334455667788

start:
        lea rsp, [stack_top]
        mov rax, MAGIC
        mov rbx, [magic_copy]        ; RIP-relative under `default rel`
        cmp rax, rbx
        jne fail
        mov rsi, values              ; an address: imm64 form, as NASM encodes it
        xor ecx, ecx
        xor edx, edx
.add:
        add rdx, [rsi + rcx*8]
        inc rcx
        cmp rcx, (values_end - values) / 8
        jb .add
        cmp rdx, 60
        jne fail
        lea rsi, [rel ok_text]
        call puts
        xor eax, eax
        out EXIT_PORT, al
        cli
        hlt
fail:
        lea rsi, [rel fail_text]
        call puts
        mov al, 1
        out EXIT_PORT, al
        cli
        hlt

%include "lib/console.inc"

        align 8
magic_copy: dq MAGIC
values:     dq 10, 20, 30
values_end:
ok_text:    db "long mode: Test result: SUCCESS", 10, 0
fail_text:  db "long mode: Test result: FAILURE", 10, 0
        align 16
            times 64 dq 0
stack_top:
