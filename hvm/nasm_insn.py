"""One x86 instruction as NASM -Ox encodes it: own encodings plus keystone with fix-ups (SDM Vol. 2)."""

# Keystone 0.9.2 (NASM syntax) differs from NASM in ways measured against NASM 2.16:
#  - it reads every decimal number as hex ("10" is 0x10): we only ever give it 0x.. numbers;
#  - it has no "rep movsd", "retn", segment overrides inside [..], or far jumps in 32-bit code;
#  - it adds stray 0x66 prefixes (16-bit push imm, ret, retf, push fs, lgdt in 32-bit code,
#    mov to/from a segment register), orders 0x67 before 0x66, and encodes "xchg r, r" with
#    the operands swapped;
#  - it picks the shortest immediate and displacement forms even where NASM may not: NASM uses
#    the sign-extended imm8 / disp8 forms only for plain numbers, never for addresses (labels,
#    $), and optimizes "mov r64, imm" to "mov r32, imm32" only for plain numbers;
#  - in 64-bit code it makes [abs] memory references RIP-relative or moffs64; NASM uses SIB
#    disp32; in 16-bit code it drops the index register of [ecx*4+disp] (refused here).
# So branches, zero-operand and string instructions (tables in hvm/nasm_tables.py), push imm,
# ret imm, int, push/pop of segment registers and far jumps are encoded here;
# keystone gets plain text with hex numbers only, and the fix-ups below bring its bytes to
# NASM's. tests/test_nasm.py checks a corpus of forms against nasm itself.

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hvm.nasm_expr import ExprError, Tok, Value
from hvm.nasm_tables import (
    BRANCHES,
    EA_WORDS,
    GPR,
    GPR32,
    JCC,
    JCXZ,
    LOOPS,
    OPERAND_WORDS,
    REGISTERS,
    REP_PREFIXES,
    SEG_PREFIX,
    SIZE_PREFIXES,
    SIZE_WORDS,
    SREGS,
    STRING_OPS,
    ZERO_OPERAND,
)

# ALU operations with a sign-extended imm8 form (83 /r ib, 6B /r ib).
SBYTE_OPS = {"add", "or", "adc", "sbb", "and", "sub", "xor", "cmp", "imul"}
DESCRIPTOR_TABLE_OPS = {"lgdt", "lidt", "sgdt", "sidt"}

# Values put in keystone text where NASM forces a full-width field, found and replaced after.
DISP_SENTINEL = {16: 0x7A5B, 32: 0x7A5B3C2D}
IMM_SENTINEL = {16: 0x6C4D, 32: 0x6C4D5E1F}
RIP_GUESS = 7  # length assumed for a RIP-relative instruction until a pass has measured it


class InsnError(Exception):
    """An instruction that cannot be encoded; the caller adds file and line."""


@dataclass
class Plan:
    """How this pass encodes one instruction: our bytes, or keystone text and a fix-up."""

    data: bytes | None = None
    text: str = ""
    finish: Callable[[bytes], bytes] | None = None
    problem: str = ""     # an error that stands only if this pass turns out to be the last
    assumed_len: int = -1  # RIP-relative: the length the displacement was computed for


@dataclass
class Ctx:
    bits: int
    addr: int
    default_rel: bool
    assumed_len: int        # this instruction's length in the previous pass, or -1
    value: Callable[[Sequence[Tok], bool], Value]  # evaluate tokens (registers allowed?)


@dataclass
class Operand:
    kind: str                        # "reg", "imm", "mem", "far"
    words: tuple[str, ...] = ()      # keywords before it: byte, word, short, near, far ...
    reg: str = ""
    value: Value = field(default_factory=lambda: Value(0))  # imm, or mem displacement + regs
    selector: Value = field(default_factory=lambda: Value(0))  # far pointer selector
    segment: str = ""                # mem: segment override
    ea_words: tuple[str, ...] = ()   # mem: rel, abs, nosplit, size inside the brackets

    @property
    def size(self) -> int:
        if self.kind == "reg" and self.reg in GPR:
            return GPR[self.reg][0]
        for w in self.words:
            if w in SIZE_WORDS:
                return SIZE_WORDS[w]
        return 0


