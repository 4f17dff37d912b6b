"""The NASM-syntax front end: bytes checked by hand, against nasm when installed, errors, bounds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hvm.keystone_worker import KeystoneTimeout, KeystoneWorker
from hvm.nasm import AsmError, assemble_file, assemble_text
from hvm.nasm_expr import ExprError, Value, evaluate, parse_number, tokenize

NASM = shutil.which("nasm")
needs_nasm = pytest.mark.skipif(NASM is None, reason="nasm is not installed (apt-get install nasm)")
REPO = Path(__file__).resolve().parents[1]


def code(text: str) -> bytes:
    return assemble_text(text, "t.asm").code


def nasm_bin(text: str, tmp_path: Path, name: str = "oracle") -> bytes:
    """What `nasm -f bin` makes of the text (the test is skipped without nasm)."""
    if NASM is None:
        pytest.skip("nasm is not installed (apt-get install nasm)")
    src = tmp_path / f"{name}.asm"
    out = tmp_path / f"{name}.bin"
    src.write_text(text)
    done = subprocess.run([NASM, "-f", "bin", "-o", str(out), str(src), "-i", f"{REPO / 'guests'}/"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child that was reaped is gone; a zombie would still answer kill(0).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


# ----------------------------------------------------------------------------------------------
# Hand-checked bytes (SDM Vol. 2 opcode tables); these run without nasm.

@pytest.mark.parametrize("bits,line,expected", [
    (16, "mov ax, 0x1234", "b8 34 12"),
    (16, "mov ax, 10", "b8 0a 00"),             # keystone alone reads "10" as 0x10
    (16, "mov al, 'A'", "b0 41"),
    (16, "out dx, al", "ee"),
    (16, "out 0xF4, al", "e6 f4"),
    (16, "in al, dx", "ec"),
    (16, "rep outsb", "f3 6e"),
    (16, "cpuid", "0f a2"),
    (16, "rdtsc", "0f 31"),
    (16, "vmcall", "0f 01 c1"),
    (16, "hlt", "f4"),
    (16, "cli", "fa"),
    (16, "ud2", "0f 0b"),
    (16, "iret", "cf"),
    (16, "iretd", "66 cf"),
    (16, "ret", "c3"),                           # keystone alone adds 0x66
    (16, "push 5", "6a 05"),                     # keystone alone: 66 6a 05
    (16, "push 0x1234", "68 34 12"),
    (16, "lgdt [0x1234]", "0f 01 16 34 12"),
    (16, "mov al, [es:di]", "26 8a 05"),
    (16, "jmp 0x08:0x1000", "ea 00 10 08 00"),
    (16, "jmp dword 0x08:0x100000", "66 ea 00 00 10 00 08 00"),
    (16, "xchg al, bl", "86 c3"),                # NASM puts the first operand in ModRM.reg
    (32, "iret", "cf"),
    (32, "pushf", "9c"),
    (32, "lgdt [0x1234]", "0f 01 15 34 12 00 00"),
    (32, "mov ds, ax", "8e d8"),
    (32, "rep movsd", "f3 a5"),
    (32, "jmp 0x08:0x100000", "ea 00 00 10 00 08 00"),
    (32, "add eax, 0x80", "05 80 00 00 00"),
    (32, "add eax, -128", "83 c0 80"),
    (64, "mov rax, 5", "b8 05 00 00 00"),        # NASM -Ox: mov r32, imm32
    (64, "mov rax, -1", "48 c7 c0 ff ff ff ff"),
    (64, "mov eax, [0x1234]", "8b 04 25 34 12 00 00"),   # SIB disp32, not RIP-relative
    (64, "out 0xE9, al", "e6 e9"),
    (64, "iretq", "48 cf"),
    (64, "push 5", "6a 05"),
])
def test_instruction_bytes_checked_by_hand(bits: int, line: str, expected: str) -> None:
    assert code(f"bits {bits}\n{line}\n") == bytes.fromhex(expected)


def test_boot_sector_padding_and_signature() -> None:
    asm = assemble_text("bits 16\norg 0x7c00\nstart: jmp short start\nmsg: db 'hi', 0\n"
                        "times 510-($-$$) db 0\ndw 0xAA55\n", "boot.asm")
    assert len(asm.code) == 512
    assert asm.code[:5] == b"\xeb\xfehi\x00"
    assert asm.code[5:510] == bytes(505)
    assert asm.code[510:] == b"\x55\xaa"
    assert (asm.bits, asm.bits_explicit, asm.org) == (16, True, 0x7C00)
    assert asm.symbols == {"start": 0x7C00, "msg": 0x7C02}


def test_defaults_without_bits_or_org() -> None:
    asm = assemble_text("nop\n")
    assert (asm.code, asm.bits, asm.bits_explicit, asm.org) == (b"\x90", 16, False, None)
    assert assemble_text("[bits 32]\nbits 64\nnop\n").bits == 32   # the first one counts


def test_data_directives_strings_and_escapes() -> None:
    text = ("db 'ab', \"c'\", `x\\n\\t\\x41\\0\\\\`, 1, -1, 'A'+1\n"
            "dw 'abc', 0x1234\n"
            "dd 'ab', 0xdeadbeef\n"
            "dq 1\n")
    assert code(text) == (b"abc'x\n\tA\x00\\\x01\xff\x42" + b"abc\x00\x34\x12"
                          + b"ab\x00\x00\xef\xbe\xad\xde" + (1).to_bytes(8, "little"))


def test_comments_continuations_and_incbin(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(bytes(range(10)))
    (tmp_path / "main.asm").write_text("db ';', \"x;y\" ; a comment\n"
                                       "db 1, \\\n   2\n"
                                       "incbin \"blob.bin\", 2, 3\n")
    assert assemble_file(tmp_path / "main.asm").code == b";x;y\x01\x02\x02\x03\x04"


def test_times_with_data_and_instructions_dollar_is_the_line_start() -> None:
    # NASM evaluates $ once for the whole TIMES line: every copy of "jmp $" jumps to its start.
    assert code("times 3 db 7\ntimes 2 jmp $\ntimes 2 dw $\n") == \
        bytes.fromhex("070707 ebfe ebfc 0700 0700")


def test_equ_define_assign_and_conditionals() -> None:
    text = """
