"""Integration: every shipped guest boots under Unicorn; exits, qualifications, console and statuses."""

from __future__ import annotations

from hvm import vmcs as V
from hvm.qualification import decode_io


def io_records(records, port=None):
    return [r for r in records if r["reason"] == "IO_INSTRUCTION" and (port is None or r["port"] == port)]


def test_hello_real_mode_console_and_debug_exit(run_guest):
    result, records = run_guest("hello")
    assert result.mode == "real"
    assert result.console == "Hello from a real-mode guest\nTest result: SUCCESS\n"
    assert (result.ended_by, result.exit_status) == ("debug_exit", 1)
    console = io_records(records, 0xE9)
    assert len(console) == len(result.console)  # one exit per byte
    assert all(r["qualification"] == 0x00E90000 for r in console)  # out dx, al
    assert all(r["insn"] == "out dx, al" and r["direction"] == "out" for r in console)
    last = records[-1]
    assert (last["port"], last["qualification"], last["insn"]) == (0xF4, 0x00F40040, "out 0xf4, al")
    assert result.exits == {"IO_INSTRUCTION": len(records)}
    assert [r["seq"] for r in records] == list(range(len(records)))


def test_rep_outsb_is_one_exit_for_the_whole_instruction(run_guest):
    result, records = run_guest("string_io")
    assert result.console == "One rep outsb, one exit, many bytes\nTest result: SUCCESS\n"
    strings = [r for r in io_records(records) if r["string"]]
    assert [r["count"] for r in strings] == [35, 1, 21]
    first = strings[0]
    assert first["qualification"] == 0x00E90030 and first["rep"] and first["insn"].startswith("rep outsb")
    assert first["linear_address"] > 0x100000
    single = strings[1]
    assert single["qualification"] == 0x00E90010 and not single["rep"]
    assert result.exits == {"IO_INSTRUCTION": 3, "HLT": 1}
    assert (result.ended_by, result.exit_status) == ("halt", 0)


def test_long_mode_guest(run_guest):
    result, records = run_guest("long_hello")
    assert result.mode == "long"
    assert result.console.endswith("Test result: SUCCESS\n")
    assert records[-1]["reason"] == "HLT" and result.exit_status == 0


def test_cpuid_exits_and_signature(run_guest):
    result, records = run_guest("cpuid")
    assert "hypervisor: XenVMMXenVMM" in result.console
    assert "cpu vendor: GenuineIntel" in result.console
    cpuid = [r for r in records if r["reason"] == "CPUID"]
    assert [r["leaf"] for r in cpuid] == [0x4000_0000, 0]
    assert all(r["reason_code"] == 10 and r["insn"] == "cpuid" for r in cpuid)


def test_rdtsc_exits_only_with_the_control(run_guest):
    result, records = run_guest("rdtsc", rdtsc_exiting=True)
    rdtsc = [r for r in records if r["reason"] == "RDTSC"]
    assert len(rdtsc) == 2 and rdtsc[1]["tsc"] > rdtsc[0]["tsc"]
    assert "Test result: SUCCESS" in result.console
    result, records = run_guest("rdtsc")
    assert "RDTSC" not in result.exits


def test_vmcall_hypercalls(run_guest):
    result, records = run_guest("vmcall")
    calls = [(r["hypercall"], r["result"]) for r in records if r["reason"] == "VMCALL"]
    assert calls == [(17, 0x0004_0011), (18, 0), (99, -38), (18, 0)]
    assert result.console == "hello through console_io\nTest result: SUCCESS\n"
    assert result.exit_status == 0


def test_fault_without_idt_is_exception_then_triple_fault(run_guest):
    result, records = run_guest("fault")
    reasons = [r["reason"] for r in records]
    assert reasons[-2:] == ["EXCEPTION_NMI", "TRIPLE_FAULT"]
    exc = records[-2]
    assert exc["insn"] == "ud2"
    assert (result.ended_by, result.exit_status) == ("triple_fault", 4)


def test_fault_vector_in_exit_interruption_information(run_guest):
    result, _ = run_guest("fault", dump_vmcs=33)
    assert result.vmcs_dump["reason"] == "EXCEPTION_NMI"
    fields = {f.name: f.value for f in result.vmcs_dump["vmcs"]}
    assert fields["VM_EXIT_INTR_INFO"] == V.intr_info(6, V.INTR_TYPE_HARD_EXCEPTION)
    assert fields["VM_EXIT_REASON"] == 0


