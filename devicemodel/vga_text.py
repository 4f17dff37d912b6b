"""VGA text-mode memory at 0xB8000: 80x25 cells of (character, attribute) as a pure MMIO device (IBM VGA Technical Reference, text modes)."""

from __future__ import annotations

COLUMNS, ROWS = 80, 25
WINDOW = 0x8000  # 0xB8000-0xBFFFF: 32 KiB of text memory (8 pages of 4000 bytes)


class VgaText:
    """Text memory only (no CRTC, no fonts): what a guest writes is what `screen()` shows."""

    def __init__(self) -> None:
        self.memory = bytearray(WINDOW)
        for i in range(0, WINDOW, 2):
            self.memory[i + 1] = 0x07  # light grey on black, as a BIOS clears the screen
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > WINDOW:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.memory[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > WINDOW:
            return
        self.memory[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self.writes += 1

    def screen(self, page: int = 0) -> str:
        """The characters of one page, one line per row, trailing blanks removed."""
        base = page * COLUMNS * ROWS * 2
        lines = []
        for row in range(ROWS):
            cells = self.memory[base + row * COLUMNS * 2: base + (row + 1) * COLUMNS * 2: 2]
            lines.append(bytes(c if 32 <= c < 127 else 32 for c in cells).decode("ascii").rstrip())
        while lines and not lines[-1]:
            lines.pop()
        return "\n".join(lines)
