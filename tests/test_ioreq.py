"""ioreq_t packing and the shared I/O page, byte by byte (Xen public/hvm/ioreq.h)."""

from __future__ import annotations

import struct

import pytest

from hvm.ioreq import (
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_WRITE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    IoReq,
    IoreqStateError,
    SharedIoPage,
    pci_config_addr,
)


def pio(addr: int = 0x3F8, data: int = 0, *, size: int = 1, dir: int = IOREQ_WRITE,
        count: int = 1, data_is_ptr: bool = False, df: bool = False,
        vp_eport: int = 0, state: int = STATE_IOREQ_NONE, type: int = IOREQ_TYPE_PIO) -> IoReq:
    return IoReq(addr=addr, data=data, count=count, size=size, vp_eport=vp_eport, state=state,
                 data_is_ptr=data_is_ptr, dir=dir, df=df, type=type)


def test_pack_string_read_with_df_matches_hand_built_bytes() -> None:
    # rep insw from port 0x1F0, 256 words into guest-physical 0x8000, direction flag set,
    # posted READY on event channel port 7.
    req = pio(0x1F0, 0x8000, size=2, dir=IOREQ_READ, count=256, data_is_ptr=True, df=True,
              vp_eport=7, state=STATE_IOREQ_READY)
    expected = (
        (0x1F0).to_bytes(8, "little")
        + (0x8000).to_bytes(8, "little")
        + (256).to_bytes(4, "little")
        + (2).to_bytes(4, "little")
        + (7).to_bytes(4, "little")
        + b"\x00\x00"  # _pad0
        + bytes([0b0111_0001])  # df | dir=read | data_is_ptr | state READY
        + bytes([0])  # IOREQ_TYPE_PIO
    )
    assert req.pack() == expected
    assert len(expected) == 32


def test_unpack_hand_built_pci_config_write() -> None:
    raw = bytearray(32)
    raw[0:8] = (0xFB_0000_0004).to_bytes(8, "little")
    raw[8:16] = (0xDEADBEEF).to_bytes(8, "little")
    raw[16:20] = (1).to_bytes(4, "little")
    raw[20:24] = (4).to_bytes(4, "little")
    raw[24:28] = (3).to_bytes(4, "little")
    raw[30] = 0x02  # state INPROCESS, write, no pointer, df clear
    raw[31] = 2
    req = IoReq.unpack(bytes(raw))
    assert req == IoReq(addr=0xFB_0000_0004, data=0xDEADBEEF, count=1, size=4, vp_eport=3,
                        state=STATE_IOREQ_INPROCESS, data_is_ptr=False, dir=IOREQ_WRITE,
                        df=False, type=IOREQ_TYPE_PCI_CONFIG)


@pytest.mark.parametrize("req", [
    pio(0xE9, 0x41),
    pio(0xFEE0_0300, 0xFFFF_FFFF_FFFF_FFFF, size=8, dir=IOREQ_READ, type=IOREQ_TYPE_COPY,
        state=STATE_IORESP_READY, vp_eport=0xFFFF_FFFF),
    pio(0x60, 0x1000, count=0xFFFF_FFFF, data_is_ptr=True, df=True, state=15, type=255),
])
def test_pack_unpack_round_trip(req: IoReq) -> None:
    assert IoReq.unpack(req.pack()) == req


@pytest.mark.parametrize("bad", [
    pio(state=16), pio(dir=2), pio(type=256), pio(addr=-1), pio(data=1 << 64),
])
def test_pack_rejects_values_that_do_not_fit(bad: IoReq) -> None:
    with pytest.raises(ValueError):
        bad.pack()


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        IoReq.unpack(bytes(31))


def test_element_addrs_step_down_when_df() -> None:
    up = pio(data=0x1000, size=4, count=3, data_is_ptr=True)
    down = pio(data=0x1008, size=4, count=3, data_is_ptr=True, df=True)
    assert up.element_addrs() == [0x1000, 0x1004, 0x1008]
    assert down.element_addrs() == [0x1008, 0x1004, 0x1000]
    with pytest.raises(ValueError):
        pio(data=5).element_addrs()


