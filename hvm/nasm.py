"""NASM-syntax assembler front end over keystone: directives, symbols, data and passes (NASM manual)."""

# The front end owns everything keystone cannot do or does differently (see hvm/nasm_insn.py):
# it preprocesses, parses each line, evaluates every expression itself and hands keystone one
# instruction at a time with numbers only. Keystone runs in a child process
# (hvm/keystone_worker.py), one batch of new texts at a time.
#
# Passes follow NASM's, because which encoding a jump ends up with depends on the path taken,
# not only on the end point: a layout where the jump is near can be as self-consistent as one
# where it is short, and NASM keeps whichever its passes reach first. So, as in NASM:
#  - every pass starts from scratch and sees the previous pass's values for symbols defined
#    further down (pass 1: unknown). An encoding that depends on an unknown value takes
#    NASM's pass-1 choice: jumps and immediates short, displacements full width;
#  - each pass is laid out with the real lengths of its own instructions: texts keystone has
#    not seen yet are sent, and the pass is run again, until it needs nothing new;
#  - label values are kept relative to the section start (NASM applies `org` only on
#    output), so values carried from a pass laid out at another origin are moved by the
#    difference. `org` is also read before pass 1 when it is a plain number;
#  - passes repeat until no symbol changes value.

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import guests
from hvm.keystone_worker import KeystoneTimeout, KeystoneUnavailable, KeystoneWorker, default_worker
from hvm.nasm_expr import ExprError, Tok, Value, evaluate
from hvm.nasm_insn import Ctx, InsnError, encode, le
from hvm.nasm_parse import (
    DATA_SIZES,
    KNOWN_MNEMONICS,
    MNEMONIC_SHAPE,
    RES_SIZES,
    Parser,
    Stmt,
    is_op,
    source_error,
)
from hvm.nasm_pre import AsmError, Preprocessor, SourceLine, read_source
from hvm.nasm_tables import REGISTERS

__all__ = ["AsmError", "Assembly", "assemble_file", "assemble_text", "main"]

MAX_PASSES = 32
MAX_ROUNDS = 8      # keystone batches within one pass before its guessed lengths are let stand
GUESSED_LENGTH = 3  # an instruction keystone has not encoded yet: a guess, replaced next round


@dataclass(frozen=True)
class Assembly:
    code: bytes                          # flat binary, as `nasm -f bin` writes it
    bits: int                            # the first `bits` directive (16 without one)
    bits_explicit: bool                  # the source has a `bits` directive
    org: int | None                      # `org` value, None without one
    symbols: dict[str, int]              # label -> address (local labels as "outer.local")
    lines: dict[int, tuple[str, int]]    # instruction address -> (file, line)


# ----------------------------------------------------------------------------------------------
# Passes

