"""shared_info's 2-level event channels and start_info packing, as the guest reads them (Xen xen.h, event_2l.c)."""

from __future__ import annotations

import ctypes
import struct

import pytest

from hvm.memory import PAGE_SIZE, GuestMemory
from pv.layouts import X86_32, X86_64, field_offsets, shared_info, start_info, vcpu_info
from pv.shared_info import SIF_INITDOMAIN, SIF_PRIVILEGED, SharedInfo, StartInfo

SHINFO_GFN = 2


@pytest.fixture
def guest() -> GuestMemory:
    return GuestMemory(4 * PAGE_SIZE)


def shinfo(guest: GuestMemory, arch: str = "x86_32") -> SharedInfo:
    return SharedInfo(guest.p2m(SHINFO_GFN).view(), arch)


class GuestView:
    """What a guest kernel reads from its shared_info page, by the header's offsets."""

    def __init__(self, guest: GuestMemory, arch=X86_32) -> None:
        self.guest, self.word = guest, ctypes.sizeof(arch.ulong)
        self.fmt = "<I" if self.word == 4 else "<Q"
        self.base = SHINFO_GFN * PAGE_SIZE
        self.off = field_offsets(shared_info(arch))
        self.vcpu = field_offsets(vcpu_info(arch))
        self.vcpu_size = ctypes.sizeof(vcpu_info(arch))

    def _word(self, at: int) -> int:
        return self.guest.read_struct(self.base + at, self.fmt)[0]

    def pending_word(self, i: int) -> int:
        return self._word(self.off["evtchn_pending"] + i * self.word)

    def mask_word(self, i: int) -> int:
        return self._word(self.off["evtchn_mask"] + i * self.word)

    def sel(self, vcpu: int = 0) -> int:
        return self._word(vcpu * self.vcpu_size + self.vcpu["evtchn_pending_sel"])

    def upcall_pending(self, vcpu: int = 0) -> int:
        return self.guest.read(self.base + vcpu * self.vcpu_size
                               + self.vcpu["evtchn_upcall_pending"], 1)[0]

    def mask_port(self, port: int) -> None:
        at = self.base + self.off["evtchn_mask"] + port // (8 * self.word) * self.word
        value = self.guest.read_struct(at, self.fmt)[0] | 1 << (port % (8 * self.word))
        self.guest.write(at, struct.pack(self.fmt, value))


def test_first_event_raises_pending_selector_and_upcall(guest: GuestMemory) -> None:
    si, g = shinfo(guest), GuestView(guest)
    assert si.set_pending(37) is True  # port 37 = word 1, bit 5 on a 32-bit guest
    assert g.pending_word(1) == 1 << 5
    assert g.sel() == 1 << 1
    assert g.upcall_pending() == 1


def test_further_events_need_no_new_upcall_until_the_guest_scans(guest: GuestMemory) -> None:
    si, g = shinfo(guest), GuestView(guest)
    assert si.set_pending(3) is True
    assert si.set_pending(3) is False  # already pending: the guest has not handled it
    assert si.set_pending(4) is False  # same word: selector bit already set
    assert si.set_pending(70) is False  # new word: selector set, but upcall already pending
    assert g.sel() == (1 << 0) | (1 << 2)
    assert si.pending_ports() == [3, 4, 70]
    assert (g.pending_word(0), g.pending_word(2), g.sel(), g.upcall_pending()) == (0, 0, 0, 0)
    assert si.set_pending(4) is True  # handled, so the next event upcalls again


def test_masked_port_stays_pending_without_upcall_until_unmasked(guest: GuestMemory) -> None:
    si, g = shinfo(guest), GuestView(guest)
    g.mask_port(9)  # the guest masks with its own store
    assert si.is_masked(9)
    assert si.set_pending(9) is False
    assert g.pending_word(0) == 1 << 9 and g.sel() == 0 and g.upcall_pending() == 0
    assert si.pending_ports() == []  # masked: the scan does not take it
    assert si.unmask(9) is True  # the edge lost while masked is delivered now
    assert g.mask_word(0) == 0 and g.sel() == 1 and g.upcall_pending() == 1
    assert si.pending_ports() == [9]
    assert si.unmask(9) is False  # not masked any more
    si.mask(10)
    assert si.unmask(10) is False  # nothing pending behind the mask


