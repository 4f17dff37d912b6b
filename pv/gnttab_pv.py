"""GNTTABOP_* from a PV guest: the x86_32 uops read from and written back to guest memory, applied through the shared GrantOps (Xen common/grant_table.c, public/grant_table.h)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Collection, Sequence

from hvm.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, HostFrame
from pv.grant_table import (
    DOMID_SELF,
    Copy,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_page,
    GNTST_bad_virt_addr,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GNTTABOP_copy,
    GNTTABOP_map_grant_ref,
    GNTTABOP_query_size,
    GNTTABOP_setup_table,
    GNTTABOP_transfer,
    GNTTABOP_unmap_grant_ref,
    GrantOps,
)
from pv.guest_copy import GuestCopy
from pv.hypercall_layouts import gnttab_query_size
from pv.layouts import (
    arch_named,
    gnttab_copy,
    gnttab_map_grant_ref,
    gnttab_setup_table,
    gnttab_transfer,
    gnttab_unmap_grant_ref,
)

EFAULT, EINVAL, ENOSYS = 14, 22, 38
PREEMPT_EVERY = 256  # uops done per entry before the call continues itself, as Xen preempts
OP_NAMES = {GNTTABOP_map_grant_ref: "map_grant_ref", GNTTABOP_unmap_grant_ref: "unmap_grant_ref",
            GNTTABOP_setup_table: "setup_table", GNTTABOP_transfer: "transfer",
            GNTTABOP_copy: "copy", GNTTABOP_query_size: "query_size"}


class GuestGrantTable:
    """One domain's grant_table_op: its table is the builder's `frames` (guest frames it
    writes its entries into); it may map other domains' grants at its own frames (host_map:
    the frame is re-backed by the granted page until unmapped), copy, and transfer pages.

    `protected` frames (start_info, shared_info, the hypercall page, the store and console
    rings, the grant table itself) can be neither mapped over nor given away: Xen would find
    extra references on those pages and refuse (GNTST_general_error / GNTST_bad_page).
    """

    def __init__(self, domid: int, memory: GuestMemory, grant_ops: GrantOps, frames: Sequence[int],
                 protected: Collection[int], exists: Callable[[int], bool],
                 arch: str = "x86_32") -> None:
        self.domid = domid
        self.memory = memory
        self.grant_ops = grant_ops
        self.frames = list(frames)
        self.protected = frozenset(protected)
        self.exists = exists
        self.guest = GuestCopy(memory)
        self.arch = arch_named(arch)
        self.counts: dict[str, int] = {}  # uops by op name
        # (uop, count) left to do when a long call was preempted: the caller re-enters the
        # hypercall with them (Xen's hypercall_create_continuation)
        self.continuation: tuple[int, int] | None = None
        self._maps: dict[int, tuple[int, HostFrame]] = {}  # handle -> (pfn, frame it had before)

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def _dom(self, dom: int) -> int:
        return self.domid if dom == DOMID_SELF else dom

    def op(self, cmd: int, uop: int, count: int) -> int:
        """HYPERVISOR_grant_table_op(cmd, uop, count): 0, or -errno for the whole call.
        Per-op outcomes are the GNTST_* codes written into each op's `status`."""
        self.continuation = None
        if count >= 1 << 31:
            return -EINVAL  # Xen: (int)count < 0
        handler = {GNTTABOP_setup_table: self._setup_table, GNTTABOP_query_size: self._query_size,
                   GNTTABOP_map_grant_ref: self._map, GNTTABOP_unmap_grant_ref: self._unmap,
                   GNTTABOP_copy: self._copy, GNTTABOP_transfer: self._transfer}.get(cmd)
        if handler is None:
            return -ENOSYS
        return handler(uop, count)

    def _each(self, uop: int, count: int, ctype: type[ctypes.Structure],
              one: Callable[[int, ctypes.Structure], bool]) -> int:
        """Xen's loop over an array of uops: stop with -EFAULT at the first that cannot be read
        or written back (the ones before it are done). After PREEMPT_EVERY uops the call
        stops with a continuation for the rest, so a long array never holds the vCPU."""
        size = ctypes.sizeof(ctype)
        for i in range(count):
            address = uop + i * size
            if i == PREEMPT_EVERY:
                self.continuation = (address, count - i)
                return 0
            op = self.guest.read_struct(address, ctype)
            if op is None or not one(address, op):
                return -EFAULT
        return 0

    # -- setup_table / query_size --------------------------------------------------------------
    def _setup_table(self, uop: int, count: int) -> int:
        if count != 1:
            return -EINVAL
        self._count("setup_table")
        ctype = gnttab_setup_table(self.arch)
        op = self.guest.read_struct(uop, ctype)
        if op is None:
            return -EFAULT
        if op.nr_frames and not self.guest.ok(op.frame_list, 4 * op.nr_frames):
            return -EFAULT
        dom = self._dom(op.dom)
        if dom != self.domid:
            op.status = GNTST_permission_denied if self.exists(dom) else GNTST_bad_domain
        elif op.nr_frames > len(self.frames):
            op.status = GNTST_general_error  # "Xen only supports up to N grant-table frames"
        else:
            op.status = GNTST_okay
            listing = b"".join(f.to_bytes(4, "little") for f in self.frames[:op.nr_frames])
            if not self.guest.write(op.frame_list, listing):
                op.status = GNTST_bad_virt_addr  # pragma: no cover - checked above
        return 0 if self.guest.write_field(uop, op, "status") else -EFAULT

    def _query_size(self, uop: int, count: int) -> int:
        if count != 1:
            return -EINVAL
        self._count("query_size")
        op = self.guest.read_struct(uop, gnttab_query_size(self.arch))
        if op is None:
            return -EFAULT
        dom = self._dom(op.dom)
        if dom != self.domid:
            op.status = GNTST_permission_denied if self.exists(dom) else GNTST_bad_domain
        else:
            op.nr_frames = op.max_nr_frames = len(self.frames)
            op.status = GNTST_okay
        return 0 if self.guest.write_struct(uop, op) else -EFAULT

    # -- map / unmap (a foreign grant at one of our frames) --------------------------------------
    def _mappable(self, host_addr: int) -> int | None:
        """The frame a host mapping would replace, or None if `host_addr` cannot take one."""
        if host_addr & (PAGE_SIZE - 1) or not self.memory.contains(host_addr, PAGE_SIZE):
            return None
        pfn = host_addr >> PAGE_SHIFT
        if pfn in self.protected or any(p == pfn for p, _ in self._maps.values()):
            return None
        return pfn

    def _map_one(self, address: int, op: ctypes.Structure) -> bool:
        self._count("map_grant_ref")
        op.handle = 0xFFFF_FFFF
        flags = op.flags
        dom = self._dom(op.dom)
        pfn = self._mappable(op.host_addr) if flags & GNTMAP_host_map else None
        if not flags & (GNTMAP_device_map | GNTMAP_host_map):
            op.status = GNTST_bad_gntref
        elif not self.exists(dom):
            op.status = GNTST_bad_domain
        elif flags & GNTMAP_host_map and pfn is None:
            op.status = GNTST_general_error  # no page there we could map over
        else:
            result = self.grant_ops.map(self.domid, dom, op.ref, bool(flags & GNTMAP_readonly))
            op.status = result.status
            if result.status == GNTST_okay and result.frame is not None:
                op.handle = result.handle
                if flags & GNTMAP_device_map:
                    table = self.grant_ops.tables.get(dom)
                    op.dev_bus_addr = (table.frame(op.ref) if table else 0) << PAGE_SHIFT
                if pfn is not None:
                    old = self.memory.remap(pfn, result.frame)
                    self._maps[result.handle] = (pfn, old)
        return self.guest.write_struct(address, op)

    def _map(self, uop: int, count: int) -> int:
        return self._each(uop, count, gnttab_map_grant_ref(self.arch), self._map_one)

    def _unmap_one(self, address: int, op: ctypes.Structure) -> bool:
        self._count("unmap_grant_ref")
        mapped = self._maps.get(op.handle)  # None: unknown, or a device-only mapping
        if mapped is not None and op.host_addr and op.host_addr != mapped[0] << PAGE_SHIFT:
            op.status = GNTST_general_error  # that address does not hold this mapping
        else:
            op.status = self.grant_ops.unmap(self.domid, op.handle)
            if op.status == GNTST_okay and mapped is not None:
                del self._maps[op.handle]
                self.memory.remap(mapped[0], mapped[1])  # our own page comes back
        return self.guest.write_field(address, op, "status")

    def _unmap(self, uop: int, count: int) -> int:
        return self._each(uop, count, gnttab_unmap_grant_ref(self.arch), self._unmap_one)

    # -- copy and transfer ---------------------------------------------------------------------
    def _copy_one(self, address: int, op: ctypes.Structure) -> bool:
        self._count("copy")
        decoded = Copy.from_bytes(bytes(op), self.arch.name)
        op.status = self.grant_ops.copy(self.domid, [decoded])[0]
        return self.guest.write_field(address, op, "status")

    def _copy(self, uop: int, count: int) -> int:
        return self._each(uop, count, gnttab_copy(self.arch), self._copy_one)

    def _transfer_one(self, address: int, op: ctypes.Structure) -> bool:
        self._count("transfer")
        gfn = op.mfn
        if gfn in self.protected or any(p == gfn for p, _ in self._maps.values()):
            op.status = GNTST_bad_page  # steal_page() refuses a page with other references
        elif op.domid == DOMID_SELF:
            op.status = GNTST_bad_domain  # transfer names its receiver by id
        else:
            op.status = self.grant_ops.transfer(self.domid, gfn, op.domid, op.ref)
        return self.guest.write_field(address, op, "status")

    def _transfer(self, uop: int, count: int) -> int:
        return self._each(uop, count, gnttab_transfer(self.arch), self._transfer_one)

    def unmap_all(self) -> None:
        """The domain is going away: release every mapping it still holds."""
        for handle in list(self._maps):
            self.grant_ops.unmap(self.domid, handle)
        self._maps.clear()
