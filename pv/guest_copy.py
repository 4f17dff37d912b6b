"""copy_from_guest / copy_to_guest for a PV domain in this model, where a guest virtual address is its pseudo-physical address (Xen xen/include/xen/guest_access.h semantics)."""

from __future__ import annotations

import ctypes
from typing import Any, TypeVar

from hvm.memory import GuestMemory, GuestMemoryError

T = TypeVar("T", bound=ctypes.Structure)
ADDRESS_LIMIT = 1 << 32  # a 32-bit guest's pointers


class GuestCopy:
    """Hypercall argument access: None / False where Xen's copy would fail (the hypercall
    then returns -EFAULT); nothing here raises for a bad guest pointer."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def ok(self, address: int, length: int) -> bool:
        """guest_handle_okay: the whole range is guest RAM."""
        return (0 <= address < ADDRESS_LIMIT and 0 <= length
                and address + length <= ADDRESS_LIMIT and self.memory.contains(address, length))

    def read(self, address: int, length: int) -> bytes | None:
        if not self.ok(address, length):
            return None
        try:
            return self.memory.read(address, length)
        except GuestMemoryError:  # pragma: no cover - ok() checked the range
            return None

    def write(self, address: int, data: bytes) -> bool:
        if not self.ok(address, len(data)):
            return False
        try:
            self.memory.write(address, data)
        except GuestMemoryError:  # pragma: no cover
            return False
        return True

    def read_u32s(self, address: int, count: int) -> list[int] | None:
        raw = self.read(address, 4 * count)
        if raw is None:
            return None
        return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]

    def read_struct(self, address: int, ctype: type[T]) -> T | None:
        raw = self.read(address, ctypes.sizeof(ctype))
        return None if raw is None else ctype.from_buffer_copy(raw)

    def write_struct(self, address: int, value: ctypes.Structure) -> bool:
        return self.write(address, bytes(value))

    def write_field(self, address: int, value: ctypes.Structure, name: str) -> bool:
        """__copy_field_to_guest: only that member's bytes go back."""
        member: Any = getattr(type(value), name)
        raw = bytes(value)[member.offset:member.offset + member.size]
        return self.write(address + member.offset, raw)