def test_clear_pending_and_per_vcpu_selectors(guest: GuestMemory) -> None:
    si, g = shinfo(guest), GuestView(guest)
    assert si.set_pending(1, vcpu=1) is True
    assert g.sel(1) == 1 and g.upcall_pending(1) == 1 and g.sel(0) == 0
    si.clear_pending(1)
    assert not si.is_pending(1) and g.pending_word(0) == 0
    assert si.pending_ports(vcpu=1) == []  # the selector named a word with nothing left


def test_upcall_mask_holds_delivery_not_pending(guest: GuestMemory) -> None:
    si = shinfo(guest)
    si.set_upcall_mask(0, True)
    assert si.set_pending(2) is True  # Xen still marks it; the mask holds the upcall back
    assert si.upcall_pending(0) and not si.upcall_deliverable(0)
    si.set_upcall_mask(0, False)
    assert si.upcall_deliverable(0)


def test_x86_64_words_are_64_bits_wide(guest: GuestMemory) -> None:
    si, g = shinfo(guest, "x86_64"), GuestView(guest, X86_64)
    assert si.nr_ports == 64 * 64
    assert si.set_pending(100) is True  # word 1, bit 36
    assert g.pending_word(1) == 1 << 36 and g.sel() == 1 << 1
    g.mask_port(4000)
    assert si.is_masked(4000) and si.set_pending(4000) is False


def test_out_of_range_ports_and_vcpus_are_refused(guest: GuestMemory) -> None:
    si = shinfo(guest)
    assert si.nr_ports == 32 * 32
    with pytest.raises(ValueError):
        si.set_pending(si.nr_ports)
    with pytest.raises(ValueError):
        si.set_pending(1, vcpu=32)
    with pytest.raises(ValueError):
        SharedInfo(memoryview(bytearray(64)))


def test_start_info_x86_32_bytes_at_the_header_offsets() -> None:
    info = StartInfo(nr_pages=4096, shared_info=0x7000, flags=SIF_PRIVILEGED | SIF_INITDOMAIN,
                     store_mfn=0x123, store_evtchn=2, console_mfn=0x124, console_evtchn=3,
                     pt_base=0xC0400000, nr_pt_frames=4, mfn_list=0xC0200000,
                     cmd_line=b"console=hvc0 root=/dev/xvda")
    data = info.pack("x86_32")
    layout = start_info(X86_32)
    off = field_offsets(layout)
    assert len(data) == ctypes.sizeof(layout)
    assert data[:16] == b"xen-3.0-x86_32p\0"
    for name, value in (("nr_pages", 4096), ("shared_info", 0x7000), ("flags", 3),
                        ("store_mfn", 0x123), ("store_evtchn", 2), ("console.domU.mfn", 0x124),
                        ("console.domU.evtchn", 3), ("pt_base", 0xC0400000),
                        ("nr_pt_frames", 4), ("mfn_list", 0xC0200000)):
        assert struct.unpack_from("<I", data, off[name])[0] == value, name
    cmd = data[off["cmd_line"]:off["cmd_line"] + 1024]
    assert cmd.rstrip(b"\0") == b"console=hvc0 root=/dev/xvda"
    assert StartInfo.unpack(data) == StartInfo(**{**vars(info), "magic": b"xen-3.0-x86_32p"})


def test_start_info_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        StartInfo(nr_pages=1 << 32, shared_info=0).pack("x86_32")
    with pytest.raises(ValueError):
        StartInfo(nr_pages=1, shared_info=0, cmd_line=b"x" * 1024).pack()
    assert StartInfo(nr_pages=1 << 32, shared_info=0).pack("x86_64")[:15] == b"xen-3.0-x86_64\0"
