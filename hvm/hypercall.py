"""HVM hypercalls reached by VMCALL, dispatched by number as Xen does (xen/include/public/xen.h, version.h, xen.h CONSOLEIO_*)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# Hypercall numbers (public/xen.h).
HYPERVISOR_xen_version = 17
HYPERVISOR_console_io = 18
HYPERVISOR_grant_table_op = 20
HYPERVISOR_sched_op = 29
HYPERVISOR_event_channel_op = 32
HYPERVISOR_hvm_op = 34
NAMES = {17: "xen_version", 18: "console_io", 20: "grant_table_op", 29: "sched_op",
         32: "event_channel_op", 34: "hvm_op"}

# Errors as the guest sees them (public/errno.h), returned negated in EAX/RAX.
ENOSYS, EFAULT, EINVAL = 38, 14, 22

XENVER_version = 0
XENVER_extraversion = 1
XENVER_compile_info = 2
XENVER_capabilities = 3
XEN_EXTRAVERSION_LEN = 16
CONSOLEIO_write = 0
CONSOLEIO_read = 1


class GuestAccess(Protocol):
    """What a hypercall needs of its caller: copy to and from guest memory, and the console."""

    def copy_from_guest(self, address: int, length: int) -> bytes | None: ...
    def copy_to_guest(self, address: int, data: bytes) -> bool: ...
    def console_write(self, data: bytes) -> None: ...


Handler = Callable[[GuestAccess, tuple[int, ...]], int]


@dataclass
class HypercallTable:
    """Number -> handler. Unknown numbers return -ENOSYS to the guest, as Xen does."""

    version: tuple[int, int] = (4, 17)
    extraversion: bytes = b".0-hvmlab"
    calls: dict[int, int] = field(default_factory=dict)

    def dispatch(self, guest: GuestAccess, number: int, args: tuple[int, ...]) -> int:
        self.calls[number] = self.calls.get(number, 0) + 1
        handler = {HYPERVISOR_xen_version: self._xen_version,
                   HYPERVISOR_console_io: self._console_io}.get(number)
        if handler is None:
            return -ENOSYS
        return handler(guest, args)

    def _xen_version(self, guest: GuestAccess, args: tuple[int, ...]) -> int:
        cmd, buf = args[0], args[1]
        if cmd == XENVER_version:
            return (self.version[0] << 16) | self.version[1]
        if cmd == XENVER_extraversion:
            text = self.extraversion[:XEN_EXTRAVERSION_LEN - 1].ljust(XEN_EXTRAVERSION_LEN, b"\0")
            return 0 if guest.copy_to_guest(buf, text) else -EFAULT
        return -ENOSYS  # Xen answers subcommands it does not know with -ENOSYS

    def _console_io(self, guest: GuestAccess, args: tuple[int, ...]) -> int:
        cmd, count, buf = args[0], args[1] & 0xFFFF_FFFF, args[2]
        if cmd == CONSOLEIO_write:
            data = guest.copy_from_guest(buf, count)
            if data is None:
                return -EFAULT
            guest.console_write(data)
            return 0  # a debug build of Xen lets a domU write and returns 0
        if cmd == CONSOLEIO_read:
            return 0  # nothing to read: the console has no input here
        return -EINVAL
