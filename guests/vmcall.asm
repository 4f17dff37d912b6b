; vmcall: an HVM guest calls the hypervisor with VMCALL (exit 18), Xen's way: EAX = the
; hypercall number, arguments in EBX, ECX, EDX. It asks xen_version (17) for the version,
; writes a line with console_io (18, CONSOLEIO_write), and checks an unknown hypercall
; returns -ENOSYS (-38).
bits 32
org 0x100000

start:
    cli
    mov eax, 17             ; __HYPERVISOR_xen_version
    xor ebx, ebx            ; XENVER_version
    vmcall
    mov [version], eax
    mov eax, 18             ; __HYPERVISOR_console_io
    mov ebx, 0              ; CONSOLEIO_write
    mov ecx, line_end - line
    mov edx, line
    vmcall
    test eax, eax
    jnz fail
    mov eax, 99             ; no such hypercall
    vmcall
    cmp eax, -38            ; -ENOSYS
    jne fail
    cmp dword [version], 0x40000
    jb fail
    mov edx, result
    mov ecx, result_end - result
    mov eax, 18
    mov ebx, 0
    vmcall
    hlt
fail:
    mov al, 1
    out 0xf4, al
    hlt

version:    dd 0
line:       db "hello through console_io", 10
line_end:
result:     db "Test result: SUCCESS", 10
result_end:
