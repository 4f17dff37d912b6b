"""The guest's console as the user sees it: bytes streamed to stdout as written, and kept for --json."""

from __future__ import annotations

from typing import BinaryIO


class ConsoleSink:
    """Collects what the guest prints; streams it line by line when given a stream."""

    def __init__(self, stream: BinaryIO | None = None, limit: int = 1 << 20) -> None:
        self._stream = stream
        self._limit = limit
        self.data = bytearray()
        self._room = limit
        self.dropped = 0

    def __call__(self, data: bytes) -> None:
        n = len(data)
        room = self._room
        if n <= room:
            self.data += data
            self._room = room - n
        else:  # keep what fits; count the rest (a guest printing forever must not eat memory)
            if room:
                self.data += data[:room]
                self._room = 0
            self.dropped += n - room
        if self._stream is not None:
            self._stream.write(data)
            if b"\n" in data:
                self._stream.flush()

    def flush(self) -> None:
        if self._stream is not None:
            self._stream.flush()

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    def last_line(self) -> str:
        lines = [line for line in self.text().splitlines() if line.strip()]
        return lines[-1] if lines else ""