@dataclass
class PassResult:
    symbols: dict[str, Value] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)
    lengths: dict[tuple[int, int], int] = field(default_factory=dict)
    org: int | None = None
    align: int = 1
    vstart: int = 0              # the section start this pass laid out from (org, aligned)
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
                raise source_error(src, str(e)) from None
            except KeystoneUnavailable as e:
                src = requests[(bits, texts[0])]
                raise source_error(src, str(e)) from None
            if len(self.cache) > 50000:
                self.cache.clear()
            for text, result in zip(texts, results, strict=True):
                self.cache[(bits, text)] = result

    def is_instruction(self, word: str, src: SourceLine) -> bool:
        """Whether keystone encodes this lone word (else NASM would take it for a label)."""
        if not MNEMONIC_SHAPE.fullmatch(word.lower()):
            return False   # only plain words reach keystone (".x" would be an LLVM directive)
        key = (32, word.lower())
        self.keystone({key: src})
        return self.cache[key].data is not None

    def is_mnemonic(self, word: str, src: SourceLine) -> bool:
        """Whether keystone knows this word as a mnemonic (with operands or without)."""
        if not MNEMONIC_SHAPE.fullmatch(word.lower()):
            return False
        key = (32, word.lower())
        self.keystone({key: src})
        result = self.cache[key]
        return result.data is not None or "MNEMONICFAIL" not in result.error

    def run(self) -> Assembly:
        prev = PassResult(org=self.plain_org())
        for pass_no in range(1, MAX_PASSES + 1):
            cur = self.measured_pass(pass_no, prev)
            self.defined |= set(cur.symbols)
            settled = (not cur.pending and cur.unsettled is None and cur.symbols == prev.symbols
                       and cur.org == prev.org and cur.align == prev.align)
            if settled and cur.unknown_use is None:
                if cur.problems:
                    src, message = cur.problems[0]
                    raise source_error(src, message)
                return Assembly(
                    code=bytes(cur.vstart - (cur.org or 0)) + cur.code,
                    bits=cur.first_bits or 16, bits_explicit=cur.first_bits is not None,
                    org=cur.org,
                    symbols={k: v.n for k, v in cur.symbols.items() if k in cur.labels},
                    lines=cur.lines)
            if settled and cur.unknown_use is not None:
                src, name = cur.unknown_use
                if name not in self.defined:
                    raise source_error(src, f"undefined symbol '{name}'")
                raise source_error(src, f"symbol '{name}' cannot be resolved (circular definition?)")
            prev = cur
        src = prev.unsettled or (self.stmts[0].src if self.stmts else SourceLine(self.main, 1, ""))
        raise source_error(src, f"sizes did not settle after {MAX_PASSES} passes")

    def plain_org(self) -> int | None:
        """The `org` of the source when it is a plain number, so pass 1 lays out from it."""
        for st in self.stmts:
            if st.kind == "org" and st.args:
                try:
                    v = evaluate(st.args[0], lambda _name: Value(0, 1, True))
                except ExprError:
                    return None   # reported where the pass meets it
                return v.n if v.simple else None
        return None

    def measured_pass(self, pass_no: int, prev: PassResult) -> PassResult:
        """One pass laid out with the real length of every instruction in it.

        Keystone is asked for the texts the pass needs; the pass then runs again with the
        answers, as long as that brings up texts not asked for yet (a length that changed
        moves the labels behind it, and so the addresses in later texts)."""
        hint: dict[tuple[int, int], int] = {}
        cur = self.one_pass(pass_no, prev, hint)
        for _ in range(MAX_ROUNDS):
            if not cur.pending and cur.unsettled is None:
                break
            self.keystone(cur.pending)
            hint = cur.lengths
            cur = self.one_pass(pass_no, prev, hint)
        return cur

    def one_pass(self, pass_no: int, prev: PassResult,
                 hint: dict[tuple[int, int], int]) -> PassResult:
        """Lay the source out once; `hint`: lengths an earlier run of this pass measured."""
        org = prev.org if prev.org is not None else 0
        vstart = -(-org // prev.align) * prev.align
        cur = PassResult(org=prev.org, align=prev.align, vstart=vstart)
        # Addresses carried over from the previous pass keep their offset into the section.
        moved = vstart - prev.vstart
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
                    if v is not None and v.reloc and moved:
                        v = Value(v.n + v.reloc * moved, v.reloc, v.unknown, v.regs)
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
                    b = value(st.args[0]) if st.args else Value(-1)
                    if not b.simple or b.n not in (16, 32, 64):
                        raise source_error(src, "'bits' takes 16, 32 or 64")
                    bits = b.n
                    if cur.first_bits is None:
                        cur.first_bits = bits
                elif kind == "org":
                    if not st.args:
                        raise source_error(src, "'org' needs an address")
                    v = value(st.args[0])
                    if v.unknown:
                        raise source_error(src, "'org' value must be known where it is written")
                    if v.reloc or v.regs:
                        raise source_error(src, "'org' takes a number")
                    if org_seen and v.n != cur.org:
                        raise source_error(src, "program origin redefined")
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
                                     value, prev, cur, hint)
                else:
                    count = 1
                    if st.times is not None:
                        t = value(st.times)
                        if not t.unknown and (t.reloc or t.regs):
                            raise source_error(src, "'times' count must be a number")
                        count = t.n if not t.unknown else 0
                        if count < 0:
                            cur.problems.append((src, f"TIMES value {count} is negative"))
                            count = 0
                    out += self.emit(st, index, count, addr, here, bits, default_rel, value,
                                     prev, cur, hint)
            except ExprError as e:
                raise source_error(src, str(e)) from None
            except InsnError as e:
                raise source_error(src, str(e)) from None
        cur.code = bytes(out)
        return cur

    @staticmethod
    def alignment(v: Value, src: SourceLine) -> int:
        if not v.simple or v.n <= 0 or v.n & (v.n - 1):
            raise source_error(src, "alignment must be a power of two")
        return v.n

    def define(self, cur: PassResult, name: str, v: Value, src: SourceLine, label: bool) -> None:
        if name in cur.symbols:
            raise source_error(src, f"symbol '{name}' redefined")
        cur.symbols[name] = v
        if label:
            cur.labels.add(name)
        elif v.reloc == 1 and not v.regs:
            cur.labels.add(name)  # "x equ label" names an address too

    def emit(self, st: Stmt, index: int, count: int, addr: int, here: Value, bits: int,
             default_rel: bool, value, prev: PassResult, cur: PassResult,
             hint: dict[tuple[int, int], int]) -> bytes:
        src = st.src
        if count <= 0:
            return b""
        if st.kind == "data":
            one = self.data(st, value)
            return one * count
        if st.kind == "res":
            v = value(st.args[0]) if st.args else Value(1)
            if not v.unknown and not v.simple:
                raise source_error(src, f"'{st.word}' count must be a number")
            n = max(v.n, 0) if not v.unknown else 0
            return bytes(n * RES_SIZES[st.word] * count)
        if st.kind == "incbin":
            return st.blob * count
        if st.kind != "insn":
            raise source_error(src, f"'{st.word}' cannot be used here")
        out = bytearray()
        for k in range(count):
            at = addr + len(out)
            key = (index, k if count < 64 else min(k, 63))
            # The length this instruction had in the last run (of this pass, else the last
            # pass): what a RIP-relative displacement is counted from, and the best guess
            # while keystone has not answered.
            assumed = hint.get(key, prev.lengths.get(key, -1))
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
            raise source_error(st.src, f"'{st.word}' needs at least one value")
        for item in st.args:
            if len(item) == 1 and item[0].kind == "str":
                chunk = item[0].data
                if size > 1 and len(chunk) % size:
                    chunk += bytes(size - len(chunk) % size)
                out += chunk
            elif len(item) == 1 and is_op(item[0], "?"):
                out += bytes(size)
            elif not item:
                raise source_error(st.src, f"empty value in '{st.word}'")
            else:
                v = value(item)
                if not v.unknown and (v.regs or v.reloc not in (0, 1, -1)):
                    raise source_error(st.src, "expression is not simple or relocatable")
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
    pre.run(text, name, directory)
    assembler = Assembler([], worker or default_worker(), name)
    parser = Parser(dirs + [_guests_dir()], assembler.is_instruction, assembler.is_mnemonic)
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
