"""The buffered I/O page: 511 posted-write slots a vCPU never waits on (Xen hvm/ioreq.h)."""

from __future__ import annotations

import mmap
import struct
import threading

from hvm.ioreq import IOREQ_WRITE, PAGE_SIZE, PageMemory, format_offsets

IOREQ_BUFFER_SLOT_NUM = 511  # 8 bytes each after two 4-byte pointers: exactly one page

# struct buf_ioreq, as two little-endian u32 words: word 0 holds the bitfields
# (type:8, pad:1, dir:1, size:2, addr:20 -- gcc fills from bit 0 upwards), word 1 is data.
BUF_IOREQ_FORMAT = "<II"
BUF_IOREQ_MEMBERS: tuple[str, ...] = ("", "data")  # "" = the word of bitfields
BUF_IOREQ_SIZE = struct.calcsize(BUF_IOREQ_FORMAT)
# name -> (shift, width) within word 0.
BUF_IOREQ_BITS: dict[str, tuple[int, int]] = {
    "type": (0, 8),
    "pad": (8, 1),
    "dir": (9, 1),
    "size": (10, 2),
    "addr": (12, 20),
}
# `type` is a whole byte, so it is also an addressable member (offsetof works on it).
BUF_IOREQ_OFFSETS: dict[str, int] = {"type": BUF_IOREQ_BITS["type"][0] // 8} | {
    name: off for name, off in zip(BUF_IOREQ_MEMBERS, format_offsets(BUF_IOREQ_FORMAT), strict=True)
    if name
}

# struct buffered_iopage: read_pointer, write_pointer (Xen itself sees them as a union with a
# u64 `full`, so both can be rewritten in one 8-byte store), then the slots.
BUFFERED_IOPAGE_FORMAT = "<II"
BUFFERED_IOPAGE_MEMBERS: tuple[str, ...] = ("read_pointer", "write_pointer")
BUFFERED_IOPAGE_OFFSETS: dict[str, int] = dict(
    zip(BUFFERED_IOPAGE_MEMBERS, format_offsets(BUFFERED_IOPAGE_FORMAT), strict=True)
)
BUFFERED_IOPAGE_OFFSETS["buf_ioreq"] = struct.calcsize(BUFFERED_IOPAGE_FORMAT)
BUFIOREQ_POINTERS_OFFSET = BUFFERED_IOPAGE_OFFSETS["read_pointer"]
BUFFERED_IOPAGE_SIZE = BUFFERED_IOPAGE_OFFSETS["buf_ioreq"] + IOREQ_BUFFER_SLOT_NUM * BUF_IOREQ_SIZE

# The 2-bit size field: 0 => 1 byte, 1 => 2, 2 => 4, 3 => 8 (an 8-byte write takes two slots).
_SIZE_CODE = {1: 0, 2: 1, 4: 2, 8: 3}
_CODE_SIZE = {code: size for size, code in _SIZE_CODE.items()}
U32_MASK = 0xFFFFFFFF


def buf_ioreq_word(type: int, addr: int, size_code: int, dir: int) -> int:
    """Word 0 of a buf_ioreq slot: the bitfields."""
    word = 0
    for name, value in (("type", type), ("dir", dir), ("size", size_code), ("addr", addr)):
        shift, width = BUF_IOREQ_BITS[name]
        if not 0 <= value < (1 << width):
            raise ValueError(f"buf_ioreq {name}={value:#x} does not fit in {width} bits")
        word |= value << shift
    return word


def pack_buf_ioreq(type: int, addr: int, size_code: int, data32: int, dir: int) -> bytes:
    """One 8-byte buf_ioreq slot."""
    return _SLOT.pack(buf_ioreq_word(type, addr, size_code, dir), data32 & U32_MASK)


_SLOT = struct.Struct(BUF_IOREQ_FORMAT)
_POINTERS = struct.Struct(BUFFERED_IOPAGE_FORMAT)
_U32 = struct.Struct("<I")
_SLOTS_AT = BUFFERED_IOPAGE_OFFSETS["buf_ioreq"]
_WRITE_POINTER_AT = BUFFERED_IOPAGE_OFFSETS["write_pointer"]
_TYPE_SHIFT, _TYPE_WIDTH = BUF_IOREQ_BITS["type"]
_SIZE_SHIFT, _SIZE_WIDTH = BUF_IOREQ_BITS["size"]
_ADDR_SHIFT, _ADDR_WIDTH = BUF_IOREQ_BITS["addr"]


def _slot_at(pointer: int) -> int:
    """The page offset of the slot a (free-running) pointer names."""
    return _SLOTS_AT + (pointer % IOREQ_BUFFER_SLOT_NUM) * BUF_IOREQ_SIZE