def test_guest_with_an_idt_handles_its_own_fault(run_guest):
    result, records = run_guest("idt_fault")
    assert result.console == ("caught #UD in the guest's own handler\nresumed after ud2\n"
                              "Test result: SUCCESS\n")
    assert result.exits["EXCEPTION_NMI"] == 1 and "TRIPLE_FAULT" not in result.exits
    assert result.interrupts_injected == 1
    assert result.exit_status == 0


def test_runaway_guest_ends_by_timeout_with_an_external_interrupt(run_guest):
    result, records = run_guest("runaway", timeout_s=0.3)
    assert (result.ended_by, result.exit_status) == ("timeout", 6)
    assert records[-1]["reason"] == "EXTERNAL_INTERRUPT"
    assert result.console == ">"


def test_max_exits_limit(run_guest):
    result, records = run_guest("hello", max_exits=5)
    assert (result.ended_by, result.exit_status, result.exits_total) == ("max_exits", 6, 5)
    assert len(records) == 5 and result.console == "Hello"


def test_unmapped_access_is_an_ept_violation(run_guest):
    result, records = run_guest("unmapped", dump_vmcs=1)
    ept = records[-1]
    assert ept["reason"] == "EPT_VIOLATION" and ept["reason_code"] == 48
    assert ept["qualification"] & 0b111 == 0b010  # a data write
    fields = {f.name: f.value for f in result.vmcs_dump["vmcs"]}
    assert fields["GUEST_PHYSICAL_ADDRESS"] == 0xE000_0000
    assert (result.ended_by, result.exit_status) == ("ept_violation", 4)
    assert result.console == "w"  # the write never happened, nor what came after


def test_pass_through_ports_do_not_exit_and_are_counted(run_guest):
    exiting, _ = run_guest("pass_through")
    direct, records = run_guest("pass_through", pass_through=[0x80])
    assert exiting.exits["IO_INSTRUCTION"] - direct.exits["IO_INSTRUCTION"] == 16
    assert (exiting.direct_port_accesses, direct.direct_port_accesses) == (0, 16)
    assert not io_records(records, 0x80)
    assert exiting.unassigned_port_writes == 16 and direct.console == exiting.console


def test_io_bitmaps_off_and_unconditional_exiting(run_guest):
    none, _ = run_guest("hello", use_io_bitmaps=False)
    assert none.exits_total == 0 and none.direct_port_accesses == 51
    assert none.exit_status == 1  # the debug exit still works: it was served directly
    every, _ = run_guest("hello", use_io_bitmaps=False, unconditional_io_exiting=True)
    assert every.exits["IO_INSTRUCTION"] == 51


def test_dump_vmcs_at_an_io_exit(run_guest):
    result, records = run_guest("string_io", dump_vmcs=0)
    fields = {f.name: f for f in result.vmcs_dump["vmcs"]}
    assert fields["VM_EXIT_REASON"].value == 30
    assert fields["EXIT_QUALIFICATION"].value == 0x00E90030
    assert fields["VM_EXIT_INSTRUCTION_LEN"].value == 2
    assert fields["GUEST_LINEAR_ADDRESS"].value == records[0]["linear_address"]
    assert fields["GUEST_RIP"].value == records[0]["rip"]
    assert fields["GUEST_CS_SELECTOR"].value == 0x08
    assert fields["GUEST_CR0"].value & 1
    assert fields["CPU_BASED_VM_EXEC_CONTROL"].value & V.CPU_USE_IO_BITMAPS
    q = decode_io(fields["EXIT_QUALIFICATION"].value)
    assert q.string and q.rep and q.port == 0xE9
    assert {f.area for f in fields.values()} == set(V.Area)


def test_unassigned_port_reads_all_ones(tmp_path, run_guest):
    source = tmp_path / "inport.asm"
    source.write_text("bits 16\norg 0x7c00\n    cli\n    in al, 0x99\n    out 0xf4, al\n    hlt\n")
    result, records = run_guest(str(source))
    assert records[0]["data"] == 0xFF and records[0]["qualification"] == 0x00990048
    assert result.exit_status == (0xFF << 1 | 1) & 0xFF
    assert result.unassigned_port_reads == 1
