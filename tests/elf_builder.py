"""Build minimal ELF executables for tests (System V gABI: ELF header, one PT_LOAD)."""

from __future__ import annotations

import struct


def elf32(code: bytes, vaddr: int = 0x200000, entry: int | None = None, bss: int = 0) -> bytes:
    ehsize, phsize = 52, 32
    offset = ehsize + phsize
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)  # ELFCLASS32, little endian, version 1
    header = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry if entry is not None else vaddr,
                                 ehsize, 0, 0, ehsize, phsize, 1, 40, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, offset, vaddr, vaddr, len(code), len(code) + bss, 5, 0x1000)
    return header + phdr + code


def elf64(code: bytes, vaddr: int = 0x200000) -> bytes:
    ehsize, phsize = 64, 56
    offset = ehsize + phsize
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, vaddr, ehsize, 0, 0, ehsize, phsize, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, offset, vaddr, vaddr, len(code), len(code), 0x1000)
    return header + phdr + code