class BufferedIoPage:
    """A buffered_iopage: the hypervisor appends posted writes, the device model drains them.

    The pointers run free and index slots modulo 511. Because 2^32 is not a multiple of 511,
    the producer pulls both pointers back by a multiple of 511 once the reader has passed 511,
    storing the pair at once, as Xen does with a cmpxchg on the 64-bit union. The consumer
    only ever adds to read_pointer. `lock` stands for that atomicity: both threads must use
    the same BufferedIoPage object (or pass the same lock to two wrappers of one page).
    """

    def __init__(
        self,
        page: mmap.mmap | memoryview | PageMemory | None = None,
        *,
        lock: threading.Lock | None = None,
    ) -> None:
        self._owned: mmap.mmap | None = None
        if page is None:
            self._owned = mmap.mmap(-1, PAGE_SIZE)
            page = self._owned
        elif isinstance(page, memoryview) and page.format != "B":
            page = page.cast("B")
        if len(page) < BUFFERED_IOPAGE_SIZE:
            raise ValueError(
                f"a buffered_iopage needs {BUFFERED_IOPAGE_SIZE} bytes, got {len(page)}")
        self._mem = page
        self._lock = lock if lock is not None else threading.Lock()

    def close(self) -> None:
        """Release the anonymous page this object allocated (a caller's page is left alone)."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    # -- the pointer pair -----------------------------------------------------------------

    def _pointers(self) -> tuple[int, int]:
        off = BUFIOREQ_POINTERS_OFFSET
        rp, wp = _POINTERS.unpack(self._mem[off:off + 8])
        return rp, wp

    def has_entries(self) -> bool:
        """Is anything posted? (Consumer side, without the lock: the producer moves only
        write_pointer forward, so a stale answer is at worst a miss that the next
        notification of the buffered port catches.)"""
        off = BUFIOREQ_POINTERS_OFFSET
        mem = self._mem
        return mem[off:off + 4] != mem[off + 4:off + 8]

    @property
    def read_pointer(self) -> int:
        with self._lock:
            return self._pointers()[0]

    @property
    def write_pointer(self) -> int:
        with self._lock:
            return self._pointers()[1]

    def _used(self) -> int:
        rp, wp = self._pointers()
        return (wp - rp) & U32_MASK

    def free_slots(self) -> int:
        with self._lock:
            return IOREQ_BUFFER_SLOT_NUM - self._used()

    # -- producer (hypervisor, vCPU thread) -------------------------------------------------

    def try_put(self, type: int, addr: int, size: int, data: int, dir: int = IOREQ_WRITE) -> bool:
        """Append one posted write; False if the page has no room (the caller then sends a
        synchronous ioreq instead). An 8-byte write takes two slots: low half, then high half."""
        return self.put(type, addr, size, data, dir) is not None

    def put(self, type: int, addr: int, size: int, data: int, dir: int = IOREQ_WRITE) -> int | None:
        """try_put() that says how many slots were in use before this write (None: no room).
        0 means the page was empty: the consumer may be asleep and must be notified; otherwise a
        notification is already on its way (see IoreqServer._drain_buffered)."""
        code = _SIZE_CODE.get(size)
        if code is None:
            raise ValueError(f"buffered ioreq size must be 1, 2, 4 or 8 bytes, not {size}")
        qw = 1 if code == 3 else 0
        word = buf_ioreq_word(type, addr, code, dir)
        mem = self._mem
        p = BUFIOREQ_POINTERS_OFFSET
        with self._lock:
            rp, wp = self._pointers()
            used = (wp - rp) & U32_MASK
            if used >= IOREQ_BUFFER_SLOT_NUM - qw:
                return None
            off = _slot_at(wp)
            mem[off:off + BUF_IOREQ_SIZE] = _SLOT.pack(word, data & U32_MASK)
            if qw:
                off = _slot_at(wp + 1)
                mem[off:off + BUF_IOREQ_SIZE] = _SLOT.pack(word, (data >> 32) & U32_MASK)
            # The slots are filled before write_pointer moves: the reader never sees a
            # pointer past data that is not there yet.
            wp = (wp + 1 + qw) & U32_MASK
            if rp >= IOREQ_BUFFER_SLOT_NUM:  # pull both back by 511s, in one store
                back = (rp // IOREQ_BUFFER_SLOT_NUM) * IOREQ_BUFFER_SLOT_NUM
                mem[p:p + 8] = _POINTERS.pack(rp - back, (wp - back) & U32_MASK)
            else:
                mem[_WRITE_POINTER_AT:_WRITE_POINTER_AT + 4] = _U32.pack(wp)
        return used

    # -- consumer (device model thread) -----------------------------------------------------

    def take(self) -> list[tuple[int, int, int, int]]:
        """Drain every complete entry, oldest first, as (type, addr, size, data)."""
        out: list[tuple[int, int, int, int]] = []
        mem = self._mem
        p = BUFIOREQ_POINTERS_OFFSET
        with self._lock:
            rp, wp = self._pointers()
        used = (wp - rp) & U32_MASK
        type_mask, size_mask, addr_mask = (1 << _TYPE_WIDTH) - 1, (1 << _SIZE_WIDTH) - 1, (1 << _ADDR_WIDTH) - 1
        i = 0
        while i < used:
            off = _slot_at(rp + i)
            word, data = _SLOT.unpack(mem[off:off + BUF_IOREQ_SIZE])
            size = _CODE_SIZE[(word >> _SIZE_SHIFT) & size_mask]
            if size == 8:
                if i + 1 >= used:  # cannot happen with a well-behaved producer: both halves
                    break  # are published by one write_pointer store
                off = _slot_at(rp + i + 1)
                data |= _SLOT.unpack(mem[off:off + BUF_IOREQ_SIZE])[1] << 32
                i += 2
            else:
                i += 1
            out.append(((word >> _TYPE_SHIFT) & type_mask, (word >> _ADDR_SHIFT) & addr_mask, size, data))
        if i:
            # Hand the slots back with an add, never a store of a stale value: the producer may
            # have pulled both pointers back by 511s in between.
            with self._lock:
                cur_rp = self._pointers()[0]
                mem[p:p + 4] = _U32.pack((cur_rp + i) & U32_MASK)
        return out
