"""Host CPU placement: a vCPU thread and its device-model thread share one host CPU, as they take turns on every synchronous ioreq (Linux sched_setaffinity(2))."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

# Where a domain's vCPU and device-model threads run (RunOptions.dm_affinity, --dm-affinity):
# "vcpu": both on one host CPU. Each ioreq hands the CPU from one to the other and back; on
# one CPU that is a switch between two threads, on two it is a cross-CPU wake-up each way
# (an IPI, and in a VM an idle virtual CPU to wake), measured at 2-3x the cost here (`hvmlab
# bench ioreq`). Python's GIL lets only one of them run Python at a time anyway.
# "any": the host scheduler places them.
DM_AFFINITIES = ("vcpu", "any")


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def process_cpus() -> list[int]:
    """The host CPUs this process may use (the main thread's set: it is never pinned)."""
    if not can_pin():
        return []
    return sorted(os.sched_getaffinity(os.getpid()))


def pair_cpu(index: int) -> int | None:
    """The host CPU for the index-th vCPU/device-model pair of this process (round robin over
    the CPUs it may use); None where threads cannot be pinned."""
    cpus = process_cpus()
    return cpus[index % len(cpus)] if cpus else None


def pin_current_thread(cpu: int | None) -> bool:
    """Run the calling thread on `cpu` only (None: leave it). False if the host refused."""
    if cpu is None or not can_pin():
        return False
    try:
        os.sched_setaffinity(0, {cpu})  # pid 0: the calling thread
    except OSError:
        return False
    return True


def pin_threads(threads: Iterable[threading.Thread], cpu: int | None) -> None:
    """Run these (started) threads on `cpu` only (None: leave them)."""
    if cpu is None or not can_pin():
        return
    for thread in threads:
        if thread.native_id is not None and thread.is_alive():
            try:
                os.sched_setaffinity(thread.native_id, {cpu})
            except OSError:
                pass  # it ended meanwhile, or the host refuses: it only runs slower


def release_process(pid: int) -> None:
    """Move a child process off the calling thread's CPU: a child inherits the affinity of the
    thread that started it, and a pinned vCPU thread starts the trace writer, which should run
    beside the vCPU, not take turns with it. It gets every other CPU this process may use (all
    of them if the caller is not pinned, or if there is no other)."""
    cpus = process_cpus()
    if not cpus:
        return
    mine = os.sched_getaffinity(0)
    others = [cpu for cpu in cpus if cpu not in mine]
    try:
        os.sched_setaffinity(pid, others or cpus)
    except OSError:
        pass  # it has gone already, or the host refuses: it only runs slower
