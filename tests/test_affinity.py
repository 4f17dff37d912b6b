"""Host CPU placement: a vCPU and its device-model thread share one CPU by default, the trace writer does not."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hvm import affinity
from hvm.console import ConsoleSink
from hvm.loader import load
from hvm.machine import HvmDomain, RunOptions
from hvm.trace import BATCH, CHUNK, TraceWriter

pytestmark = pytest.mark.skipif(len(affinity.process_cpus()) < 2,
                                reason="needs a host with two CPUs this process may use")


def _cpus_of(thread: threading.Thread) -> set[int]:
    assert thread.native_id is not None
    return os.sched_getaffinity(thread.native_id)


def _running_domain(dm_affinity: str) -> HvmDomain:
    domain = HvmDomain(load("runaway"), RunOptions(timeout_s=20, dm_affinity=dm_affinity), ConsoleSink())
    domain.start()
    return domain


def _settled(read, want, timeout_s: float = 5.0):
    """The value read() gives once it equals want (a thread pins itself as it starts)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while value != want and time.monotonic() < deadline:
        time.sleep(0.01)
        value = read()
    return value


def test_a_vcpu_and_its_device_model_share_one_host_cpu() -> None:
    domain = _running_domain("vcpu")
    try:
        cpu = affinity.pair_cpu(0)
        assert domain.server._thread is not None
        assert _settled(lambda: _cpus_of(domain._thread), {cpu}) == {cpu}
        assert _settled(lambda: _cpus_of(domain.server._thread), {cpu}) == {cpu}
        assert os.sched_getaffinity(os.getpid()) == set(affinity.process_cpus())  # the rest: free
    finally:
        domain.stop()
        result = domain.wait()
    assert result.ended_by == "interrupted"


def test_dm_affinity_any_leaves_placement_to_the_host() -> None:
    domain = _running_domain("any")
    try:
        everything = set(affinity.process_cpus())
        assert domain.server._thread is not None
        time.sleep(0.05)
        assert _cpus_of(domain._thread) == everything
        assert _cpus_of(domain.server._thread) == everything
    finally:
        domain.stop()
        domain.wait()


def test_the_trace_writer_started_by_a_pinned_thread_runs_beside_it(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def pinned_vcpu() -> None:
        affinity.pin_current_thread(affinity.pair_cpu(0))
        writer = TraceWriter(tmp_path / "t.jsonl", {"guest": "pin"})
        for seq in range(2 * CHUNK // 20 + BATCH):  # enough packed bytes to start the process
            writer.add((seq, seq, 0, 30, 0xE90000, 0x1000, '"out dx, al"', "hypervisor", 1,
                        (0xE9, 1, "out", False, False, 1, seq & 0xFF), None))
        sink = writer._sink
        seen["cpus"] = os.sched_getaffinity(sink.pid) if sink is not None else None
        writer.close(None)
        seen["lines"] = len((tmp_path / "t.jsonl").read_text().splitlines())

    thread = threading.Thread(target=pinned_vcpu)
    thread.start()
    thread.join(30)
    assert seen["cpus"] == set(affinity.process_cpus()) - {affinity.pair_cpu(0)}
    assert seen["lines"] == 1 + 2 * CHUNK // 20 + BATCH