%define COUNT 3
%define ADD(a, b) ((a) + (b))
%assign DOUBLE COUNT * 2
%ifdef COUNT
WIDTH equ ADD(COUNT, 1)
%else
WIDTH equ 99
%endif
%ifndef MISSING
    db COUNT, DOUBLE, WIDTH, ADD(WIDTH, 10)
%endif
%if DOUBLE > 5
    db 0xAA
%elif 1
    db 0xBB
%endif
"""
    assert code(text) == bytes([3, 6, 4, 14, 0xAA])


def test_align_pads_with_nop_or_the_given_fill_relative_to_section_start() -> None:
    assert code("db 1\nalign 4\ndb 2\nalign 8, db 0\ndb 3\n") == \
        bytes([1, 0x90, 0x90, 0x90, 2, 0, 0, 0, 3])
    # An org that is not aligned: NASM moves the section start up and zero-fills the gap.
    asm = assemble_text("org 0x7c01\ndb 1\nalign 2\nx: dw x\n")
    assert asm.code == bytes.fromhex("00 01 90 04 7c")
    assert asm.symbols["x"] == 0x7C04


def test_local_labels_belong_to_the_previous_label() -> None:
    asm = assemble_text("a:\n.x: nop\nb:\n.x: nop\n  jmp a.x\nc: equ 5\n.y: dw .x\n")
    assert asm.symbols == {"a": 0, "a.x": 0, "b": 1, "b.x": 1, "b.y": 4}
    assert asm.code[2:4] == b"\xeb\xfc" and asm.code[4:] == b"\x01\x00"


def test_bare_labels_and_orphan_label_as_nasm() -> None:
    asm = assemble_text("msg db 'x'\nthere\nhlt\ndw there, msg\n")
    assert asm.code == b"x\xf4\x01\x00\x00\x00"
    assert asm.symbols == {"msg": 0, "there": 1}


def test_jumps_short_when_in_range_near_otherwise() -> None:
    assert code("x: jmp y\ny: jz x\n") == bytes.fromhex("eb00 74fc")
    far = code("jmp z\ntimes 200 nop\nz: jz start\nstart:")
    assert far[:3] == bytes.fromhex("e9 c8 00")          # 200 bytes ahead: near
    assert far[-2:] == bytes.fromhex("7400")
    assert code("jmp near z\nz:") == bytes.fromhex("e9 00 00")
    assert code("call z\nz:") == bytes.fromhex("e8 00 00")
    assert code("org 0x7c00\njmp 0x7c00\n") == bytes.fromhex("e9 fd ff")  # a number: near


# Jump relaxation. NASM starts each pass from scratch with the previous pass's label values
# (section-relative: `org` only moves the output), takes a jump to a label it does not know
# yet as short, gives a displacement it does not know yet the full width, and stops when no
# label moves. Where two layouts are both self-consistent it keeps the one its passes reach.

def boundary_source(bits: int, org: int | None, mnem: str, backward: bool, beyond: int) -> str:
    """A jump whose short form would land exactly at +127 / -128, or one byte beyond."""
    head = f"bits {bits}\n" + (f"org {org:#x}\n" if org is not None else "")
    if backward:
        return head + f"target: times {126 + beyond} nop\n{mnem} target\n"
    return head + f"{mnem} target\ntimes {127 + beyond} nop\ntarget: hlt\n"


def boundary_bytes(bits: int, mnem: str, backward: bool, beyond: int) -> bytes:
    """What the SDM encodings give: 74/EB rel8, else 0F 84 / E9 with rel16 (16-bit) or rel32."""
    width = 2 if bits == 16 else 4
    short_op, near_op = (b"\x74", b"\x0f\x84") if mnem == "jz" else (b"\xeb", b"\xe9")
    nops = (126 if backward else 127) + beyond
    if backward:
        rel = -(nops + 2)                  # from the end of the 2-byte short form
        insn = short_op + (rel & 0xFF).to_bytes(1, "little") if not beyond else \
            near_op + (-(nops + len(near_op) + width)).to_bytes(width, "little", signed=True)
        return b"\x90" * nops + insn
    insn = short_op + bytes([nops]) if not beyond else \
        near_op + nops.to_bytes(width, "little")
    return insn + b"\x90" * nops + b"\xf4"


BOUNDARY_CASES = [(bits, org, mnem, backward, beyond)
                  for bits, orgs in ((16, (None, 0x7C00)), (32, (None, 0x100000)),
                                     (64, (None, 0x100000)))
                  for org in orgs for mnem in ("jz", "jmp") for backward in (False, True)
                  for beyond in (0, 1)]


def boundary_id(case: tuple) -> str:
    bits, org, mnem, backward, beyond = case
    where = ("-128" if backward else "+127") + (" and one beyond" if beyond else "")
    return f"{bits}-{'org' if org is not None else 'no_org'}-{mnem}-{where}"


@pytest.mark.parametrize("case", BOUNDARY_CASES, ids=boundary_id)
def test_jump_at_the_rel8_boundary_checked_by_hand(case: tuple) -> None:
    bits, org, mnem, backward, beyond = case
    source = boundary_source(bits, org, mnem, backward, beyond)
    assert code(source) == boundary_bytes(bits, mnem, backward, beyond)


REPRODUCER = """bits 32
org 0x100000
start: jc fail
       mov [edi + LATER], eax
       times 121 nop
