"""XenStore wire protocol: xsd_sockmsg framing, XS_* types and error strings (Xen public/io/xs_wire.h)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class XsdSockmsgType(IntEnum):
    """enum xsd_sockmsg_type, numbered exactly as the header (20, XS_RESTRICT, is gone)."""

    XS_CONTROL = 0
    XS_DIRECTORY = 1
    XS_READ = 2
    XS_GET_PERMS = 3
    XS_WATCH = 4
    XS_UNWATCH = 5
    XS_TRANSACTION_START = 6
    XS_TRANSACTION_END = 7
    XS_INTRODUCE = 8
    XS_RELEASE = 9
    XS_GET_DOMAIN_PATH = 10
    XS_WRITE = 11
    XS_MKDIR = 12
    XS_RM = 13
    XS_SET_PERMS = 14
    XS_WATCH_EVENT = 15
    XS_ERROR = 16
    XS_IS_DOMAIN_INTRODUCED = 17
    XS_RESUME = 18
    XS_SET_TARGET = 19
    XS_RESET_WATCHES = 21  # XS_SET_TARGET + 2
    XS_DIRECTORY_PART = 22


XS_CONTROL = XsdSockmsgType.XS_CONTROL
XS_DEBUG = XsdSockmsgType.XS_CONTROL  # the header's alias
XS_DIRECTORY = XsdSockmsgType.XS_DIRECTORY
XS_READ = XsdSockmsgType.XS_READ
XS_GET_PERMS = XsdSockmsgType.XS_GET_PERMS
XS_WATCH = XsdSockmsgType.XS_WATCH
XS_UNWATCH = XsdSockmsgType.XS_UNWATCH
XS_TRANSACTION_START = XsdSockmsgType.XS_TRANSACTION_START
XS_TRANSACTION_END = XsdSockmsgType.XS_TRANSACTION_END
XS_INTRODUCE = XsdSockmsgType.XS_INTRODUCE
XS_RELEASE = XsdSockmsgType.XS_RELEASE
XS_GET_DOMAIN_PATH = XsdSockmsgType.XS_GET_DOMAIN_PATH
XS_WRITE = XsdSockmsgType.XS_WRITE
XS_MKDIR = XsdSockmsgType.XS_MKDIR
XS_RM = XsdSockmsgType.XS_RM
XS_SET_PERMS = XsdSockmsgType.XS_SET_PERMS
XS_WATCH_EVENT = XsdSockmsgType.XS_WATCH_EVENT
XS_ERROR = XsdSockmsgType.XS_ERROR
XS_IS_DOMAIN_INTRODUCED = XsdSockmsgType.XS_IS_DOMAIN_INTRODUCED
XS_RESUME = XsdSockmsgType.XS_RESUME
XS_SET_TARGET = XsdSockmsgType.XS_SET_TARGET
XS_RESET_WATCHES = XsdSockmsgType.XS_RESET_WATCHES
XS_DIRECTORY_PART = XsdSockmsgType.XS_DIRECTORY_PART
XS_TYPE_COUNT = 23  # number of valid types (one past XS_DIRECTORY_PART)
XS_INVALID = 0xFFFF  # guaranteed to remain an invalid type

XS_WRITE_NONE = "NONE"
XS_WRITE_CREATE = "CREATE"
XS_WRITE_CREATE_EXCL = "CREATE|EXCL"

# enum xs_watch_type: the index of each string in an XS_WATCH_EVENT payload.
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1

# xsd_errors[] in header order (new errors are only ever appended). The numbers are the
# Linux errno values the table is built from on Xen's usual hosts; the wire carries the names.
XSD_ERRORS: tuple[tuple[int, str], ...] = (
    (22, "EINVAL"),
    (13, "EACCES"),
    (17, "EEXIST"),
    (21, "EISDIR"),
    (2, "ENOENT"),
    (12, "ENOMEM"),
    (28, "ENOSPC"),
    (5, "EIO"),
    (39, "ENOTEMPTY"),
    (38, "ENOSYS"),
    (30, "EROFS"),
    (16, "EBUSY"),
    (11, "EAGAIN"),
    (106, "EISCONN"),
    (7, "E2BIG"),
    (1, "EPERM"),
)
XSD_ERROR_NAMES: frozenset[str] = frozenset(name for _, name in XSD_ERRORS)

XSD_SOCKMSG = struct.Struct("<IIII")  # type, req_id, tx_id, len
XSD_SOCKMSG_SIZE = XSD_SOCKMSG.size  # 16

XENSTORE_PAYLOAD_MAX = 4096  # "violating this is very bad"
XENSTORE_ABS_PATH_MAX = 3072  # violating these just gets you an error back
XENSTORE_REL_PATH_MAX = 2048

OK_PAYLOAD = b"OK\0"  # the reply to WRITE, MKDIR, RM, WATCH, ... on success


class XsError(Exception):
    """A XenStore error as carried on the wire: one of the xsd_errors names (e.g. "ENOENT")."""

    def __init__(self, errname: str, detail: str = "") -> None:
        if errname not in XSD_ERROR_NAMES:
            raise ValueError(f"{errname!r} is not an xsd_errors name")
        super().__init__(f"{errname}: {detail}" if detail else errname)
        self.errname = errname
        self.detail = detail


class XsWireError(ValueError):
    """Bytes that are not a valid xsd_sockmsg stream (length over XENSTORE_PAYLOAD_MAX...)."""


@dataclass(frozen=True)
class XsdSockmsg:
    """struct xsd_sockmsg and the payload that follows it; `len` is derived from the payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes = b""

    @property
    def len(self) -> int:
        return len(self.payload)

    def pack(self) -> bytes:
        return XSD_SOCKMSG.pack(self.type & 0xFFFFFFFF, self.req_id & 0xFFFFFFFF,
                                self.tx_id & 0xFFFFFFFF, len(self.payload)) + self.payload

    @property
    def errname(self) -> str | None:
        """For an XS_ERROR message, the error name; None otherwise."""
        if self.type != XS_ERROR:
            return None
        return self.payload.split(b"\0", 1)[0].decode("latin-1")


