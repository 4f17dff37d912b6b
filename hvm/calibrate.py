"""`hvmlab calibrate`: a cost profile measured on this machine, hvmlab's own per-event costs (hvm/bench.py's method) and the real KVM exit costs beside them (hvm/kvm.py)."""

from __future__ import annotations

import datetime
import mmap
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import bench, kvm
from .console import ConsoleSink
from .costmodel import (
    DEFAULT_MEASURED_PATH,
    FIGURE_KEYS,
    Figure,
    Profile,
    dump_profile,
    load_profile,
)

BASE_PROFILE = "kvm-2024"  # where the figures calibrate cannot measure come from (marked assumed)
MIB = 1 << 20

# An HVM hypercall: xen_version(XENVER_version) through VMCALL, answered by hvm/hypercall.py.
VMCALL_LOOP = """bits 32
org 0x100000
    cli
    mov esi, {n}
.l: mov eax, 17             ; __HYPERVISOR_xen_version
    xor ebx, ebx            ; XENVER_version
    xor ecx, ecx
    vmcall
    dec esi
    jnz .l
    hlt
"""

# A PV guest (started as Xen starts an x86_32 PV kernel): n hypercalls, each `batch`
# GNTTABOP_copy entries (batch 0: xen_version instead), then SCHEDOP_shutdown. The guest
# checks that its copies succeeded and shuts down with SHUTDOWN_crash if one did not.
PV_LOOP = """bits 32
org 0x100000
    mov esi, {n}
.l: {body}
    int 0x82
    dec esi
    jnz .l
    mov ebx, 2              ; SCHEDOP_shutdown
    mov ecx, reason
{check}
    mov eax, 29             ; __HYPERVISOR_sched_op
    int 0x82
.h: hlt
    jmp .h
.bad:
    mov dword [reason], 3   ; SHUTDOWN_crash
    mov ebx, 2
    mov ecx, reason
    mov eax, 29
    int 0x82
    jmp .h
reason: dd 0                ; SHUTDOWN_poweroff
align 4
ops:
{ops}
"""
XEN_VERSION_BODY = "mov eax, 17\n    xor ebx, ebx\n    xor ecx, ecx"
GRANT_COPY_BODY = "mov eax, 20\n    mov ebx, 5\n    mov ecx, ops\n    mov edx, {batch}"
GRANT_CHECK = "    cmp word [ops + {status}], 0\n    jne .bad"
COPY_SRC_PFN, COPY_DST_PFN = 0x10, 0x11  # two of the guest's own frames (pfn 0x10-0x7F)
COPY_LEN = 8
GRANT_BATCH = 16


@dataclass(frozen=True)
class Measured:
    """Seconds per item: median, min and max over bench.REPEATS (bench._per_item)."""

    median: float
    low: float
    high: float
    what: str


Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def _hvm(source: str) -> Callable[[int], float]:
    return lambda k: bench._timed_run(source, k)


def _pv_source(n: int, batch: int) -> str:
    if batch == 0:
        return PV_LOOP.format(n=n, body=XEN_VERSION_BODY, check="", ops="    dd 0")
    from pv.grant_table import DOMID_SELF
    from pv.layouts import X86_32, gnttab_copy

    layout = gnttab_copy(X86_32)
    op = layout()
    op.source.u.gmfn, op.source.domid, op.source.offset = COPY_SRC_PFN, DOMID_SELF, 0
    op.dest.u.gmfn, op.dest.domid, op.dest.offset = COPY_DST_PFN, DOMID_SELF, 0
    op.len, op.flags, op.status = COPY_LEN, 0, -1  # status -1 until Xen writes GNTST_okay
    line = "    db " + ", ".join(f"{b:#04x}" for b in bytes(op))
    status = layout.status.offset + (batch - 1) * len(bytes(op))  # the last entry's status
    return PV_LOOP.format(n=n, body=GRANT_COPY_BODY.format(batch=batch),
                          check=GRANT_CHECK.format(status=status), ops="\n".join([line] * batch))


def _pv(batch: int) -> Callable[[int], float]:
    """Seconds of the PV domain's run (PvRunResult.wall_s: vCPU start to shutdown)."""
    from pv.domain import PvOptions, run_pv

    def measure(n: int) -> float:
        image = bench._image(_pv_source(n, batch), 1)  # the count is already in the source
        result = run_pv(image, PvOptions(timeout_s=600, backends=[]), ConsoleSink(limit=0))
        if result.ended_by != "shutdown_poweroff":
            raise RuntimeError(f"calibration PV guest ended by {result.ended_by}: {result.message}")
        return result.wall_s

    return measure


def _notify_seconds(n: int) -> float:
    """n notifications on an interdomain event channel nobody is waiting on."""
    from .evtchn import make_interdomain_pair

    mine, theirs = make_interdomain_pair(name="calibrate")
    try:
        start = time.perf_counter()
        for _ in range(n):
            mine.notify()
        elapsed = time.perf_counter() - start
        theirs.consume()
    finally:
        mine.close()
        theirs.close()
    return elapsed