fail:  ret
LATER equ 4
"""


def test_jump_over_a_forward_equ_is_short_when_org_is_set() -> None:
    # fail is 124 bytes past the end of a short jc. Pass 1 used to lay out from 0 and pass 2
    # then measured from 0x100000 to those stale values, so the jc went near and stayed near.
    asm = assemble_text(REPRODUCER, "repro.asm")
    assert asm.code == REPRODUCER_BYTES
    assert asm.symbols == {"start": 0x100000, "fail": 0x100000 + 126}


REPRODUCER_BYTES = bytes.fromhex("72 7c 89 47 04") + b"\x90" * 121 + b"\xc3"

# Origins for the reproducer, and the zero bytes nasm puts before the code: `align 4` after
# an unaligned org moves the section start up, so pass 2 lays out from another address.
ORIGINS = [("", 0), ("org 0\n", 0), ("org 0x7c01\n", 0), ("org 0x100000\n", 0),
           ("org 0x7c01\nalign 4\n", 3)]


@pytest.mark.parametrize("org,lead", ORIGINS)
def test_org_does_not_change_which_jumps_are_short(org: str, lead: int) -> None:
    # Relative jumps do not depend on where the code is loaded: same bytes at every origin.
    assert code(REPRODUCER.replace("org 0x100000\n", org)) == bytes(lead) + REPRODUCER_BYTES


@pytest.mark.parametrize("position,nops,expected_jc", [
    ("before", 122, "72 7d"),
    ("before", 124, "72 7f"),            # fail lands exactly at +127
    ("before", 125, "0f 82 80 00 00 00"),
    ("after", 121, "72 7c"),
    # LATER unknown in pass 1: the mov gets a disp32 (6 bytes), fail is 128 bytes past a
    # short jc, so pass 2 makes it near; the mov then shrinks to 3 bytes, but with a near
    # jc fail is still out of short range, and NASM keeps that layout (nasm 2.16 does this).
    ("after", 122, "0f 82 7d 00 00 00"),
])
def test_jump_over_an_equ_defined_before_or_after_use(position: str, nops: int,
                                                       expected_jc: str) -> None:
    equ = "LATER equ 4\n"
    source = ("bits 32\norg 0x100000\n" + (equ if position == "before" else "")
              + f"jc fail\nmov [edi + LATER], eax\ntimes {nops} nop\nfail: ret\n"
              + (equ if position == "after" else ""))
    assert code(source) == bytes.fromhex(expected_jc + " 89 47 04") + b"\x90" * nops + b"\xc3"


def test_addresses_never_take_the_sign_extended_byte_forms() -> None:
    # NASM keeps imm8/disp8 for plain numbers; a label's address gets the full field.
    assert code("push lbl\npush 3\nlbl:") == bytes.fromhex("68 05 00 6a 03")
    assert code("add ax, lbl\nmov ax, [bx+lbl]\nlbl:") == bytes.fromhex("05 07 00 8b 87 07 00")
    assert code("add ax, lbl-$$\nlbl:") == bytes.fromhex("83 c0 03")


def test_expressions_and_character_constants() -> None:
    text = ("db 1+2*3, (1+2)*3, 7/2, 7 % 3, -7//2, 1<<3, 0x80>>3, 0xF0&0x3C, 0xF0|0x0F, "
            "0xF0^0xFF, ~0 & 0xFF, 5 > 3, 3 == 4, 'a' | 0x20\n"
            "dw 'ab', 101b, 17q, 0o17, 1Fh, $1F, 0b11, 1_000\n")
    assert code(text) == bytes([7, 9, 3, 1, 0xFD, 8, 0x10, 0x30, 0xFF, 0x0F, 0xFF, 1, 0, 0x61]) \
        + b"".join(v.to_bytes(2, "little") for v in (0x6261, 5, 15, 15, 31, 31, 3, 1000))


@pytest.mark.parametrize("text,value", [
    ("0x1F", 31), ("1Fh", 31), ("$1F", 31), ("0h1f", 31), ("17q", 15), ("17o", 15),
    ("0q17", 15), ("101b", 5), ("0b101", 5), ("0y101", 5), ("99d", 99), ("0d99", 99),
    ("1_000", 1000),
])
def test_number_formats(text: str, value: int) -> None:
    assert parse_number(text) == value


def test_evaluator_tracks_addresses_and_registers() -> None:
    def symbol(name: str) -> Value:
        return Value(0x7C10, 1)
    assert evaluate(tokenize("lbl - $$"), symbol, base=Value(0x7C00, 1)) == Value(0x10)
    v = evaluate(tokenize("bx + si*2 + lbl"), symbol, registers=frozenset({"bx", "si"}))
    assert v.regs == (("bx", 1), ("si", 2)) and v.n == 0x7C10 and v.reloc == 1
    with pytest.raises(ExprError, match="shift operator"):
        evaluate(tokenize("lbl >> 1"), symbol)


def test_far_jumps_and_mode_switch_in_one_file() -> None:
    asm = assemble_text("bits 16\norg 0x7c00\njmp dword 0x08:pm\nbits 32\npm: mov eax, 1\n")
    assert asm.code == bytes.fromhex("66 ea 08 7c 00 00 08 00 b8 01 00 00 00")
    assert asm.lines == {0x7C00: ("<text>", 3), 0x7C08: ("<text>", 5)}


def test_rip_relative_and_default_rel() -> None:
    asm = code("bits 64\nlea rsi, [rel msg]\ndefault rel\nmov al, [msg]\nmov al, [abs msg]\n"
               "msg: db 0\n")
    assert asm == bytes.fromhex("48 8d 35 0d 00 00 00" "8a 05 07 00 00 00" "8a 04 25 14 00 00 00"
                                "00")


def test_64_bit_address_immediates_use_imm64_like_nasm() -> None:
    asm = code("bits 64\norg 0x100000\nmov rsi, msg\nmov rsi, msg - $$\nmsg:")
    assert asm == bytes.fromhex("48 be 0f 00 10 00 00 00 00 00" "be 0f 00 00 00")


def test_segment_overrides_and_prefix_order_as_nasm() -> None:
    assert code("mov eax, [es:edi+4]\n") == bytes.fromhex("26 66 67 8b 47 04")
    assert code("lock add [es:bx], ax\nrep es movsb\n") == bytes.fromhex("f0 26 01 07 f3 26 a4")


# ----------------------------------------------------------------------------------------------
# Errors: file and line, no traceback, status 2

@pytest.mark.parametrize("text,line,message", [
    ("nop\nfoo ax, 1\n", 2, "unknown directive 'foo'"),
    ("nop\n%foo\n", 2, "unknown directive '%foo'"),
    ("bits 16\n\njmp nowhere\n", 3, "undefined symbol 'nowhere'"),
    ("mov ax, (1+\n", 1, "expression expected"),
    ("db 'abc\n", 1, "unterminated string"),
    ("bits 15\n", 1, "'bits' takes 16, 32 or 64"),
    ("x: nop\nx: nop\n", 2, "symbol 'x' redefined"),
    ("x: jmp short y\ntimes 200 nop\ny: ret\n", 1, "short jump is out of range"),
    ("times -1 db 0\n", 1, "TIMES value -1 is negative"),
    ("bits 64\npusha\n", 2, "'pusha' is not valid in 64-bit mode"),
    ("nop\nmov ax, [al]\n", 2, "register 'al' cannot be used in a memory address"),
    ("mov eax, [ax]\n", 1, "invalid 16-bit effective address"),
    ("nop\nmov cr0, 5\n", 2, "invalid instruction 'mov cr0, 5'"),     # keystone rejects it
    ("a equ b\nb equ a\ndb a\n", 1, "cannot be resolved"),
    ("dw x >> 1\nx:\n", 1, "shift operator may only be applied to scalar values"),
    ("section .data\n", 1, "section '.data' is not supported"),
])
def test_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(AsmError) as info:
        assemble_text(text, "hello.asm")
    e = info.value
    assert (e.file, e.line) == ("hello.asm", line)
    assert message in e.message
    assert str(e) == f"hello.asm:{line}: {e.message}"


def test_error_inside_include_names_the_include(tmp_path: Path) -> None:
    (tmp_path / "lib.inc").write_text("db 1\n\nbad line here\n")
    (tmp_path / "main.asm").write_text("nop\n%include \"lib.inc\"\n")
    with pytest.raises(AsmError, match=r"^lib\.inc:3: unknown directive 'bad'$"):
        assemble_file(tmp_path / "main.asm")


def test_missing_include_is_reported_at_the_include_line(tmp_path: Path) -> None:
    (tmp_path / "main.asm").write_text("nop\n\n%include \"nothere.inc\"\n")
    with pytest.raises(AsmError, match=r"^main\.asm:3: include file 'nothere.inc' not found$"):
        assemble_file(tmp_path / "main.asm")


def test_command_line_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "hello.asm").write_text("bits 16\n" + "nop\n" * 10 + "foo bar\n")
    done = subprocess.run([sys.executable, "-m", "hvm.nasm", str(tmp_path / "hello.asm")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr == "hello.asm:12: unknown directive 'foo'\n"
    (tmp_path / "ok.asm").write_text("bits 16\nhlt\n")
    done = subprocess.run([sys.executable, "-m", "hvm.nasm", str(tmp_path / "ok.asm"), "-o",
                           str(tmp_path / "ok.bin")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and (tmp_path / "ok.bin").read_bytes() == b"\xf4"


# ----------------------------------------------------------------------------------------------
# %include search order

def test_include_search_order(tmp_path: Path) -> None:
    here, extra = tmp_path / "src", tmp_path / "extra"
    here.mkdir()
    extra.mkdir()
    (here / "a.inc").write_text("db 'H'\n")
    (extra / "a.inc").write_text("db 'X'\n")
    (extra / "b.inc").write_text("db 'E'\n")
    (here / "main.asm").write_text('%include "a.inc"\n%include "b.inc"\n%include "lib/ports.inc"\n'
                                   "db EXIT_PORT, CONSOLE_PORT\n")
    asm = assemble_file(here / "main.asm", include_dirs=[extra])
    assert asm.code == b"HE\xf4\xe9"   # own directory first, then include_dirs, then guests/


# ----------------------------------------------------------------------------------------------
# Keystone is bounded in time

def test_define_never_reaches_keystone() -> None:
    # Keystone 0.9.2 spins forever on "%define": the preprocessor handles it.
    assert code("%define X 0x41\n%define Y(a) a+1\ndb X, Y(X)\n") == b"AB"


def test_a_hanging_keystone_call_is_bounded_and_the_child_killed() -> None:
    worker = KeystoneWorker(timeout=0.5)
    try:
        assert worker.assemble(16, ["nop"])[0].data == b"\x90"
        pid = worker.pid
        assert pid is not None
        with pytest.raises(KeystoneTimeout, match="keystone did not answer within 0.5 s") as info:
            worker.assemble(16, ["hlt", "%define X 1"])   # really hangs keystone
        assert info.value.index == 1
        assert not alive(pid)
        assert worker.assemble(16, ["cli"])[0].data == b"\xfa"   # a fresh child takes over
    finally:
        worker.close()


def test_front_end_reports_a_silent_worker_at_the_source_line() -> None:
    hang = KeystoneWorker(timeout=0.3, argv=[sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(AsmError) as info:
            assemble_text("nop\nmov ax, bx\n", "slow.asm", worker=hang)
        assert str(info.value) == "slow.asm:2: keystone did not answer within 0.3 s"
        assert hang.proc is None   # killed and reaped
    finally:
        hang.close()


def test_a_worker_that_cannot_start_keystone_is_an_error_at_the_line() -> None:
    broken = KeystoneWorker(argv=[sys.executable, "-c", "raise SystemExit('no keystone here')"])
    try:
        with pytest.raises(AsmError, match=r"^t\.asm:2: keystone worker exited without "
                                           r"answering: no keystone here$"):
            assemble_text("nop\nmov ax, bx\n", "t.asm", worker=broken)
    finally:
        broken.close()


def test_one_keystone_batch_per_pass() -> None:
    worker = KeystoneWorker()
    try:
        lines = "".join(f"mov ax, {i}\nadd bx, ax\n" for i in range(50))
        assemble_text("bits 16\n" + lines + "jmp start\nstart:\n", worker=worker)
        assert worker.round_trips <= 2
    finally:
        worker.close()


# ----------------------------------------------------------------------------------------------
# Against nasm itself (skipped without nasm)

CORPUS = {
    16: """mov ax, bx|mov ax, 5|mov al, 500|mov ax, 65535|mov ax, -500|add ax, 5|add ax, 0x100
