"""Address-space bus mapping [base, base+length) ranges to devices, for port I/O and MMIO (rust-vmm vm-device style)."""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable
from typing import Protocol

VALID_SIZES = (1, 2, 4, 8)


class Device(Protocol):
    """A device as the bus sees it: offsets are relative to the base it is mapped at.

    `size` is 1, 2, 4 or 8 bytes. `read` returns a value that fits in `size` bytes and
    never raises for a bad offset (unbacked bytes read as 0xFF); `write` gets `value`
    already masked to `size` and ignores what it cannot take.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(ValueError):
    """A mapping that overlaps another, lies outside the address space, or a bad access size."""


def size_mask(size: int) -> int:
    """All-ones for an access of `size` bytes (what a read of nothing returns)."""
    return (1 << (8 * size)) - 1


def read_bytewise(read8: Callable[[int], int], offset: int, size: int) -> int:
    """A wide access to an 8-bit ISA device: the bus splits it into byte cycles at
    offset, offset+1, ... and assembles the result little-endian."""
    value = 0
    for i in range(size):
        value |= (read8(offset + i) & 0xFF) << (8 * i)
    return value


def write_bytewise(write8: Callable[[int, int], None], offset: int, size: int, value: int) -> None:
    """Byte cycles for a wide write to an 8-bit device, lowest address first."""
    for i in range(size):
        write8(offset + i, (value >> (8 * i)) & 0xFF)


class Bus:
    """One address space (port I/O, 16 bits; or MMIO, 64 bits).

    An access goes to the device whose range holds its first byte; the device sees
    (addr - base). Reads of unassigned addresses return all-ones (a floating ISA bus),
    writes there are dropped; both are counted.
    """

    def __init__(self, name: str, width_bits: int) -> None:
        if width_bits <= 0 or width_bits > 64:
            raise BusError(f"bad address width {width_bits}")
        self.name = name
        self.width_bits = width_bits
        self.limit = 1 << width_bits
        self._bases: list[int] = []  # sorted
        self._entries: dict[int, tuple[int, Device, str]] = {}  # base -> (length, dev, name)
        self.unassigned_reads: int = 0
        self.unassigned_writes: int = 0
        self.accesses: collections.Counter[str] = collections.Counter()

    # -- mapping ---------------------------------------------------------------------

    def map(self, base: int, length: int, device: Device, name: str) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: {name}: length must be positive, got {length}")
        if base < 0 or base + length > self.limit:
            raise BusError(
                f"{self.name}: {name}: range {base:#x}+{length:#x} outside the "
                f"{self.width_bits}-bit address space"
            )
        i = bisect.bisect_left(self._bases, base)
        # The neighbour below must end at or before base; the one at/above must start
        # at or after base + length.
        if i > 0:
            prev = self._bases[i - 1]
            plen, _, pname = self._entries[prev]
            if prev + plen > base:
                raise BusError(f"{self.name}: {name} at {base:#x} overlaps {pname} at {prev:#x}")
        if i < len(self._bases):
            nxt = self._bases[i]
            if nxt < base + length:
                nname = self._entries[nxt][2]
                raise BusError(f"{self.name}: {name} at {base:#x} overlaps {nname} at {nxt:#x}")
        self._bases.insert(i, base)
        self._entries[base] = (length, device, name)

    def unmap(self, base: int) -> None:
        if base not in self._entries:
            raise BusError(f"{self.name}: nothing mapped at {base:#x}")
        del self._entries[base]
        self._bases.remove(base)

    def find(self, addr: int) -> tuple[int, Device, str] | None:
        """The (base, device, name) whose range holds addr, or None."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        base = self._bases[i]
        length, device, name = self._entries[base]
        if addr < base + length:
            return base, device, name
        return None

    def ranges(self) -> list[tuple[int, int, str]]:
        """(base, length, name) for every mapping, in address order."""
        return [(b, self._entries[b][0], self._entries[b][2]) for b in self._bases]

    # -- accesses --------------------------------------------------------------------

    def _check(self, addr: int, size: int) -> None:
        if size not in VALID_SIZES:
            raise BusError(f"{self.name}: bad access size {size}")
        if addr < 0 or addr >= self.limit:
            raise BusError(f"{self.name}: address {addr:#x} outside the address space")

    def access(self, addr: int, size: int, is_read: bool, value: int = 0) -> tuple[int, str]:
        """One read or write with a single lookup: (the value read, or 0 for a write; the
        device's name, or "unassigned" when nothing is mapped there)."""
        self._check(addr, size)
        hit = self.find(addr)
        mask = size_mask(size)
        if hit is None:
            if is_read:
                self.unassigned_reads += 1
                return mask, "unassigned"
            self.unassigned_writes += 1
            return 0, "unassigned"
        base, device, name = hit
        self.accesses[name] += 1
        if is_read:
            return device.read(addr - base, size) & mask, name
        device.write(addr - base, size, value & mask)
        return 0, name

    def read(self, addr: int, size: int) -> int:
        return self.access(addr, size, True)[0]

    def write(self, addr: int, size: int, value: int) -> None:
        self.access(addr, size, False, value)
