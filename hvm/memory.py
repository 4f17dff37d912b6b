"""Guest RAM as host-owned pages with a pfn-to-host-frame map, Xen's p2m (xen/include/public/xen.h, arch-x86 p2m)."""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1


_ELEMENT = {1: "B", 2: "H", 4: "I", 8: "Q"}  # struct code of a string instruction's element, by size


class GuestMemoryError(Exception):
    """A guest-physical access outside guest RAM (the hypervisor turns it into an EPT violation)."""


@dataclass(frozen=True)
class HostFrame:
    """One 4 KiB page of host memory: a buffer and the offset of the page in it."""

    buffer: mmap.mmap
    offset: int

    @property
    def address(self) -> int:
        """The host virtual address of the page (what Unicorn's mem_map_ptr takes)."""
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        return base + self.offset

    def view(self) -> memoryview:
        return memoryview(self.buffer)[self.offset:self.offset + PAGE_SIZE]


RemapListener = Callable[[int, HostFrame], None]


class GuestMemory:
    """Guest-physical RAM from 0 to `size`, backed by one anonymous mmap.

    The device model and backends read and write guest memory here directly, never through
    Unicorn. `p2m` maps each guest frame number to the host frame that backs it; a page flip
    replaces one entry and tells the listeners (the vCPUs remap that page in Unicorn).
    """

    def __init__(self, size: int) -> None:
        if size <= 0 or size & PAGE_MASK:
            raise ValueError(f"guest memory size must be a positive multiple of 4 KiB, not {size}")
        self.size = size
        self.ram = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.nr_pages = size >> PAGE_SHIFT
        self._p2m: list[HostFrame] = [HostFrame(self.ram, pfn << PAGE_SHIFT) for pfn in range(self.nr_pages)]
        self._identity = True  # every pfn still backed by its own page of `ram`
        self._listeners: list[RemapListener] = []

    # -- the p2m -----------------------------------------------------------------------------------
    def p2m(self, pfn: int) -> HostFrame:
        if not 0 <= pfn < self.nr_pages:
            raise GuestMemoryError(f"guest frame {pfn:#x} is not guest RAM")
        return self._p2m[pfn]

    def remap(self, pfn: int, frame: HostFrame) -> HostFrame:
        """Back guest frame `pfn` by `frame`; returns the frame that backed it before."""
        old = self.p2m(pfn)
        self._p2m[pfn] = frame
        self._identity = False
        for listener in self._listeners:
            listener(pfn, frame)
        return old

    def on_remap(self, listener: RemapListener) -> None:
        self._listeners.append(listener)

    def runs(self) -> list[tuple[int, int, int]]:
        """(guest-physical address, length, host address) of each run of contiguous host memory."""
        out: list[tuple[int, int, int]] = []
        for pfn, frame in enumerate(self._p2m):
            addr = frame.address
            if out and out[-1][0] + out[-1][1] == pfn << PAGE_SHIFT and out[-1][2] + out[-1][1] == addr:
                gpa, length, host = out[-1]
                out[-1] = (gpa, length + PAGE_SIZE, host)
            else:
                out.append((pfn << PAGE_SHIFT, PAGE_SIZE, addr))
        return out

    # -- access by guest-physical address ---------------------------------------------------------
    def contains(self, gpa: int, length: int = 1) -> bool:
        return 0 <= gpa and length >= 0 and gpa + length <= self.size

    def _check(self, gpa: int, length: int) -> None:
        if not self.contains(gpa, length):
            raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is outside guest RAM "
                               f"(0-{self.size:#x})")

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        if self._identity:
            return self.ram[gpa:gpa + length]
        out = bytearray()
        while length:
            pfn, off = gpa >> PAGE_SHIFT, gpa & PAGE_MASK
            chunk = min(length, PAGE_SIZE - off)
            frame = self._p2m[pfn]
            out += frame.buffer[frame.offset + off:frame.offset + off + chunk]
            gpa += chunk
            length -= chunk
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        self._check(gpa, length)
        if self._identity:
            self.ram[gpa:gpa + length] = data
            return
        view = memoryview(data)
        done = 0
        while done < length:
            pfn, off = (gpa + done) >> PAGE_SHIFT, (gpa + done) & PAGE_MASK
            chunk = min(length - done, PAGE_SIZE - off)
            frame = self._p2m[pfn]
            frame.buffer[frame.offset + off:frame.offset + off + chunk] = view[done:done + chunk]
            done += chunk

    def read_uint(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_uint(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_elements(self, gpa: int, size: int, count: int, step: int) -> list[int]:
        """`count` little-endian values of `size` bytes, the first at gpa, each `step` bytes
        after the last (step = -size: downwards, as a string instruction with DF=1 goes)."""
        start = gpa if step > 0 else gpa + step * (count - 1)
        values = [v for (v,) in struct.iter_unpack("<" + _ELEMENT[size], self.read(start, size * count))]
        if step < 0:
            values.reverse()
        return values

    def write_elements(self, gpa: int, size: int, values: list[int], step: int) -> None:
        """The reverse of read_elements: values[0] at gpa, the next `step` bytes on."""
        if not values:
            return
        ordered = values if step > 0 else values[::-1]
        start = gpa if step > 0 else gpa + step * (len(values) - 1)
        self.write(start, struct.pack(f"<{len(values)}{_ELEMENT[size]}", *ordered))

    def read_struct(self, gpa: int, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(gpa, struct.calcsize(fmt)))

    def close(self) -> None:
        self._listeners.clear()