add ax, lbl|add bx, lbl|add ax, small|push lbl|push small|push 0x1234|push word 5|push dword 5
push dword lbl|push byte 5|push fs|pop gs|push es|pop ds|ret|ret 4|retf|retf 2|retn|iret|iretd
mov ax, [bx+lbl]|mov ax, [bx+small]|mov ax, [lbl]|mov al, [es:di]|mov ax, [es:0x10]
mov ax, [cs:bx+4]|mov eax, [es:edi+4]|mov eax, [edi+4]|mov eax, [esi+ecx*4]|mov eax, [eax*2]
rep movsb|rep movsd|movsd|rep stosw|es lodsb|lock inc word [bx]|xchg al, bl|xchg cx, dx
xchg ax, bx|xchg [bx], al|mov ds, ax|mov ds, eax|mov eax, ds|mov ax, ds|mov [0x10], ds
lgdt [lbl]|lidt [bx]|jmp lbl|jmp short lbl|jmp near lbl|jmp 0x7c00|jz lbl|jnz near lbl|call lbl
loop lbl|jcxz lbl|jecxz lbl|jmp 0x0:lbl|jmp 0x08:0x1000|jmp dword 0x08:0x100000|call 0x0:lbl
jmp far [bx]|call far [bx]|jmp far dword [bx]|jmp ax|call [bx]|jmp word [lbl]|int 3|int 0x10
int3|out dx, al|out 0xF4, al|out 0xE9, ax|in al, dx|in al, 0x60|cpuid|rdtsc|vmcall|hlt|cli|ud2
mov eax, cr0|or eax, 1|mov cr0, eax|and eax, ~1|mov byte [bx], 'A'|mov word [bx], 'AB'
cmp al, 'x'|cmp byte [si], 0|imul ax, bx, 500|imul ax, bx, small|imul ax, bx, lbl|mov sp, 0x7c00
mov ss, ax|pushf|popf|pusha|popa|pushad|cbw|cwd|cwde|cdq|enter 8, 0|leave|test al, 1
test ax, 0x8000|shl ax, 1|shl ax, 4|shr al, cl|movzx ax, byte [si]|movzx eax, byte [si]
lea si, [bx+si+3]|mov ax, [bp]|mov ax, [bp+di-2]|mov ax, [si+bx]|mov ax, [bx+0xfff0]|inc ax
dec byte [bx]|not ax|neg word [bx]|sti|nop|mov si, lbl|mov si, lbl+3|mov cx, lbl - $
mov eax, 0x12345678|mov ebx, lbl|add eax, lbl|sub esp, 8|xor eax, eax|mov ax, small*3+1
mov ax, (1<<4)^2|mov ax, 'ab'|mov al, `\\n`|bt ax, 3|bts word [bx], 1|setz al|cmovz ax, bx
lodsw|stosd|outsb|rep outsb|insb|scasb|repne scasb|cmpsb|repe cmpsw|wbinvd|invlpg [bx]|lldt ax
ltr ax|str ax|smsw ax|lmsw ax|clts|rdmsr|wrmsr|sgdt [bx]|mov dx, 0x3f8|in eax, dx|out dx, eax
xlatb|sahf|lahf|pause|bswap eax|div cx|mul byte [bx]|adc ax, 1|sbb ax, lbl|cmp ax, lbl
and ax, lbl|or ax, lbl|xor ax, lbl|test ax, lbl|mov word [bx], lbl|mov word [bx+si+lbl], 1
add word [bx], lbl|add word [bx+lbl], lbl|jmp $|jmp $+2|loop $""",
    32: """mov eax, ebx|mov eax, 5|mov al, 500|add eax, 5|add eax, lbl|add ebx, lbl|add ebx, small
