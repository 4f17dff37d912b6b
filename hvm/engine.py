"""The CPU under the vCPU: a Unicorn x86 instance and its raw hooks; the only module that imports unicorn."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import unicorn
from unicorn import x86_const as X
from unicorn.unicorn_py3.arch.intel import (
    HOOK_INSN_CPUID_CFUNC,
    HOOK_INSN_IN_CFUNC,
    HOOK_INSN_OUT_CFUNC,
)
from unicorn.unicorn_py3.unicorn import (
    HOOK_INSN_INVALID_CFUNC,
    HOOK_INTR_CFUNC,
    HOOK_MEM_INVALID_CFUNC,
    MMIO_READ_CFUNC,
    MMIO_WRITE_CFUNC,
    uclib,
)

from .memory import PAGE_SIZE, GuestMemory, HostFrame

MSR_EFER = 0xC000_0080


class Reg(IntEnum):
    """Guest registers by Unicorn's numbering (kept here so no other module imports unicorn)."""

    EAX = X.UC_X86_REG_EAX
    EBX = X.UC_X86_REG_EBX
    ECX = X.UC_X86_REG_ECX
    EDX = X.UC_X86_REG_EDX
    ESI = X.UC_X86_REG_ESI
    EDI = X.UC_X86_REG_EDI
    EBP = X.UC_X86_REG_EBP
    ESP = X.UC_X86_REG_ESP
    EIP = X.UC_X86_REG_EIP
    EFLAGS = X.UC_X86_REG_EFLAGS
    RAX = X.UC_X86_REG_RAX
    RBX = X.UC_X86_REG_RBX
    RCX = X.UC_X86_REG_RCX
    RDX = X.UC_X86_REG_RDX
    RSI = X.UC_X86_REG_RSI
    RDI = X.UC_X86_REG_RDI
    RSP = X.UC_X86_REG_RSP
    RIP = X.UC_X86_REG_RIP
    RFLAGS = X.UC_X86_REG_RFLAGS
    R8 = X.UC_X86_REG_R8
    R10 = X.UC_X86_REG_R10
    CS = X.UC_X86_REG_CS
    DS = X.UC_X86_REG_DS
    ES = X.UC_X86_REG_ES
    SS = X.UC_X86_REG_SS
    FS = X.UC_X86_REG_FS
    GS = X.UC_X86_REG_GS
    CR0 = X.UC_X86_REG_CR0
    CR2 = X.UC_X86_REG_CR2
    CR3 = X.UC_X86_REG_CR3
    CR4 = X.UC_X86_REG_CR4
    DR7 = X.UC_X86_REG_DR7
    FS_BASE = X.UC_X86_REG_FS_BASE
    GS_BASE = X.UC_X86_REG_GS_BASE


SEGMENTS = {"es": Reg.ES, "cs": Reg.CS, "ss": Reg.SS, "ds": Reg.DS, "fs": Reg.FS, "gs": Reg.GS}


class HookSink(Protocol):
    """What the engine calls on the vCPU thread when the guest does something that may exit."""

    def on_in(self, port: int, size: int) -> int: ...
    def on_out(self, port: int, size: int, value: int) -> None: ...
    def on_cpuid(self) -> None: ...
    def on_rdtsc(self) -> None: ...
    def on_invalid_insn(self) -> bool: ...
    def on_interrupt(self, vector: int) -> None: ...
    def on_unmapped(self, write: bool, fetch: bool, address: int, size: int, value: int) -> bool: ...
    def on_hook_exception(self, exc: BaseException) -> None: ...


class EngineError(RuntimeError):
    """Unicorn refused something (a bad mapping, a CPU state it cannot take)."""


@dataclass(frozen=True)
class StopInfo:
    """Why emu_start returned: `error` is Unicorn's error name or None for a normal stop."""

    error: str | None
    hook_exception: BaseException | None