def test_pci_config_addr_puts_sbdf_above_register() -> None:
    # 0000:00:1f.3, register 0x10: SBDF 0x00fb
    assert pci_config_addr(0, 0, 0x1F, 3, 0x10) == 0x0000_00FB_0000_0010
    assert pci_config_addr(1, 2, 3, 4, 0x40) >> 48 == 1


class RecordingPage(bytearray):
    """A page that remembers every store: (offset, bytes written) and a snapshot after it."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.stores: list[tuple[int, bytes, bytes]] = []

    def __setitem__(self, index, value) -> None:  # noqa: ANN001 - as bytearray
        super().__setitem__(index, value)
        start = index.start if isinstance(index, slice) else index
        data = bytes(value) if isinstance(index, slice) else bytes([value])
        self.stores.append((start, data, bytes(self)))


def test_post_stores_state_ready_last_in_a_separate_store() -> None:
    mem = RecordingPage(4096)
    page = SharedIoPage(mem)
    req = pio(0x3F8, 0x1234, size=2, dir=IOREQ_READ, vp_eport=9)
    page.post(2, req)
    slot = 2 * 32
    assert len(mem.stores) >= 2
    # The last store is the state byte alone, and it is what makes the slot READY.
    last_off, last_data, final = mem.stores[-1]
    assert (last_off, len(last_data)) == (slot + 30, 1)
    assert final[slot + 30] & 0x0F == STATE_IOREQ_READY
    # Before it, every other byte already held its final value, and the state was NONE.
    before = mem.stores[-2][2]
    assert before[slot + 30] & 0x0F == STATE_IOREQ_NONE
    assert before[slot:slot + 30] == final[slot:slot + 30]
    assert before[slot + 31] == final[slot + 31]
    assert all(snap[slot + 30] & 0x0F != STATE_IOREQ_READY for _, _, snap in mem.stores[:-1])
    assert IoReq.unpack(final[slot:slot + 32]) == IoReq(
        addr=0x3F8, data=0x1234, count=1, size=2, vp_eport=9, state=STATE_IOREQ_READY,
        data_is_ptr=False, dir=IOREQ_READ, df=False, type=IOREQ_TYPE_PIO)
    # No other vCPU's slot was touched.
    assert final[:slot] == bytes(slot) and final[slot + 32:] == bytes(4096 - slot - 32)


def test_post_into_a_busy_slot_is_refused() -> None:
    page = SharedIoPage()
    page.post(0, pio())
    with pytest.raises(IoreqStateError, match="STATE_IOREQ_READY"):
        page.post(0, pio())
    page.post(1, pio())  # the other vCPUs' slots are free


def test_vcpu_slots_are_at_32_byte_strides_of_the_given_memory() -> None:
    backing = bytearray(4096)
    hypervisor_side = SharedIoPage(memoryview(backing))
    device_model_side = SharedIoPage(memoryview(backing))
    hypervisor_side.post(3, pio(0x70, 0x8F, vp_eport=4))
    assert backing[96:104] == (0x70).to_bytes(8, "little")
    assert device_model_side.state(3) == STATE_IOREQ_READY
    assert device_model_side.fetch(3).data == 0x8F
    assert device_model_side.state(0) == STATE_IOREQ_NONE
    with pytest.raises(ValueError):
        hypervisor_side.state(128)


def test_set_state_keeps_dir_df_and_pointer_bits() -> None:
    page = SharedIoPage()
    page.post(0, pio(dir=IOREQ_READ, data_is_ptr=True, df=True))
    page.set_state(0, STATE_IOREQ_INPROCESS)
    assert page.raw(0)[30] == 0b0111_0010
    page.set_state(0, STATE_IORESP_READY)
    assert page.raw(0)[30] == 0b0111_0011
    assert page.state(0) == STATE_IORESP_READY


def test_write_data_touches_only_the_data_field() -> None:
    page = SharedIoPage()
    page.post(1, pio(0x64, 0, dir=IOREQ_READ, vp_eport=12))
    before = page.raw(1)
    page.write_data(1, 0x1_0000_0000_0000_001C)  # wider than u64: truncated like a store
    after = page.raw(1)
    assert after[8:16] == struct.pack("<Q", 0x1C)
    assert after[:8] == before[:8] and after[16:] == before[16:]
    assert page.read_data(1) == 0x1C