def le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def hexnum(n: int) -> str:
    return f"-0x{-n:x}" if n < 0 else f"0x{n:x}"


def fits8(n: int) -> bool:
    return -128 <= n <= 127


# ----------------------------------------------------------------------------------------------
# Operands

def parse_operand(toks: Sequence[Tok], ctx: Ctx) -> Operand:
    toks = list(toks)
    words: list[str] = []
    while toks and toks[0].kind == "id" and not toks[0].value and \
            toks[0].text.lower() in OPERAND_WORDS and len(toks) > 1:
        words.append(toks.pop(0).text.lower())
    if not toks:
        raise ExprError("operand expected")
    first, last = toks[0], toks[-1]
    if first.kind == "op" and first.text == "[":
        if not (last.kind == "op" and last.text == "]"):
            raise ExprError("memory operand must end with ']'")
        inner = toks[1:-1]
        ea_words: list[str] = []
        while inner and inner[0].kind == "id" and inner[0].text.lower() in EA_WORDS:
            ea_words.append(inner.pop(0).text.lower())
        segment = ""
        if len(inner) > 2 and inner[0].kind == "id" and inner[0].text.lower() in SEG_PREFIX \
                and inner[1].kind == "op" and inner[1].text == ":":
            segment = inner[0].text.lower()
            inner = inner[2:]
        return Operand("mem", tuple(words), value=ctx.value(inner, True), segment=segment,
                       ea_words=tuple(ea_words))
    if len(toks) == 1 and first.kind == "id" and not first.value and \
            first.text.lower() in REGISTERS:
        return Operand("reg", tuple(words), reg=first.text.lower())
    depth = 0
    for i, t in enumerate(toks):
        if t.kind == "op" and t.text == "(":
            depth += 1
        elif t.kind == "op" and t.text == ")":
            depth -= 1
        elif t.kind == "op" and t.text == ":" and depth == 0:
            return Operand("far", tuple(words), value=ctx.value(toks[i + 1:], False),
                           selector=ctx.value(toks[:i], False))
    return Operand("imm", tuple(words), value=ctx.value(toks, False))


@dataclass
class Patch:
    sentinel: bytes
    real: bytes


