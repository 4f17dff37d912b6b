"""Guest faults as VM exits: #DE, #GP, #PF and #UD, reflected through the IVT/IDT or fatal; INT n."""

from __future__ import annotations

from hvm import vmcs as V


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_divide_error_in_real_mode_without_handler_is_a_crash(tmp_path, run_guest):
    src = write(tmp_path, "de.asm", "bits 16\norg 0x7c00\n cli\n xor bx, bx\n mov ax, 1\n div bx\n hlt\n")
    result, records = run_guest(src, dump_vmcs=0)
    assert [r["reason"] for r in records] == ["EXCEPTION_NMI"]
    fields = {f.name: f.value for f in result.vmcs_dump["vmcs"]}
    assert fields["VM_EXIT_INTR_INFO"] == V.intr_info(0, V.INTR_TYPE_HARD_EXCEPTION)
    assert records[0]["rip"] == 0x7C00 + 1 + 2 + 3  # the faulting DIV, not the next instruction
    assert (result.ended_by, result.exit_status) == ("fault", 4)


def test_divide_error_with_an_ivt_handler_is_delivered(tmp_path, run_guest):
    src = write(tmp_path, "de_ivt.asm", """bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    mov word [0 * 4], handler
    mov word [0 * 4 + 2], 0
    xor bx, bx
    mov ax, 1
    div bx
back:
    mov al, 'B'
    out 0xe9, al
    hlt
handler:
    mov al, 'H'
    out 0xe9, al
    mov bp, sp
    mov word [bp], back       ; return to `back` instead of re-running the DIV
    iret
""")
    result, records = run_guest(src)
    assert result.console == "HB"
    assert result.exits["EXCEPTION_NMI"] == 1 and result.interrupts_injected == 1
    assert result.exit_status == 0


def test_general_protection_fault_is_vector_13_with_error_code(tmp_path, run_guest):
    src = write(tmp_path, "gp.asm", "bits 32\norg 0x100000\n cli\n mov ax, 0x1234\n mov ds, ax\n hlt\n")
    result, records = run_guest(src, dump_vmcs=0)
    fields = {f.name: f.value for f in result.vmcs_dump["vmcs"]}
    assert fields["VM_EXIT_INTR_INFO"] == V.intr_info(13, V.INTR_TYPE_HARD_EXCEPTION, error_code=True)
    assert [r["reason"] for r in records] == ["EXCEPTION_NMI", "TRIPLE_FAULT"]
    assert result.ended_by == "triple_fault"


def test_page_fault_qualification_is_the_linear_address(tmp_path, run_guest):
    src = write(tmp_path, "pf.asm", "bits 64\norg 0x100000\n cli\n mov rbx, 0x100000000\n mov rax, [rbx]\n hlt\n")
    result, records = run_guest(src)
    assert records[0]["reason"] == "EXCEPTION_NMI"
    assert records[0]["qualification"] == 0x1_0000_0000
    assert result.exit_status == 4


def test_int_n_is_not_an_exit_but_is_delivered(tmp_path, run_guest):
    src = write(tmp_path, "int.asm", """bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    mov word [0x30 * 4], handler
    mov word [0x30 * 4 + 2], 0
    int 0x30
    mov al, 'R'
    out 0xe9, al
    hlt
handler:
    mov al, 'I'
    out 0xe9, al
    iret
""")
    result, _ = run_guest(src)
    assert result.console == "IR"
    assert "EXCEPTION_NMI" not in result.exits and result.interrupts_injected == 0