@dataclass(frozen=True)
class SegmentState:
    selector: int
    base: int
    limit: int
    flags: int


_MODES = {16: unicorn.UC_MODE_16, 32: unicorn.UC_MODE_32, 64: unicorn.UC_MODE_64}
_UC_MEM_WRITE_UNMAPPED = unicorn.UC_MEM_WRITE_UNMAPPED
_UC_MEM_FETCH_UNMAPPED = unicorn.UC_MEM_FETCH_UNMAPPED


class Engine:
    """One Unicorn instance for one vCPU; only that vCPU's thread calls into it (but `stop`)."""

    def __init__(self, bits: int, memory: GuestMemory, holes: tuple[tuple[int, int], ...] = ()) -> None:
        if bits not in _MODES:
            raise EngineError(f"unsupported CPU mode: {bits}-bit")
        self.bits = bits
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, _MODES[bits])
        self._h = self.uc._uch
        self._memory = memory
        self._callbacks: list[object] = []  # keep ctypes thunks alive as long as the engine
        self._u64 = ctypes.c_uint64()
        self._u64_ref = ctypes.byref(self._u64)
        self._reg_read = uclib.uc_reg_read
        self._reg_write = uclib.uc_reg_write
        self.hook_exception: BaseException | None = None
        self._sink: HookSink | None = None
        for gpa, length, host in memory.runs():
            for start, end in _minus_holes(gpa, gpa + length, holes):
                self.uc.mem_map_ptr(start, end - start, unicorn.UC_PROT_ALL, host + (start - gpa))
        self.holes = holes
        memory.on_remap(self._remap)

    # -- memory ----------------------------------------------------------------------------------
    def _remap(self, pfn: int, frame: HostFrame) -> None:
        gpa = pfn * PAGE_SIZE
        if any(base <= gpa < base + length for base, length in self.holes):
            return  # a device's page, not RAM the CPU maps
        self.uc.mem_unmap(gpa, PAGE_SIZE)
        self.uc.mem_map_ptr(gpa, PAGE_SIZE, unicorn.UC_PROT_ALL, frame.address)

    def take_remap_listener(self) -> Callable[[int, HostFrame], None]:
        """Stop following GuestMemory.remap by itself; return the function that re-backs one
        page in Unicorn, for a caller that chooses the thread it runs on. (A PV domain's
        pages are flipped by Dom0 threads while its guest runs; Unicorn's memory map may only
        change while this vCPU is stopped.)"""
        self._memory._listeners = [cb for cb in self._memory._listeners if cb != self._remap]
        return self._remap

    def map_mmio(self, base: int, size: int, read: Callable[[int, int], int],
                 write: Callable[[int, int, int], None]) -> None:
        """Map an MMIO range: guest loads and stores in it call read(offset, size)/write(...)."""

        def read_cb(_uc, offset, size, _ud):
            try:
                return read(offset, size)
            except BaseException as exc:  # noqa: BLE001 - reported as an internal failure
                self._fail(exc)
                return 0

        def write_cb(_uc, offset, size, value, _ud):
            try:
                write(offset, size, value)
            except BaseException as exc:  # noqa: BLE001
                self._fail(exc)

        rcb, wcb = MMIO_READ_CFUNC(read_cb), MMIO_WRITE_CFUNC(write_cb)
        self._callbacks += [rcb, wcb]
        status = uclib.uc_mmio_map(self._h, ctypes.c_uint64(base), ctypes.c_size_t(size), rcb, None, wcb, None)
        if status:
            raise EngineError(f"cannot map MMIO at {base:#x}+{size:#x}: {unicorn.UcError(status)}")

    # -- hooks -------------------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """A hook failed or ended the run: remember why and stop the CPU."""
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.hook_exception is None:
            self.hook_exception = exc
            if self._sink is not None:
                self._sink.on_hook_exception(exc)
        uclib.uc_emu_stop(self._h)

    def _add_hook(self, htype: int, thunk: object, *extra: object) -> None:
        handle = ctypes.c_size_t()
        status = uclib.uc_hook_add(self._h, ctypes.byref(handle), htype, thunk, None,
                                   ctypes.c_uint64(1), ctypes.c_uint64(0), *extra)
        if status:
            raise EngineError(f"cannot install hook type {htype}: {unicorn.UcError(status)}")
        self._callbacks.append(thunk)

    def install(self, sink: HookSink, rdtsc_exiting: bool) -> None:
        """One IN and one OUT hook (only the first IN hook's value counts), CPUID, invalid
        opcodes (VMCALL, UD2), interrupts and exceptions, unmapped guest-physical accesses."""
        self._sink = sink
        fail = self._fail
        on_in, on_out = sink.on_in, sink.on_out

        def in_cb(_uc, port, size, _ud):
            try:
                return on_in(port, size)
            except BaseException as exc:  # noqa: BLE001
                fail(exc)
                return 0

        def out_cb(_uc, port, size, value, _ud):
            try:
                on_out(port, size, value)
            except BaseException as exc:  # noqa: BLE001
                fail(exc)

        def cpuid_cb(_uc, _ud):
            try:
                sink.on_cpuid()
            except BaseException as exc:  # noqa: BLE001
                fail(exc)
            return 1  # the hook produced the result: skip Unicorn's own CPUID

        def rdtsc_cb(_uc, _ud):
            try:
                sink.on_rdtsc()
            except BaseException as exc:  # noqa: BLE001
                fail(exc)
            return 1

        def invalid_cb(_uc, _ud):
            try:
                return sink.on_invalid_insn()
            except BaseException as exc:  # noqa: BLE001
                fail(exc)
                return False

        def intr_cb(_uc, vector, _ud):
            try:
                sink.on_interrupt(vector)
            except BaseException as exc:  # noqa: BLE001
                fail(exc)

        def unmapped_cb(_uc, access, address, size, value, _ud):
            try:
                return sink.on_unmapped(access == _UC_MEM_WRITE_UNMAPPED, access == _UC_MEM_FETCH_UNMAPPED,
                                        address, size, value)
            except BaseException as exc:  # noqa: BLE001
                fail(exc)
                return False

        insn = unicorn.UC_HOOK_INSN
        self._add_hook(insn, HOOK_INSN_IN_CFUNC(in_cb), ctypes.c_int(X.UC_X86_INS_IN))
        # A sink may offer its OUT hook with the raw C signature (guarding its own exceptions),
        # saving a Python frame on the most frequent exit.
        raw_out = getattr(sink, "out_hook", None)
        self._add_hook(insn, HOOK_INSN_OUT_CFUNC(raw_out or out_cb), ctypes.c_int(X.UC_X86_INS_OUT))
        self._add_hook(insn, HOOK_INSN_CPUID_CFUNC(cpuid_cb), ctypes.c_int(X.UC_X86_INS_CPUID))
        if rdtsc_exiting:
            # The Python binding refuses RDTSC hooks; the C core has them (same callback shape as CPUID).
            self._add_hook(insn, HOOK_INSN_CPUID_CFUNC(rdtsc_cb), ctypes.c_int(X.UC_X86_INS_RDTSC))
        self._add_hook(unicorn.UC_HOOK_INSN_INVALID, HOOK_INSN_INVALID_CFUNC(invalid_cb))
        self._add_hook(unicorn.UC_HOOK_INTR, HOOK_INTR_CFUNC(intr_cb))
        self._add_hook(unicorn.UC_HOOK_MEM_UNMAPPED, HOOK_MEM_INVALID_CFUNC(unmapped_cb))

    # -- registers -------------------------------------------------------------------------------
    def reg(self, reg: int) -> int:
        """Read one register through the C API directly (the binding's reg_read is ~3x slower).
        Unicorn writes only the register's width into the buffer: clear it first."""
        self._u64.value = 0
        self._reg_read(self._h, reg, self._u64_ref)
        return self._u64.value

    def pc_reader(self) -> Callable[[], int]:
        """A function returning the linear address of the current instruction, as cheap as the
        binding allows: one C call in protected/long mode, two in real mode (CS base + IP)."""
        # A second handle on uc_reg_read without argtypes, called with ready-made ctypes
        # arguments: no per-call conversion (0.34 us instead of 0.58 us a read, measured).
        read = ctypes.CDLL(uclib._name).uc_reg_read
        read.restype = ctypes.c_int
        h = self._h if isinstance(self._h, ctypes.c_void_p) else ctypes.c_void_p(self._h)
        if self.bits == 16:
            buf32 = ctypes.c_uint32()
            ref32 = ctypes.byref(buf32)
            cs, eip = ctypes.c_int(int(Reg.CS)), ctypes.c_int(int(Reg.EIP))

            def pc16() -> int:
                buf32.value = 0
                read(h, cs, ref32)
                base = (buf32.value & 0xFFFF) << 4
                read(h, eip, ref32)
                return (base + (buf32.value & 0xFFFF)) & 0xF_FFFF
            return pc16
        # EIP fills all 4 bytes of a 32-bit buffer: no stale upper half to clear first.
        buf: ctypes.c_uint64 | ctypes.c_uint32 = ctypes.c_uint64() if self.bits == 64 else ctypes.c_uint32()
        ref = ctypes.byref(buf)
        reg = ctypes.c_int(int(Reg.RIP if self.bits == 64 else Reg.EIP))

        def pc() -> int:
            read(h, reg, ref)
            return buf.value
        return pc

    def set_reg(self, reg: int, value: int) -> None:
        self._u64.value = value & 0xFFFF_FFFF_FFFF_FFFF
        self._reg_write(self._h, reg, self._u64_ref)

    def registers_writer(self, regs: Sequence[int]) -> Callable[[Sequence[int]], None]:
        """A function writing values to these registers in ONE C call (uc_reg_write_batch):
        for an exit that sets several at once (CPUID's four)."""
        count = len(regs)
        reg_ids = (ctypes.c_int * count)(*[int(r) for r in regs])
        buffers = [ctypes.c_uint64() for _ in regs]
        pointers = (ctypes.c_void_p * count)(*[ctypes.addressof(b) for b in buffers])
        batch = uclib.uc_reg_write_batch
        h = self._h

        def write(values: Sequence[int]) -> None:
            for buffer, value in zip(buffers, values, strict=True):
                buffer.value = value & 0xFFFF_FFFF_FFFF_FFFF
            batch(h, reg_ids, pointers, count)
        return write

    def set_segment(self, name: str, selector: int) -> None:
        """Load a segment register as a MOV would (in protected mode the descriptor comes from the GDT)."""
        self.uc.reg_write(SEGMENTS[name], selector)

    def segment(self, name: str) -> SegmentState:
        """Selector and the hidden base/limit/flags (read back from the GDT in protected mode)."""
        selector = self.reg(SEGMENTS[name])
        if self.bits == 16 or not self.reg(Reg.CR0) & 1:
            return SegmentState(selector, (selector << 4) & 0xF_FFFF, 0xFFFF, 0)
        gdt_base, gdt_limit = self.table("gdtr")
        index = selector & ~7
        if selector & 4 or index + 7 > gdt_limit or not self._memory.contains(gdt_base + index, 8):
            return SegmentState(selector, 0, 0, 0)
        raw = int.from_bytes(self._memory.read(gdt_base + index, 8), "little")
        base = ((raw >> 16) & 0xFF_FFFF) | (((raw >> 56) & 0xFF) << 24)
        limit = (raw & 0xFFFF) | (((raw >> 48) & 0xF) << 16)
        flags = (raw >> 40) & 0xF0FF  # access byte and G/DB/L/AVL: the VMCS access-rights layout
        if flags & 0x8000:
            limit = (limit << 12) | 0xFFF
        if name in ("fs", "gs") and self.bits == 64:
            base = self.reg(Reg.FS_BASE if name == "fs" else Reg.GS_BASE)
        return SegmentState(selector, base, limit, flags)

    def set_table(self, which: str, base: int, limit: int) -> None:
        reg = X.UC_X86_REG_GDTR if which == "gdtr" else X.UC_X86_REG_IDTR
        self.uc.reg_write(reg, (0, base, limit, 0))

    def table(self, which: str) -> tuple[int, int]:
        reg = X.UC_X86_REG_GDTR if which == "gdtr" else X.UC_X86_REG_IDTR
        _sel, base, limit, _flags = self.uc.reg_read(reg)
        return base, limit

    def msr(self, index: int) -> int:
        return self.uc.msr_read(index)

    def set_msr(self, index: int, value: int) -> None:
        self.uc.msr_write(index, value)

    # -- running ---------------------------------------------------------------------------------
    def run(self, begin: int, count: int = 0) -> StopInfo:
        """Run the guest from linear address `begin` until a hook or another thread stops it,
        HLT, an error (Unicorn returns after HLT with EIP past it), or `count` instructions."""
        self.hook_exception = None
        try:
            self.uc.emu_start(begin, 0xFFFF_FFFF_FFFF_FFFF if self.bits == 64 else 0xFFFF_FFFF,
                              count=count)
            error = None
        except unicorn.UcError as exc:
            error = _error_name(exc.errno)
        return StopInfo(error, self.hook_exception)

    def stop(self) -> None:
        """Stop the guest; safe from any thread (how an external interrupt becomes an exit)."""
        uclib.uc_emu_stop(self._h)

    def close(self) -> None:
        self._memory._listeners = [cb for cb in self._memory._listeners if cb != self._remap]
        self._callbacks.clear()