add esp, 8|push lbl|push small|push 0x12345|push word 5|push word lbl|push byte 5|push fs|pop gs
push ds|ret|ret 4|retf|iret|iretd|iretw|pushf|pushfd|pushfw|popfd|pusha|pushad|pushaw
mov eax, [lbl]|mov [lbl], al|mov eax, [ebx+lbl]|mov eax, [ebx+small]|mov eax, [ebx+ecx*4+lbl]
mov eax, [ebp]|mov eax, [esp]|mov eax, [esp+4]|mov eax, [eax*2]|mov eax, [eax*1]
mov eax, [ebp*1]|mov eax, [eax*3]|mov eax, [ecx*4+0x10]|mov eax, [nosplit eax*2]
mov ax, [bx+si]|mov al, [es:edi]|mov eax, [fs:0x10]|mov eax, [gs:ebx+4]|rep movsd|rep movsb
movsw|rep stosd|rep insw|cmpsd|lock xadd [ebx], eax|lock cmpxchg [ebx], ecx|xchg eax, ebx
xchg ebx, ecx|xchg al, bl|mov ds, ax|mov ds, eax|mov ss, ax|mov ax, ds|mov eax, ds
mov [lbl], ds|mov ds, [lbl]|lgdt [lbl]|lidt [eax]|sgdt [lbl]|sidt [ebx]|lldt ax|ltr ax|jmp lbl
jmp short lbl|jz lbl|jnz near lbl|call lbl|loop lbl|jecxz lbl|jcxz lbl|jmp 0x08:lbl
jmp word 0x08:0x1000|call 0x08:lbl|jmp far [ebx]|call far [lbl]|jmp eax|call [ebx+4]
jmp dword [lbl]|int 0x80|int 0x82|out dx, al|out 0xF4, al|in eax, dx|rep outsb|outsd|cpuid
rdtsc|vmcall|hlt|ud2|mov eax, cr0|mov cr3, eax|mov cr4, ebx|mov eax, dr7|or eax, 0x80000000
and eax, ~0x80000000|mov esp, 0x90000|mov edi, 0xb8000|mov byte [edi], 'A'
mov word [edi], 0x0741|mov dword [edi], lbl|imul eax, ebx, 500|imul eax, ebx, lbl
imul eax, ebx, small|imul eax, [ebx], 3|imul eax, ebx|imul ecx|shl eax, 1|sar eax, cl
rol eax, 4|shld eax, ebx, 4|movzx eax, al|movzx eax, word [esi]|movsx eax, byte [esi]
lea eax, [eax+eax*2]|lea esi, [lbl]|lea esi, [ebx+lbl]|test eax, eax|test dword [ebx], 1
cmp eax, lbl|cmp dword [esi], 0|cmp byte [esi+ecx], 'z'|bt eax, 31|setnz al|cmovl eax, ebx
bswap ecx|leave|enter 16, 0|cdq|cwde|cbw|cwd|xlatb|inc eax|dec dword [ebx]|inc word [ebx]
not eax|neg eax|mul ecx|div dword [ebx]|idiv ecx|sbb eax, lbl|adc eax, small|sub eax, lbl
xor eax, lbl|or eax, lbl|and eax, lbl|mov eax, lbl|mov eax, lbl-$$|mov ecx, (lbl - $$) / 4
wrmsr|rdmsr|wbinvd|invlpg [eax]|clflush [eax]|mfence|pause|syscall|sysenter
mov eax, [esi+ecx*8-8]|mov [esp+0x20], eax|push dword [ebx]|pop dword [ebx]|push eax|pop ebx
push esp|mov al, [lbl+ebx]|add [ebx+small*2], al|mov eax, 0xFFFFFFFF|mov eax, -1
add eax, 0xFFFFFF80|add eax, 0x7F|add eax, 0x80|sub eax, -128|movd xmm0, eax|pxor xmm0, xmm0
movdqa xmm1, [eax]""",
    64: """mov rax, rbx|mov rax, 5|mov rax, 0x100000|mov rax, 0x80000000|mov rax, 0xffffffff
