"""ioreq_t and the shared I/O page of hypervisor and device model (Xen public/hvm/ioreq.h)."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any, Protocol

# --- Constants, as public/hvm/ioreq.h names them --------------------------------------------

IOREQ_READ, IOREQ_WRITE = 1, 0

STATE_IOREQ_NONE = 0  # slot free: the hypervisor may post
STATE_IOREQ_READY = 1  # posted by the hypervisor, not yet seen by the device model
STATE_IOREQ_INPROCESS = 2  # the device model has copied it out and is emulating it
STATE_IORESP_READY = 3  # the device model has answered; the hypervisor completes the exit

IOREQ_TYPE_PIO = 0  # port I/O
IOREQ_TYPE_COPY = 1  # MMIO
IOREQ_TYPE_PCI_CONFIG = 2  # addr = SBDF << 32 | register
IOREQ_TYPE_TIMEOFFSET = 7
IOREQ_TYPE_INVALIDATE = 8  # mapcache invalidation

STATE_NAMES = {
    STATE_IOREQ_NONE: "STATE_IOREQ_NONE",
    STATE_IOREQ_READY: "STATE_IOREQ_READY",
    STATE_IOREQ_INPROCESS: "STATE_IOREQ_INPROCESS",
    STATE_IORESP_READY: "STATE_IORESP_READY",
}
TYPE_NAMES = {
    IOREQ_TYPE_PIO: "IOREQ_TYPE_PIO",
    IOREQ_TYPE_COPY: "IOREQ_TYPE_COPY",
    IOREQ_TYPE_PCI_CONFIG: "IOREQ_TYPE_PCI_CONFIG",
    IOREQ_TYPE_TIMEOFFSET: "IOREQ_TYPE_TIMEOFFSET",
    IOREQ_TYPE_INVALIDATE: "IOREQ_TYPE_INVALIDATE",
}

PAGE_SIZE = 4096
U64_MASK = (1 << 64) - 1


# --- Layout: the one definition every offset below (and hvm/abi.py) is derived from -------------

def format_offsets(fmt: str) -> list[int]:
    """Byte offset of each item of a simple `struct` format ('<' then one letter per item)."""
    order, codes = fmt[0], fmt[1:]
    if order not in "<>=!" or not codes.isalpha():
        raise ValueError(f"only simple formats with an explicit byte order are supported: {fmt!r}")
    return [struct.calcsize(order + codes[:i]) for i in range(len(codes))]


# struct ioreq: addr, data, count, size, vp_eport, _pad0, <bitfield byte>, type.
# The bitfield byte has no C member name; "" marks it here.
IOREQ_FORMAT = "<QQIIIHBB"
IOREQ_MEMBERS: tuple[str, ...] = ("addr", "data", "count", "size", "vp_eport", "_pad0", "", "type")
IOREQ_SIZE = struct.calcsize(IOREQ_FORMAT)
_IOREQ_ITEM_OFFSETS = format_offsets(IOREQ_FORMAT)
IOREQ_OFFSETS: dict[str, int] = {
    name: off for name, off in zip(IOREQ_MEMBERS, _IOREQ_ITEM_OFFSETS, strict=True) if name
}
IOREQ_FLAGS_OFFSET = _IOREQ_ITEM_OFFSETS[IOREQ_MEMBERS.index("")]
IOREQ_DATA_OFFSET = IOREQ_OFFSETS["data"]
IOREQ_DATA_FORMAT = "<Q"

# Bitfields of the flags byte: name -> (shift, width), gcc's little-endian allocation order
# (first declared member in the lowest bits): state:4, data_is_ptr:1, dir:1, df:1, _pad1:1.
IOREQ_FLAG_BITS: dict[str, tuple[int, int]] = {
    "state": (0, 4),
    "data_is_ptr": (4, 1),
    "dir": (5, 1),
    "df": (6, 1),
}

# struct shared_iopage { struct ioreq vcpu_ioreq[1]; } -- in practice one slot per vCPU,
# indexed by vCPU id, filling the page.
SHARED_IOPAGE_VCPU_IOREQ_OFFSET = 0
MAX_VCPUS = PAGE_SIZE // IOREQ_SIZE


def _bits(value: int, name: str) -> int:
    shift, width = IOREQ_FLAG_BITS[name]
    return (value >> shift) & ((1 << width) - 1)


def _put_bits(name: str, field: int) -> int:
    shift, width = IOREQ_FLAG_BITS[name]
    if not 0 <= field < (1 << width):
        raise ValueError(f"ioreq {name}={field} does not fit in {width} bit(s)")
    return field << shift


@dataclass(frozen=True)
class IoReq:
    """One ioreq_t, as a value. pack()/unpack() give the exact 32 bytes of the ABI."""

    addr: int
    data: int
    count: int
    size: int
    vp_eport: int
    state: int
    data_is_ptr: bool
    dir: int
    df: bool
    type: int

    def flags_byte(self) -> int:
        """Byte 30: state | data_is_ptr << 4 | dir << 5 | df << 6."""
        return (
            _put_bits("state", self.state)
            | _put_bits("data_is_ptr", int(bool(self.data_is_ptr)))
            | _put_bits("dir", self.dir)
            | _put_bits("df", int(bool(self.df)))
        )

    def pack(self) -> bytes:
        try:
            return struct.pack(
                IOREQ_FORMAT, self.addr, self.data, self.count, self.size, self.vp_eport, 0,
                self.flags_byte(), self.type,
            )
        except struct.error as exc:
            raise ValueError(f"ioreq field out of range: {exc} ({self!r})") from None

    @classmethod
    def unpack(cls, b: bytes | bytearray | memoryview) -> IoReq:
        if len(b) != IOREQ_SIZE:
            raise ValueError(f"an ioreq_t is {IOREQ_SIZE} bytes, got {len(b)}")
        addr, data, count, size, vp_eport, _pad0, flags, type_ = struct.unpack(IOREQ_FORMAT, b)
        return cls(
            addr=addr, data=data, count=count, size=size, vp_eport=vp_eport,
            state=_bits(flags, "state"), data_is_ptr=bool(_bits(flags, "data_is_ptr")),
            dir=_bits(flags, "dir"), df=bool(_bits(flags, "df")), type=type_,
        )

    def element_addrs(self) -> list[int]:
        """String I/O (data_is_ptr): the guest-physical address of each of the `count`
        elements, in the order the guest's REP INS/OUTS touches them (downwards when df)."""
        if not self.data_is_ptr:
            raise ValueError("element_addrs() is for ioreqs whose data is a guest pointer")
        step = -self.size if self.df else self.size
        return [(self.data + i * step) & U64_MASK for i in range(self.count)]

    def describe(self) -> str:
        """A one-line human description, for error messages and `explain`."""
        kind = TYPE_NAMES.get(self.type, f"type {self.type}")
        rw = "read" if self.dir == IOREQ_READ else "write"
        extra = f" count={self.count}" + (" data_is_ptr" if self.data_is_ptr else "")
        extra += " df" if self.df else ""
        return f"{kind} {rw} addr={self.addr:#x} size={self.size}{extra}"


