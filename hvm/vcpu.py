"""The vCPU: guest events become VM exits recorded in the VMCS, then VM entry resumes the guest (Intel SDM Vol. 3C ch. 26-28)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from . import exit_reasons as R
from . import vmcs as V
from .controls import ExecutionControls
from .decode import DecodeError, Disassembler, IoInstruction, decode_io
from .engine import Engine, Reg
from .exit_info import ExitInfo
from .guest_state import load_guest_field
from .host_timer import HostTimer
from .interrupts import ERROR_CODE_VECTORS
from .memory import GuestMemory
from .qualification import encode_ept
from .status import LIMIT, GuestEnded
from .trace import TraceWriter

WINDOW_STEPS = 20000  # ~4 us each: up to ~80 ms of exact stepping before slicing
WINDOW_SLICE_INSNS = 20_000
# While the guest can take interrupts (IF=1), it runs in slices of this many instructions, so
# the hypervisor regains control at an exact instruction boundary to inject what devices and
# timers raised. Stopping Unicorn from another thread instead (uc_emu_stop) is NOT exact: the
# stop can land after an instruction ran but before RIP moved, and resuming runs it again
# (measured here; Unicorn issue #1355). That is only acceptable for a stop that ends the run.
GUEST_SLICE_INSNS = 200_000
HOST_TIMER_VECTOR = 0xEC  # the host's local-timer vector (Linux LOCAL_TIMER_VECTOR) seen at the exit


class ExitHandler(Protocol):
    """The hypervisor as the vCPU sees it: one entry point per exit, dispatched on reason."""

    def handle_exit(self, vcpu: Vcpu, exit: ExitInfo) -> int | None: ...
    def exit_table(self) -> dict: ...
    def io_direct(self, vcpu: Vcpu, port: int, size: int, direction_in: bool, value: int) -> int: ...


class Vcpu:
    """One virtual CPU: owns its Unicorn engine and VMCS, and runs on its own thread."""

    def __init__(self, vcpu_id: int, engine: Engine, memory: GuestMemory, controls: ExecutionControls,
                 hypervisor: ExitHandler, tracer: TraceWriter | None = None,
                 max_exits: int | None = None, dump_at: int | None = None,
                 t0_ns: int | None = None) -> None:
        self.id = vcpu_id
        self.engine = engine
        self.memory = memory
        self.controls = controls
        self.hv = hypervisor
        self.tracer = tracer
        self.max_exits = max_exits
        self.dump_at = dump_at
        self.dump: dict | None = None
        self.vmcs = V.Vmcs(self._guest_field)
        controls.write_to(self.vmcs)
        self.exit = ExitInfo()
        self.exits = 0
        self._by_reason = [0] * 80  # indexed by basic exit reason
        self.direct_port_accesses = 0
        self.spurious_debug_traps = 0
        self.bits = engine.bits
        self._io_exit_cache: dict[int, bool] = {}  # port | size << 16 -> exits? (from the bitmaps)
        self._pc = engine.pc_reader()
        # CPUID's four results in one C call (see Hypervisor._cpuid)
        self.set_cpuid_result = engine.registers_writer(
            (Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX) if engine.bits == 64 else (Reg.EAX, Reg.EBX, Reg.ECX, Reg.EDX))
        self._ram = memory.ram
        self._io_handler = hypervisor.exit_table()[R.IO_INSTRUCTION]
        self._record_exit = self.vmcs.record_exit
        # Anyone looking at each exit (trace, --dump-vmcs, --max-exits)? If not, the hot path
        # skips filling the parts of ExitInfo only they read.
        self._observed = tracer is not None or dump_at is not None or max_exits is not None
        self._pc_reg = Reg.RIP if self.bits == 64 else Reg.EIP
        self._disasm = Disassembler(self.bits)
        self._io_cache: dict[int, tuple[bytes, IoInstruction, int, str, int, int]] = {}
        self._string: tuple[int, int, list[int] | None] | None = None  # (pc, elements left, IN values)
        self._string_finish: tuple[int, IoInstruction, int, bool, list[int] | None, int] | None = None
        self._event: tuple[str, int, int, int] | None = None  # (kind, vector, pc, cr2)
        self._ending: GuestEnded | None = None
        self._kicked = threading.Event()
        self._thread_id = threading.get_ident()  # the vCPU thread (Vcpu is built on it)
        self.running_sliced = False  # the current run stops every GUEST_SLICE_INSNS instructions
        self.in_guest = False  # inside engine.run (a hook may stop it; outside, a stop would linger)
        self.wake = threading.Event()          # set when a halted vCPU has something to look at
        self.halted = False                    # blocked in HLT, waiting for an interrupt
        self.host_timer: HostTimer | None = None
        self._entry_check = False              # leave the guest to run VM entry's interrupt check
        self.interrupt_shadow = False          # the instruction after STI: interrupts still blocked
        self.window_budget = WINDOW_STEPS      # single steps left before slicing (see _window_step)
        self._t0 = time.monotonic_ns() if t0_ns is None else t0_ns  # virtual time 0 (the devices' clock)

        self.out_hook = self._make_out_hook()

    # -- time and registers ------------------------------------------------------------------------
    @property
    def exits_by_reason(self) -> dict[int, int]:
        return {reason: n for reason, n in enumerate(self._by_reason) if n}

    def controls_changed(self) -> None:
        """The hypervisor changed the execution controls: forget cached decisions."""
        self._io_exit_cache.clear()

    def _io_exits(self, port: int, size: int) -> bool:
        key = port | size << 16
        hit = self._io_exit_cache.get(key)
        if hit is None:
            hit = self._io_exit_cache[key] = self.controls.io_exits(port, size)
        return hit

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._t0

    def reg(self, reg: int) -> int:
        return self.engine.reg(reg)

    def set_reg(self, reg: int, value: int) -> None:
        self.engine.set_reg(reg, value)

    def linear_pc(self) -> int:
        return self._pc()

    def _guest_field(self, encoding: int) -> int | None:
        """Load one guest-state field from the CPU (the VMCS reads guest state lazily)."""
        return load_guest_field(self.engine, self.vmcs, encoding)

    # -- the exit path shared by every reason ----------------------------------------------------
    def _record(self, reason: int, qualification: int, length: int, rip: int, *,
                intr_info: int = 0, linear: int = 0, gpa: int = 0) -> ExitInfo:
        x = self.exit
        if self.tracer is not None:
            x.t_ns = time.monotonic_ns() - self._t0
        x.seq = self.exits
        x.reason = reason
        x.qualification = qualification
        x.length = length
        x.rip = rip
        x.handled_by = "hypervisor"
        x.extra = None
        self.vmcs.record_exit(reason, qualification, length, intr_info, linear, gpa)
        self.exits += 1
        self._by_reason[reason] += 1
        return x

    def _finish(self, x: ExitInfo, io: tuple | None, check_limit: bool = True) -> None:
        """After the handler: trace, VMCS dump, and the --max-exits limit."""
        if self.tracer is not None:
            latency = time.monotonic_ns() - self._t0 - x.t_ns
            self.tracer.add((x.seq, x.t_ns, self.id, x.reason, x.qualification, x.rip, x.insn_json,
                             x.handled_by, latency, io, x.extra))
        if self.dump_at is not None and x.seq == self.dump_at:
            self.dump = {"exit": x.seq, "reason": R.name(x.reason), "vmcs": self._vmcs_views()}
        if check_limit and self.max_exits is not None and self.exits >= self.max_exits:
            raise GuestEnded("max_exits", LIMIT, f"stopped after {self.exits} exits (--max-exits)")

    def _vmcs_views(self) -> list:
        return self.vmcs.fields()

    def _insn_json(self, pc: int) -> str:
        if self.tracer is None:
            return '""'
        code = self.memory.read(pc, min(15, self.memory.size - pc)) if self.memory.contains(pc) else b""
        return self._disasm.json_text(pc, code)

    # -- I/O instructions ------------------------------------------------------------------------
    def _io_decode(self, pc: int) -> tuple[bytes, IoInstruction, int, str, int, int]:
        code = self.memory.read(pc, min(15, self.memory.size - pc))
        try:
            io = decode_io(code, self.bits)
        except DecodeError:
            io = IoInstruction(1, False, False, False, False, 1, 16, "ds", None)
        qual_base = ((io.size - 1) | (8 if io.direction_in else 0) | (16 if io.string else 0)
                     | (32 if io.rep else 0) | (64 if io.immediate else 0))
        insn_json = self._disasm.json_text(pc, code)
        # The trace's site for this instruction (see trace.SITE_TAG), defined before any record
        # that uses it; -1 when nothing is traced.
        site = -1 if self.tracer is None else self.tracer.site(
            (self.id, self._t0, R.IO_INSTRUCTION, qual_base, pc, insn_json, "hypervisor", io.size,
             "in" if io.direction_in else "out", io.string, io.rep, 1))
        entry = (code[:io.length], io, qual_base, insn_json, io.length, site)
        self._io_cache[pc] = entry
        return entry

    def _make_out_hook(self) -> Callable[[object, int, int, int, object], None]:
        """Unicorn's OUT hook itself (raw C signature): the hot path of every port write. It is
        a closure over what it needs, so each exit costs as few Python lookups as possible,
        and it guards itself so no exception can escape into C."""
        pc_of = self._pc
        ram = self._ram
        io_cache = self._io_cache
        exit_cache = self._io_exit_cache
        record_exit = self._record_exit
        by_reason = self._by_reason
        x = self.exit
        io_handler = self._io_handler
        out_tuple = "out"
        tracer = self.tracer
        # Only a trace is looking (no --dump-vmcs, no --max-exits): compact records will do.
        compact = tracer is not None and self.dump_at is None and self.max_exits is None
        # The writer's own list and batch size: one list append per exit (TraceWriter.add inlined).
        pending: list = tracer._pending if tracer is not None else []
        append = pending.append
        observed = self._observed
        batch = tracer._batch if tracer is not None else 0
        drain = tracer._drain if tracer is not None else None
        # The clock as float seconds: CLOCK_MONOTONIC like monotonic_ns (a float is cheaper to
        # make and to marshal than a two-digit int); the writer rounds it back to ns.
        clock = time.perf_counter
        t0 = self._t0

        def out_hook(_uc: object, port: int, size: int, value: int, _ud: object) -> None:
            try:
                if self._ending is not None:
                    return
                pc = pc_of()
                string = self._string
                if string is not None and string[0] == pc:
                    self._string_step()
                    return
                hit = io_cache.get(pc)
                if hit is None or ram[pc:pc + hit[4]] != hit[0]:  # new or self-modified code
                    hit = self._io_decode(pc)
                io = hit[1]
                exits = exit_cache.get(port | size << 16)
                if exits is None:
                    exits = self._io_exits(port, size)
                if not exits:
                    self.direct_port_accesses += 1
                    self.hv.io_direct(self, port, size, False, value)
                    return
                if io.string:
                    self._string_exit(pc, port, size, io, hit[2], hit[3], None)
                    return
                # The VM exit: the VMCS always gets the exit information; ExitInfo gets what
                # the handler reads, and the rest only when someone looks (trace, dump, limit).
                qualification = hit[2] | (port << 16)
                record_exit(30, qualification, hit[4])
                exits_now = self.exits = self.exits + 1
                by_reason[30] += 1
                x.port = port
                x.size = size
                x.direction_in = x.string = False
                x.data = value
                x.handled_by = "hypervisor"
                x.extra = None
                if not observed:
                    io_handler(self, x)
                    return
                if compact:  # only tracing: a compact record of this exit's site (trace.SITE_TAG)
                    t_exit = clock()
                    try:
                        io_handler(self, x)
                    except GuestEnded:
                        x.t_ns = round(t_exit * 1e9) - t0
                        self._fill_out_exit(x, self.exits - 1, pc, qualification, hit)
                        self._finish(x, (port, size, out_tuple, False, False, 1, value), check_limit=False)
                        raise
                    if x.extra is None and x.handled_by == "hypervisor":  # the site's handler
                        append((hit[5], port, exits_now, t_exit, clock(), value))
                        if len(pending) >= batch:
                            drain()  # type: ignore[misc]
                        return
                    x.t_ns = round(t_exit * 1e9) - t0
                    self._fill_out_exit(x, self.exits - 1, pc, qualification, hit)
                    self._finish(x, (port, size, out_tuple, False, False, 1, value))
                    return
                if self.tracer is not None:
                    x.t_ns = time.monotonic_ns() - self._t0
                x.seq = self.exits - 1
                x.reason = 30
                x.qualification = qualification
                x.length = hit[4]
                x.rip = pc
                x.rep = False
                x.count = 1
                x.insn_json = hit[3]
                io_record = (port, size, out_tuple, False, False, 1, value)
                try:
                    io_handler(self, x)
                except GuestEnded:
                    self._finish(x, io_record, check_limit=False)
                    raise
                self._finish(x, io_record)
            except BaseException as exc:  # noqa: BLE001 - never let an exception unwind into Unicorn
                self.engine.fail(exc)

        return out_hook

    @staticmethod
    def _fill_out_exit(x: ExitInfo, seq: int, pc: int, qualification: int, hit: tuple) -> None:
        x.seq = seq
        x.reason = 30
        x.qualification = qualification
        x.length = hit[4]
        x.rip = pc
        x.rep = False
        x.count = 1
        x.insn_json = hit[3]

    def on_out(self, port: int, size: int, value: int) -> None:
        self.out_hook(None, port, size, value, None)

    def on_in(self, port: int, size: int) -> int:
        if self._ending is not None:
            return 0
        pc = self.linear_pc()
        string = self._string
        if string is not None and string[0] == pc:
            return self._string_step()
        hit = self._io_cache.get(pc)
        if hit is None or self._ram[pc:pc + hit[4]] != hit[0]:
            hit = self._io_decode(pc)
        code, io, qual_base, insn_json, _length, _site = hit
        mask = (1 << (8 * size)) - 1
        if not self._io_exits(port, size):
            self.direct_port_accesses += 1
            return self.hv.io_direct(self, port, size, True, 0) & mask
        if io.string:
            return self._string_exit(pc, port, size, io, qual_base, insn_json, True)
        x = self._record(R.IO_INSTRUCTION, qual_base | (port << 16), io.length, pc)
        x.port, x.size, x.direction_in, x.string, x.rep, x.count, x.data = port, size, True, False, False, 1, None
        x.insn_json = insn_json
        try:
            value = (self._io_handler(self, x) or 0) & mask
        except GuestEnded:
            self._finish(x, (port, size, "in", False, False, 1, None), check_limit=False)
            raise
        x.data = value
        if self.tracer is not None or self.dump_at is not None or self.max_exits is not None:
            self._finish(x, (port, size, "in", False, False, 1, value))
        return value

    def _string_exit(self, pc: int, port: int, size: int, io: IoInstruction, qual_base: int,
                     insn_json: str, direction_in: bool | None) -> int:
        """INS/OUTS: ONE exit for the whole (REP) instruction, as on hardware; the elements the
        hooks see afterwards are served from what the handler did at the exit."""
        engine = self.engine
        mask = (1 << io.address_size) - 1
        count_reg, index_reg = self._string_registers(io)
        count = (engine.reg(count_reg) & mask) if io.rep else 1
        offset = engine.reg(index_reg) & mask
        base = engine.segment(io.segment).base if self.bits != 64 else 0
        linear = (base + offset) & (0xF_FFFF if self.bits == 16 else 0xFFFF_FFFF_FFFF_FFFF)
        df = bool(engine.reg(Reg.EFLAGS) & (1 << 10))
        x = self._record(R.IO_INSTRUCTION, qual_base | (port << 16), io.length, pc, linear=linear)
        self.vmcs._fields[V.VMX_INSTRUCTION_INFO] = io.instruction_info
        x.port, x.size, x.direction_in, x.string, x.rep = port, size, io.direction_in, True, io.rep
        x.count, x.data, x.linear, x.df = count, None, linear, df
        x.insn_json = insn_json
        values = self._io_handler(self, x)
        x.extra = {**(x.extra or {}), "linear_address": linear, "df": df}
        in_values = list(values) if io.direction_in and values is not None else None  # type: ignore[call-overload]
        if count > 1:
            self._string = (pc, count - 1, in_values[1:] if in_values is not None else None)
            if self._can_finish_string(io, linear, offset, count, df):
                # Unicorn runs a REP string instruction one element per iteration, each with a
                # hook call. The handler has done them all: stop here and finish the
                # instruction at once (_finish_string).
                self._string_finish = (pc, io, count, df, in_values, base)
                self.engine.stop()
        self._finish(x, (port, size, "in" if io.direction_in else "out", True, io.rep, count, None)
                     if self.tracer else None)
        if in_values:
            return in_values[0]
        return 0

    def _can_finish_string(self, io: IoInstruction, linear: int, offset: int, count: int, df: bool) -> bool:
        """Can the rest of this REP INS/OUTS be skipped in Unicorn? Only when every element's
        memory is RAM (otherwise Unicorn must fault on the element that leaves it), nothing
        single-steps, and the index register does not wrap around its address size."""
        if self.engine.reg(Reg.EFLAGS) & (1 << 8):  # TF: one trap per element
            return False
        span = (count - 1) * io.size
        if (offset - span < 0) if df else (offset + span + io.size > 1 << io.address_size):
            return False
        first = linear - span if df else linear
        return first >= 0 and self.memory.contains(first, span + io.size)

    def _finish_string(self) -> None:
        """After the stop that _string_exit asked for: complete the REP INS/OUTS as the CPU
        would have, for the elements rCX says are left (Unicorn abandons the iteration a stop
        comes in, so that is usually all of them): the IN values stored in guest memory, rCX = 0,
        rDI (INS) or rSI (OUTS) moved past them, rIP past the instruction. OUT values were
        taken at the exit."""
        finish, self._string_finish = self._string_finish, None
        if finish is None:
            return
        pc, io, count, df, in_values, base = finish  # base: of ES for INS (its only segment)
        self._string = None  # from here on no hook serves this instruction's elements
        mask = (1 << io.address_size) - 1
        rcx, index_reg = self._string_registers(io)
        engine = self.engine
        left = engine.reg(rcx) & mask
        if self.linear_pc() != pc or not 0 < left <= count:
            return  # the instruction is over (the guest went on): nothing left to do
        step = -io.size if df else io.size
        index = engine.reg(index_reg)
        if io.direction_in and in_values is not None:  # what Unicorn would have stored, one by one
            self.memory.write_elements(base + (index & mask), io.size, in_values[count - left:], step)
        engine.set_reg(index_reg, _with_low(index, index + step * left, io.address_size))
        engine.set_reg(rcx, _with_low(engine.reg(rcx), 0, io.address_size))
        ip_mask = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: (1 << 64) - 1}[self.bits]
        engine.set_reg(self._pc_reg, (engine.reg(self._pc_reg) + io.length) & ip_mask)

    def _string_registers(self, io: IoInstruction) -> tuple[int, int]:
        """A string instruction's count register and index register (rDI for INS, rSI for OUTS)."""
        if self.bits == 64:
            return Reg.RCX, Reg.RDI if io.direction_in else Reg.RSI
        return Reg.ECX, Reg.EDI if io.direction_in else Reg.ESI

    def _string_step(self) -> int:
        assert self._string is not None
        pc, left, values = self._string
        value = values.pop(0) if values else 0
        self._string = (pc, left - 1, values) if left > 1 else None
        return value

    def _handle(self, x: ExitInfo) -> None:
        """Dispatch an exit from inside a hook; an ending is still traced before it propagates."""
        try:
            self.hv.handle_exit(self, x)
        except GuestEnded:
            self._finish(x, None, check_limit=False)
            raise
        self._finish(x, None)

    # -- other instructions that exit ------------------------------------------------------------
    def on_cpuid(self) -> None:
        if self._ending is not None:
            return
        pc = self.linear_pc()
        x = self._record(R.CPUID, 0, 2, pc)
        x.insn_json = self._insn_json(pc)
        self._handle(x)

    def on_rdtsc(self) -> None:
        if self._ending is not None:
            return
        pc = self.linear_pc()
        x = self._record(R.RDTSC, 0, 2, pc)
        x.insn_json = self._insn_json(pc)
        self._handle(x)

    def on_invalid_insn(self) -> bool:
        """VMCALL (0F 01 C1) exits to the hypervisor; any other invalid opcode is #UD."""
        if self._ending is not None:
            return False
        pc = self.linear_pc()
        if self.memory.contains(pc, 3) and self.memory.read(pc, 3) == b"\x0f\x01\xc1":
            x = self._record(R.VMCALL, 0, 3, pc)
            x.insn_json = self._insn_json(pc)
            self._handle(x)
            self.engine.set_reg(self._pc_reg, self.engine.reg(self._pc_reg) + 3)  # VM entry skips it
            return True
        self._event = ("exception", 6, pc, 0)
        return False

    def on_interrupt(self, vector: int) -> None:
        """Unicorn raised an interrupt: a CPU exception (RIP at the faulting instruction) or
        INT n / INT3 / INTO (RIP after it). Handled after Unicorn returns, where RIP/CS are exact."""
        pc = self.linear_pc()
        mem = self.memory
        if vector == 1 and not self.engine.reg(Reg.EFLAGS) & (1 << 8) and not (
                mem.contains(pc - 1) and mem.read(pc - 1, 1) == b"\xf1"):
            # Unicorn reports a debug trap of its own when a stop request meets a single step;
            # the guest neither set TF nor executed INT1: nothing happened in the guest.
            self.spurious_debug_traps += 1
            return
        soft = ((vector == 3 and mem.contains(pc - 1) and mem.read(pc - 1, 1) == b"\xcc")
                or (vector == 4 and mem.contains(pc - 1) and mem.read(pc - 1, 1) == b"\xce")
                or (mem.contains(pc - 2, 2) and mem.read(pc - 2, 2) == bytes((0xCD, vector))))
        # CR2 is only right inside the hook (Unicorn's way out clobbers it): keep it with the event.
        cr2 = self.engine.reg(Reg.CR2) if vector == 14 else 0
        self._event = ("soft" if soft else "exception", vector, pc, cr2)
        self.engine.stop()

    def on_unmapped(self, write: bool, fetch: bool, address: int, size: int, value: int) -> bool:
        """An access to guest-physical memory that EPT does not map: EPT_VIOLATION."""
        if self._ending is not None:
            return False
        pc = self.linear_pc()
        x = self._record(R.EPT_VIOLATION, encode_ept(not write and not fetch, write, fetch), 0, pc,
                         linear=address, gpa=address)
        x.gpa, x.write, x.fetch, x.size, x.data = address, write, fetch, size, value if write else None
        x.insn_json = self._insn_json(pc) if not fetch else '""'
        self._handle(x)
        return False

    def mmio_access(self, gpa: int, size: int, write: bool, value: int) -> int:
        """A load or store to a page EPT leaves unmapped because a device lives there: an
        EPT_VIOLATION exit that the hypervisor turns into a COPY ioreq (Xen: p2m_mmio_dm)."""
        if self._ending is not None:
            return 0
        pc = self.linear_pc()
        x = self._record(R.EPT_VIOLATION, encode_ept(not write, write, False), 0, pc, linear=gpa, gpa=gpa)
        x.gpa, x.write, x.fetch, x.size, x.data = gpa, write, False, size, value if write else None
        x.insn_json = self._insn_json(pc)
        try:
            result = self.hv.handle_exit(self, x) or 0
        except GuestEnded:
            self._finish(x, None, check_limit=False)
            raise
        if not write:
            x.data = result
        self._finish(x, None)
        return result

    def on_hook_exception(self, exc: BaseException) -> None:
        """A handler ended the run (or failed) inside a hook: the rest of Unicorn's block still
        runs, so every later hook must do nothing."""
        if isinstance(exc, GuestEnded):
            self._ending = exc
        else:
            self._ending = GuestEnded("error", 8, f"internal error: {type(exc).__name__}: {exc}")

    # -- external events -------------------------------------------------------------------------
    def kick(self) -> None:
        """Another thread wants the vCPU out of the guest (a host interrupt): emu_stop."""
        self._kicked.set()
        self.wake.set()
        self.engine.stop()

    def timer_fired(self, retry: bool) -> int | None:
        """The host timer for a device deadline: wake a halted vCPU; kick a running one (an
        EXTERNAL_INTERRUPT exit) and ask to be called again until the kick has been seen."""
        if self.halted:
            self.wake.set()
            return None
        # The running vCPU notices at its next slice boundary (an exact stop; see
        # GUEST_SLICE_INSNS), records the EXTERNAL_INTERRUPT exit and runs the timers.
        self._kicked.set()
        return None

    # -- the run loop ----------------------------------------------------------------------------
    def run(self, wait_for_interrupt: Callable[[Vcpu], bool]) -> GuestEnded:
        """Run until the guest ends; returns how it ended. `wait_for_interrupt` blocks a halted
        vCPU (HLT with IF=1) until there is something to do; False if it should stop waiting."""
        while True:
            try:
                self._run_once(wait_for_interrupt)
            except GuestEnded as ending:
                self._ending = ending
            if self._ending is not None:
                return self._ending

    def _run_once(self, wait_for_interrupt: Callable[[Vcpu], bool]) -> None:
        """VM entry, guest execution until the next stop, and the exit that stop means."""
        self._vm_entry()
        if self._kicked.is_set():
            self._external_interrupt()
            return
        self.vmcs.guest_stale()
        if self.controls.interrupt_window_exiting:
            self._window_step()
            return
        self.interrupt_shadow = False
        sliced = self.running_sliced = self.hv.interrupts_may_arrive()  # type: ignore[attr-defined]
        # emu_start sets RIP from `begin`: the current one
        self.in_guest = True
        try:
            stop = self.engine.run(self.linear_pc(), count=GUEST_SLICE_INSNS if sliced else 0)
        finally:
            self.in_guest = False
        exc = stop.hook_exception
        if exc is not None:
            if isinstance(exc, GuestEnded):
                raise exc
            raise exc  # a bug in a handler: the machine reports it as an internal failure
        if self._string_finish is not None:
            self._finish_string()
        event, self._event = self._event, None
        if event is not None:
            self._exception_or_soft(*event)
        elif stop.error is None and self._after_hlt():
            # The guest halted; a kick that came meanwhile waits for the next VM entry (taking
            # it first would resume the guest past its HLT).
            self._entry_check = False
            self._halted(wait_for_interrupt)
        elif self._kicked.is_set():
            self._external_interrupt()
        elif stop.error is None:
            self._entry_check = False  # a slice ended (or a stop for VM entry): go round again
        else:
            self._engine_error(stop.error)

    def _vm_entry(self) -> None:
        """VM entry: deliver the event in VM_ENTRY_INTR_INFO_FIELD, then clear its valid bit.
        With none there, the hypervisor first looks for a pending interrupt to inject."""
        info = self.vmcs._fields[V.VM_ENTRY_INTR_INFO_FIELD]
        if not info & V.INTR_INFO_VALID:
            self.hv.check_interrupts(self)  # type: ignore[attr-defined]
            info = self.vmcs._fields[V.VM_ENTRY_INTR_INFO_FIELD]
            if self.host_timer is not None:
                self.host_timer.arm(self.hv.next_timer_deadline_ns())  # type: ignore[attr-defined]
            if not info & V.INTR_INFO_VALID:
                return
        self.vmcs._fields[V.VM_ENTRY_INTR_INFO_FIELD] = 0
        self.hv.inject(self, info & 0xFF, (info >> 8) & 7,  # type: ignore[attr-defined]
                       self.vmcs._fields[V.VM_ENTRY_EXCEPTION_ERROR_CODE]
                       if info & V.INTR_INFO_DELIVER_CODE else None)

    def _call(self, x: ExitInfo) -> None:
        try:
            self.hv.handle_exit(self, x)
            self._finish(x, None)
        except GuestEnded as ending:
            self._finish(x, None, check_limit=False)
            self._ending = ending

    def _external_interrupt(self) -> None:
        self._kicked.clear()
        pc = self.linear_pc()
        x = self._record(R.EXTERNAL_INTERRUPT, 0, 0, pc,
                         intr_info=V.intr_info(HOST_TIMER_VECTOR, V.INTR_TYPE_EXTERNAL))
        x.vector = HOST_TIMER_VECTOR
        self._call(x)

    def _after_hlt(self) -> bool:
        pc = self.linear_pc()
        return self.memory.contains(pc - 1) and self.memory.read(pc - 1, 1) == b"\xf4"

    @property
    def interrupt_check_requested(self) -> bool:
        """Has something asked for VM entry's interrupt check that has not run yet?"""
        return self._entry_check

    def request_interrupt_check(self) -> None:
        """Another thread raised an interrupt line: wake a halted vCPU; a running one sees it at
        its next slice boundary and VM entry injects it (no exit is recorded: nothing the guest
        did). No uc_emu_stop from here: it is not exact (see GUEST_SLICE_INSNS)."""
        self._entry_check = True
        self.wake.set()
        if self.in_guest and threading.get_ident() == self._thread_id:
            # Raised while this vCPU handles an exit (e.g. a device answering an ioreq): a stop
            # from the vCPU's own thread is exact; the rest of the block runs first.
            self.engine.stop()

    def _window_step(self) -> None:
        """Interrupt-window exiting: run until the guest can take an interrupt (IF=1 and past
        the STI shadow), then exit with reason 7. The first WINDOW_STEPS instructions go one at
        a time, so a short CLI section opens its window at the exact instruction; a long one
        then runs in slices of WINDOW_SLICE_INSNS and the window is seen at a slice boundary
        (interrupts are asynchronous to the guest: it cannot tell)."""
        pc = self.linear_pc()
        was_sti = self.memory.contains(pc) and self.memory.read(pc, 1) == b"\xfb"
        if self.window_budget > 0:
            self.window_budget -= 1
            stop = self.engine.run(pc, count=1)
        else:
            was_sti = False
            stop = self.engine.run(pc, count=WINDOW_SLICE_INSNS)
        exc = stop.hook_exception
        if exc is not None:
            raise exc
        event, self._event = self._event, None
        if event is not None:
            self._exception_or_soft(*event)
            return
        if stop.error is not None:
            self._engine_error(stop.error)
            return
        if self._after_hlt() and self.linear_pc() != pc:
            self._halted(lambda _vcpu: True)
        self.interrupt_shadow = was_sti
        if self.engine.reg(Reg.EFLAGS) & (1 << 9) and not was_sti:
            x = self._record(R.INTERRUPT_WINDOW, 0, 0, self.linear_pc())
            x.insn_json = self._insn_json(self.linear_pc())
            self._call(x)

    def _halted(self, wait_for_interrupt: Callable[[Vcpu], bool]) -> None:
        pc_after = self.linear_pc()
        hlt_pc = pc_after - 1
        if not (self.memory.contains(hlt_pc) and self.memory.read(hlt_pc, 1) == b"\xf4"):
            self._ending = GuestEnded("error", 8, f"the CPU stopped at {pc_after:#x} for no known reason")
            return
        if self.controls.hlt_exiting:
            x = self._record(R.HLT, 0, 1, hlt_pc)
            self.vmcs._fields[V.GUEST_RIP] = hlt_pc if self.bits != 16 else (self.engine.reg(Reg.EIP) - 1) & 0xFFFF
            self.vmcs._available.add(V.GUEST_RIP)
            x.insn_json = self._insn_json(hlt_pc)
            self._call(x)
        elif not self.engine.reg(Reg.EFLAGS) & (1 << 9):
            self._ending = GuestEnded("halt", 0, "guest halted with interrupts disabled")
        self.halted = True
        try:
            woken = self._ending is not None or wait_for_interrupt(self)
        finally:
            self.halted = False
        if not woken:
            self._ending = self._ending or GuestEnded("error", 8, "halted vCPU was never woken")

    def triple_fault(self, why: str) -> None:
        """Delivery of a fault faulted again, and so did #DF: the CPU shuts down (exit 2)."""
        pc = self.linear_pc()
        x = self._record(R.TRIPLE_FAULT, 0, 0, pc)
        x.extra = {"why": why}
        x.insn_json = self._insn_json(pc)
        self._call(x)
        if self._ending is not None:
            raise self._ending

    def _exception_or_soft(self, kind: str, vector: int, pc: int, cr2: int = 0) -> None:
        if kind == "soft":
            # INT n is not intercepted (no VMX control for it): the CPU vectors straight away.
            self.hv.inject(self, vector, V.INTR_TYPE_SOFT_INTR, None)  # type: ignore[attr-defined]
            return
        has_code = vector in ERROR_CODE_VECTORS
        # SDM 28.2.1: for a #PF the exit qualification is the faulting linear address (CR2).
        qualification = cr2 if vector == 14 else 0
        x = self._record(R.EXCEPTION_NMI, qualification, 0, pc,
                         intr_info=V.intr_info(vector, V.INTR_TYPE_HARD_EXCEPTION, has_code))
        x.vector = vector
        x.insn_json = self._insn_json(pc)
        if self.controls.exception_bitmap >> vector & 1:
            self._call(x)
        else:
            self.exits -= 1
            self._by_reason[R.EXCEPTION_NMI] -= 1
            self.hv.inject(self, vector, V.INTR_TYPE_HARD_EXCEPTION, 0 if has_code else None)  # type: ignore[attr-defined]

    def _engine_error(self, error: str) -> None:
        pc = self.linear_pc()
        if error in ("INSN_INVALID",):
            self._exception_or_soft("exception", 6, pc)
        elif error in ("READ_UNMAPPED", "WRITE_UNMAPPED", "FETCH_UNMAPPED"):
            # the unmapped hook already recorded the EPT violation and ended the run
            self._ending = self._ending or GuestEnded("ept_violation", 4, f"EPT violation at rip {pc:#x}")
        elif error in ("READ_PROT", "WRITE_PROT", "FETCH_PROT", "EXCEPTION"):
            self._exception_or_soft("exception", 13, pc)
        else:
            self._ending = GuestEnded("fault", 4, f"the CPU could not go on at {pc:#x}: {error}")


def _with_low(old: int, low: int, address_size: int) -> int:
    """A register after a write of `low` with the given address size: 16 bits keep the rest,
    32 bits zero-extend (as on x86-64), 64 bits replace it."""
    if address_size == 16:
        return (old & ~0xFFFF) | (low & 0xFFFF)
    return low & ((1 << address_size) - 1)