mov rax, -1|mov rax, 0x123456789|mov rax, lbl|mov rsi, lbl|mov r8, 5|mov r12, lbl
mov rax, lbl - $$|mov eax, 5|mov r8d, 5|mov rax, qword 5|add rax, 5|add rax, lbl|add rbx, lbl
add rsp, 8|sub rsp, 0x28|mov eax, [lbl]|mov rax, [lbl]|mov [lbl], al|mov eax, [0x1234]
mov dword [0x500], 0x1234|mov qword [lbl], 0|mov rax, [rbx+4]|mov rax, [rbx+lbl]|mov rax, [rbp]
mov rax, [rsp+8]|mov rax, [r12]|mov rax, [r13]|mov rax, [rbx+rcx*8+0x10]|mov rax, [rax*2]
mov eax, [ebx]|lea rsi, [rel lbl]|lea rsi, [lbl]|mov eax, [rel lbl]|mov eax, [rel lbl+4]
cmp byte [rel lbl], 0|mov dword [rel lbl], 5|mov al, [fs:0x10]|mov rax, [gs:0]
mov eax, [fs:rbx+4]|inc rax|inc eax|dec r9|push rax|push r12|push 5|push 0x1234|push lbl
push word 5|pop rbx|pop r15|push fs|pop gs|ret|retf|iret|iretd|iretq|pushf|pushfq|popfq|pushfw
out dx, al|out 0xF4, al|in al, dx|rep outsb|rep movsq|rep stosq|movsq|lodsq|stosb|rep movsd
lgdt [lbl]|lidt [rax]|sgdt [rax]|mov rax, cr0|mov cr3, rax|mov cr4, rax|mov cr8, rax
xor eax, eax|xor rax, rax|xor r8, r8|xchg rax, rbx|xchg rbx, rcx|xchg r8, r9|test rax, rax
shl rax, 1|shr rax, 32|mov ds, ax|mov ss, ax|mov ax, ds|mov eax, ds|mov rax, ds
movzx eax, byte [rsi]|movsxd rax, ecx|movsx rax, word [rsi]|jmp lbl|jmp short lbl|jz lbl
jnz near lbl|call lbl|loop lbl|jrcxz lbl|jecxz lbl|jmp rax|call rax|jmp qword [rbx]
call [rel lbl]|jmp far [rax]|cpuid|rdtsc|vmcall|hlt|ud2|syscall|sysret|swapgs|wrmsr|rdmsr
mov ecx, 0xc0000080|cmp byte [rsi], 0|mov [rsi+4], ax|cdqe|cqo|cdq|leave|nop|pause
and rax, -16|and rsp, ~0xF|or rax, 0x80000000|imul rax, rbx, 500|imul rax, rbx, lbl
imul rax, rbx, small|mov r9b, 1|mov sil, 2|mov byte [rdi], 'A'|bswap rax|bt rax, 63
lock xadd [rbx], rax|cmpxchg16b [rbx]|int 3|int 0x80|add eax, lbl|mov edi, 0xb8000
mov rdi, 0xb8000|add r8, lbl|sub r15, small|cmp rax, lbl|mov rax, [rsi+rdi*4-4]
movq xmm0, rax|movdqu xmm1, [rsi]""",
}


def corpus_lines(bits: int) -> list[str]:
    return [line.strip() for row in CORPUS[bits].splitlines() for line in row.split("|")
            if line.strip()]


def corpus_source(bits: int, org: int, lines: list[str]) -> str:
    # Each form gets its own nearby label, so branches and displacements stay small.
    body = "".join(f"{line.replace('lbl', f'lbl{i}')}\nlbl{i}: db 0\n"
                   for i, line in enumerate(lines))
    return f"bits {bits}\norg {org:#x}\n{body}small equ 5\n"


@needs_nasm
@pytest.mark.parametrize("bits,org", [(16, 0), (16, 0x7C00), (32, 0x100000), (32, 0),
                                      (64, 0x100000)])
def test_instruction_corpus_matches_nasm(bits: int, org: int, tmp_path: Path) -> None:
    lines = corpus_lines(bits)
    source = corpus_source(bits, org, lines)
    ours = assemble_text(source, "corpus.asm").code
    theirs = nasm_bin(source, tmp_path)
    if ours != theirs:   # name the forms that differ
        bad = []
        for i, line in enumerate(lines):
            one = corpus_source(bits, org, [line])
            a, b = assemble_text(one).code, nasm_bin(one, tmp_path, f"l{i}")
            if a != b:
                bad.append(f"{line}: ours {a.hex()} nasm {b.hex()}")
        pytest.fail("\n".join(bad) or "whole corpus differs")


def test_index_only_32_bit_address_in_16_bit_code_is_refused() -> None:
    # Keystone 0.9.2 drops the index register of [ecx*4+disp] in 16-bit code (measured).
    with pytest.raises(AsmError, match="index-only 32-bit address"):
        assemble_text("mov eax, [ecx*4+0x10]\n")


@needs_nasm
@pytest.mark.parametrize("bits", [16, 32, 64])
def test_zero_operand_and_string_instructions_match_nasm(bits: int, tmp_path: Path) -> None:
    from hvm.nasm_tables import ALL, STRING_OPS, ZERO_OPERAND
    names = [m for m, (_, _, modes) in ZERO_OPERAND.items() if bits in modes]
    names += [m for m in STRING_OPS if bits == 64 or not m.endswith("q")]
    names += ["rep movsb", "repne scasb", "a32 lodsb", "o32 ret", "o16 iret", "rep ret"]
    assert ALL == (16, 32, 64)
    source = f"bits {bits}\n" + "\n".join(names) + "\n"
    assert assemble_text(source).code == nasm_bin(source, tmp_path)


FEATURES = r"""
; a bit of everything the front end does itself
%define COUNT 4
%define ADD(a, b) ((a) + (b))
%assign TWICE COUNT*2
%ifdef COUNT
  BITS 16
