"""Ports the hypervisor itself emulates in this issue's split: the 0xE9 debug console and the 0xF4 debug exit (Bochs/QEMU isa-debugcon, isa-debug-exit)."""

from __future__ import annotations

from collections.abc import Callable


class DebugConsole:
    """Port 0xE9: bytes written go to the console sink; a read returns 0xE9 (how guests probe it)."""

    _BYTES = [bytes((i,)) for i in range(256)]

    def __init__(self, output: Callable[[bytes], None]) -> None:
        self._output = output
        self.bytes_written = 0

    def read(self, offset: int, size: int) -> int:
        return 0xE9 if size == 1 else (0xE9 | ((1 << (8 * size)) - 0x100))

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self._output(self._BYTES[value & 0xFF])
        else:
            self._output(value.to_bytes(size, "little"))
        self.bytes_written += size


class DebugExit:
    """Port 0xF4: a write ends the run; `on_exit(value)` is told the value written."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value)
