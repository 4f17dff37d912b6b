"""NASM-syntax assembler front end over keystone: directives, symbols, data and passes (NASM manual)."""

# The front end owns everything keystone cannot do or does differently (see hvm/nasm_insn.py):
# it preprocesses, parses each line, evaluates every expression itself and hands keystone one
# instruction at a time with numbers only. Like NASM it repeats passes, forward references
# taking the previous pass's values, until label values and instruction sizes stop changing.
# Keystone runs in a child process (hvm/keystone_worker.py), one batch of new texts per pass.

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import guests
from hvm.keystone_worker import (
    KeystoneTimeout,
    KeystoneUnavailable,
    KeystoneWorker,
    default_worker,
)
from hvm.nasm_expr import ExprError, Tok, Value, evaluate, split_commas, tokenize
from hvm.nasm_insn import (
    BRANCHES,
    PREFIX_WORDS,
    REGISTERS,
    STRING_OPS,
    ZERO_OPERAND,
    Ctx,
    InsnError,
    encode,
    le,
)
from hvm.nasm_pre import PreprocessError, Preprocessor, SourceLine, read_source

MAX_PASSES = 32
_MNEMONIC_SHAPE = re.compile(r"[a-z][a-z0-9]{1,15}")
GUESSED_LENGTH = 3  # an instruction keystone has not encoded yet: a guess, corrected next pass

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


