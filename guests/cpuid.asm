; cpuid: asks CPUID leaf 0x40000000, the hypervisor leaf (a CPUID exit), and prints the
; 12-byte signature from EBX, ECX, EDX ("XenVMMXenVMM": hvmlab speaks Xen's ABI) and the
; vendor string of leaf 0. Every CPUID is an exit (reason 10) with instruction length 2.
bits 32
org 0x100000

start:
    cli
    mov eax, 0x40000000
    cpuid
    mov [signature], ebx
    mov [signature + 4], ecx
    mov [signature + 8], edx
    mov esi, prefix
    call puts
    mov esi, signature
    call puts
    xor eax, eax
    cpuid
    mov [vendor], ebx
    mov [vendor + 4], edx
    mov [vendor + 8], ecx
    mov esi, vendor_prefix
    call puts
    mov esi, vendor
    call puts
    mov esi, result
    call puts
    hlt

; puts: print the NUL-terminated string at ESI to the debug console.
puts:
    mov dx, 0xe9
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    ret

prefix:        db "hypervisor: ", 0
signature:     db "????????????", 10, 0
vendor_prefix: db "cpu vendor: ", 0
vendor:        db "????????????", 10, 0
result:        db "Test result: SUCCESS", 10, 0
