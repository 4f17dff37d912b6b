"""hvm/kvm.py on the real /dev/kvm: exit reasons and the port I/O user space sees (never timings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvm import kvm

KVM_REASON = kvm.probe()
needs_kvm = pytest.mark.skipif(KVM_REASON is not None,
                               reason=f"no usable KVM here: {KVM_REASON}")


def _io(exit_: kvm.KvmExit) -> tuple[str | None, int | None, int | None]:
    assert exit_.reason == kvm.KVM_EXIT_IO, exit_.name
    return exit_.direction, exit_.port, exit_.value


@needs_kvm
def test_the_probe_guest_sees_its_answer_and_passes_cpuid_in_the_kernel() -> None:
    code = kvm.assemble(kvm.PROBE_GUEST)
    with kvm.KvmVm(code, answer=lambda port, size: kvm.PROBE_ANSWER if port == kvm.PROBE_PORT else 0) as vm:
        exits = vm.run(max_exits=10)
        rip = vm.regs()["rip"]
    assert [_io(e) for e in exits[:-1]] == [
        ("out", kvm.PROBE_PORT, 0x42),
        ("in", kvm.PROBE_PORT, kvm.PROBE_ANSWER),
        ("out", kvm.PROBE_PORT, kvm.PROBE_ANSWER + 1),   # the IN's value reached AL
        ("out", kvm.PROBE_PORT, kvm.PROBE_PAST_CPUID),   # CPUID never came out to user space
    ]
    assert all(e.size == 1 for e in exits[:-1])
    assert exits[-1].reason == kvm.KVM_EXIT_HLT and exits[-1].name == "KVM_EXIT_HLT"
    assert rip == kvm.LOAD + len(code)  # HLT exits with RIP after the instruction


@needs_kvm
def test_each_out_of_the_loop_exits_to_user_space() -> None:
    with kvm.KvmVm(kvm.assemble(kvm.OUT_LOOP, n=5)) as vm:
        exits = vm.run(max_exits=10)
    assert [_io(e)[:2] for e in exits[:-1]] == [("out", kvm.PROBE_PORT)] * 5
    assert exits[-1].reason == kvm.KVM_EXIT_HLT


@needs_kvm
@pytest.mark.parametrize("kind", ["cpuid", "pio"])
def test_in_kernel_loops_reach_user_space_only_at_their_end(kind: str) -> None:
    code = kvm.assemble(kvm._IN_KERNEL_LOOP, n=300, body=kvm.IN_KERNEL_BODIES[kind])
    with kvm.KvmVm(code, irqchip=(kind == "pio")) as vm:
        exits = vm.run(max_exits=5)
        rsi = vm.regs()["rsi"]
    # 300 CPUIDs (or OUTs to the in-kernel PIC's ELCR 0x4D0) and only the closing OUT seen here
    assert [_io(e)[:2] for e in exits] == [("out", kvm.DONE_PORT)]
    assert rsi == 0  # the loop ran to its end


@needs_kvm
def test_vmcall_answers_enosys_or_says_why_not() -> None:
    reason = kvm.check_vmcall(timeout_s=1.0)
    if reason is not None:
        pytest.skip(f"this KVM ({kvm.backend()}): {reason}")
    with kvm.KvmVm(kvm.assemble(kvm.VMCALL_GUEST)) as vm:
        exits = vm.run(max_exits=3)
    assert _io(exits[0]) == ("out", kvm.PROBE_PORT, kvm.ENOSYS_LOW_BYTE)


@needs_kvm
def test_a_guest_that_never_exits_is_stopped_by_the_deadline() -> None:
    code = kvm.assemble("bits 16\norg 0x1000\n    cli\n.l: jmp .l\n")
    with kvm.KvmVm(code) as vm, pytest.raises(kvm.KvmError, match="did not exit"):
        vm.run(timeout_s=0.3)


def test_nominal_clock_from_the_model_name_or_cpu_mhz(tmp_path: Path) -> None:
    intel = tmp_path / "intel"
    intel.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\n"
                     "cpu MHz\t\t: 3100.000\n")
    assert kvm.nominal_ghz(intel)[0] == pytest.approx(2.40)
    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.134\n")
    ghz, where = kvm.nominal_ghz(amd)
    assert ghz == pytest.approx(2.596134) and "cpu MHz" in where
    empty = tmp_path / "none"
    empty.write_text("processor\t: 0\n")
    with pytest.raises(RuntimeError, match="no clock"):
        kvm.nominal_ghz(empty)


def test_ioctl_numbers_are_linux_kvm_h() -> None:
    # _IO/_IOW/_IOR(KVMIO, nr, type) as <linux/kvm.h> defines them on x86-64
    assert kvm.KVM_CREATE_VM == 0xAE01
    assert kvm.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm.KVM_RUN == 0xAE80
    assert (kvm.KVM_GET_REGS, kvm.KVM_SET_REGS) == (0x8090AE81, 0x4090AE82)
    assert (kvm.KVM_GET_SREGS, kvm.KVM_SET_SREGS) == (0x8138AE83, 0x4138AE84)
