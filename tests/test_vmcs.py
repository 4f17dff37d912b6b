"""VMCS encodings, areas and VMREAD/VMWRITE checks (SDM Vol. 3C ch. 25, App. B). No Unicorn."""

import pytest

from hvm import vmcs as V


@pytest.mark.parametrize("encoding,width", [
    (V.GUEST_CS_SELECTOR, 16), (V.IO_BITMAP_A, 64), (V.IO_BITMAP_A + 1, 32),
    (V.VM_EXIT_REASON, 32), (V.EXIT_QUALIFICATION, 64), (V.GUEST_RIP, 64),
    (V.VM_ENTRY_INTR_INFO_FIELD, 32), (V.GUEST_PHYSICAL_ADDRESS, 64),
])
def test_width_comes_from_encoding_bits_14_13(encoding, width):
    assert V.width_of(encoding) == width


def test_encodings_are_the_sdm_values():
    assert (V.VM_EXIT_REASON, V.EXIT_QUALIFICATION, V.VM_EXIT_INSTRUCTION_LEN) == (0x4402, 0x6400, 0x440C)
    assert (V.VMX_INSTRUCTION_INFO, V.GUEST_LINEAR_ADDRESS, V.GUEST_PHYSICAL_ADDRESS) == (0x440E, 0x640A, 0x2400)
    assert (V.GUEST_RIP, V.GUEST_RSP, V.GUEST_RFLAGS) == (0x681E, 0x681C, 0x6820)
    assert (V.GUEST_CR0, V.GUEST_CR3, V.GUEST_CR4) == (0x6800, 0x6802, 0x6804)
    assert (V.GUEST_CS_SELECTOR, V.GUEST_CS_BASE) == (0x0802, 0x6808)
    assert (V.IO_BITMAP_A, V.IO_BITMAP_B, V.MSR_BITMAP) == (0x2000, 0x2002, 0x2004)
    assert (V.PIN_BASED_VM_EXEC_CONTROL, V.CPU_BASED_VM_EXEC_CONTROL) == (0x4000, 0x4002)
    assert (V.VM_EXIT_CONTROLS, V.VM_ENTRY_CONTROLS, V.VM_ENTRY_INTR_INFO_FIELD) == (0x400C, 0x4012, 0x4016)


def test_every_field_falls_in_one_of_six_areas():
    areas = {V.area_of(e) for e in V.FIELD_NAMES}
    assert areas == set(V.Area)
    assert V.area_of(V.GUEST_RIP) is V.Area.GUEST_STATE
    assert V.area_of(V.HOST_RIP) is V.Area.HOST_STATE
    assert V.area_of(V.CPU_BASED_VM_EXEC_CONTROL) is V.Area.EXECUTION_CONTROLS
    assert V.area_of(V.IO_BITMAP_B) is V.Area.EXECUTION_CONTROLS
    assert V.area_of(V.VM_EXIT_CONTROLS) is V.Area.EXIT_CONTROLS
    assert V.area_of(V.VM_ENTRY_INTR_INFO_FIELD) is V.Area.ENTRY_CONTROLS
    assert V.area_of(V.EXIT_QUALIFICATION) is V.Area.EXIT_INFORMATION


def test_vmwrite_checks_the_width_of_the_field():
    vmcs = V.Vmcs()
    vmcs.vmwrite(V.GUEST_CS_SELECTOR, 0xFFFF)
    with pytest.raises(V.VmcsError, match="16-bit"):
        vmcs.vmwrite(V.GUEST_CS_SELECTOR, 0x1_0000)
    with pytest.raises(V.VmcsError):
        vmcs.vmwrite(V.CPU_BASED_VM_EXEC_CONTROL, 1 << 32)
    vmcs.vmwrite(V.IO_BITMAP_A, 0x1234_5678_9ABC_D000)
    assert vmcs.vmread(V.IO_BITMAP_A) == 0x1234_5678_9ABC_D000


def test_high_access_reads_and_writes_the_upper_half():
    vmcs = V.Vmcs()
    vmcs.vmwrite(V.TSC_OFFSET, 0x1111_2222_3333_4444)
    assert vmcs.vmread(V.TSC_OFFSET + 1) == 0x1111_2222
    vmcs.vmwrite(V.TSC_OFFSET + 1, 0xAAAA_BBBB)
    assert vmcs.vmread(V.TSC_OFFSET) == 0xAAAA_BBBB_3333_4444


def test_exit_information_is_read_only_to_vmwrite_but_recorded_by_the_processor():
    vmcs = V.Vmcs()
    with pytest.raises(V.VmcsError) as err:
        vmcs.vmwrite(V.VM_EXIT_REASON, 30)
    assert err.value.number == V.VMERR_READ_ONLY_COMPONENT
    vmcs.record_exit(30, 0x00E90000, 1)
    assert vmcs.vmread(V.VM_EXIT_REASON) == 30
    assert vmcs.vmread(V.EXIT_QUALIFICATION) == 0x00E90000
    assert vmcs.vmread(V.VM_EXIT_INSTRUCTION_LEN) == 1


def test_unsupported_field_is_vm_instruction_error_12():
    with pytest.raises(V.VmcsError) as err:
        V.Vmcs().vmread(0x7FFE)
    assert err.value.number == V.VMERR_UNSUPPORTED_COMPONENT


def test_guest_state_is_loaded_lazily_and_forgotten_at_the_next_exit():
    reads = []

    def source(encoding):
        reads.append(encoding)
        return 0x7C00 + len(reads)

    vmcs = V.Vmcs(source)
    assert vmcs.vmread(V.GUEST_RIP) == 0x7C01
    assert vmcs.vmread(V.GUEST_RIP) == 0x7C01  # cached until the guest runs again
    vmcs.record_exit(12, 0, 1)
    assert vmcs.vmread(V.GUEST_RIP) == 0x7C02
    assert reads == [V.GUEST_RIP, V.GUEST_RIP]


def test_snapshot_groups_fields_by_area():
    vmcs = V.Vmcs()
    vmcs.record_exit(10, 0, 2)
    snap = vmcs.snapshot()
    assert set(snap) == {a.value for a in V.Area}
    assert snap["VM-exit information fields"]["VM_EXIT_REASON"] == 10
    assert snap["guest-state area"]["VMCS_LINK_POINTER"] == 0xFFFF_FFFF_FFFF_FFFF


def test_interruption_information_layout():
    assert V.intr_info(6, V.INTR_TYPE_HARD_EXCEPTION) == 0x8000_0306
    assert V.intr_info(13, V.INTR_TYPE_HARD_EXCEPTION, error_code=True) == 0x8000_0B0D
    assert V.intr_info(0x20, V.INTR_TYPE_EXTERNAL) == 0x8000_0020
