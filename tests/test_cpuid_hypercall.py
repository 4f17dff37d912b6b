"""The CPU model's CPUID leaves and the HVM hypercall table. No Unicorn."""

import struct

from hvm.cpuid import hvmlab_cpu
from hvm.hypercall import ENOSYS, HypercallTable


def test_hypervisor_leaf_has_xen_signature_and_max_leaf():
    eax, ebx, ecx, edx = hvmlab_cpu().query(0x4000_0000)
    assert struct.pack("<3I", ebx, ecx, edx) == b"XenVMMXenVMM"
    assert eax >= 0x4000_0002


def test_vendor_and_hypervisor_present_bit():
    cpu = hvmlab_cpu()
    _, ebx, ecx, edx = cpu.query(0)
    assert struct.pack("<3I", ebx, edx, ecx) == b"GenuineIntel"
    assert cpu.query(1)[2] >> 31 & 1


def test_leaf_beyond_max_returns_the_highest_basic_leaf():
    cpu = hvmlab_cpu()
    assert cpu.query(0x30) == cpu.query(cpu.max_basic)


class FakeGuest:
    def __init__(self):
        self.memory = bytearray(4096)
        self.console = b""

    def copy_from_guest(self, address, length):
        return bytes(self.memory[address:address + length]) if address + length <= 4096 else None

    def copy_to_guest(self, address, data):
        if address + len(data) > 4096:
            return False
        self.memory[address:address + len(data)] = data
        return True

    def console_write(self, data):
        self.console += data


def test_console_io_write_and_bad_buffer():
    guest, table = FakeGuest(), HypercallTable()
    guest.memory[100:105] = b"hello"
    assert table.dispatch(guest, 18, (0, 5, 100, 0, 0)) == 0
    assert guest.console == b"hello"
    assert table.dispatch(guest, 18, (0, 5, 5000, 0, 0)) == -14  # -EFAULT


def test_xen_version_and_unknown_hypercall():
    guest, table = FakeGuest(), HypercallTable(version=(4, 17))
    assert table.dispatch(guest, 17, (0, 0, 0, 0, 0)) == 0x0004_0011
    assert table.dispatch(guest, 17, (1, 200, 0, 0, 0)) == 0
    assert guest.memory[200:216].rstrip(b"\0") == b".0-hvmlab"
    assert table.dispatch(guest, 99, (0,) * 5) == -ENOSYS
    assert table.calls[17] == 2 and table.calls[99] == 1