def _minus_holes(start: int, end: int, holes: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """[start, end) without the (base, length) holes: what of guest RAM the CPU may touch directly."""
    pieces = [(start, end)]
    for base, length in holes:
        out = []
        for lo, hi in pieces:
            if base + length <= lo or base >= hi:
                out.append((lo, hi))
                continue
            if lo < base:
                out.append((lo, base))
            if base + length < hi:
                out.append((base + length, hi))
        pieces = out
    return pieces


def _error_name(errno: int) -> str:
    for key in dir(unicorn):
        if key.startswith("UC_ERR_") and getattr(unicorn, key) == errno:
            return key[len("UC_ERR_"):]
    return f"ERR_{errno}"


# -- baselines for `hvmlab bench`: plain Unicorn, as anyone would use it -------------------------
def _bare_uc(code: bytes, base: int) -> unicorn.Uc:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map(0, 16 << 20)
    uc.mem_write(base, code)
    uc.reg_write(X.UC_X86_REG_ESP, 0x80000)
    return uc


def bare_out_hook_loop(code: bytes, base: int = 0x100000) -> float:
    """Seconds to run `code` on a bare Unicorn with one do-nothing OUT hook (the binding's hook_add)."""
    uc = _bare_uc(code, base)

    def out_hook(_uc, _port, _size, _value, _ud):
        return None

    uc.hook_add(unicorn.UC_HOOK_INSN, out_hook, None, 1, 0, X.UC_X86_INS_OUT)
    start = time.perf_counter()
    uc.emu_start(base, 0xFFFF_FFFF)
    return time.perf_counter() - start


def bare_run(code: bytes, base: int = 0x100000) -> float:
    """Seconds to run `code` on a bare Unicorn without hooks."""
    uc = _bare_uc(code, base)
    start = time.perf_counter()
    uc.emu_start(base, 0xFFFF_FFFF)
    return time.perf_counter() - start
