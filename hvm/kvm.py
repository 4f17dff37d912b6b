"""A tiny KVM user: a real-mode guest on /dev/kvm whose port I/O Python answers, to time real exits (Linux Documentation/virt/kvm/api.rst, uapi linux/kvm.h).

Everything goes through ioctl(2) (fcntl, or ctypes for one wide argument): KVM_CREATE_VM,
KVM_SET_USER_MEMORY_REGION over an anonymous mmap, KVM_CREATE_VCPU, the vCPU's kvm_run page
mmapped, KVM_SET_SREGS/KVM_SET_REGS for real mode at 0000:1000, then KVM_RUN with
KVM_EXIT_IO answered in Python. Times are wall-clock seconds (time.perf_counter) around the
KVM_RUN loop; hvm/calibrate.py turns them into cycles with the nominal clock from
/proc/cpuinfo (nominal_ghz), not the TSC. An exit to user space is timed one KVM_RUN each;
an exit the kernel handles (CPUID, an OUT to the in-kernel PIC) by a guest that loops it N
times in the kernel and then makes one OUT to user space.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import re
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .nasm import assemble_text

# ioctl numbers as <linux/kvm.h> builds them with _IO/_IOW/_IOR on type KVMIO (0xAE).
KVMIO = 0xAE
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, 32)  # struct kvm_userspace_memory_region
KVM_SET_TSS_ADDR = _ioc(0, 0x47, 0)
KVM_CREATE_IRQCHIP = _ioc(0, 0x60, 0)
KVM_RUN = _ioc(0, 0x80, 0)
KVM_GET_REGS = _ioc(_IOC_READ, 0x81, 144)  # struct kvm_regs: 18 u64
KVM_SET_REGS = _ioc(_IOC_WRITE, 0x82, 144)
KVM_GET_SREGS = _ioc(_IOC_READ, 0x83, 312)  # struct kvm_sregs
KVM_SET_SREGS = _ioc(_IOC_WRITE, 0x84, 312)

KVM_API_VERSION = 12  # the only stable API version there has ever been

# kvm_run.exit_reason values.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {0: "KVM_EXIT_UNKNOWN", 1: "KVM_EXIT_EXCEPTION", 2: "KVM_EXIT_IO",
              3: "KVM_EXIT_HYPERCALL", 4: "KVM_EXIT_DEBUG", 5: "KVM_EXIT_HLT", 6: "KVM_EXIT_MMIO",
              8: "KVM_EXIT_SHUTDOWN", 9: "KVM_EXIT_FAIL_ENTRY", 10: "KVM_EXIT_INTR",
              17: "KVM_EXIT_INTERNAL_ERROR"}
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

# struct kvm_run (x86-64): exit_reason u32 at 8; the exit union at 32, whose `io` member is
# {u8 direction; u8 size; u16 port; u32 count; u64 data_offset} (data_offset from kvm_run).
RUN_EXIT_REASON = 8
RUN_IO = 32
_IO = struct.Struct("<BBHIQ")
# struct kvm_sregs: 8 kvm_segment (24 bytes: u64 base, u32 limit, u16 selector, u8 type,
# present, dpl, db, s, l, g, avl, unusable, padding) cs ds es fs gs ss tr ldt, then gdt, idt
# (kvm_dtable, 16 bytes), cr0, cr2, cr3, cr4, cr8, efer, apic_base, interrupt_bitmap[4].
SREGS_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
SEGMENT_SIZE = 24
# struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags.
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")

GUEST_MEM = 0x10000  # 64 KiB of guest RAM at guest-physical 0
LOAD = 0x1000  # where the guest code goes; CS = 0, IP = LOAD
STACK = 0x8000
TSS_ADDR = 0xFFFBD000  # three pages below 4 GiB that Intel's real-mode emulation may use

# Ports of the guests below. Nothing is emulated in the kernel at 0xE9 or 0xF4, so each
# access exits to user space (KVM_EXIT_IO) as an unassigned port does in QEMU.
PROBE_PORT = 0xE9
DONE_PORT = 0xF4
# The ELCR of the in-kernel 8259 (0x4D0): with KVM_CREATE_IRQCHIP the kernel answers it, as
# kvm-unit-tests' inl_from_kernel/outl_to_kernel use it.
ELCR_PORT = 0x4D0
PROBE_ANSWER = 0x5A  # what Python answers to the probe guest's IN
PROBE_PAST_CPUID = 0xC1  # what the probe guest writes once CPUID has returned to it
KVM_HC_UNKNOWN = 0x7F  # a hypercall number KVM does not know: it answers -KVM_ENOSYS (-1000)
ENOSYS_LOW_BYTE = (-1000) & 0xFF

PROBE_GUEST = f"""bits 16
org {LOAD:#x}
    cli
    mov dx, {PROBE_PORT:#x}
    mov al, 0x42
    out dx, al              ; KVM_EXIT_IO out, port 0xE9, 0x42
    in al, dx               ; KVM_EXIT_IO in: user space answers {PROBE_ANSWER:#x}
    inc al
    out dx, al              ; the answer plus one: proves the IN value reached AL
    xor eax, eax
    cpuid                   ; handled in the kernel: no exit reaches user space
    mov dx, {PROBE_PORT:#x}
    mov al, {PROBE_PAST_CPUID:#x}
    out dx, al              ; the guest went on past CPUID
    hlt                     ; KVM_EXIT_HLT (no in-kernel irqchip)
"""

VMCALL_GUEST = f"""bits 16
org {LOAD:#x}
    cli
    mov eax, {KVM_HC_UNKNOWN:#x}
    vmcall                  ; answered in the kernel: EAX = -KVM_ENOSYS
    mov dx, {PROBE_PORT:#x}
    out dx, al              ; the low byte of -1000: 0x18
    hlt
"""

OUT_LOOP = f"""bits 16
org {LOAD:#x}
    cli
    mov ecx, {{n}}
    mov dx, {PROBE_PORT:#x}
.l: out dx, al              ; one exit to user space per iteration
    dec ecx
    jnz .l
    hlt
"""

# In-kernel exits: the loop never leaves the kernel; one OUT to DONE_PORT ends it.
_IN_KERNEL_LOOP = f"""bits 16
org {LOAD:#x}
    cli
    xor eax, eax
    mov esi, {{n}}
.l: {{body}}
    dec esi
    jnz .l
    mov dx, {DONE_PORT:#x}
    out dx, al
    hlt
"""
IN_KERNEL_BODIES = {
    "cpuid": "xor eax, eax\n    cpuid",
    "vmcall": f"mov eax, {KVM_HC_UNKNOWN:#x}\n    vmcall",
    # outl_to_kernel's access: a write to the in-kernel PIC's ELCR (AL = 0: every line edge)
    "pio": f"mov dx, {ELCR_PORT:#x}\n    out dx, al",
}
DEFAULT_TIMEOUT_S = 10.0  # bound on one run of a probe guest (it needs microseconds)


class KvmUnavailable(Exception):
    """/dev/kvm is missing or refuses to make a VM; str() says why."""


class KvmError(RuntimeError):
    """The guest ended in a way the program did not expect (failed entry, shutdown, ...)."""


@dataclass(frozen=True)
class KvmExit:
    """One exit seen by user space: its reason, and for port I/O what was accessed."""

    reason: int
    port: int | None = None
    size: int | None = None
    direction: str | None = None  # "in" or "out"
    value: int | None = None  # OUT: the byte(s) written; IN: what user space answered

    @property
    def name(self) -> str:
        return EXIT_NAMES.get(self.reason, f"exit {self.reason}")


def _ioctl(fd: int, request: int, arg: int | bytearray = 0) -> int:
    """ioctl(2) through fcntl: an int argument is passed as a C int, a bytearray as a pointer
    to a buffer the kernel may write back into."""
    return fcntl.ioctl(fd, request, arg) if isinstance(arg, int) else fcntl.ioctl(fd, request, arg, True)


def _ioctl_ulong(fd: int, request: int, arg: int) -> int:
    """ioctl(2) with an unsigned long argument too wide for fcntl's C int (through libc)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
    result = libc.ioctl(fd, request, arg)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Deadline:
    """Bound the time KVM_RUN may spend in the guest: SIGALRM interrupts the ioctl and the
    handler raises KvmError. Signals reach only the main thread, so elsewhere there is no bound.
    The previous SIGALRM handler is put back; an interval timer the caller had is cancelled."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread() and seconds > 0
        self.previous: object = None

    def _expired(self, _signum: int, _frame: object) -> None:
        raise KvmError(f"the guest did not exit to user space within {self.seconds:g} s")

    def __enter__(self) -> Deadline:
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)  # type: ignore[arg-type]


def probe() -> str | None:
    """None if a VM can be made here, otherwise the reason it cannot."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no KVM on this host, or not passed into this container)"
    try:
        with KvmVm(b"\xf4") as vm:  # hlt
            exits = vm.run(max_exits=2, timeout_s=5.0)
    except KvmUnavailable as exc:
        return str(exc)
    except (KvmError, OSError) as exc:
        return f"a one-instruction guest (hlt) did not run on KVM: {exc}"
    if exits[-1].reason != KVM_EXIT_HLT:
        return f"a one-instruction guest (hlt) ended with {exits[-1].name}, not KVM_EXIT_HLT"
    return None


class KvmVm:
    """One VM with one vCPU in real mode, CS:IP = 0:LOAD, `code` loaded at LOAD.

    `irqchip=True` creates the in-kernel PIC/IOAPIC/LAPIC first (KVM_CREATE_IRQCHIP), so
    ports such as the ELCR are answered in the kernel; HLT then no longer exits to user space
    and guests end with an OUT to DONE_PORT instead.
    """

    def __init__(self, code: bytes, *, irqchip: bool = False,
                 answer: Callable[[int, int], int] | None = None) -> None:
        self.answer = answer or (lambda _port, _size: 0xFF)
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        try:
            self._open(code, irqchip)
        except BaseException:
            self.close()
            raise

    def _open(self, code: bytes, irqchip: bool) -> None:
        try:
            kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailable(f"cannot open /dev/kvm: {exc.strerror}") from None
        self._fds.append(kvm)
        version = _ioctl(kvm, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            raise KvmUnavailable(f"KVM API version {version}, expected {KVM_API_VERSION}")
        try:
            self.vm = _ioctl(kvm, KVM_CREATE_VM)
        except OSError as exc:
            raise KvmUnavailable(f"KVM_CREATE_VM failed: {exc.strerror}") from None
        self._fds.append(self.vm)
        try:
            _ioctl_ulong(self.vm, KVM_SET_TSS_ADDR, TSS_ADDR)
        except OSError:
            pass  # only Intel without unrestricted guest needs it; AMD has no such ioctl use
        self.memory = mmap.mmap(-1, GUEST_MEM, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._maps.append(self.memory)
        if len(code) > GUEST_MEM - LOAD:
            raise ValueError("guest code does not fit in guest memory")
        self.memory[LOAD:LOAD + len(code)] = code
        host = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        region = bytearray(struct.pack("<IIQQQ", 0, 0, 0, GUEST_MEM, host))
        _ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region)
        if irqchip:
            try:
                _ioctl(self.vm, KVM_CREATE_IRQCHIP)
            except OSError as exc:
                raise KvmUnavailable(f"KVM_CREATE_IRQCHIP failed: {exc.strerror}") from None
        try:
            self.vcpu = _ioctl(self.vm, KVM_CREATE_VCPU, 0)
        except OSError as exc:
            raise KvmUnavailable(f"KVM_CREATE_VCPU failed: {exc.strerror}") from None
        self._fds.append(self.vcpu)
        size = _ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.run_page = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._maps.append(self.run_page)
        self._real_mode()

    def _real_mode(self) -> None:
        """CS base 0 (reset leaves it at 0xFFFF0000), flat real-mode segments, IP = LOAD."""
        sregs = bytearray(312)
        _ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        for i, _name in enumerate(SREGS_SEGMENTS):
            at = i * SEGMENT_SIZE
            struct.pack_into("<QIH", sregs, at, 0, 0xFFFF, 0)  # base 0, limit 64 KiB, selector 0
        _ioctl(self.vcpu, KVM_SET_SREGS, sregs)
        regs = [0] * len(REG_NAMES)
        regs[REG_NAMES.index("rip")] = LOAD
        regs[REG_NAMES.index("rsp")] = STACK
        regs[REG_NAMES.index("rflags")] = 0x2  # bit 1 is always set
        _ioctl(self.vcpu, KVM_SET_REGS, bytearray(struct.pack("<18Q", *regs)))

    def regs(self) -> dict[str, int]:
        buf = bytearray(144)
        _ioctl(self.vcpu, KVM_GET_REGS, buf)
        return dict(zip(REG_NAMES, struct.unpack("<18Q", buf), strict=True))

    def run_once(self) -> KvmExit:
        """KVM_RUN until the next exit to user space; answer an IN, report what happened."""
        _ioctl(self.vcpu, KVM_RUN)  # EINTR from an unrelated signal: Python retries (PEP 475)
        run = self.run_page
        reason = struct.unpack_from("<I", run, RUN_EXIT_REASON)[0]
        if reason != KVM_EXIT_IO:
            return KvmExit(reason)
        direction, size, port, count, offset = _IO.unpack_from(run, RUN_IO)
        if count != 1:  # string I/O: the guests here never do it
            raise KvmError(f"string I/O ({count} elements) at port {port:#x} is not handled here")
        if direction == KVM_EXIT_IO_OUT:
            value = int.from_bytes(run[offset:offset + size], "little")
            return KvmExit(reason, port, size, "out", value)
        value = self.answer(port, size) & ((1 << (8 * size)) - 1)
        run[offset:offset + size] = value.to_bytes(size, "little")
        return KvmExit(reason, port, size, "in", value)

    def run(self, max_exits: int = 1000, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[KvmExit]:
        """Every exit up to and including HLT or an OUT to DONE_PORT."""
        seen: list[KvmExit] = []
        with Deadline(timeout_s):
            for _ in range(max_exits):
                exit_ = self.run_once()
                seen.append(exit_)
                if exit_.reason == KVM_EXIT_HLT or (exit_.direction == "out"
                                                    and exit_.port == DONE_PORT):
                    return seen
                if exit_.reason != KVM_EXIT_IO:
                    raise KvmError(f"guest stopped with {exit_.name} after {len(seen)} exits")
        raise KvmError(f"guest still running after {max_exits} exits")

    def close(self) -> None:
        """vCPU, VM and /dev/kvm descriptors first, then the mappings."""
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()
        for m in reversed(self._maps):
            m.close()
        self._maps.clear()

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def assemble(source: str, **fields: object) -> bytes:
    return assemble_text(source.format(**fields), name="kvm.asm").code


def time_pio_exits(n: int) -> float:
    """Seconds for n OUTs that each exit to user space, are seen by Python and re-entered:
    the whole round trip guest -> kernel -> Python -> kernel -> guest (perf_counter)."""
    if n < 1:
        raise ValueError("time_pio_exits needs at least one exit")
    with KvmVm(assemble(OUT_LOOP, n=n)) as vm, Deadline(DEFAULT_TIMEOUT_S + n * 1e-4):
        run_once = vm.run_once
        start = time.perf_counter()
        for _ in range(n):
            exit_ = run_once()
        end = time.perf_counter()
        if exit_.port != PROBE_PORT or run_once().reason != KVM_EXIT_HLT:
            raise KvmError("the OUT loop guest did not end as written")
    return end - start


def time_in_kernel(kind: str, n: int) -> float:
    """Seconds for a guest that runs `kind` (cpuid, vmcall, or pio: an OUT to the ELCR of the
    in-kernel PIC) n times without leaving the kernel, then one OUT to user space."""
    body = IN_KERNEL_BODIES[kind]
    with KvmVm(assemble(_IN_KERNEL_LOOP, n=n, body=body), irqchip=(kind == "pio")) as vm, \
            Deadline(DEFAULT_TIMEOUT_S + n * 1e-4):
        start = time.perf_counter()
        exit_ = vm.run_once()
        end = time.perf_counter()
        if exit_.direction != "out" or exit_.port != DONE_PORT:
            raise KvmError(f"the {kind} loop guest stopped with {exit_.name} "
                           f"(port {exit_.port}) instead of its OUT to {DONE_PORT:#x}")
    return end - start


def check_vmcall(timeout_s: float = 2.0) -> str | None:
    """None if VMCALL from the real-mode guest comes back with -KVM_ENOSYS as KVM's hypercall
    ABI says, otherwise what happened instead (some KVM back ends, e.g. kvm_pvm, do not
    return from it in real mode)."""
    try:
        with KvmVm(assemble(VMCALL_GUEST)) as vm:
            exits = vm.run(max_exits=3, timeout_s=timeout_s)
    except (KvmError, OSError) as exc:
        return f"VMCALL in real mode did not come back: {exc}"
    first = exits[0]
    if first.direction != "out" or first.value != ENOSYS_LOW_BYTE:
        return (f"VMCALL in real mode came back with {first.name} value {first.value}, not "
                f"-KVM_ENOSYS")
    return None


def backend() -> str:
    """Which KVM back end the host kernel has loaded (kvm_intel, kvm_amd, kvm_pvm), and
    whether this kernel itself runs under a hypervisor (the cpuinfo 'hypervisor' flag)."""
    modules = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path("/sys/module", m).exists()]
    name = "+".join(modules) or "kvm (back end module not found in /sys/module)"
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        flags = None
    if flags and "hypervisor" in flags.group(1).split():
        name += ", itself running under a hypervisor (nested)"
    return name


def nominal_ghz(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[float, str]:
    """The CPU's nominal clock and where it came from: the '@ x.xxGHz' of the model name when
    there is one (Intel names carry it), otherwise the first 'cpu MHz' line."""
    try:
        text = cpuinfo.read_text()
    except OSError as exc:
        raise RuntimeError(f"cannot read {cpuinfo}: {exc.strerror}") from None
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    name = model.group(1).strip() if model else "unknown CPU"
    at = re.search(r"@\s*([0-9.]+)\s*GHz", name)
    if at:
        return float(at.group(1)), f"{cpuinfo} model name '{name}'"
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    if mhz:
        return float(mhz.group(1)) / 1000, f"{cpuinfo} 'cpu MHz' of '{name}'"
    raise RuntimeError(f"{cpuinfo} gives no clock frequency")
