"""The hypervisor's exit handlers, dispatched through one table on the basic exit reason (Intel SDM Vol. 3C ch. 28; Xen arch/x86/hvm/vmx/vmx.c's split)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from devicemodel.bus import Bus, Device
from devicemodel.clock import Clock

from . import exit_reasons as R
from . import vmcs as V
from .cpuid import CpuModel
from .engine import Reg
from .hypercall import HypercallTable
from .interrupts import EXCEPTION_NAMES, DeliveryFault, NoHandler, deliver
from .io_router import IoRouter
from .ioreq_client import IoreqClient
from .memory import GuestMemory
from .pc import Platform
from .platform_ports import DebugConsole, DebugExit
from .status import CRASHED, HALTED, LIMIT, GuestEnded, debug_exit
from .vcpu import WINDOW_STEPS, ExitInfo, Vcpu

DEBUGCON_PORT = 0xE9
DEBUG_EXIT_PORT = 0xF4
TSC_HZ = 2_000_000_000
# Devices whose accesses can change when an interrupt is due (kept off the fast path).
TIMER_AND_IRQ_DEVICES = frozenset({"pic-master", "pic-slave", "elcr", "pit", "port61", "rtc"})  # the virtual TSC runs at a nominal 2 GHz of virtual time

ExitFn = Callable[[Vcpu, ExitInfo], "int | list[int] | None"]


class Hypervisor:
    """Handles every exit of a domain's vCPUs: its own devices on the vCPU thread, the rest as
    ioreqs to the device model (through the IoRouter), and the interrupts devices raise."""

    def __init__(self, memory: GuestMemory, console: Callable[[bytes], None], cpu: CpuModel,
                 hypercalls: HypercallTable | None = None, platform: Platform | None = None,
                 ioreq: IoreqClient | None = None, clock: Clock | None = None) -> None:
        self.memory = memory
        self.cpu = cpu
        self.hypercalls = hypercalls or HypercallTable()
        self._console = console
        self.platform = platform
        self.ioreq = ioreq
        self.clock = clock
        if platform is not None:
            self.pio = platform.hv_pio
        else:
            self.pio = Bus("hypervisor-pio", 16)
            self.pio.map(DEBUGCON_PORT, 1, DebugConsole(console), "debugcon")
            self.pio.map(DEBUG_EXIT_PORT, 1, DebugExit(debug_exit), "debug-exit")
        self.router = IoRouter(self.pio, memory, platform, ioreq)
        self._port_cache: dict[int, tuple[int, Device, str] | None] = {}
        # --placement all-dm: the device model has the timers and the PIC (see pc.build)
        self._dm_has_platform_devices = platform is not None and platform.placement != "xen"
        self.interrupts_injected = 0
        self._armed: int | None = None  # the deadline last given to the host timer
        self.timeout_s: float | None = None
        self.user_interrupt = threading.Event()
        self.deadline: float | None = None
        self._table: dict[int, ExitFn] = {
            R.EXCEPTION_NMI: self._exception,
            R.EXTERNAL_INTERRUPT: self._external_interrupt,
            R.TRIPLE_FAULT: self._triple_fault,
            R.INTERRUPT_WINDOW: self._interrupt_window,
            R.CPUID: self._cpuid,
            R.HLT: self._hlt,
            R.RDTSC: self._rdtsc,
            R.VMCALL: self._vmcall,
            R.IO_INSTRUCTION: self._io,
            R.EPT_VIOLATION: self._ept_violation,
        }

    @property
    def ioreqs(self) -> int:
        return self.ioreq.ioreqs if self.ioreq is not None else 0

    @property
    def buffered_ioreqs(self) -> int:
        return self.ioreq.buffered if self.ioreq is not None else 0

    @property
    def unassigned_port_reads(self) -> int:
        extra = self.platform.dm.pio.unassigned_reads if self.platform is not None else 0
        return self.router.unassigned_reads + extra

    @property
    def unassigned_port_writes(self) -> int:
        extra = self.platform.dm.pio.unassigned_writes if self.platform is not None else 0
        return self.router.unassigned_writes + extra

    def exit_table(self) -> dict[int, ExitFn]:
        """Basic exit reason -> handler: the one table every exit is dispatched through."""
        return self._table

    # -- dispatch --------------------------------------------------------------------------------
    def handle_exit(self, vcpu: Vcpu, x: ExitInfo):  # noqa: ANN201 - value depends on the exit
        try:
            handler = self._table[x.reason]
        except KeyError:
            raise GuestEnded("error", 8, f"no handler for exit reason {R.name(x.reason)}") from None
        return handler(vcpu, x)

    # -- port I/O --------------------------------------------------------------------------------
    def io_direct(self, vcpu: Vcpu, port: int, size: int, direction_in: bool, value: int) -> int:
        """An access the I/O bitmaps let through: served at once, without an exit."""
        return self.router.pio(port, size, direction_in, value)[0]

    def _io(self, vcpu: Vcpu, x: ExitInfo) -> int | list[int] | None:
        if x.string:
            values, x.handled_by, sent = self.router.string_pio(x.port, x.size, x.direction_in,
                                                                x.linear, x.count, x.df)
            if sent and vcpu.tracer is not None:
                x.extra = {**(self._ioreq_extra() or {}), "ioreqs": sent}
            if sent:
                self.router.check_shutdown()
            return values
        hit = self._port_cache.get(x.port, False)
        if hit:  # the common case: a port this hypervisor emulates that cannot raise interrupts
            base, device, _name = hit  # type: ignore[misc]
            if x.direction_in:
                return device.read(x.port - base, x.size)
            device.write(x.port - base, x.size, x.data or 0)
            return 0
        if hit is False:
            local = self.router.local_device(x.port)
            self._port_cache[x.port] = None if local is None or local[2] in TIMER_AND_IRQ_DEVICES else local
        value, x.handled_by = self.router.pio(x.port, x.size, x.direction_in, x.data or 0)
        if x.handled_by == "device-model":
            if vcpu.tracer is not None:
                x.extra = self._ioreq_extra()
            self.router.check_shutdown()
            if not self._dm_has_platform_devices:
                # Its devices cannot touch a timer or the PIC's registers: only a line it
                # raised can matter, and that already asked for an interrupt check.
                if vcpu.interrupt_check_requested:
                    vcpu.request_interrupt_check()  # from this thread: leave the guest now
                return value
        if x.handled_by != "unassigned" and self.platform is not None:
            self._after_platform_access(vcpu)
        return value

    def _after_platform_access(self, vcpu: Vcpu) -> None:
        """A guest access may have programmed a timer or unmasked/acknowledged an interrupt:
        re-arm the host timer, and leave the guest for VM entry if INTR is now asserted (an
        inline exit does not pass through VM entry by itself)."""
        assert self.platform is not None
        deadline = self.next_timer_deadline_ns()
        if vcpu.host_timer is not None and deadline != self._armed:
            self._armed = deadline
            vcpu.host_timer.arm(deadline)
        if deadline is not None and not vcpu.running_sliced and vcpu.in_guest:
            vcpu.engine.stop()  # from the vCPU's own thread: exact; the next run goes in slices
        with self.platform.lock:
            pending = self.platform.pic.has_interrupt()
        if pending:
            vcpu.request_interrupt_check()

    def _ioreq_extra(self) -> dict | None:
        assert self.ioreq is not None
        if not self.ioreq.records:
            return None
        rec = self.ioreq.records[-1]
        return {"ioreq": {"hex": rec.posted_bytes.hex(), "answer_hex": rec.answered_bytes.hex(),
                          "device": rec.device},
                "steps": rec.steps}

    # -- interrupts from devices ---------------------------------------------------------------
    def check_interrupts(self, vcpu: Vcpu) -> None:
        """At VM entry: advance timers; if the vPIC asserts INTR, inject it when the guest can
        take it (IF=1, no STI shadow), else ask for an interrupt-window exit."""
        platform = self.platform
        if platform is None:
            return
        if self.clock is not None:
            platform.run_timers(self.clock.now_ns())
        with platform.lock:
            pending = platform.pic.has_interrupt()
        if not pending:
            vcpu.controls.interrupt_window_exiting = False
            return
        if vcpu.reg(Reg.EFLAGS) & (1 << 9) and not vcpu.interrupt_shadow:
            with platform.lock:
                vector = platform.pic.inta()
            vcpu.controls.interrupt_window_exiting = False
            vcpu.vmcs.vmwrite(V.VM_ENTRY_INTR_INFO_FIELD, V.intr_info(vector, V.INTR_TYPE_EXTERNAL))
        elif not vcpu.controls.interrupt_window_exiting:
            vcpu.controls.interrupt_window_exiting = True
            vcpu.window_budget = WINDOW_STEPS

    def _interrupt_window(self, vcpu: Vcpu, x: ExitInfo) -> None:
        """The guest can take interrupts again: the next VM entry injects (check_interrupts)."""
        vcpu.controls.interrupt_window_exiting = False

    def interrupts_may_arrive(self) -> bool:
        """Can an interrupt come from another thread while the guest runs: a device timer is
        armed, or the NIC takes frames from a bridge? Then the vCPU runs in exact slices.
        (Interrupts raised while the vCPU handles an exit stop it from its own thread.)"""
        platform = self.platform
        if platform is None:
            return False
        return platform.nic_connected or self.next_timer_deadline_ns() is not None

    def next_timer_deadline_ns(self) -> int | None:
        return self.platform.next_deadline_ns() if self.platform is not None else None

    # -- instructions ----------------------------------------------------------------------------
    def _cpuid(self, vcpu: Vcpu, x: ExitInfo) -> None:
        leaf, subleaf = vcpu.reg(Reg.EAX) & 0xFFFF_FFFF, vcpu.reg(Reg.ECX) & 0xFFFF_FFFF
        vcpu.set_cpuid_result(self.cpu.query(leaf, subleaf))  # EAX, EBX, ECX, EDX (RAX.. in long mode)
        if vcpu.tracer is not None:
            x.extra = {"leaf": leaf, "subleaf": subleaf}

    def _rdtsc(self, vcpu: Vcpu, x: ExitInfo) -> None:
        offset = vcpu.vmcs.vmread(V.TSC_OFFSET)
        tsc = (offset + vcpu.now_ns() * TSC_HZ // 1_000_000_000) & 0xFFFF_FFFF_FFFF_FFFF
        if vcpu.bits == 64:
            vcpu.set_reg(Reg.RAX, tsc & 0xFFFF_FFFF)
            vcpu.set_reg(Reg.RDX, tsc >> 32)
        else:
            vcpu.set_reg(Reg.EAX, tsc & 0xFFFF_FFFF)
            vcpu.set_reg(Reg.EDX, tsc >> 32)
        x.extra = {"tsc": tsc}

    def _vmcall(self, vcpu: Vcpu, x: ExitInfo) -> None:
        if vcpu.bits == 64:
            number = vcpu.reg(Reg.RAX)
            args = tuple(vcpu.reg(r) for r in (Reg.RDI, Reg.RSI, Reg.RDX, Reg.R10, Reg.R8))
            result_reg, mask = Reg.RAX, 0xFFFF_FFFF_FFFF_FFFF
        else:
            number = vcpu.reg(Reg.EAX) & 0xFFFF_FFFF
            args = tuple(vcpu.reg(r) & 0xFFFF_FFFF for r in (Reg.EBX, Reg.ECX, Reg.EDX, Reg.ESI, Reg.EDI))
            result_reg, mask = Reg.EAX, 0xFFFF_FFFF
        result = self.hypercalls.dispatch(_GuestAccess(self.memory, self._console), number, args)
        vcpu.set_reg(result_reg, result & mask)
        x.extra = {"hypercall": number, "result": result}

    def _hlt(self, vcpu: Vcpu, x: ExitInfo) -> None:
        if not vcpu.reg(Reg.EFLAGS) & (1 << 9):
            raise GuestEnded("halt", HALTED, "guest halted with interrupts disabled")

    def wait_for_interrupt(self, vcpu: Vcpu) -> bool:
        """HLT with IF=1: block (no spinning) until the vPIC asserts INTR, a device timer is
        due, or the host timer (--timeout) / Ctrl-C kicks the vCPU."""
        platform = self.platform
        while True:
            vcpu.wake.clear()
            if vcpu._kicked.is_set():
                return True
            if platform is not None:
                if self.clock is not None:
                    platform.run_timers(self.clock.now_ns())
                with platform.lock:
                    if platform.pic.has_interrupt():
                        return True
            wait = 0.25
            deadline = self.next_timer_deadline_ns()
            if deadline is not None and self.clock is not None:
                wait = min(wait, max(0.0, (deadline - self.clock.now_ns()) / 1e9))
            vcpu.wake.wait(wait)

    # -- events ----------------------------------------------------------------------------------
    def _external_interrupt(self, vcpu: Vcpu, x: ExitInfo) -> None:
        if self.user_interrupt.is_set():
            raise GuestEnded("interrupted", LIMIT, "stopped by the user (Ctrl-C)")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise GuestEnded("timeout", LIMIT, f"guest still running after {self.timeout_s:g} s (--timeout)")

    def _exception(self, vcpu: Vcpu, x: ExitInfo) -> None:
        """Reflect the fault into the guest: VM entry delivers it through the guest's IVT/IDT."""
        has_code = x.vector in (8, 10, 11, 12, 13, 14, 17)
        if x.vector == 14:
            vcpu.set_reg(Reg.CR2, x.qualification)  # delivery of a #PF sets CR2, as the CPU does
        vcpu.vmcs.vmwrite(V.VM_ENTRY_INTR_INFO_FIELD, V.intr_info(x.vector, V.INTR_TYPE_HARD_EXCEPTION, has_code))
        vcpu.vmcs.vmwrite(V.VM_ENTRY_EXCEPTION_ERROR_CODE, 0)

    def _triple_fault(self, vcpu: Vcpu, x: ExitInfo) -> None:
        why = (x.extra or {}).get("why", "")
        raise GuestEnded("triple_fault", CRASHED,
                         f"guest triple-faulted at rip {x.rip:#x} ({why}): the CPU shut down")

    def _ept_violation(self, vcpu: Vcpu, x: ExitInfo) -> int:
        served = self.router.mmio(x.gpa, x.size, x.write, x.data or 0)
        if served is not None:
            value, x.handled_by = served
            if vcpu.tracer is not None and self.ioreq is not None and not x.write:
                x.extra = self._ioreq_extra()
            return value
        kind = "instruction fetch from" if x.fetch else ("write to" if x.write else "read of")
        raise GuestEnded("ept_violation", CRASHED,
                         f"EPT violation: {kind} guest-physical address {x.gpa:#x} at rip {x.rip:#x}, "
                         f"which is neither RAM nor a device")

    def inject(self, vcpu: Vcpu, vector: int, kind: int, error_code: int | None) -> None:
        """VM entry with an event to deliver: vector the guest as the CPU would."""
        engine = vcpu.engine
        return_ip = engine.reg(Reg.RIP if vcpu.bits == 64 else Reg.EIP)
        if vcpu.bits == 16:
            return_ip &= 0xFFFF
        name = EXCEPTION_NAMES.get(vector, f"vector {vector:#x}")
        try:
            deliver(engine, self.memory, vector, return_ip, error_code)
            if kind != V.INTR_TYPE_SOFT_INTR:
                self.interrupts_injected += 1
            return
        except NoHandler:
            raise_crash = f"unhandled {name} at rip {vcpu.linear_pc():#x}: no handler in the IVT"
            raise GuestEnded("fault", CRASHED, f"guest crashed: {raise_crash}") from None
        except DeliveryFault as first:
            reason = f"{name}: {first.why}"
        if kind == V.INTR_TYPE_HARD_EXCEPTION and vector != 8:
            try:
                deliver(engine, self.memory, 8, return_ip, 0)  # double fault
                self.interrupts_injected += 1
                return
            except (DeliveryFault, NoHandler) as second:
                reason += f"; then #DF: {second}"
        vcpu.triple_fault(reason)


class _GuestAccess:
    """Guest memory as a hypercall sees it (HVM guests here run identity-mapped)."""

    def __init__(self, memory: GuestMemory, console: Callable[[bytes], None]) -> None:
        self._memory = memory
        self.console_write = console

    def copy_from_guest(self, address: int, length: int) -> bytes | None:
        if not self._memory.contains(address, length):
            return None
        return self._memory.read(address, length)

    def copy_to_guest(self, address: int, data: bytes) -> bool:
        if not self._memory.contains(address, len(data)):
            return False
        self._memory.write(address, data)
        return True