%else
  bits 32
%endif
[org 0x7c00]
PORT equ 0xE9
start:
    jmp short main
    nop
oem: db 'HVMLAB  ', 0
vals: dw 1, 2, 0x10, 10h, 0b101, 101b, 17q, 0o17, $1F, 1_000, 'ab', "c"
      dd 0xdeadbeef, -1, 'abcd', 'ab'
      dq 0x123456789abcdef0, lbl
      db `tab\there\n`, `\x41\102\\`, '"', "'", `\``
      db COUNT, TWICE, ADD(1, 2), ADD(COUNT, 1)*2
      db 1+2*3, (1+2)*3, 7/2, 7 % 3, -7//2, -7 %% 3, 1<<3, 0x80>>3, 0xF0&0x3C, ~0 & 0xFF, !0
      db 5 > 3, 3 == 3, 2 != 2, 1 ? 7 : 8, 'A' + 1, -1, 255
      dw lbl - start, $ - $$, $$ - $$, main - $
main:
.loop:
    mov al, [si]
    inc si
    cmp al, 0
    je .done
    out PORT, al
    jmp .loop
.done:
    jmp main.loop
    call far_away
    jmp lbl
lbl: times COUNT db 0xCC
     times 3 nop
     times 2 dw $
     resb 3
     resw 1
