"""Guest RAM and its p2m: reads and writes across pages, remapping a frame. No Unicorn."""

import mmap

import pytest

from hvm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError, HostFrame


def test_read_write_across_a_page_boundary():
    mem = GuestMemory(1 << 20)
    mem.write(PAGE_SIZE - 2, b"abcd")
    assert mem.read(PAGE_SIZE - 2, 4) == b"abcd"
    mem.write_uint(0x100, 4, 0x12345678)
    assert mem.read(0x100, 4) == bytes.fromhex("78563412")


def test_outside_ram_is_refused():
    mem = GuestMemory(1 << 20)
    with pytest.raises(GuestMemoryError):
        mem.read((1 << 20) - 1, 2)


def test_remap_backs_a_frame_with_another_host_page_and_tells_listeners():
    mem = GuestMemory(1 << 20)
    mem.write(5 * PAGE_SIZE - 1, b"xy")
    page = mmap.mmap(-1, PAGE_SIZE)
    page[:4] = b"NEW!"
    seen = []
    mem.on_remap(lambda pfn, frame: seen.append(pfn))
    old = mem.remap(5, HostFrame(page, 0))
    assert seen == [5]
    assert mem.read(5 * PAGE_SIZE, 4) == b"NEW!"
    assert mem.read(5 * PAGE_SIZE - 1, 2) == b"xN"  # a read across the remapped boundary
    assert bytes(old.view()[:1]) == b"y"
    runs = mem.runs()
    assert any(gpa == 5 * PAGE_SIZE and length == PAGE_SIZE for gpa, length, _ in runs)