def ea_text(op: Operand, ctx: Ctx, patches: list[Patch]) -> tuple[str, bool]:
    """The [..] text keystone gets, and whether it is RIP-relative."""
    v = op.value
    regs = list(v.regs)
    sizes = {GPR[r][0] for r, _ in regs if r in GPR}
    for r, k in regs:
        if r not in GPR or GPR[r][0] == 8:
            raise ExprError(f"register '{r}' cannot be used in a memory address")
        if k < 0:
            raise ExprError(f"register '{r}' cannot be subtracted in a memory address")
    if len(sizes) > 1:
        raise ExprError("registers of different sizes in one memory address")
    asize = sizes.pop() if sizes else ctx.bits
    words = [w for w in op.ea_words if w in SIZE_WORDS]
    parts: list[str] = []
    if "nosplit" not in op.ea_words:
        # NASM -Ox: [r*1] is [r]; [r*2] is [r+r]; [r*3], [r*5], [r*9] are [r+r*2/4/8].
        if len(regs) == 1 and regs[0][1] in (2, 3, 5, 9):
            r, k = regs[0]
            regs = [(r, 1), (r, k - 1)] if k != 2 else [(r, 1), (r, 1)]
    if asize == 16:
        names = sorted(r for r, _ in regs)
        if any(k != 1 for _, k in regs) or any(r not in ("bx", "bp", "si", "di") for r in names) \
                or len(names) > 2 or names in (["bp", "bx"], ["di", "si"]):
            raise ExprError("invalid 16-bit effective address: use bx or bp, plus si or di")
    if ctx.bits == 16 and asize == 32 and regs and all(k != 1 for _, k in regs):
        # Keystone 0.9.2 drops the index register here (measured); refuse rather than miscode.
        raise InsnError("an index-only 32-bit address ([reg*scale]) is not supported in "
                        "16-bit code; add a base register")
    for r, k in regs:
        if k not in (1, 2, 4, 8):
            raise ExprError(f"invalid scale {k} for register '{r}'")
        parts.append(r if k == 1 else f"{r}*{k}")
    rel = False
    if not regs and ctx.bits == 64:
        wants_rel = "rel" in op.ea_words or (ctx.default_rel and "abs" not in op.ea_words
                                             and op.segment not in ("fs", "gs"))
        # A value not known yet is taken as absolute, as in NASM's first pass (SIB disp32,
        # one byte longer than RIP-relative).
        rel = wants_rel and v.reloc == 1 and not v.unknown
    if rel:
        length = ctx.assumed_len if ctx.assumed_len > 0 else RIP_GUESS
        disp = signed(v.n - (ctx.addr + length), 32)
        return "[" + " ".join(words + [f"rip+{hexnum(disp)}"]) + "]", True
    if regs:
        disp = signed(v.n, 16 if asize == 16 else 32)
        if (v.reloc or v.unknown) and fits8(disp):
            # NASM never uses disp8 for an address: full-width field, patched after keystone.
            width = 16 if asize == 16 else 32
            patches.append(Patch(le(DISP_SENTINEL[width], width // 8), le(disp, width // 8)))
            disp = DISP_SENTINEL[width]
        if disp:
            parts.append(hexnum(disp))
    else:
        disp = v.n & (0xFFFF if asize == 16 else 0xFFFFFFFF)
        if ctx.bits == 64:
            # NASM encodes an absolute address as SIB with no base and no index (disp32).
            parts = ["riz*1", hexnum(signed(disp, 32))]
        else:
            parts.append(hexnum(disp))
    return "[" + " ".join(words + ["+".join(parts)]) + "]", False


# ----------------------------------------------------------------------------------------------
# Encoders of our own

def size_prefix(size: int, bits: int) -> bytes:
    """0x66 / REX.W for an operand size that is not the mode's default."""
    if size == 64:
        if bits != 64:
            raise InsnError("64-bit operand size is only available in 64-bit mode")
        return b"\x48"
    if size == 16 and bits != 16:
        return b"\x66"
    if size == 32 and bits == 16:
        return b"\x66"
    return b""


def addr_prefix(asize: int, bits: int) -> bytes:
    if asize in (0, bits):
        return b""
    if asize == 16 and bits == 64:
        raise InsnError("16-bit addressing is not available in 64-bit mode")
    if asize == 64 and bits != 64:
        raise InsnError("64-bit addressing is only available in 64-bit mode")
    return b"\x67"


def encode_branch(mnem: str, op: Operand, ctx: Ctx) -> Plan:
    """Relative jumps and calls; NASM -Ox picks the short form when the target is in range."""
    v = op.value
    bits = ctx.bits
    near_size = 2 if bits == 16 else 4
    forced_short = "short" in op.words
    forced_near = "near" in op.words or mnem == "call"
    bad = [w for w in op.words if w not in ("short", "near", "strict")]
    if bad:
        raise InsnError(f"'{bad[0]}' is not supported on {mnem} with an immediate target")
    if mnem in LOOPS or mnem in JCXZ:
        if mnem in JCXZ:
            prefix = addr_prefix(JCXZ[mnem], bits) if JCXZ[mnem] != 16 or bits != 64 else None
            if prefix is None:
                raise InsnError("jcxz is not available in 64-bit mode")
            body = prefix + b"\xe3"
        else:
            body = bytes([LOOPS[mnem]])
        return _short(body, v, ctx, always=True)
    if mnem == "jmp":
        short_body, near_body = b"\xeb", b"\xe9"
    elif mnem == "call":
        short_body, near_body = b"", b"\xe8"
    else:
        cc = JCC[mnem]
        short_body, near_body = bytes([0x70 + cc]), bytes([0x0F, 0x80 + cc])
    if forced_short:
        return _short(short_body, v, ctx, always=True)
    if not forced_near:
        # Optimistic while the target is unknown; otherwise short only within the section.
        if v.unknown or v.reloc == 1:
            rel = v.n - (ctx.addr + len(short_body) + 1)
            if v.unknown or fits8(rel):
                return _short(short_body, v, ctx, always=False)
    rel = v.n - (ctx.addr + len(near_body) + near_size)
    return Plan(data=near_body + le(rel, near_size))


def _short(body: bytes, v: Value, ctx: Ctx, always: bool) -> Plan:
    rel = v.n - (ctx.addr + len(body) + 1)
    problem = "" if v.unknown or fits8(rel) else "short jump is out of range"
    return Plan(data=body + le(rel, 1), problem=problem)


def encode_far(mnem: str, op: Operand, ctx: Ctx) -> Plan:
    if ctx.bits == 64:
        raise InsnError(f"far {mnem} with an immediate operand is not valid in 64-bit mode")
    size = op.size or (16 if ctx.bits == 16 else 32)
    if size not in (16, 32):
        raise InsnError(f"far {mnem} takes a word or dword offset")
    opcode = b"\xea" if mnem == "jmp" else b"\x9a"
    return Plan(data=size_prefix(size, ctx.bits) + opcode + le(op.value.n, size // 8)
                + le(op.selector.n, 2))


def encode_push_imm(mnem: str, op: Operand, ctx: Ctx) -> Plan:
    size = op.size
    default = 16 if ctx.bits == 16 else (32 if ctx.bits == 32 else 64)
    if size in (0, 8):
        size = default
    if size == 32 and ctx.bits == 64:
        raise InsnError("push dword is not valid in 64-bit mode")
    if size == 64 and ctx.bits != 64:
        raise InsnError("push qword is only valid in 64-bit mode")
    prefix = b"\x66" if size != default else b""
    width = 2 if size == 16 else 4
    n = signed(op.value.n, 16 if size == 16 else 32)
    # A value not known yet gets the short form, as in NASM's first pass.
    short = op.value.unknown or (op.value.simple and fits8(n))
    if "byte" in op.words or (short and "strict" not in op.words):
        return Plan(data=prefix + b"\x6a" + le(n, 1))
    return Plan(data=prefix + b"\x68" + le(n, width))


def encode_push_sreg(mnem: str, reg: str, ctx: Ctx) -> Plan:
    push = mnem == "push"
    table = {"es": 0x06, "cs": 0x0E, "ss": 0x16, "ds": 0x1E}
    if reg in table:
        if ctx.bits == 64:
            raise InsnError(f"{mnem} {reg} is not valid in 64-bit mode")
        if reg == "cs" and not push:
            raise InsnError("pop cs is not a valid instruction")
        return Plan(data=bytes([table[reg] + (0 if push else 1)]))
    return Plan(data=bytes([0x0F, (0xA0 if reg == "fs" else 0xA8) + (0 if push else 1)]))


# ----------------------------------------------------------------------------------------------
# Keystone fix-ups

def _split_prefixes(data: bytes) -> tuple[bytes, bytes]:
    """Legacy prefixes and REX at the front, and the rest from the opcode on."""
    i = 0
    while i < len(data) and data[i] in (0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E,
                                        0x64, 0x65):
        i += 1
    if i < len(data) and 0x40 <= data[i] <= 0x4F:
        i += 1
    return data[:i], data[i:]


def _apply_patches(data: bytes, patches: Sequence[Patch], text: str) -> bytes:
    for p in patches:
        at = data.find(p.sentinel)
        if at < 0 or data.find(p.sentinel, at + 1) >= 0:
            raise InsnError(f"cannot place an address field in '{text}'")
        data = data[:at] + p.real + data[at + len(p.sentinel):]
    return data


def _drop_66_and_rexw(data: bytes) -> bytes:
    pre, rest = _split_prefixes(data)
    out = bytearray()
    for b in pre:
        if b == 0x66:
            continue
        if 0x40 <= b <= 0x4F:
            b &= ~0x08
            if b == 0x40:
                continue
        out.append(b)
    return bytes(out) + rest


def _order_66_67(data: bytes) -> bytes:
    if data[:2] == b"\x67\x66":
        return b"\x66\x67" + data[2:]
    return data


def _far_indirect(data: bytes, mnem: str, op: Operand, ctx: Ctx) -> bytes:
    """Turn keystone's near indirect jmp/call (FF /4, FF /2) into the far form (FF /5, FF /3)."""
    pre, rest = _split_prefixes(data)
    if len(rest) < 2 or rest[0] != 0xFF:
        raise InsnError(f"cannot encode far {mnem}")
    modrm = rest[1] + 0x08
    if ctx.bits == 64 and op.size != 32:
        rex = 0x48
        if pre and 0x40 <= pre[-1] <= 0x4F:
            rex |= pre[-1]
            pre = pre[:-1]
        pre += bytes([rex])
    return pre + bytes([0xFF, modrm]) + rest[2:]


# ----------------------------------------------------------------------------------------------

def prefix_bytes(prefixes: Sequence[str], ctx: Ctx) -> tuple[bytes, int, int]:
    """Bytes for rep/lock/segment prefix words; and the o16/o32/a16/a32 sizes asked for."""
    rep = lock = seg = b""
    osize = asize = 0
    for p in prefixes:
        if p in REP_PREFIXES:
            rep = bytes([REP_PREFIXES[p]])
        elif p == "lock":
            lock = b"\xf0"
        elif p in SEG_PREFIX:
            seg = bytes([SEG_PREFIX[p]])
        else:
            kind, size = SIZE_PREFIXES[p]
            if kind == "o":
                osize = size
            else:
                asize = size
    return rep + lock + seg, osize, asize


def encode(prefixes: Sequence[str], mnem: str, operand_toks: Sequence[Sequence[Tok]],
           ctx: Ctx) -> Plan:
    """Plan the encoding of one instruction at ctx.addr in ctx.bits mode."""
    pre, osize, asize = prefix_bytes(prefixes, ctx)
    ops = [parse_operand(t, ctx) for t in operand_toks]
    bits = ctx.bits

    def own(plan: Plan) -> Plan:
        if plan.data is not None:
            plan.data = pre + plan.data
        return plan

    if not ops and mnem in ZERO_OPERAND:
        size, body, modes = ZERO_OPERAND[mnem]
        if bits not in modes:
            raise InsnError(f"'{mnem}' is not valid in {bits}-bit mode")
        size = osize or size
        return own(Plan(data=size_prefix(size, bits) + addr_prefix(asize, bits) + body))
    if not ops and mnem in STRING_OPS:
        size, opcode = STRING_OPS[mnem]
        size = osize or size
        return own(Plan(data=(size_prefix(size, bits) if size != 8 else b"")
                        + addr_prefix(asize, bits) + bytes([opcode])))
    if osize or asize:
        raise InsnError("o16/o32/a16/a32 prefixes are only supported on instructions "
                        "without operands")
    if mnem in BRANCHES and len(ops) == 1 and ops[0].kind == "imm":
        return own(encode_branch(mnem, ops[0], ctx))
    if mnem in ("jmp", "call") and len(ops) == 1 and ops[0].kind == "far":
        return own(encode_far(mnem, ops[0], ctx))
    if mnem in ("ret", "retn", "retf") and len(ops) == 1 and ops[0].kind == "imm":
        ret = b"\xca" if mnem == "retf" else b"\xc2"
        return own(Plan(data=ret + le(ops[0].value.n, 2)))
    if mnem == "int" and len(ops) == 1 and ops[0].kind == "imm":
        return own(Plan(data=b"\xcd" + le(ops[0].value.n, 1)))
    if mnem == "push" and len(ops) == 1 and ops[0].kind == "imm":
        return own(encode_push_imm(mnem, ops[0], ctx))
    if mnem in ("push", "pop") and len(ops) == 1 and ops[0].kind == "reg" \
            and ops[0].reg in SREGS:
        return own(encode_push_sreg(mnem, ops[0].reg, ctx))
    if any(op.kind == "far" for op in ops):
        raise InsnError("a seg:offset operand is only valid with jmp and call")

    patches: list[Patch] = []
    is_rel = False
    text_ops: list[str] = []
    far_mem = mnem in ("jmp", "call") and len(ops) == 1 and "far" in ops[0].words
    first_size = ops[0].size if ops else 0   # operand size, for immediates that follow
    # mov r64, imm: NASM uses mov r32, imm32 for plain numbers below 2^32, and the imm64
    # form for addresses.
    if mnem == "mov" and bits == 64 and len(ops) == 2 and ops[0].kind == "reg" \
            and GPR.get(ops[0].reg, (0, 0))[0] == 64 and ops[1].kind == "imm" \
            and set(ops[1].words) <= {"qword", "strict"}:
        v = ops[1].value
        num = GPR[ops[0].reg][1]
        if "strict" in ops[1].words or (not v.simple and not v.unknown):
            return own(Plan(data=bytes([0x48 | (num >> 3), 0xB8 + (num & 7)]) + le(v.n, 8)))
        if v.unknown or 0 <= v.n <= 0xFFFFFFFF:
            r32 = f"r{num}d" if num >= 8 else GPR32[num]
            ops = [Operand("reg", reg=r32), ops[1]]
    for op in ops:
        words = [w for w in op.words if w in SIZE_WORDS]
        if op.kind == "reg":
            text = op.reg
        elif op.kind == "mem":
            text, rel = ea_text(op, ctx, patches)
            is_rel = is_rel or rel
            if op.segment:
                pre += bytes([SEG_PREFIX[op.segment]])
        else:
            # NASM's first pass is optimistic about a value it does not know yet: the
            # sign-extended imm8 and shift-by-one forms; 1 is a value keystone gives them for.
            n = 1 if op.value.unknown else op.value.n
            size = first_size if op is not ops[0] else 0
            if size in (8, 16, 32) and not -(1 << (size - 1)) <= n < (1 << size):
                n &= (1 << size) - 1     # NASM warns and keeps the low bits
            elif size == 64 and not -(1 << 31) <= n < (1 << 31) \
                    and not (mnem == "mov" and ops[0].kind == "reg"):
                n = signed(n, 32)        # imm32 sign-extended: NASM warns and keeps 32 bits
            if mnem in SBYTE_OPS and size in (16, 32, 64) and not op.value.simple \
                    and not op.value.unknown:
                n = signed(n, 16 if size == 16 else 32)
                if fits8(n):
                    width = 16 if size == 16 else 32
                    patches.append(Patch(le(IMM_SENTINEL[width], width // 8),
                                         le(n, width // 8)))
                    n = IMM_SENTINEL[width]
            text = hexnum(n)
        if far_mem:
            words = [w for w in words if w != "dword"] if bits == 64 else words
        text_ops.append(" ".join(words + [text]))
    if mnem == "xchg" and len(ops) == 2 and all(op.kind == "reg" for op in ops):
        text_ops.reverse()  # NASM puts the first operand in ModRM.reg
    text = mnem + (" " + ", ".join(text_ops) if text_ops else "")
    sreg_fix = mnem == "mov" and any(op.kind == "reg" and op.reg in SREGS for op in ops)
    vector = any(op.kind == "reg" and op.reg[:2] in ("xm", "ym", "zm", "mm") for op in ops)
    snapshot = bytes(pre)

    def finish(data: bytes) -> bytes:
        data = _apply_patches(data, patches, text)
        if far_mem:
            data = _far_indirect(data, mnem, ops[0], ctx)
        if mnem in DESCRIPTOR_TABLE_OPS:
            p, rest = _split_prefixes(data)
            data = bytes(b for b in p if b != 0x66) + rest
        if sreg_fix:
            data = _drop_66_and_rexw(data)
            if ops[0].kind == "reg" and ops[0].reg in GPR:
                size = GPR[ops[0].reg][0]
                if (bits == 16 and size == 32) or (bits != 16 and size == 16):
                    data = b"\x66" + data
        if not vector:
            data = _order_66_67(data)
        return snapshot + data

    # Keystone gets the near form of a far indirect jump; finish() makes it far.
    rel_len = (ctx.assumed_len if ctx.assumed_len > 0 else RIP_GUESS) if is_rel else -1
    return Plan(text=text, finish=finish, assumed_len=rel_len)
