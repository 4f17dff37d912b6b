"""Decoding the instructions that exit: I/O forms, lengths and prefixes (Intel SDM Vol. 2, IN/OUT/INS/OUTS; Vol. 3C 28.2.5)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import capstone

_SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
_SEGMENT_NUMBER = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}  # VMX instruction-info encoding


@dataclass(frozen=True)
class IoInstruction:
    """What the processor knows about an I/O instruction at a VM exit."""

    length: int          # VM_EXIT_INSTRUCTION_LEN
    immediate: bool      # port is an imm8 (qualification bit 6)
    string: bool         # INS/OUTS
    rep: bool            # F3/F2 prefix on a string instruction
    direction_in: bool
    size: int            # operand size in bytes
    address_size: int    # 16, 32 or 64: which of (E/R)SI, (E/R)DI, (E/R)CX the string form uses
    segment: str         # segment of the memory operand (OUTS: DS unless overridden; INS: always ES)
    port: int | None     # the immediate port, when immediate

    @property
    def instruction_info(self) -> int:
        """VMX_INSTRUCTION_INFO for INS/OUTS: address size in bits 9:7, segment in bits 17:15."""
        if not self.string:
            return 0
        size_code = {16: 0, 32: 1, 64: 2}[self.address_size]
        return (size_code << 7) | (_SEGMENT_NUMBER[self.segment] << 15)


class DecodeError(ValueError):
    pass


def decode_io(code: bytes, bits: int) -> IoInstruction:
    """Decode the I/O instruction at the start of `code` for a CPU in `bits` mode."""
    operand_override = address_override = rep = False
    segment = None
    i = 0
    while i < len(code) and i < 15:
        b = code[i]
        if b == 0x66:
            operand_override = True
        elif b == 0x67:
            address_override = True
        elif b in (0xF2, 0xF3):
            rep = True
        elif b in _SEGMENT_PREFIXES:
            segment = _SEGMENT_PREFIXES[b]
        elif b == 0xF0:
            pass
        elif bits == 64 and 0x40 <= b <= 0x4F:
            pass  # REX: no effect on I/O operand size (at most 32 bits)
        else:
            break
        i += 1
    if i >= len(code):
        raise DecodeError("no opcode after prefixes")
    op = code[i]
    default16 = bits == 16
    wide = 2 if default16 != operand_override else 4
    address_size = {16: 32 if address_override else 16, 32: 16 if address_override else 32,
                    64: 32 if address_override else 64}[bits]
    if op in (0xE4, 0xE5, 0xE6, 0xE7):  # IN/OUT with imm8 port
        if i + 1 >= len(code):
            raise DecodeError("truncated immediate port")
        return IoInstruction(i + 2, True, False, False, op in (0xE4, 0xE5), 1 if op & 1 == 0 else wide,
                             address_size, segment or "ds", code[i + 1])
    if op in (0xEC, 0xED, 0xEE, 0xEF):  # IN/OUT with DX
        return IoInstruction(i + 1, False, False, False, op in (0xEC, 0xED), 1 if op & 1 == 0 else wide,
                             address_size, segment or "ds", None)
    if op in (0x6C, 0x6D, 0x6E, 0x6F):  # INS/OUTS
        direction_in = op in (0x6C, 0x6D)
        return IoInstruction(i + 1, False, True, rep, direction_in, 1 if op & 1 == 0 else wide,
                             address_size, "es" if direction_in else (segment or "ds"), None)
    raise DecodeError(f"opcode {op:#04x} is not an I/O instruction")


class Disassembler:
    """Capstone text of guest instructions, cached by (address, bytes) so tracing stays cheap."""

    def __init__(self, bits: int) -> None:
        mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
        self._cs = capstone.Cs(capstone.CS_ARCH_X86, mode)
        self._cache: dict[tuple[int, bytes], tuple[str, int]] = {}

    def text(self, address: int, code: bytes) -> tuple[str, int]:
        """(assembly text, length) of the instruction at `address`; ("(bad)", 1) if undecodable."""
        key = (address, code)
        hit = self._cache.get(key)
        if hit is None:
            hit = ("(bad)", 1)
            for insn in self._cs.disasm(code, address, 1):
                hit = (f"{insn.mnemonic} {insn.op_str}".strip(), insn.size)
            if len(self._cache) > 65536:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def json_text(self, address: int, code: bytes) -> str:
        """The text as a JSON string literal (for the trace writer)."""
        return json.dumps(self.text(address, code)[0])