align 8
     db 1
align 16, db 0xEE
alignb 4
     db 2
far_away:
    ret
  .x equ 3
    db far_away.x, .x
bare db 9
     dw bare
$ax: dw $ax
times 510-($-$$) db 0
dw 0xAA55
"""


@needs_nasm
def test_directive_soup_matches_nasm(tmp_path: Path) -> None:
    assert assemble_text(FEATURES, "features.asm").code == nasm_bin(FEATURES, tmp_path)


@needs_nasm
@pytest.mark.parametrize("case", BOUNDARY_CASES, ids=boundary_id)
def test_jump_at_the_rel8_boundary_matches_nasm(case: tuple, tmp_path: Path) -> None:
    source = boundary_source(*case)
    assert code(source) == nasm_bin(source, tmp_path)


@needs_nasm
@pytest.mark.parametrize("org", [o for o, _ in ORIGINS])
def test_reproducer_at_every_origin_matches_nasm(org: str, tmp_path: Path) -> None:
    source = REPRODUCER.replace("org 0x100000\n", org)
    assert code(source) == nasm_bin(source, tmp_path)


# A jc over one instruction that names a symbol defined further down, then a run of nops:
# around the rel8 limit the jc's form depends on how NASM's first pass sized that instruction.
FORWARD_FORMS = {
    16: ["mov [bx + LATER], ax", "push LATER", "imul ax, bx, LATER", "push flab"],
    32: ["mov [edi + LATER], eax", "push LATER", "add eax, LATER", "shl eax, LATER",
         "push flab", "mov [edi + flab], eax"],
    64: ["mov rax, LATER", "mov rax, flab", "add rax, LATER", "mov eax, [rel flab]",
         "lea rsi, [rel LATER]", "push LATER"],
}


@needs_nasm
@pytest.mark.parametrize("bits,form", [(b, f) for b, forms in FORWARD_FORMS.items()
                                       for f in forms])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("org", [None, 0x100000])
def test_jump_over_forward_references_matches_nasm(bits: int, form: str, position: str,
                                                    org: int | None, tmp_path: Path) -> None:
    equ = "LATER equ 1\n"
    differ = []
    for nops in range(114, 127):
        source = (f"bits {bits}\n" + (f"org {org:#x}\n" if org is not None else "")
                  + (equ if position == "before" else "")
                  + f"start: jc fail\n{form}\ntimes {nops} nop\nfail: ret\nflab: db 0\n"
                  + (equ if position == "after" else ""))
        ours, theirs = code(source), nasm_bin(source, tmp_path)
        if ours != theirs:
            differ.append(f"{nops} nops: ours {ours[:8].hex()} ({len(ours)} bytes), "
                          f"nasm {theirs[:8].hex()} ({len(theirs)} bytes)")
    assert not differ, "\n".join(differ)
