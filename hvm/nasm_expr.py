"""NASM-syntax tokens, numbers, strings and expressions for the guest assembler (NASM manual ch. 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

MASK64 = (1 << 64) - 1


class ExprError(Exception):
    """A malformed token or expression; the caller adds file and line."""


def to_signed64(n: int) -> int:
    n &= MASK64
    return n - (1 << 64) if n >> 63 else n


# ----------------------------------------------------------------------------------------------
# Tokens

@dataclass(frozen=True)
class Tok:
    kind: str          # "num", "id", "str", "op", "$", "$$"
    text: str          # source text ("op": the operator itself)
    value: int = 0     # "num": the number; "id": 1 if written "$name" (never a register)
    data: bytes = b""  # "str": the bytes the string stands for


# NASM manual 3.1: identifiers start with a letter, "." or "_" ("?" is ours: the operator).
ID_START = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ._")
ID_CHARS = ID_START | set("0123456789$#@~?")
NUM_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_.")
# Longest operators first so that "<<" is not read as two "<".
OPERATORS = ("<<<", ">>>", "<=>", "<<", ">>", "//", "%%", "==", "!=", "<>", "<=", ">=", "&&",
             "||", "^^", "+", "-", "*", "/", "%", "&", "|", "^", "~", "!", "(", ")", "[", "]",
             ",", ":", "<", ">", "=", "?")

_ESCAPES = {"n": 10, "t": 9, "r": 13, "0": 0, "a": 7, "b": 8, "f": 12, "v": 11, "e": 27,
            "\\": 92, "'": 39, '"': 34, "`": 96, "?": 63}


def parse_number(text: str) -> int:
    """A NASM integer constant: 0x1F, 1Fh, $1F, 0b101, 101b, 17q, 0o17, 12d ..."""
    s = text.replace("_", "")
    low = s.lower()
    try:
        if low.startswith("$"):
            return int(low[1:], 16)
        if low.startswith("0x"):
            return int(low[2:], 16)
        if low.endswith("h") or low.endswith("x"):
            return int(low[:-1], 16)
        if len(low) > 2 and low[0] == "0" and low[1] in "hbyoqdt":
            base = {"h": 16, "b": 2, "y": 2, "o": 8, "q": 8, "d": 10, "t": 10}[low[1]]
            return int(low[2:], base)
        if low[-1] in "by":
            return int(low[:-1], 2)
        if low[-1] in "qo":
            return int(low[:-1], 8)
        if low[-1] in "dt":
            return int(low[:-1], 10)
        return int(low, 10)
    except ValueError:
        if "." in low or "e" in low:
            raise ExprError(f"floating-point constant '{text}' is not supported") from None
        raise ExprError(f"invalid number '{text}'") from None


def _backquote_bytes(body: str) -> bytes:
    """Bytes of a `...` string: C-style escapes as NASM reads them (NASM manual 3.4.2)."""
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        i += 1
        if i >= len(body):
            raise ExprError("backslash at end of string")
        e = body[i]
        if e in "01234567":
            j = i
            while j < len(body) and j < i + 3 and body[j] in "01234567":
                j += 1
            out.append(int(body[i:j], 8) & 0xFF)
            i = j
        elif e == "x":
            j = i + 1
            while j < len(body) and j < i + 3 and body[j] in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 1:
                raise ExprError("\\x needs hex digits")
            out.append(int(body[i + 1:j], 16))
            i = j
        elif e in "uU":
            n = 4 if e == "u" else 8
            digits = body[i + 1:i + 1 + n]
            if len(digits) != n:
                raise ExprError(f"\\{e} needs {n} hex digits")
            out += chr(int(digits, 16)).encode("utf-8")
            i += 1 + n
        elif e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 1
        else:
            out += ("\\" + e).encode("utf-8")
            i += 1
    return bytes(out)


def tokenize(text: str) -> list[Tok]:
    """Split one source line (comment already removed) into tokens."""
    toks: list[Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\f\v":
            i += 1
        elif c in "'\"`":
            j = text.find(c, i + 1)
            if c == "`":  # a backquote string ends at an unescaped backquote
                j = i + 1
                while j < n and text[j] != "`":
                    j += 2 if text[j] == "\\" else 1
                j = j if j < n else -1
            if j < 0:
                raise ExprError("unterminated string")
            body = text[i + 1:j]
            data = _backquote_bytes(body) if c == "`" else body.encode("utf-8")
            toks.append(Tok("str", text[i:j + 1], data=data))
            i = j + 1
        elif c.isdigit() or (c == "$" and i + 1 < n and text[i + 1].isdigit()):
            j = i + 1
            while j < n and text[j] in NUM_CHARS:
                j += 1
            toks.append(Tok("num", text[i:j], parse_number(text[i:j])))
            i = j
        elif c == "$" and i + 1 < n and text[i + 1] == "$":
            toks.append(Tok("$$", "$$"))
            i += 2
        elif c == "$" and i + 1 < n and text[i + 1] in ID_START:
            j = i + 1  # "$name": an identifier even if it spells a register or keyword
            while j < n and text[j] in ID_CHARS:
                j += 1
            toks.append(Tok("id", text[i + 1:j], value=1))
            i = j
        elif c == "$":
            toks.append(Tok("$", "$"))
            i += 1
        elif c in ID_START:
            j = i + 1
            while j < n and text[j] in ID_CHARS:
                j += 1
            toks.append(Tok("id", text[i:j]))
            i = j
        else:
            for op in OPERATORS:
                if text.startswith(op, i):
                    toks.append(Tok("op", op))
                    i += len(op)
                    break
            else:
                raise ExprError(f"unexpected character '{c}'")
    return toks


def split_commas(toks: Sequence[Tok]) -> list[list[Tok]]:
    """Split tokens at top-level commas (not inside brackets or parentheses)."""
    parts: list[list[Tok]] = [[]]
    depth = 0
    for t in toks:
        if t.kind == "op" and t.text in "([":
            depth += 1
        elif t.kind == "op" and t.text in ")]":
            depth -= 1
        if t.kind == "op" and t.text == "," and depth == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


def string_value(data: bytes) -> int:
    """A string used as a number: its bytes little-endian ('AB' == 0x4241), as NASM does."""
    if len(data) > 8:
        raise ExprError("character constant longer than 8 bytes")
    return int.from_bytes(data, "little")


# ----------------------------------------------------------------------------------------------
# Values

@dataclass(frozen=True)
class Value:
    """A number, how many times it counts the section base (labels, $, $$), and EA registers."""

    n: int
    reloc: int = 0          # 0: a plain number; 1: an address in the section (label, $)
    unknown: bool = False   # depends on a symbol not yet defined in this pass
    regs: tuple[tuple[str, int], ...] = ()  # (register, scale) terms of an effective address

    @property
    def simple(self) -> bool:
        return self.reloc == 0 and not self.unknown and not self.regs


def _merge_regs(a: tuple[tuple[str, int], ...], b: tuple[tuple[str, int], ...],
                sign: int) -> tuple[tuple[str, int], ...]:
    out: dict[str, int] = dict(a)
    for r, k in b:
        out[r] = out.get(r, 0) + sign * k
    return tuple((r, k) for r, k in out.items() if k)


Resolver = Callable[[str], Value]


class Evaluator:
    """Recursive-descent evaluation with NASM's operator precedence (NASM manual 3.5)."""

    def __init__(self, toks: Sequence[Tok], symbol: Resolver, here: Value | None,
                 base: Value | None, registers: frozenset[str] = frozenset()) -> None:
        self.toks = list(toks)
        self.pos = 0
        self.symbol = symbol
        self.here = here
        self.base = base
        self.registers = registers

    # -- helpers
    def peek(self) -> Tok | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take_op(self, *ops: str) -> str | None:
        t = self.peek()
        if t is not None and t.kind == "op" and t.text in ops:
            self.pos += 1
            return t.text
        return None

    def parse(self) -> Value:
        if not self.toks:
            raise ExprError("expression expected")
        v = self.ternary()
        if self.pos != len(self.toks):
            raise ExprError(f"unexpected '{self.toks[self.pos].text}' in expression")
        return v

    @staticmethod
    def scalar(v: Value, op: str) -> None:
        if v.regs:
            raise ExprError(f"register not allowed with '{op}'")
        if v.reloc and not v.unknown:
            what = {"<<": "shift", ">>": "shift", "<<<": "shift", ">>>": "shift",
                    "/": "division", "//": "division"}.get(op, f"`{op}'")
            raise ExprError(f"{what} operator may only be applied to scalar values")

    def binop(self, a: Value, b: Value, op: str) -> Value:
        unknown = a.unknown or b.unknown
        if op in ("+", "-"):
            sign = 1 if op == "+" else -1
            return Value(to_signed64(a.n + sign * b.n), a.reloc + sign * b.reloc, unknown,
                         _merge_regs(a.regs, b.regs, sign))
        if op == "*":
            if (a.regs or a.reloc) and (b.regs or b.reloc):
                raise ExprError("unable to multiply two non-scalar objects")
            k, other = (b, a) if (a.regs or a.reloc) else (a, b)
            return Value(to_signed64(a.n * b.n), other.reloc * k.n, unknown,
                         tuple((r, s * k.n) for r, s in other.regs if s * k.n))
        self.scalar(a, op)
        self.scalar(b, op)
        x, y = a.n, b.n
        ux, uy = x & MASK64, y & MASK64
        if op in ("/", "//", "%", "%%") and y == 0:
            if unknown:
                return Value(0, 0, True)
            raise ExprError("division by zero")
        if op == "/":
            r = ux // uy
        elif op == "//":
            r = abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)
        elif op == "%":
            r = ux % uy
        elif op == "%%":
            r = x - (abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)) * y
        elif op in ("<<", "<<<"):
            r = ux << (y & 63) if y < 64 else 0
        elif op == ">>":
            r = ux >> y if 0 <= y < 64 else 0
        elif op == ">>>":
            r = x >> min(max(y, 0), 63)
        elif op == "&":
            r = x & y
        elif op == "|":
            r = x | y
        elif op == "^":
            r = x ^ y
        else:
            raise ExprError(f"unknown operator '{op}'")
        return Value(to_signed64(r), 0, unknown)

    # -- grammar, lowest precedence first
    def ternary(self) -> Value:
        c = self.logor()
        if self.take_op("?"):
            a = self.ternary()
            if not self.take_op(":"):
                raise ExprError("':' expected in '?:' expression")
            b = self.ternary()
            return a if c.n else b
        return c

    def logor(self) -> Value:
        v = self.logxor()
        while self.take_op("||"):
            w = self.logxor()
            v = Value(int(bool(v.n) or bool(w.n)), 0, v.unknown or w.unknown)
        return v

    def logxor(self) -> Value:
        v = self.logand()
        while self.take_op("^^"):
            w = self.logand()
            v = Value(int(bool(v.n) != bool(w.n)), 0, v.unknown or w.unknown)
        return v

    def logand(self) -> Value:
        v = self.compare()
        while self.take_op("&&"):
            w = self.compare()
            v = Value(int(bool(v.n) and bool(w.n)), 0, v.unknown or w.unknown)
        return v

    def compare(self) -> Value:
        v = self.bitor()
        while True:
            op = self.take_op("==", "=", "!=", "<>", "<", "<=", ">", ">=", "<=>")
            if op is None:
                return v
            w = self.bitor()
            x, y = v.n, w.n
            r = {"==": x == y, "=": x == y, "!=": x != y, "<>": x != y, "<": x < y,
                 "<=": x <= y, ">": x > y, ">=": x >= y}.get(op)
            n = int(r) if r is not None else (x > y) - (x < y)
            v = Value(n, 0, v.unknown or w.unknown)

    def bitor(self) -> Value:
        v = self.bitxor()
        while self.take_op("|"):
            v = self.binop(v, self.bitxor(), "|")
        return v

    def bitxor(self) -> Value:
        v = self.bitand()
        while self.take_op("^"):
            v = self.binop(v, self.bitand(), "^")
        return v

    def bitand(self) -> Value:
        v = self.shift()
        while self.take_op("&"):
            v = self.binop(v, self.shift(), "&")
        return v

    def shift(self) -> Value:
        v = self.additive()
        while (op := self.take_op("<<", ">>", "<<<", ">>>")) is not None:
            v = self.binop(v, self.additive(), op)
        return v

    def additive(self) -> Value:
        v = self.multiplicative()
        while (op := self.take_op("+", "-")) is not None:
            v = self.binop(v, self.multiplicative(), op)
        return v

    def multiplicative(self) -> Value:
        v = self.unary()
        while (op := self.take_op("*", "/", "//", "%", "%%")) is not None:
            v = self.binop(v, self.unary(), op)
        return v

    def unary(self) -> Value:
        op = self.take_op("-", "+", "~", "!")
        if op is None:
            return self.atom()
        v = self.unary()
        if op == "+":
            return v
        if op == "-":
            return Value(to_signed64(-v.n), -v.reloc, v.unknown,
                         tuple((r, -k) for r, k in v.regs))
        self.scalar(v, op)
        if op == "~":
            return Value(to_signed64(~v.n), 0, v.unknown)
        return Value(int(v.n == 0), 0, v.unknown)

    def atom(self) -> Value:
        t = self.peek()
        if t is None:
            raise ExprError("expression expected")
        self.pos += 1
        if t.kind == "num":
            return Value(t.value)
        if t.kind == "str":
            return Value(string_value(t.data))
        if t.kind == "$":
            if self.here is None:
                raise ExprError("'$' is not allowed here")
            return self.here
        if t.kind == "$$":
            if self.base is None:
                raise ExprError("'$$' is not allowed here")
            return self.base
        if t.kind == "id":
            if not t.value and t.text.lower() in self.registers:
                return Value(0, regs=((t.text.lower(), 1),))
            return self.symbol(t.text)
        if t.kind == "op" and t.text == "(":
            v = self.ternary()
            if not self.take_op(")"):
                raise ExprError("')' expected")
            return v
        raise ExprError(f"unexpected '{t.text}' in expression")


def evaluate(toks: Sequence[Tok], symbol: Resolver, here: Value | None = None,
             base: Value | None = None, registers: frozenset[str] = frozenset()) -> Value:
    """Evaluate an expression; registers are only accepted when `registers` names them."""
    return Evaluator(toks, symbol, here, base, registers).parse()