def _copy_seconds(mib: int) -> float:
    """mib MiB copied between two guest-RAM-like host mappings through memoryviews, as the
    device model and the backends move data."""
    with mmap.mmap(-1, MIB) as src, mmap.mmap(-1, MIB) as dst:
        src.write(os.urandom(4096) * (MIB // 4096))
        with memoryview(src) as s, memoryview(dst) as d:
            start = time.perf_counter()
            for _ in range(mib):
                d[:] = s
            elapsed = time.perf_counter() - start
        if dst[:] != src[:]:
            raise RuntimeError("the copy calibration copied the wrong bytes")
    return elapsed


def _measure(fn: Callable[[int], float], n: int, what: str) -> Measured:
    median, low, high = bench._per_item(fn, n)
    return Measured(median, low, high, what)


@dataclass(frozen=True)
class _Clock:
    ghz: float
    source: str

    def figure(self, m: Measured, per: float = 1.0, extra: str = "") -> Figure:
        cycles = m.median / per * self.ghz * 1e9
        text = (f"measured by hvmlab calibrate: {m.what}; median of {bench.REPEATS} "
                f"({m.low * 1e6 / per:.3g}-{m.high * 1e6 / per:.3g} us), each from runs of 2N "
                f"and N items so fixed costs cancel; time.perf_counter x {self.ghz:g} GHz "
                f"nominal ({self.source}), no TSC read")
        return Figure(cycles, text + (f"; {extra}" if extra else ""), False)


def _checked(fig: Figure, fallback: Figure, base: str) -> Figure:
    """A measured figure, or, if noise made it non-positive (too few items for this machine),
    the base profile's figure marked assumed, with what was measured as the reason."""
    if fig.cycles > 0:
        return fig
    return Figure(fallback.cycles, f"the measurement came out {fig.cycles:,.0f} cycles, not positive "
                  f"(below this machine's noise: raise the item counts), so {base}'s figure is "
                  f"used; what was measured: {fig.source}", True)


def _derived(cycles: float, clock_text: str, how: str) -> Figure:
    return Figure(cycles, f"measured by hvmlab calibrate, derived: {how} ({clock_text})", False)


def _kvm_reference(clock: _Clock, exits: int, progress: Progress) -> tuple[dict[str, Figure], str]:
    """Real KVM exit costs on this machine, or ({}, the reason they could not be measured).
    A measurement that fails is left out and said so; it never fails the calibration."""
    reason = kvm.probe()
    if reason is not None:
        return {}, f"real KVM not measured: {reason}"
    backend = kvm.backend()
    where = f"real KVM on this machine ({backend}), hvm/kvm.py, a real-mode guest: "
    ref: dict[str, Figure] = {}
    notes = [f"real KVM measured: {backend}"]
    steps: list[tuple[str, str, Callable[[int], float], str]] = [
        ("kvm_ioreq_round_trip", "KVM: PIO exit to user space and back", kvm.time_pio_exits,
         "an OUT to port 0xE9 exits to user space (KVM_EXIT_IO), Python reads it from kvm_run, "
         "KVM_RUN re-enters"),
        ("kvm_vmexit_cpuid", "KVM: CPUID exit handled in the kernel",
         lambda k: kvm.time_in_kernel("cpuid", k),
         "a loop of CPUID, each exit handled in the kernel, then one OUT"),
        ("kvm_vmexit_hypervisor", "KVM: OUT to the in-kernel PIC",
         lambda k: kvm.time_in_kernel("pio", k),
         "a loop of OUT to the in-kernel 8259's ELCR (0x4D0, KVM_CREATE_IRQCHIP), as "
         "kvm-unit-tests' outl_to_kernel, then one OUT to user space"),
    ]
    progress("KVM: VMCALL")
    vmcall_reason = kvm.check_vmcall()
    if vmcall_reason is None:
        steps.append(("kvm_vmcall", "KVM: VMCALL", lambda k: kvm.time_in_kernel("vmcall", k),
                      "a loop of VMCALL with an unknown hypercall number (KVM answers "
                      "-KVM_ENOSYS)"))
    else:
        notes.append(f"kvm_vmcall not measured: {vmcall_reason}")
    for key, label, fn, what in steps:
        progress(label)
        try:
            fig = clock.figure(_measure(fn, exits, where + what))
        except (kvm.KvmError, kvm.KvmUnavailable, OSError) as exc:
            notes.append(f"{key} not measured: {exc}")
            continue
        if fig.cycles > 0:
            ref[key] = fig
        else:
            notes.append(f"{key} left out: it came out {fig.cycles:,.0f} cycles (below the "
                         f"noise at {exits} exits)")
    return ref, "; ".join(notes)


def calibrate(out: Path = DEFAULT_MEASURED_PATH, *, exits: int = 20_000, ios: int = 2_000,
              use_kvm: bool = True, progress: Progress | None = None,
              base: str = BASE_PROFILE) -> Profile:
    """Measure this machine, write the profile to `out` (TOML), and return it as loaded back.

    `exits` and `ios` are the items per measurement (cheap exits and device-model round trips);
    every figure is the median of bench.REPEATS differences of runs with 2N and N items.
    Figures calibrate cannot measure (interrupt injection, upcall, page flip) are `base`'s,
    marked assumed. With use_kvm, the real KVM exit costs go in the profile's [reference]."""
    say = progress or _quiet
    ghz, ghz_where = kvm.nominal_ghz()
    clock = _Clock(ghz, ghz_where)
    fallback = load_profile(base)
    figures: dict[str, Figure] = {}

    say("exit handled in the hypervisor")
    figures["vmexit_hypervisor"] = clock.figure(_measure(
        _hvm(bench.OUT_LOOP), exits, "hvmlab IO_INSTRUCTION exit handled in the hypervisor "
        "(out dx, al to 0xE9; bench vmexit's guest)"))
    say("CPUID exit")
    figures["vmexit_cpuid"] = clock.figure(_measure(
        _hvm(bench.CPUID_LOOP), exits, "hvmlab CPUID exit (bench vmexit's guest)"))
    say("VMCALL exit")
    figures["vmcall"] = clock.figure(_measure(
        _hvm(VMCALL_LOOP), exits, "hvmlab VMCALL exit: xen_version(XENVER_version)"))
    say("ioreq round trip")
    figures["ioreq_round_trip"] = clock.figure(_measure(
        _hvm(bench.DM_IN_LOOP), ios, "hvmlab IN from COM1's scratch register served by the "
        "device-model thread: exit, ioreq, event channel, device model, answer, VM entry "
        "(bench ioreq's guest)"))
    say("PV hypercall")
    hypercall = _measure(_pv(0), exits, "hvmlab PV hypercall: int 0x82 xen_version(XENVER_version)")
    figures["hypercall"] = clock.figure(hypercall)
    say("grant copy")
    grant = _measure(_pv(GRANT_BATCH), ios, f"GNTTABOP_copy of {GRANT_BATCH} entries")
    grant_cycles = (grant.median - hypercall.median) / GRANT_BATCH * ghz * 1e9
    figures["grant_op"] = _derived(
        grant_cycles, f"{ghz:g} GHz nominal, {ghz_where}",
        f"(one GNTTABOP_copy hypercall of {GRANT_BATCH} {COPY_LEN}-byte entries between the "
        f"guest's own frames {grant.median * 1e6:.3g} us - one xen_version hypercall "
        f"{hypercall.median * 1e6:.3g} us) / {GRANT_BATCH}, medians of {bench.REPEATS}")
    say("event-channel notification")
    notify = _measure(_notify_seconds, max(exits, 1000), "hvmlab event-channel notify() on an "
                      "interdomain pair nobody waits on (the pending signal: lock, eventfd write)")
    figures["evtchn_notify"] = clock.figure(notify)
    say("thread hand-off")
    floor = _measure(bench._floor_round_trip, ios, "hand-off to another thread and back")
    switch_cycles = (floor.median - 2 * notify.median) / 2 * ghz * 1e9
    figures["domain_switch"] = _derived(
        switch_cycles, f"{ghz:g} GHz nominal, {ghz_where}",
        f"(bench ioreq's floor, a hand-off to another thread and back through an event "
        f"channel, {floor.median * 1e6:.3g} us - 2 notifications of {notify.median * 1e6:.3g} us) "
        f"/ 2 hand-offs, medians of {bench.REPEATS}")
    say("copy bandwidth")
    figures["copy_per_byte"] = clock.figure(
        _measure(_copy_seconds, 16, "1 MiB copied between two host mappings through memoryviews "
                 "(as device models and backends move guest data)"), per=MIB,
        extra="per byte")
    for key in ("interrupt_injection", "upcall", "page_flip"):
        theirs = fallback.figures[key]
        figures[key] = Figure(theirs.cycles, f"not measured by hvmlab calibrate: {base}'s figure, "
                              f"which is hardware-scale and far below hvmlab's own costs "
                              f"({'assumed there' if theirs.assumed else 'sourced there'}: "
                              f"{theirs.source})", True)
    assert set(figures) == set(FIGURE_KEYS)
    figures = {k: _checked(figures[k], fallback.figures[k], base) for k in FIGURE_KEYS}

    reference: dict[str, Figure] = {}
    kvm_note = "real KVM not measured: not asked (use_kvm=False)"
    if use_kvm:
        reference, kvm_note = _kvm_reference(clock, exits, say)
    host = platform.node() or "this host"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    profile = Profile(
        name="measured",
        description=f"hvmlab's own costs measured on {host}, {when} ({kvm_note})",
        ghz=ghz, figures=figures, ghz_source=f"nominal clock from {ghz_where}", reference=reference)
    header = (f"Written by `hvmlab calibrate` on {host}, {when}.\n"
              f"[figures]: hvmlab's own per-event costs (what the emulator spends), so modeled\n"
              f"cycles under this profile should come near the measured wall time.\n"
              f"[reference]: real KVM exit costs on this machine when /dev/kvm works "
              f"(not used by the model).\n{kvm_note}")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(dump_profile(profile, header) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return load_profile(out)
