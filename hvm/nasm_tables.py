"""x86 names NASM knows: registers, prefixes, zero-operand and string instructions (SDM Vol. 2)."""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------
# Registers

GPR8 = ["al", "cl", "dl", "bl", "ah", "ch", "dh", "bh"]
GPR8_REX = {"spl": 4, "bpl": 5, "sil": 6, "dil": 7}
GPR16 = ["ax", "cx", "dx", "bx", "sp", "bp", "si", "di"]
GPR32 = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"]
GPR64 = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"]
SREGS = ["es", "cs", "ss", "ds", "fs", "gs"]

# name -> (size in bits, register number)
GPR: dict[str, tuple[int, int]] = {}
for _num, _name in enumerate(GPR8):
    GPR[_name] = (8, _num)
GPR.update({k: (8, v) for k, v in GPR8_REX.items()})
for _num in range(8):
    GPR[GPR16[_num]] = (16, _num)
    GPR[GPR32[_num]] = (32, _num)
    GPR[GPR64[_num]] = (64, _num)
for _num in range(8, 16):
    GPR[f"r{_num}"] = (64, _num)
    GPR[f"r{_num}d"] = (32, _num)
    GPR[f"r{_num}w"] = (16, _num)
    GPR[f"r{_num}b"] = (8, _num)
    GPR[f"r{_num}l"] = (8, _num)

REGISTERS: frozenset[str] = frozenset(
    list(GPR) + SREGS
    + [f"cr{i}" for i in range(16)] + [f"dr{i}" for i in range(16)] + [f"tr{i}" for i in range(8)]
    + [f"st{i}" for i in range(8)] + [f"mm{i}" for i in range(8)]
    + [f"{x}mm{i}" for x in "xyz" for i in range(32)] + [f"k{i}" for i in range(8)])

SIZE_WORDS = {"byte": 8, "word": 16, "dword": 32, "qword": 64, "tword": 80, "oword": 128,
              "yword": 256, "zword": 512}
OPERAND_WORDS = set(SIZE_WORDS) | {"short", "near", "far", "strict", "to"}
EA_WORDS = set(SIZE_WORDS) | {"rel", "abs", "nosplit"}

# ----------------------------------------------------------------------------------------------
# Prefixes, in the order NASM emits them: rep/repne, lock, segment, 0x66, 0x67.

REP_PREFIXES = {"rep": 0xF3, "repe": 0xF3, "repz": 0xF3, "repne": 0xF2, "repnz": 0xF2}
SEG_PREFIX = {"es": 0x26, "cs": 0x2E, "ss": 0x36, "ds": 0x3E, "fs": 0x64, "gs": 0x65}
SIZE_PREFIXES = {"o16": ("o", 16), "o32": ("o", 32), "o64": ("o", 64),
                 "a16": ("a", 16), "a32": ("a", 32), "a64": ("a", 64)}
PREFIX_WORDS = set(REP_PREFIXES) | {"lock"} | set(SEG_PREFIX) | set(SIZE_PREFIXES)

# ----------------------------------------------------------------------------------------------
# Instructions without operands: mnemonic -> (operand size or 0, bytes, modes where valid).
# Operand size 16/32 adds 0x66 where it is not the mode's default; 64 adds REX.W.

