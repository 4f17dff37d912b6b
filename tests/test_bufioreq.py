"""The buffered I/O page: slot bytes, order, wrap-around, full page, two threads."""

from __future__ import annotations

import struct
import threading

import pytest

from hvm.bufioreq import IOREQ_BUFFER_SLOT_NUM, BufferedIoPage
from hvm.evtchn import make_interdomain_pair
from hvm.ioreq import IOREQ_TYPE_COPY, IOREQ_TYPE_PIO


def slot_words(backing: bytearray, index: int) -> tuple[int, int]:
    return struct.unpack_from("<II", backing, 8 + 8 * index)


def pointers(backing: bytearray) -> tuple[int, int]:
    return struct.unpack_from("<II", backing, 0)


def test_one_write_lands_in_slot_zero_with_header_bit_layout() -> None:
    backing = bytearray(4096)
    page = BufferedIoPage(memoryview(backing))
    assert page.try_put(IOREQ_TYPE_PIO, 0x3F8, 2, 0xBEEF)
    word0, data = slot_words(backing, 0)
    # type in bits 0-7, pad 8, dir 9, size 10-11 (1 => 2 bytes), addr 12-31
    assert word0 == 0x003F_8400
    assert data == 0xBEEF
    assert pointers(backing) == (0, 1)
    assert page.free_slots() == IOREQ_BUFFER_SLOT_NUM - 1


def test_qword_write_takes_two_slots_high_half_second() -> None:
    backing = bytearray(4096)
    page = BufferedIoPage(memoryview(backing))
    assert page.try_put(IOREQ_TYPE_COPY, 0xA0000, 8, 0x1122_3344_5566_7788)
    (w0, lo), (w1, hi) = slot_words(backing, 0), slot_words(backing, 1)
    assert (lo, hi) == (0x5566_7788, 0x1122_3344)
    assert w0 == w1 == (0xA0000 << 12) | (3 << 10) | IOREQ_TYPE_COPY
    assert pointers(backing) == (0, 2)
    assert page.take() == [(IOREQ_TYPE_COPY, 0xA0000, 8, 0x1122_3344_5566_7788)]
    assert pointers(backing) == (2, 2)
    assert page.free_slots() == IOREQ_BUFFER_SLOT_NUM


def test_writes_come_out_in_order_across_the_wrap() -> None:
    backing = bytearray(4096)
    page = BufferedIoPage(memoryview(backing))
    sizes = (1, 2, 4)
    sent: list[tuple[int, int, int, int]] = []
    got: list[tuple[int, int, int, int]] = []
    for rnd in range(3):  # 3 x 400 entries: the slot index wraps past 511 twice
        for i in range(400):
            item = (IOREQ_TYPE_PIO, 0x80 + (i % 16), sizes[i % 3], (rnd << 16 | i) & 0xFF)
            assert page.try_put(*item)
            sent.append(item)
        got += page.take()
        rp, wp = pointers(backing)
        assert rp == wp
    assert got == sent
    # The free-running pointers were pulled back by multiples of 511, as Xen does.
    rp, wp = pointers(backing)
    assert rp < 2 * IOREQ_BUFFER_SLOT_NUM
    assert page.take() == []


def test_qword_split_across_the_last_and_first_slot() -> None:
    backing = bytearray(4096)
    page = BufferedIoPage(memoryview(backing))
    for _ in range(IOREQ_BUFFER_SLOT_NUM - 1):
        assert page.try_put(IOREQ_TYPE_PIO, 0x80, 1, 0)
    page.take()
    assert page.try_put(IOREQ_TYPE_COPY, 0xB8000, 8, 0xAAAA_BBBB_CCCC_DDDD)
    assert slot_words(backing, 510)[1] == 0xCCCC_DDDD
    assert slot_words(backing, 0)[1] == 0xAAAA_BBBB
    assert page.take() == [(IOREQ_TYPE_COPY, 0xB8000, 8, 0xAAAA_BBBB_CCCC_DDDD)]


def test_full_page_refuses_and_frees_after_take() -> None:
    page = BufferedIoPage()
    for i in range(IOREQ_BUFFER_SLOT_NUM):
        assert page.try_put(IOREQ_TYPE_PIO, 0x80, 1, i & 0xFF)
    assert page.free_slots() == 0
    assert not page.try_put(IOREQ_TYPE_PIO, 0x80, 1, 0)
    taken = page.take()
    assert [d for *_, d in taken] == [i & 0xFF for i in range(IOREQ_BUFFER_SLOT_NUM)]
    assert page.free_slots() == IOREQ_BUFFER_SLOT_NUM


def test_qword_needs_two_free_slots() -> None:
    page = BufferedIoPage()
    for _ in range(IOREQ_BUFFER_SLOT_NUM - 1):
        assert page.try_put(IOREQ_TYPE_PIO, 0x80, 4, 0)
    assert page.free_slots() == 1
    assert not page.try_put(IOREQ_TYPE_COPY, 0xA0000, 8, 1)
    assert page.try_put(IOREQ_TYPE_PIO, 0x80, 1, 7)
    assert not page.try_put(IOREQ_TYPE_PIO, 0x80, 1, 8)


@pytest.mark.parametrize("kwargs", [
    {"size": 3}, {"size": 16}, {"addr": 1 << 20}, {"addr": -1}, {"type": 256},
])
def test_entries_that_cannot_be_encoded_are_rejected(kwargs: dict[str, int]) -> None:
    args = {"type": IOREQ_TYPE_PIO, "addr": 0x80, "size": 1, "data": 0} | kwargs
    page = BufferedIoPage()
    with pytest.raises(ValueError):
        page.try_put(**args)
    assert page.free_slots() == IOREQ_BUFFER_SLOT_NUM


def test_a_producer_and_a_consumer_thread_keep_every_write_in_order() -> None:
    page = BufferedIoPage()
    hyp_end, dm_end = make_interdomain_pair()
    room = threading.Event()
    total = 3000  # almost six trips round the 511 slots, with canonicalisation each trip
    problems: list[str] = []

    def producer() -> None:
        for i in range(total):
            size = 8 if i % 7 == 0 else 4
            data = i << 32 | i if size == 8 else i
            while not page.try_put(IOREQ_TYPE_PIO, i & 0xFFFF, size, data):
                room.clear()
                hyp_end.notify()
                if not room.wait(5.0):
                    problems.append(f"no room for write {i}")
                    return
            if i % 64 == 0:
                hyp_end.notify()
        hyp_end.notify()

    t = threading.Thread(target=producer)
    t.start()
    got: list[tuple[int, int, int, int]] = []
    while len(got) < total and not problems:
        if not dm_end.wait(5.0):
            break
        got += page.take()
        room.set()
    t.join(5.0)
    assert not problems and not t.is_alive()
    expected = [(IOREQ_TYPE_PIO, i & 0xFFFF, 8 if i % 7 == 0 else 4,
                 (i << 32 | i) if i % 7 == 0 else i) for i in range(total)]
    assert got == expected
    hyp_end.close()
    dm_end.close()