class PageMemory(Protocol):
    """What SharedIoPage needs of its page: byte indexing and slice get/set (mmap, memoryview)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any, /) -> Any: ...  # int -> int, slice -> bytes-like

    def __setitem__(self, index: Any, value: Any, /) -> None: ...


class IoreqStateError(RuntimeError):
    """The hypervisor found the vCPU's slot busy when posting (Xen crashes the domain here)."""


_STATE_MASK = ((1 << IOREQ_FLAG_BITS["state"][1]) - 1) << IOREQ_FLAG_BITS["state"][0]
_IOREQ_STRUCT = struct.Struct(IOREQ_FORMAT)
_DATA_STRUCT = struct.Struct(IOREQ_DATA_FORMAT)


class SharedIoPage:
    """One 4096-byte page, one ioreq_t slot per vCPU (slot index = vCPU id).

    Both the hypervisor (vCPU thread) and the device model (its own thread) act on the same
    bytes; nothing is handed over by reference. Writes are whole-field stores into the page.
    """

    def __init__(self, page: mmap.mmap | memoryview | PageMemory | None = None) -> None:
        self._owned: mmap.mmap | None = None
        if page is None:
            self._owned = mmap.mmap(-1, PAGE_SIZE)
            page = self._owned
        elif isinstance(page, memoryview) and page.format != "B":
            page = page.cast("B")
        if len(page) < IOREQ_SIZE:
            raise ValueError(f"an I/O page needs at least {IOREQ_SIZE} bytes, got {len(page)}")
        self._mem = page
        self.nr_vcpus = min(MAX_VCPUS, len(page) // IOREQ_SIZE)

    def close(self) -> None:
        """Release the anonymous page this object allocated (a caller's page is left alone)."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def _slot(self, vcpu: int) -> int:
        if not 0 <= vcpu < self.nr_vcpus:
            raise ValueError(f"vCPU {vcpu} has no slot on this I/O page (0..{self.nr_vcpus - 1})")
        return SHARED_IOPAGE_VCPU_IOREQ_OFFSET + vcpu * IOREQ_SIZE

    def post(self, vcpu: int, req: IoReq) -> None:
        """Hypervisor side: publish `req` in the vCPU's slot (req.state is ignored).

        Every field is stored with state still NONE; only then, in a separate one-byte store,
        does state become READY. A device model that sees READY therefore sees a whole request.
        """
        off = self._slot(vcpu)
        current = self.state(vcpu)
        if current != STATE_IOREQ_NONE:
            raise IoreqStateError(
                f"vCPU {vcpu}: I/O slot is {STATE_NAMES.get(current, current)}, not "
                "STATE_IOREQ_NONE; the previous ioreq was never completed"
            )
        body = bytearray(req.pack())
        flags = body[IOREQ_FLAGS_OFFSET] & ~_STATE_MASK & 0xFF
        body[IOREQ_FLAGS_OFFSET] = flags  # state NONE while the other fields land
        self._mem[off:off + IOREQ_SIZE] = body
        # Publish: the state store is last, so the request is complete before it is READY.
        self._mem[off + IOREQ_FLAGS_OFFSET] = flags | _put_bits("state", STATE_IOREQ_READY)

    def post_fields(self, vcpu: int, addr: int, data: int, count: int, size: int, vp_eport: int,
                    data_is_ptr: bool, dir: int, df: bool, type: int) -> None:
        """post() without building an IoReq: the same bytes, the same order (state READY last)."""
        off = SHARED_IOPAGE_VCPU_IOREQ_OFFSET + vcpu * IOREQ_SIZE
        mem = self._mem
        if mem[off + IOREQ_FLAGS_OFFSET] & _STATE_MASK:
            self.post(vcpu, IoReq(addr, data, count, size, vp_eport, 0, data_is_ptr, dir, df, type))
            return  # post() raises with the full explanation
        flags = (int(data_is_ptr) << 4) | (dir << 5) | (int(df) << 6)
        mem[off:off + IOREQ_SIZE] = _IOREQ_STRUCT.pack(addr, data, count, size, vp_eport, 0, flags, type)
        mem[off + IOREQ_FLAGS_OFFSET] = flags | STATE_IOREQ_READY

    # -- the hot path: one call per side and step, each one copy of the bytes it needs ---------
    def take_request(self, vcpu: int) -> tuple[int, int, int, int, int, int, int] | None:
        """Device-model side: if the slot is READY, copy it out once and mark it INPROCESS.
        Returns (addr, data, count, size, vp_eport, flags byte, type), or None if not READY."""
        off = self._slot(vcpu)
        mem = self._mem
        flags = mem[off + IOREQ_FLAGS_OFFSET]
        if flags & _STATE_MASK != STATE_IOREQ_READY:
            return None
        addr, data, count, size, vp_eport, _pad, flags, type_ = _IOREQ_STRUCT.unpack(mem[off:off + IOREQ_SIZE])
        mem[off + IOREQ_FLAGS_OFFSET] = (flags & ~_STATE_MASK & 0xFF) | STATE_IOREQ_INPROCESS
        return addr, data, count, size, vp_eport, flags, type_

    def answer(self, vcpu: int, flags: int, data: int | None) -> None:
        """Device-model side: write `data` back (None: leave it, as for writes and string I/O),
        then, last, state IORESP_READY. `flags` is the byte take_request() returned."""
        off = self._slot(vcpu)
        mem = self._mem
        if data is not None:
            mem[off + IOREQ_DATA_OFFSET:off + IOREQ_DATA_OFFSET + 8] = _DATA_STRUCT.pack(data & U64_MASK)
        mem[off + IOREQ_FLAGS_OFFSET] = (flags & ~_STATE_MASK & 0xFF) | STATE_IORESP_READY

    def take_response(self, vcpu: int) -> int | None:
        """Hypervisor side: if the device model has answered, read `data` and set the slot back
        to NONE; None while it has not."""
        off = SHARED_IOPAGE_VCPU_IOREQ_OFFSET + vcpu * IOREQ_SIZE
        mem = self._mem
        flags = mem[off + IOREQ_FLAGS_OFFSET]
        if flags & _STATE_MASK != STATE_IORESP_READY:
            return None
        data: int = _DATA_STRUCT.unpack(mem[off + IOREQ_DATA_OFFSET:off + IOREQ_DATA_OFFSET + 8])[0]
        mem[off + IOREQ_FLAGS_OFFSET] = flags & ~_STATE_MASK & 0xFF
        return data

    def state(self, vcpu: int) -> int:
        return _bits(self._mem[self._slot(vcpu) + IOREQ_FLAGS_OFFSET], "state")

    def set_state(self, vcpu: int, state: int) -> None:
        """Store the 4-bit state, keeping the other bits of the byte (data_is_ptr, dir, df)."""
        where = self._slot(vcpu) + IOREQ_FLAGS_OFFSET
        shift, width = IOREQ_FLAG_BITS["state"]
        keep = self._mem[where] & ~(((1 << width) - 1) << shift) & 0xFF
        self._mem[where] = keep | _put_bits("state", state)

    def fetch(self, vcpu: int) -> IoReq:
        """Device-model side: one copy of the 32 bytes; decide everything from that copy."""
        return IoReq.unpack(self.raw(vcpu))

    def write_data(self, vcpu: int, data: int) -> None:
        """Device-model side: the answer goes back in `data` only."""
        off = self._slot(vcpu) + IOREQ_DATA_OFFSET
        self._mem[off:off + 8] = struct.pack(IOREQ_DATA_FORMAT, data & U64_MASK)

    def read_data(self, vcpu: int) -> int:
        off = self._slot(vcpu) + IOREQ_DATA_OFFSET
        return struct.unpack(IOREQ_DATA_FORMAT, bytes(self._mem[off:off + 8]))[0]

    def raw(self, vcpu: int) -> bytes:
        off = self._slot(vcpu)
        return bytes(self._mem[off:off + IOREQ_SIZE])


def pci_config_addr(segment: int, bus: int, dev: int, fn: int, reg: int) -> int:
    """The addr of an IOREQ_TYPE_PCI_CONFIG ioreq: SBDF in bits 63..32, register in 31..0."""
    sbdf = (segment & 0xFFFF) << 16 | (bus & 0xFF) << 8 | (dev & 0x1F) << 3 | (fn & 0x7)
    return sbdf << 32 | (reg & 0xFFFFFFFF)


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, f"state {state}")