ALL, NOT64, ONLY64 = (16, 32, 64), (16, 32), (64,)
ZERO_OPERAND: dict[str, tuple[int, bytes, tuple[int, ...]]] = {
    "nop": (0, b"\x90", ALL), "pause": (0, b"\xf3\x90", ALL), "hlt": (0, b"\xf4", ALL),
    "cmc": (0, b"\xf5", ALL), "clc": (0, b"\xf8", ALL), "stc": (0, b"\xf9", ALL),
    "cli": (0, b"\xfa", ALL), "sti": (0, b"\xfb", ALL), "cld": (0, b"\xfc", ALL),
    "std": (0, b"\xfd", ALL), "sahf": (0, b"\x9e", ALL), "lahf": (0, b"\x9f", ALL),
    "wait": (0, b"\x9b", ALL), "fwait": (0, b"\x9b", ALL), "xlatb": (0, b"\xd7", ALL),
    "xlat": (0, b"\xd7", ALL), "leave": (0, b"\xc9", ALL), "int3": (0, b"\xcc", ALL),
    "int1": (0, b"\xf1", ALL), "icebp": (0, b"\xf1", ALL), "into": (0, b"\xce", NOT64),
    "ret": (0, b"\xc3", ALL), "retn": (0, b"\xc3", ALL), "retf": (0, b"\xcb", ALL),
    "iret": (0, b"\xcf", ALL), "iretw": (16, b"\xcf", ALL), "iretd": (32, b"\xcf", ALL),
    "iretq": (64, b"\xcf", ONLY64),
    "pushf": (0, b"\x9c", ALL), "popf": (0, b"\x9d", ALL),
    "pushfw": (16, b"\x9c", ALL), "popfw": (16, b"\x9d", ALL),
    "pushfd": (32, b"\x9c", NOT64), "popfd": (32, b"\x9d", NOT64),
    "pushfq": (0, b"\x9c", ONLY64), "popfq": (0, b"\x9d", ONLY64),
    "pusha": (0, b"\x60", NOT64), "popa": (0, b"\x61", NOT64),
    "pushaw": (16, b"\x60", NOT64), "popaw": (16, b"\x61", NOT64),
    "pushad": (32, b"\x60", NOT64), "popad": (32, b"\x61", NOT64),
    "cbw": (16, b"\x98", ALL), "cwde": (32, b"\x98", ALL), "cdqe": (64, b"\x98", ONLY64),
    "cwd": (16, b"\x99", ALL), "cdq": (32, b"\x99", ALL), "cqo": (64, b"\x99", ONLY64),
    "cpuid": (0, b"\x0f\xa2", ALL), "rdtsc": (0, b"\x0f\x31", ALL),
    "rdtscp": (0, b"\x0f\x01\xf9", ALL), "rdmsr": (0, b"\x0f\x32", ALL),
    "wrmsr": (0, b"\x0f\x30", ALL), "rdpmc": (0, b"\x0f\x33", ALL), "ud2": (0, b"\x0f\x0b", ALL),
    "clts": (0, b"\x0f\x06", ALL), "invd": (0, b"\x0f\x08", ALL), "wbinvd": (0, b"\x0f\x09", ALL),
    "syscall": (0, b"\x0f\x05", ALL), "sysret": (0, b"\x0f\x07", ALL),
    "sysenter": (0, b"\x0f\x34", ALL), "sysexit": (0, b"\x0f\x35", ALL),
    "swapgs": (0, b"\x0f\x01\xf8", ONLY64), "rsm": (0, b"\x0f\xaa", ALL),
    "vmcall": (0, b"\x0f\x01\xc1", ALL), "vmlaunch": (0, b"\x0f\x01\xc2", ALL),
    "vmresume": (0, b"\x0f\x01\xc3", ALL), "vmxoff": (0, b"\x0f\x01\xc4", ALL),
    "vmmcall": (0, b"\x0f\x01\xd9", ALL), "monitor": (0, b"\x0f\x01\xc8", ALL),
    "mwait": (0, b"\x0f\x01\xc9", ALL), "xgetbv": (0, b"\x0f\x01\xd0", ALL),
    "clac": (0, b"\x0f\x01\xca", ALL), "stac": (0, b"\x0f\x01\xcb", ALL),
    "lfence": (0, b"\x0f\xae\xe8", ALL), "mfence": (0, b"\x0f\xae\xf0", ALL),
    "sfence": (0, b"\x0f\xae\xf8", ALL), "emms": (0, b"\x0f\x77", ALL),
    "fninit": (0, b"\xdb\xe3", ALL), "finit": (0, b"\x9b\xdb\xe3", ALL),
}

# String instructions: base opcode of the byte form; w/d/q forms are base + 1.
STRING_BASE = {"movs": 0xA4, "cmps": 0xA6, "stos": 0xAA, "lods": 0xAC, "scas": 0xAE,
               "ins": 0x6C, "outs": 0x6E}
STRING_OPS: dict[str, tuple[int, int]] = {}
for _stem, _op in STRING_BASE.items():
    STRING_OPS[_stem + "b"] = (8, _op)
    STRING_OPS[_stem + "w"] = (16, _op + 1)
    STRING_OPS[_stem + "d"] = (32, _op + 1)
    if _stem not in ("ins", "outs"):
        STRING_OPS[_stem + "q"] = (64, _op + 1)

CONDITIONS = {"o": 0, "no": 1, "b": 2, "c": 2, "nae": 2, "nb": 3, "nc": 3, "ae": 3, "e": 4,
              "z": 4, "ne": 5, "nz": 5, "be": 6, "na": 6, "nbe": 7, "a": 7, "s": 8, "ns": 9,
              "p": 10, "pe": 10, "np": 11, "po": 11, "l": 12, "nge": 12, "nl": 13, "ge": 13,
              "le": 14, "ng": 14, "nle": 15, "g": 15}
JCC = {"j" + cc: n for cc, n in CONDITIONS.items()}
LOOPS = {"loop": 0xE2, "loope": 0xE1, "loopz": 0xE1, "loopne": 0xE0, "loopnz": 0xE0}
JCXZ = {"jcxz": 16, "jecxz": 32, "jrcxz": 64}
BRANCHES = set(JCC) | set(LOOPS) | set(JCXZ) | {"jmp", "call"}