def unpack_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """(type, req_id, tx_id, len) from the first 16 bytes."""
    return XSD_SOCKMSG.unpack_from(data, 0)  # type: ignore[return-value]


def decode_stream(buf: bytearray) -> XsdSockmsg | None:
    """Take one whole message off the front of `buf`; None if it is not all there yet.

    Raises XsWireError for a header whose len exceeds XENSTORE_PAYLOAD_MAX: no valid
    sender produces one, and the stream cannot be resynchronised after it.
    """
    if len(buf) < XSD_SOCKMSG_SIZE:
        return None
    msg_type, req_id, tx_id, length = unpack_header(buf)
    if length > XENSTORE_PAYLOAD_MAX:
        raise XsWireError(f"xsd_sockmsg len {length} > XENSTORE_PAYLOAD_MAX")
    end = XSD_SOCKMSG_SIZE + length
    if len(buf) < end:
        return None
    msg = XsdSockmsg(msg_type, req_id, tx_id, bytes(buf[XSD_SOCKMSG_SIZE:end]))
    del buf[:end]
    return msg


def decode(data: bytes) -> XsdSockmsg:
    """Exactly one message in `data` (header + len bytes, nothing after)."""
    buf = bytearray(data)
    msg = decode_stream(buf)
    if msg is None or buf:
        raise XsWireError(f"{len(data)} bytes are not exactly one xsd_sockmsg")
    return msg


def join_strings(*parts: str | bytes) -> bytes:
    """Each part NUL-terminated, as "path\\0token\\0" or a directory listing "a\\0b\\0"."""
    out = bytearray()
    for part in parts:
        raw = part.encode("latin-1") if isinstance(part, str) else part
        if b"\0" in raw:
            raise XsWireError("a string on the wire cannot contain NUL")
        out += raw + b"\0"
    return bytes(out)


def split_strings(payload: bytes) -> list[str]:
    """The NUL-separated strings of a payload; a final terminator is optional."""
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode("latin-1") for p in parts]


def error_payload(errname: str) -> bytes:
    if errname not in XSD_ERROR_NAMES:
        raise ValueError(f"{errname!r} is not an xsd_errors name")
    return errname.encode("ascii") + b"\0"


def error_reply(request: XsdSockmsg, errname: str) -> XsdSockmsg:
    """XS_ERROR echoing the request's req_id and tx_id."""
    return XsdSockmsg(XS_ERROR, request.req_id, request.tx_id, error_payload(errname))


@dataclass(frozen=True)
class WatchEvent:
    """One XS_WATCH_EVENT: the path that changed (relative if the watch was) and the token."""

    path: str
    token: str

    def to_message(self) -> XsdSockmsg:
        return XsdSockmsg(XS_WATCH_EVENT, 0, 0, join_strings(self.path, self.token))

    @classmethod
    def from_message(cls, msg: XsdSockmsg) -> WatchEvent:
        parts = split_strings(msg.payload)
        if msg.type != XS_WATCH_EVENT or len(parts) < 2:
            raise XsWireError("not an XS_WATCH_EVENT with path and token")
        return cls(parts[XS_WATCH_PATH], parts[XS_WATCH_TOKEN])
