"""Disk images behind emulated drives: a BlockBackend protocol and a raw image file backend with clear open errors (POSIX pread/pwrite/fsync)."""

from __future__ import annotations

import os
import stat
from typing import Protocol

SECTOR_SIZE = 512


class DiskError(Exception):
    """A disk image that cannot be opened or an I/O on it that failed."""


class BlockBackend(Protocol):
    """Storage behind a disk: whole 512-byte sectors addressed by LBA."""

    @property
    def sectors(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    def read(self, lba: int, count: int) -> bytes: ...

    def write(self, lba: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


class FileBlockBackend:
    """A raw disk image file. A trailing partial sector is not addressable."""

    def __init__(self, path: str | os.PathLike[str], read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self._read_only = read_only
        mode = "read-only" if read_only else "for reading and writing"
        try:
            fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as exc:
            raise DiskError(f"cannot open disk image {self.path} {mode}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(fd)
            raise DiskError(f"cannot open disk image {self.path}: not a regular file")
        self._fd: int | None = fd
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
        self._sectors = size // SECTOR_SIZE

    @property
    def sectors(self) -> int:
        return self._sectors

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _fileno(self) -> int:
        if self._fd is None:
            raise DiskError(f"disk image {self.path} is closed")
        return self._fd

    def _check(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or lba + count > self._sectors:
            raise DiskError(
                f"{self.path}: sectors {lba}..{lba + count - 1} outside 0..{self._sectors - 1}"
            )

    def read(self, lba: int, count: int) -> bytes:
        self._check(lba, count)
        want = count * SECTOR_SIZE
        try:
            data = os.pread(self._fileno(), want, lba * SECTOR_SIZE)
        except OSError as exc:
            raise DiskError(f"{self.path}: read of sector {lba} failed: {exc.strerror}") from exc
        if len(data) != want:
            raise DiskError(f"{self.path}: short read at sector {lba}")
        return data

    def write(self, lba: int, data: bytes) -> None:
        if self._read_only:
            raise DiskError(f"{self.path} is opened read-only")
        if len(data) % SECTOR_SIZE:
            raise DiskError(f"{self.path}: write of {len(data)} bytes is not whole sectors")
        self._check(lba, len(data) // SECTOR_SIZE)
        view = memoryview(data)
        offset = lba * SECTOR_SIZE
        try:
            while view:
                done = os.pwrite(self._fileno(), view, offset)
                view = view[done:]
                offset += done
        except OSError as exc:
            raise DiskError(f"{self.path}: write of sector {lba} failed: {exc.strerror}") from exc

    def flush(self) -> None:
        try:
            os.fsync(self._fileno())
        except OSError as exc:
            raise DiskError(f"{self.path}: fsync failed: {exc.strerror}") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileBlockBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
