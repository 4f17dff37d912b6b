"""NASM source lines to statements: labels, local labels, prefixes, directives (NASM manual ch. 3, 6, 7)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hvm.nasm_expr import Evaluator, ExprError, Tok, Value, evaluate, split_commas, tokenize
from hvm.nasm_pre import AsmError, SourceLine
from hvm.nasm_tables import BRANCHES, PREFIX_WORDS, REGISTERS, STRING_OPS, ZERO_OPERAND

# Only such words are ever shown to keystone as a mnemonic (".x" would be an LLVM directive).
MNEMONIC_SHAPE = re.compile(r"[a-z][a-z0-9]{1,15}")

DATA_SIZES = {"db": 1, "dw": 2, "dd": 4, "dq": 8}
RES_SIZES = {"resb": 1, "resw": 2, "resd": 4, "resq": 8, "rest": 10, "reso": 16, "resy": 32}
DIRECTIVES = {"bits", "use16", "use32", "use64", "org", "section", "segment", "align", "alignb",
              "sectalign", "default", "cpu", "global", "extern", "common", "static", "incbin",
              "equ", "times", "absolute", "dt", "do", "ddq", "dy", "dz"} \
    | set(DATA_SIZES) | set(RES_SIZES)
BRACKET_DIRECTIVES = {"bits", "use16", "use32", "use64", "org", "section", "segment",
                      "default", "cpu", "global", "extern", "sectalign", "absolute"}

# Mnemonics a bare label may stand before ("msg db 'hi'", "again mov ax, 1").
_GENERAL = """aaa aad aam aas adc add and arpl bound bsf bsr bswap bt btc btr bts call clflush
cmp cmpxchg cmpxchg8b cmpxchg16b dec div enter idiv imul in inc int invlpg jmp lar lds lea les
lfs lgs lgdt lidt lldt lmsw lsl lss ltr mov movsx movsxd movzx mul neg not or out pop push rcl
rcr rol ror sal sar sbb shl shld shr shrd sgdt sidt sldt smsw str sub test verr verw xadd xchg
xor movd movq movdqa movdqu movaps movups xorps pxor popcnt lzcnt tzcnt crc32 invpcid vmptrld
vmptrst vmclear vmread vmwrite vmxon invept invvpid fld fst fstp fild fist fistp"""
KNOWN_MNEMONICS = set(_GENERAL.split()) | set(ZERO_OPERAND) | set(STRING_OPS) | BRANCHES \
    | {"set" + c for c in ("o no b c nae nb nc ae e z ne nz be na nbe a s ns p pe np po l "
                           "nge nl ge le ng nle g").split()} \
    | {"cmov" + c for c in ("o no b c nae nb nc ae e z ne nz be na nbe a s ns p pe np po l "
                            "nge nl ge le ng nle g").split()}
KNOWN_WORDS = KNOWN_MNEMONICS | DIRECTIVES | PREFIX_WORDS


@dataclass
class Stmt:
    src: SourceLine
    scope: str                       # the non-local label that ".x" names belong to
    label: str = ""                  # label defined on this line (full name)
    kind: str = ""                   # insn, data, res, equ, bits, org, align, sectalign,
    #                                  default, incbin, nothing (label only)
    word: str = ""                   # mnemonic or directive, lower case
    times: list[Tok] | None = None
    prefixes: tuple[str, ...] = ()
    args: list[list[Tok]] = field(default_factory=list)
    inner: Stmt | None = None        # align: what fills the gap
    blob: bytes = b""                # incbin: the file's bytes


def source_error(src: SourceLine, message: str) -> AsmError:
    return AsmError(src.file, src.line, message)


def is_op(t: Tok, text: str) -> bool:
    return t.kind == "op" and t.text == text


def expression_end(toks: Sequence[Tok], start: int) -> int:
    """Index of the first token after the expression that begins at toks[start]."""
    ev = Evaluator(toks[start:], lambda _n: Value(0, unknown=True), Value(0), Value(0))
    ev.ternary()
    return start + ev.pos


# ----------------------------------------------------------------------------------------------
# Parsing

class Parser:
    def __init__(self, include_dirs: Sequence[Path],
                 is_instruction: Callable[[str, SourceLine], bool],
                 is_mnemonic: Callable[[str, SourceLine], bool]) -> None:
        self.scope = ""
        self.include_dirs = include_dirs
        self.is_instruction = is_instruction
        self.is_mnemonic = is_mnemonic
        self.stmts: list[Stmt] = []

    def full_name(self, name: str) -> str:
        if name.startswith(".") and not name.startswith(".."):
            return self.scope + name
        return name

    def parse(self, src: SourceLine) -> None:
        try:
            toks = tokenize(src.text)
        except ExprError as e:
            raise source_error(src, str(e)) from None
        if not toks:
            return
        if is_op(toks[0], "[") and is_op(toks[-1], "]") and len(toks) > 2 and \
                toks[1].kind == "id" and toks[1].text.lower() in BRACKET_DIRECTIVES:
            self.stmts.append(self.statement(src, toks[1:-1]))
            return
        label = ""
        first = toks[0]
        if first.kind == "id" and len(toks) > 1 and is_op(toks[1], ":"):
            label, toks = first.text, toks[2:]
        elif first.kind == "id" and (first.value or first.text.lower() not in KNOWN_WORDS):
            if len(toks) == 1 and (first.value or not self.is_instruction(first.text, src)):
                # A word alone: NASM takes it for a label unless it is an instruction.
                label, toks = first.text, []
            elif first.value or (toks[1].kind == "id" and toks[1].text.lower() in KNOWN_WORDS):
                label, toks = first.text, toks[1:]
        if label:
            if label.lower() in REGISTERS and not first.value:
                raise source_error(src, f"'{label}' is a register and cannot be a label")
            full = self.full_name(label)
            if toks and toks[0].kind == "id" and toks[0].text.lower() == "equ":
                st = Stmt(src, self.scope, label=full, kind="equ", word="equ", args=[toks[1:]])
                if not toks[1:]:
                    raise source_error(src, "'equ' needs a value")
                self.stmts.append(st)
                return
            self.define_scope(label)
            st = self.statement(src, toks) if toks else Stmt(src, self.scope, kind="nothing")
            st.scope = self.scope
            st.label = full
            self.stmts.append(st)
            return
        self.stmts.append(self.statement(src, toks))

    def define_scope(self, label: str) -> None:
        if not label.startswith("."):
            self.scope = label

    def statement(self, src: SourceLine, toks: list[Tok]) -> Stmt:
        st = Stmt(src, self.scope)
        if toks[0].kind != "id":
            raise source_error(src, f"instruction or directive expected, found '{toks[0].text}'")
        word = toks[0].text.lower()
        if word == "times":
            try:
                end = expression_end(toks, 1)
            except ExprError as e:
                raise source_error(src, f"bad 'times' count: {e}") from None
            if end == 1:
                raise source_error(src, "'times' needs a count")
            if end >= len(toks):
                raise source_error(src, "'times' needs something to repeat")
            inner = self.statement(src, toks[end:])
            if inner.kind not in ("insn", "data", "res", "incbin"):
                raise source_error(src, f"'times' cannot repeat '{inner.word}'")
            inner.times = toks[1:end]
            return inner
        if word == "equ":
            raise source_error(src, "'equ' needs a label")
        prefixes: list[str] = []
        while toks and toks[0].kind == "id" and toks[0].text.lower() in PREFIX_WORDS:
            prefixes.append(toks.pop(0).text.lower())
            if not toks:
                raise source_error(src, f"instruction expected after prefix '{prefixes[-1]}'")
            if toks[0].kind != "id":
                raise source_error(src, f"instruction expected after prefix '{prefixes[-1]}'")
        word = toks[0].text.lower()
        rest = toks[1:]
        st.word = word
        st.args = split_commas(rest) if rest else []
        if prefixes:
            st.kind, st.prefixes = "insn", tuple(prefixes)
            return st
        if word in DATA_SIZES:
            st.kind = "data"
        elif word in RES_SIZES:
            st.kind = "res"
        elif word in ("dt", "do", "ddq", "dy", "dz"):
            raise source_error(src, f"'{word}' is not supported (use db/dw/dd/dq)")
        elif word in ("bits", "use16", "use32", "use64"):
            st.kind = "bits"
            if word != "bits":
                st.args = [[Tok("num", word[3:], int(word[3:]))]]
        elif word == "org":
            st.kind = "org"
        elif word in ("section", "segment"):
            name = rest[0].text if rest else ""
            if name not in (".text", "text", ".code"):
                raise source_error(src, f"section '{name}' is not supported: flat binaries "
                                "have one section (.text)")
            st.kind = "nothing"
            for i, t in enumerate(rest[:-2]):
                if t.kind == "id" and t.text.lower() == "align" and is_op(rest[i + 1], "="):
                    st.kind, st.args = "sectalign", [rest[i + 2:i + 3]]
        elif word in ("align", "alignb"):
            st.kind = "align"
            if not rest:
                raise source_error(src, f"'{word}' needs an alignment")
            commas = [i for i, t in enumerate(rest) if is_op(t, ",")]
            count = rest[:commas[0]] if commas else rest
            fill = rest[commas[0] + 1:] if commas else []
            st.args = [count]
            if fill:
                st.inner = self.statement(src, list(fill))
            elif word == "align":
                st.inner = Stmt(src, self.scope, kind="insn", word="nop")
            else:
                st.inner = Stmt(src, self.scope, kind="res", word="resb",
                                args=[[Tok("num", "1", 1)]])
        elif word == "sectalign":
            st.kind = "sectalign"
        elif word == "default":
            st.kind = "default"
            mode = rest[0].text.lower() if rest else ""
            if mode not in ("rel", "abs"):
                raise source_error(src, "'default' takes 'rel' or 'abs'")
            st.args = [[rest[0]]]
        elif word in ("cpu", "global", "extern", "common", "static"):
            st.kind = "nothing"
        elif word == "absolute":
            raise source_error(src, "'absolute' is not supported")
        elif word == "incbin":
            st.kind = "incbin"
            st.blob = self.incbin(src, rest)
        else:
            if word not in KNOWN_MNEMONICS and not self.is_mnemonic(word, src):
                raise source_error(src, f"unknown directive '{word}'")
            st.kind = "insn"
        return st

    def incbin(self, src: SourceLine, rest: list[Tok]) -> bytes:
        if not rest or rest[0].kind != "str":
            raise source_error(src, "'incbin' needs a quoted file name")
        name = rest[0].data.decode("utf-8", errors="surrogateescape")
        dirs = ([src.directory] if src.directory is not None else []) + list(self.include_dirs)
        for d in dirs:
            path = Path(d) / name
            if path.is_file():
                data = path.read_bytes()
                break
        else:
            raise source_error(src, f"incbin file '{name}' not found")
        numbers = []
        for part in split_commas(rest[2:]) if len(rest) > 2 else []:
            try:
                numbers.append(evaluate(part, lambda n: Value(0, unknown=True)).n)
            except ExprError as e:
                raise source_error(src, str(e)) from None
        skip = numbers[0] if numbers else 0
        length = numbers[1] if len(numbers) > 1 else len(data)
        return data[skip:skip + length]


