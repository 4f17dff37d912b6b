"""Decoding the I/O instructions that exit: length, immediate form, string, REP, sizes. No Unicorn."""

import pytest

from hvm.decode import DecodeError, Disassembler, decode_io


@pytest.mark.parametrize("code,bits,length,imm,string,rep,size,port", [
    (b"\xee", 16, 1, False, False, False, 1, None),            # out dx, al
    (b"\xe6\xf4", 16, 2, True, False, False, 1, 0xF4),         # out 0xf4, al
    (b"\xef", 16, 1, False, False, False, 2, None),            # out dx, ax (16-bit default)
    (b"\x66\xef", 16, 2, False, False, False, 4, None),        # out dx, eax
    (b"\xef", 32, 1, False, False, False, 4, None),
    (b"\x66\xef", 32, 2, False, False, False, 2, None),
    (b"\xf3\x6e", 32, 2, False, True, True, 1, None),          # rep outsb
    (b"\xf3\x66\x6d", 32, 3, False, True, True, 2, None),      # rep insw
    (b"\xe4\x60", 64, 2, True, False, False, 1, 0x60),         # in al, 0x60
])
def test_io_forms(code, bits, length, imm, string, rep, size, port):
    io = decode_io(code + b"\x90" * 4, bits)
    assert (io.length, io.immediate, io.string, io.rep, io.size, io.port) == (length, imm, string, rep, size, port)


def test_outs_uses_ds_unless_overridden_and_ins_always_es():
    assert decode_io(b"\x6e", 32).segment == "ds"
    assert decode_io(b"\x2e\x6e", 32).segment == "cs"
    assert decode_io(b"\x2e\x6c", 32).segment == "es"


def test_instruction_info_for_string_io():
    io = decode_io(b"\xf3\x6e", 32)
    assert io.instruction_info == (1 << 7) | (3 << 15)  # 32-bit addresses, DS
    assert decode_io(b"\x67\xf3\x6e", 32).address_size == 16


def test_not_an_io_instruction():
    with pytest.raises(DecodeError):
        decode_io(b"\x90", 32)


def test_disassembler_text():
    text, length = Disassembler(16).text(0x7C00, b"\xe6\xf4")
    assert (text, length) == ("out 0xf4, al", 2)
