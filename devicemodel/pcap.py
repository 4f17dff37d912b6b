"""Frame capture in the classic libpcap file format, timestamped by a device-model clock (pcap-savefile(5), tcpdump.org LINKTYPE list)."""

from __future__ import annotations

import os
import struct
import threading
from typing import BinaryIO

from devicemodel.clock import Clock

PCAP_MAGIC_USEC = 0xA1B2C3D4
PCAP_MAGIC_NSEC = 0xA1B23C4D
PCAP_VERSION_MAJOR = 2
PCAP_VERSION_MINOR = 4
LINKTYPE_ETHERNET = 1

# File header: magic, version major/minor, thiszone, sigfigs, snaplen, linktype.
_FILE_HEADER = struct.Struct("<IHHiIII")
# Record header: seconds, microseconds, captured length, original length.
_RECORD_HEADER = struct.Struct("<IIII")


class PcapWriter:
    """Writes frames to a .pcap file (little-endian, microsecond timestamps).

    `target` is a path (the writer opens and owns the file) or a binary file object
    (the writer writes to it and leaves closing to its owner). Frames longer than
    `snaplen` are cut to it, keeping their original length in the record. Safe to
    share between the device-model and backend threads.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | BinaryIO,
        clock: Clock,
        *,
        linktype: int = LINKTYPE_ETHERNET,
        snaplen: int = 65535,
    ) -> None:
        if snaplen <= 0:
            raise ValueError("snaplen must be positive")
        self.clock = clock
        self.linktype = linktype
        self.snaplen = snaplen
        self.frames_written = 0
        self._lock = threading.Lock()
        if isinstance(target, (str, os.PathLike)):
            self._file: BinaryIO = open(target, "wb")  # owned until close()
            self._owns_file = True
        else:
            self._file = target
            self._owns_file = False
        self._closed = False
        self._file.write(
            _FILE_HEADER.pack(
                PCAP_MAGIC_USEC, PCAP_VERSION_MAJOR, PCAP_VERSION_MINOR, 0, 0, snaplen, linktype
            )
        )

    def write(self, frame: bytes) -> None:
        """Append one frame, stamped with the clock's current time."""
        now = self.clock.now_ns()
        seconds, rest = divmod(now, 1_000_000_000)
        data = bytes(frame[: self.snaplen])
        record = _RECORD_HEADER.pack(seconds & 0xFFFF_FFFF, rest // 1000, len(data), len(frame))
        with self._lock:
            if self._closed:
                raise ValueError("write to a closed PcapWriter")
            self._file.write(record + data)
            self.frames_written += 1

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.flush()
            if self._owns_file:
                self._file.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pcap(path: str | os.PathLike[str]) -> list[tuple[int, bytes]]:
    """(timestamp in nanoseconds, captured bytes) for each record of a classic pcap
    file, either byte order, microsecond or nanosecond resolution."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < _FILE_HEADER.size:
        raise ValueError(f"{os.fspath(path)}: too short for a pcap file header")
    magic_le = struct.unpack_from("<I", blob)[0]
    magic_be = struct.unpack_from(">I", blob)[0]
    if magic_le in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
        order, magic = "<", magic_le
    elif magic_be in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
        order, magic = ">", magic_be
    else:
        raise ValueError(f"{os.fspath(path)}: not a pcap file (magic {magic_le:#010x})")
    tick_ns = 1000 if magic == PCAP_MAGIC_USEC else 1
    record = struct.Struct(order + "IIII")
    frames: list[tuple[int, bytes]] = []
    pos = _FILE_HEADER.size
    while pos < len(blob):
        if pos + record.size > len(blob):
            raise ValueError(f"{os.fspath(path)}: truncated record header at byte {pos}")
        seconds, fraction, incl_len, _orig_len = record.unpack_from(blob, pos)
        pos += record.size
        if pos + incl_len > len(blob):
            raise ValueError(f"{os.fspath(path)}: truncated record data at byte {pos}")
        frames.append((seconds * 1_000_000_000 + fraction * tick_ns, blob[pos : pos + incl_len]))
        pos += incl_len
    return frames