class AsmError(Exception):
    """An error in the guest source: str(e) == "file:line: message"."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Assembly:
    code: bytes                          # flat binary, as `nasm -f bin` writes it
    bits: int                            # the first `bits` directive (16 without one)
    bits_explicit: bool                  # the source has a `bits` directive
    org: int | None                      # `org` value, None without one
    symbols: dict[str, int]              # label -> address (local labels as "outer.local")
    lines: dict[int, tuple[str, int]]    # instruction address -> (file, line)


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


def _err(src: SourceLine, message: str) -> AsmError:
    return AsmError(src.file, src.line, message)


def _is_op(t: Tok, text: str) -> bool:
    return t.kind == "op" and t.text == text


def expression_end(toks: Sequence[Tok], start: int) -> int:
    """Index of the first token after the expression that begins at toks[start]."""
    from hvm.nasm_expr import Evaluator
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
            raise _err(src, str(e)) from None
        if not toks:
            return
        if _is_op(toks[0], "[") and _is_op(toks[-1], "]") and len(toks) > 2 and \
                toks[1].kind == "id" and toks[1].text.lower() in BRACKET_DIRECTIVES:
            self.stmts.append(self.statement(src, toks[1:-1]))
            return
        label = ""
        first = toks[0]
        if first.kind == "id" and len(toks) > 1 and _is_op(toks[1], ":"):
            label, toks = first.text, toks[2:]
        elif first.kind == "id" and (first.value or first.text.lower() not in KNOWN_WORDS):
            if len(toks) == 1 and (first.value or not self.is_instruction(first.text, src)):
                # A word alone: NASM takes it for a label unless it is an instruction.
                label, toks = first.text, []
            elif first.value or (toks[1].kind == "id" and toks[1].text.lower() in KNOWN_WORDS):
                label, toks = first.text, toks[1:]
        if label:
            if label.lower() in REGISTERS and not first.value:
                raise _err(src, f"'{label}' is a register and cannot be a label")
            full = self.full_name(label)
            if toks and toks[0].kind == "id" and toks[0].text.lower() == "equ":
                st = Stmt(src, self.scope, label=full, kind="equ", word="equ", args=[toks[1:]])
                if not toks[1:]:
                    raise _err(src, "'equ' needs a value")
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
            raise _err(src, f"instruction or directive expected, found '{toks[0].text}'")
        word = toks[0].text.lower()
        if word == "times":
            try:
                end = expression_end(toks, 1)
            except ExprError as e:
                raise _err(src, f"bad 'times' count: {e}") from None
            if end == 1:
                raise _err(src, "'times' needs a count")
            if end >= len(toks):
                raise _err(src, "'times' needs something to repeat")
            inner = self.statement(src, toks[end:])
            if inner.kind not in ("insn", "data", "res", "incbin"):
                raise _err(src, f"'times' cannot repeat '{inner.word}'")
            inner.times = toks[1:end]
            return inner
        if word == "equ":
            raise _err(src, "'equ' needs a label")
        prefixes: list[str] = []
        while toks and toks[0].kind == "id" and toks[0].text.lower() in PREFIX_WORDS:
            prefixes.append(toks.pop(0).text.lower())
            if not toks:
                raise _err(src, f"instruction expected after prefix '{prefixes[-1]}'")
            if toks[0].kind != "id":
                raise _err(src, f"instruction expected after prefix '{prefixes[-1]}'")
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
            raise _err(src, f"'{word}' is not supported (use db/dw/dd/dq)")
        elif word in ("bits", "use16", "use32", "use64"):
            st.kind = "bits"
            if word != "bits":
                st.args = [[Tok("num", word[3:], int(word[3:]))]]
        elif word == "org":
            st.kind = "org"
        elif word in ("section", "segment"):
            name = rest[0].text if rest else ""
            if name not in (".text", "text", ".code"):
                raise _err(src, f"section '{name}' is not supported: flat binaries "
                                "have one section (.text)")
            st.kind = "nothing"
            for i, t in enumerate(rest[:-2]):
                if t.kind == "id" and t.text.lower() == "align" and _is_op(rest[i + 1], "="):
                    st.kind, st.args = "sectalign", [rest[i + 2:i + 3]]
        elif word in ("align", "alignb"):
            st.kind = "align"
            if not rest:
                raise _err(src, f"'{word}' needs an alignment")
            commas = [i for i, t in enumerate(rest) if _is_op(t, ",")]
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
                raise _err(src, "'default' takes 'rel' or 'abs'")
            st.args = [[rest[0]]]
        elif word in ("cpu", "global", "extern", "common", "static"):
            st.kind = "nothing"
        elif word == "absolute":
            raise _err(src, "'absolute' is not supported")
        elif word == "incbin":
            st.kind = "incbin"
            st.blob = self.incbin(src, rest)
        else:
            if word not in KNOWN_MNEMONICS and not self.is_mnemonic(word, src):
                raise _err(src, f"unknown directive '{word}'")
            st.kind = "insn"
        return st

    def incbin(self, src: SourceLine, rest: list[Tok]) -> bytes:
        if not rest or rest[0].kind != "str":
            raise _err(src, "'incbin' needs a quoted file name")
        name = rest[0].data.decode("utf-8", errors="surrogateescape")
        dirs = ([src.directory] if src.directory is not None else []) + list(self.include_dirs)
        for d in dirs + [_guests_dir()]:
            path = Path(d) / name
            if path.is_file():
                data = path.read_bytes()
                break
        else:
            raise _err(src, f"incbin file '{name}' not found")
        numbers = []
        for part in split_commas(rest[2:]) if len(rest) > 2 else []:
            try:
                numbers.append(evaluate(part, lambda n: Value(0, unknown=True)).n)
            except ExprError as e:
                raise _err(src, str(e)) from None
        skip = numbers[0] if numbers else 0
        length = numbers[1] if len(numbers) > 1 else len(data)
        return data[skip:skip + length]


# ----------------------------------------------------------------------------------------------
# Passes

@dataclass
class PassResult:
    symbols: dict[str, Value] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)
    lengths: dict[tuple[int, int], int] = field(default_factory=dict)
    org: int | None = None
    align: int = 1
    code: bytes = b""
    first_bits: int | None = None
    lines: dict[int, tuple[str, int]] = field(default_factory=dict)
    pending: dict[tuple[int, str], SourceLine] = field(default_factory=dict)
    unsettled: SourceLine | None = None   # a length or value that was only a guess
    unknown_use: tuple[SourceLine, str] | None = None
    problems: list[tuple[SourceLine, str]] = field(default_factory=list)


class Assembler:
    def __init__(self, stmts: list[Stmt], worker: KeystoneWorker, main: str) -> None:
        self.stmts = stmts
        self.worker = worker
        self.main = main
        self.cache = worker.cache
        self.defined: set[str] = set()

    def keystone(self, requests: dict[tuple[int, str], SourceLine]) -> None:
        by_bits: dict[int, list[str]] = {}
        for bits, text in requests:
            if (bits, text) not in self.cache:
                by_bits.setdefault(bits, []).append(text)
        for bits, texts in by_bits.items():
            try:
                results = self.worker.assemble(bits, texts)
            except KeystoneTimeout as e:
                src = requests[(bits, texts[e.index])]
                raise _err(src, str(e)) from None
            except KeystoneUnavailable as e:
                src = requests[(bits, texts[0])]
                raise _err(src, str(e)) from None
            if len(self.cache) > 50000:
                self.cache.clear()
            for text, result in zip(texts, results, strict=True):
                self.cache[(bits, text)] = result

    def is_instruction(self, word: str, src: SourceLine) -> bool:
        """Whether keystone encodes this lone word (else NASM would take it for a label)."""
        if not _MNEMONIC_SHAPE.fullmatch(word.lower()):
            return False   # only plain words reach keystone (".x" would be an LLVM directive)
        key = (32, word.lower())
        self.keystone({key: src})
        return self.cache[key].data is not None

    def is_mnemonic(self, word: str, src: SourceLine) -> bool:
        """Whether keystone knows this word as a mnemonic (with operands or without)."""
        if not _MNEMONIC_SHAPE.fullmatch(word.lower()):
            return False
        key = (32, word.lower())
        self.keystone({key: src})
        result = self.cache[key]
        return result.data is not None or "MNEMONICFAIL" not in result.error

    def run(self) -> Assembly:
        prev = PassResult()
        for pass_no in range(1, MAX_PASSES + 1):
            cur = self.one_pass(pass_no, prev)
            self.defined |= set(cur.symbols)
            if cur.pending:
                self.keystone(cur.pending)
            settled = (not cur.pending and cur.unsettled is None and cur.symbols == prev.symbols
                       and cur.org == prev.org and cur.align == prev.align)
            if settled and cur.unknown_use is None:
                if cur.problems:
                    src, message = cur.problems[0]
                    raise _err(src, message)
                org = cur.org if cur.org is not None else 0
                vstart = -(-org // cur.align) * cur.align
                return Assembly(
                    code=bytes(vstart - org) + cur.code,
                    bits=cur.first_bits or 16, bits_explicit=cur.first_bits is not None,
                    org=cur.org,
                    symbols={k: v.n for k, v in cur.symbols.items() if k in cur.labels},
                    lines=cur.lines)
            if settled and cur.unknown_use is not None:
                src, name = cur.unknown_use
                if name not in self.defined:
                    raise _err(src, f"undefined symbol '{name}'")
                raise _err(src, f"symbol '{name}' cannot be resolved (circular definition?)")
            prev = cur
        src = prev.unsettled or (self.stmts[0].src if self.stmts else SourceLine(self.main, 1, ""))
        raise _err(src, f"sizes did not settle after {MAX_PASSES} passes")

    def one_pass(self, pass_no: int, prev: PassResult) -> PassResult:
        cur = PassResult(org=prev.org, align=prev.align)
        org = prev.org if prev.org is not None else 0
        vstart = -(-org // prev.align) * prev.align
        base = Value(vstart, 1)
        out = bytearray()
        bits = 16
        default_rel = False
        org_seen = False

        for index, st in enumerate(self.stmts):
            src = st.src
            addr = vstart + len(out)
            here = Value(addr, 1)

            def resolve(name: str, st: Stmt = st) -> Value:
                full = st.scope + name if name.startswith(".") and not name.startswith("..") \
                    else name
                v = cur.symbols.get(full)
                if v is None:
                    v = prev.symbols.get(full)
                if v is None:
                    if pass_no > 1 and full not in self.defined:
                        raise ExprError(f"undefined symbol '{full}'")
                    v = Value(0, 1, True)
                if v.unknown and cur.unknown_use is None:
                    cur.unknown_use = (st.src, full)
                return v

            def value(toks: Sequence[Tok], regs: bool = False, here: Value = here) -> Value:
                return evaluate(toks, resolve, here, base, REGISTERS if regs else frozenset())

            try:
                if st.label and st.kind != "equ":
                    self.define(cur, st.label, here, src, label=True)
                kind = st.kind
                if kind == "nothing":
                    continue
                if kind == "equ":
                    self.define(cur, st.label, value(st.args[0]), src, label=False)
                elif kind == "bits":
                    n = value(st.args[0]) if st.args else Value(-1)
                    if not n.simple or n.n not in (16, 32, 64):
                        raise _err(src, "'bits' takes 16, 32 or 64")
                    bits = n.n
                    if cur.first_bits is None:
                        cur.first_bits = bits
                elif kind == "org":
                    if not st.args:
                        raise _err(src, "'org' needs an address")
                    v = value(st.args[0])
                    if v.unknown:
                        raise _err(src, "'org' value must be known where it is written")
                    if v.reloc or v.regs:
                        raise _err(src, "'org' takes a number")
                    if org_seen and v.n != cur.org:
                        raise _err(src, "program origin redefined")
                    org_seen = True
                    cur.org = v.n
                elif kind == "default":
                    default_rel = st.args[0][0].text.lower() == "rel"
                elif kind == "sectalign":
                    n = self.alignment(value(st.args[0]) if st.args else Value(0), src)
                    cur.align = max(cur.align, n)
                elif kind == "align":
                    n = self.alignment(value(st.args[0]), src)
                    cur.align = max(cur.align, n)
                    count = (n - (addr - vstart) % n) % n
                    assert st.inner is not None
                    out += self.emit(st.inner, index, count, addr, here, bits, default_rel,
                                     value, prev, cur)
                else:
                    count = 1
                    if st.times is not None:
                        t = value(st.times)
                        if not t.unknown and (t.reloc or t.regs):
                            raise _err(src, "'times' count must be a number")
                        count = t.n if not t.unknown else 0
                        if count < 0:
                            cur.problems.append((src, f"TIMES value {count} is negative"))
                            count = 0
                    out += self.emit(st, index, count, addr, here, bits, default_rel, value,
                                     prev, cur)
            except ExprError as e:
                raise _err(src, str(e)) from None
            except InsnError as e:
                raise _err(src, str(e)) from None
        cur.code = bytes(out)
        return cur

    @staticmethod
    def alignment(v: Value, src: SourceLine) -> int:
        if not v.simple or v.n <= 0 or v.n & (v.n - 1):
            raise _err(src, "alignment must be a power of two")
        return v.n

    def define(self, cur: PassResult, name: str, v: Value, src: SourceLine, label: bool) -> None:
        if name in cur.symbols:
            raise _err(src, f"symbol '{name}' redefined")
        cur.symbols[name] = v
        if label:
            cur.labels.add(name)
        elif v.reloc == 1 and not v.regs:
            cur.labels.add(name)  # "x equ label" names an address too

    def emit(self, st: Stmt, index: int, count: int, addr: int, here: Value, bits: int,
             default_rel: bool, value, prev: PassResult, cur: PassResult) -> bytes:
        src = st.src
        if count <= 0:
            return b""
        if st.kind == "data":
            one = self.data(st, value)
            return one * count
        if st.kind == "res":
            v = value(st.args[0]) if st.args else Value(1)
            if not v.unknown and not v.simple:
                raise _err(src, f"'{st.word}' count must be a number")
            n = max(v.n, 0) if not v.unknown else 0
            return bytes(n * RES_SIZES[st.word] * count)
        if st.kind == "incbin":
            return st.blob * count
        if st.kind != "insn":
            raise _err(src, f"'{st.word}' cannot be used here")
        out = bytearray()
        for k in range(count):
            at = addr + len(out)
            key = (index, k if count < 64 else min(k, 63))
            assumed = prev.lengths.get(key, -1)
            ctx = Ctx(bits=bits, addr=at, default_rel=default_rel, assumed_len=assumed,
                      value=lambda toks, regs: value(toks, regs, here))
            plan = encode(st.prefixes, st.word, st.args, ctx)
            if plan.problem:
                cur.problems.append((src, plan.problem))
            if plan.data is not None:
                data = plan.data
            else:
                result = self.cache.get((bits, plan.text))
                if result is None:
                    cur.pending.setdefault((bits, plan.text), src)
                    data = bytes(assumed if assumed >= 0 else GUESSED_LENGTH)
                    cur.unsettled = cur.unsettled or src
                elif result.data is None:
                    cur.problems.append((src, self.rejected(st, result.error)))
                    data = b""
                else:
                    assert plan.finish is not None
                    data = plan.finish(result.data)
                    if plan.assumed_len >= 0 and len(data) != plan.assumed_len:
                        cur.unsettled = cur.unsettled or src
            cur.lengths[key] = len(data)
            cur.lines.setdefault(at, (src.file, src.line))
            out += data
        return bytes(out)

    @staticmethod
    def rejected(st: Stmt, error: str) -> str:
        if "MNEMONICFAIL" in error and st.word not in KNOWN_MNEMONICS:
            return f"unknown directive '{st.word}'"
        reason = error.split(" (KS_ERR")[0].lower()
        return f"invalid instruction '{st.src.text.strip()}' ({reason})"

    def data(self, st: Stmt, value) -> bytes:
        size = DATA_SIZES[st.word]
        out = bytearray()
        if not st.args:
            raise _err(st.src, f"'{st.word}' needs at least one value")
        for item in st.args:
            if len(item) == 1 and item[0].kind == "str":
                chunk = item[0].data
                if size > 1 and len(chunk) % size:
                    chunk += bytes(size - len(chunk) % size)
                out += chunk
            elif len(item) == 1 and _is_op(item[0], "?"):
                out += bytes(size)
            elif not item:
                raise _err(st.src, f"empty value in '{st.word}'")
            else:
                v = value(item)
                if not v.unknown and (v.regs or v.reloc not in (0, 1, -1)):
                    raise _err(st.src, "expression is not simple or relocatable")
                out += le(v.n, size)
        return bytes(out)


# ----------------------------------------------------------------------------------------------
# Public API

def _guests_dir() -> Path:
    return Path(guests.__file__).parent


def _assemble(text: str, name: str, directory: Path | None, include_dirs: Sequence,
              worker: KeystoneWorker | None) -> Assembly:
    dirs = [Path(d) for d in include_dirs]
    pre = Preprocessor(dirs, _guests_dir())
    try:
        pre.run(text, name, directory)
    except PreprocessError as e:
        raise AsmError(e.file, e.line, e.message) from None
    assembler = Assembler([], worker or default_worker(), name)
    parser = Parser(dirs, assembler.is_instruction, assembler.is_mnemonic)
    for src in pre.out:
        parser.parse(src)
    assembler.stmts = parser.stmts
    return assembler.run()


def assemble_text(text: str, name: str = "<text>", include_dirs: Sequence[str | Path] = (),
                  *, worker: KeystoneWorker | None = None) -> Assembly:
    """Assemble NASM-syntax source text; errors are AsmError("name:line: message")."""
    return _assemble(text, name, None, include_dirs, worker)


def assemble_file(path: str | os.PathLike, include_dirs: Sequence[str | Path] = (),
                  *, worker: KeystoneWorker | None = None) -> Assembly:
    """Assemble a .asm file; %include looks in its directory, include_dirs, then guests/."""
    p = Path(path)
    name = os.path.basename(p)
    try:
        text = read_source(p)
    except OSError as e:
        raise AsmError(name, 0, f"cannot read: {e.strerror}") from None
    return _assemble(text, name, p.parent, include_dirs, worker)


def main(argv: Sequence[str] | None = None) -> int:
    """python3 -m hvm.nasm FILE.asm [-o OUT.bin] [-i DIR]...: like nasm -f bin; status 2 on error."""
    import argparse
    ap = argparse.ArgumentParser(prog="python3 -m hvm.nasm", description=main.__doc__)
    ap.add_argument("source")
    ap.add_argument("-o", "--output")
    ap.add_argument("-i", "--include", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        asm = assemble_file(args.source, args.include)
    except AsmError as e:
        print(e, file=sys.stderr)
        return 2
    out = args.output or str(Path(args.source).with_suffix(".bin"))
    Path(out).write_bytes(asm.code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
