"""Grant tables: v1 entries in the granting domain's memory, and the hypervisor's map/unmap/copy/transfer (Xen public/grant_table.h)."""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from hvm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError, HostFrame
from pv.layouts import arch_named, gnttab_copy, grant_entry_v1

# --- Constants, as public/grant_table.h names them ------------------------------------------

GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
# Subflags of GTF_permit_access.
GTF_readonly = 1 << 2  # [GST] the grantee may only read
GTF_reading = 1 << 3  # [XEN] mapped (or being copied) for reading
GTF_writing = 1 << 4  # [XEN] mapped (or being copied) for writing
GTF_sub_page = 1 << 8
# Subflags of GTF_accept_transfer: the same bits as readonly/reading, other meaning.
GTF_transfer_committed = 1 << 2
GTF_transfer_completed = 1 << 3

GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6

GNTMAP_device_map = 1 << 0
GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2

GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13

GNTST_NAMES = {
    GNTST_okay: "okay", GNTST_general_error: "undefined error",
    GNTST_bad_domain: "unrecognised domain id", GNTST_bad_gntref: "invalid grant reference",
    GNTST_bad_handle: "invalid mapping handle", GNTST_bad_virt_addr: "invalid virtual address",
    GNTST_bad_dev_addr: "invalid device address",
    GNTST_no_device_space: "no spare translation slot in the I/O MMU",
    GNTST_permission_denied: "permission denied", GNTST_bad_page: "bad page",
    GNTST_bad_copy_arg: "copy arguments cross page boundary",
    GNTST_address_too_big: "page address size too large",
    GNTST_eagain: "operation not done; try again", GNTST_no_space: "out of space",
}

DOMID_SELF = 0x7FF0  # xen.h: "refer to oneself" in a copy pointer

GRANT_ENTRY_V1_SIZE = ctypes.sizeof(grant_entry_v1(arch_named("x86_32")))  # 8 on both arches
GRANT_ENTRIES_PER_FRAME = PAGE_SIZE // GRANT_ENTRY_V1_SIZE
DEFAULT_MAX_GRANT_FRAMES = 64  # Xen's default gnttab_max_frames


@dataclass(frozen=True)
class GrantEntry:
    """A snapshot of one grant_entry_v1."""

    flags: int
    domid: int
    frame: int

    @property
    def type(self) -> int:
        return self.flags & GTF_type_mask


class GrantTable:
    """One domain's v1 grant table: `nr_frames` pages of 8-byte entries the domain writes.

    `table` is either the guest frames the domain gave for it (the table then lives in those
    pages of its own RAM), or a number of frames for the hypervisor to allocate itself, as Xen
    does; `map_into()` then puts them at guest frames (XENMAPSPACE_grant_table).

    flags and domid are read and written as aligned u16s, frame as an aligned u32. Xen updates
    {flags, domid} with a cmpxchg so that a guest revoking a grant at the same instant cannot
    be missed; here the update is a Python read-modify-write (see GrantOps).
    """

    def __init__(self, owner_domid: int, memory: GuestMemory, table: Sequence[int] | int) -> None:
        self.owner_domid = owner_domid
        self.memory = memory
        self._own: mmap.mmap | None = None
        if isinstance(table, int):
            if table <= 0:
                raise ValueError(f"a grant table needs at least one frame, not {table}")
            self._own = mmap.mmap(-1, table * PAGE_SIZE,
                                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.gfns: list[int] | None = None
            self.frames = [HostFrame(self._own, i * PAGE_SIZE) for i in range(table)]
        else:
            if not table:
                raise ValueError("a grant table needs at least one frame")
            self.gfns = list(table)
            self.frames = [memory.p2m(gfn) for gfn in self.gfns]
        self._u16 = [frame.view().cast("H") for frame in self.frames]
        self._u32 = [frame.view().cast("I") for frame in self.frames]

    @property
    def nr_frames(self) -> int:
        return len(self.frames)

    @property
    def nr_entries(self) -> int:
        return self.nr_frames * GRANT_ENTRIES_PER_FRAME

    def map_into(self, gfns: Sequence[int]) -> None:
        """Back the owner's guest frames `gfns` by the table's frames, so the guest can write
        its entries there."""
        if len(gfns) != self.nr_frames:
            raise ValueError(f"{len(gfns)} guest frames for a {self.nr_frames}-frame table")
        for gfn, frame in zip(gfns, self.frames, strict=True):
            self.memory.remap(gfn, frame)
        self.gfns = list(gfns)

    # -- raw entry access ----------------------------------------------------------------------
    def _where(self, ref: int) -> tuple[int, int]:
        if not 0 <= ref < self.nr_entries:
            raise IndexError(f"grant ref {ref} is outside a {self.nr_entries}-entry table")
        return ref // GRANT_ENTRIES_PER_FRAME, ref % GRANT_ENTRIES_PER_FRAME

    def flags(self, ref: int) -> int:
        page, slot = self._where(ref)
        return self._u16[page][slot * 4]

    def domid(self, ref: int) -> int:
        page, slot = self._where(ref)
        return self._u16[page][slot * 4 + 1]

    def frame(self, ref: int) -> int:
        page, slot = self._where(ref)
        return self._u32[page][slot * 2 + 1]

    def entry(self, ref: int) -> GrantEntry:
        return GrantEntry(self.flags(ref), self.domid(ref), self.frame(ref))

    def _set_flags(self, ref: int, value: int) -> None:
        page, slot = self._where(ref)
        self._u16[page][slot * 4] = value & 0xFFFF

    def _set_domid(self, ref: int, value: int) -> None:
        page, slot = self._where(ref)
        self._u16[page][slot * 4 + 1] = value & 0xFFFF

    def _set_frame(self, ref: int, value: int) -> None:
        page, slot = self._where(ref)
        self._u32[page][slot * 2 + 1] = value & 0xFFFF_FFFF

    # -- what the granting guest does (its kernel's gnttab_* helpers), for Dom0 and tests ------
    def grant_foreign_access(self, ref: int, domid: int, gfn: int, readonly: bool = False) -> None:
        """Let `domid` map or copy guest frame `gfn`. frame and domid first, flags last: the
        hypervisor trusts the other fields once it sees GTF_permit_access."""
        self._set_frame(ref, gfn)
        self._set_domid(ref, domid)
        self._set_flags(ref, GTF_permit_access | (GTF_readonly if readonly else 0))

    def end_foreign_access(self, ref: int) -> bool:
        """Revoke a grant unless it is mapped (GTF_reading/GTF_writing): False if still in use."""
        if self.flags(ref) & (GTF_reading | GTF_writing):
            return False
        self._set_flags(ref, GTF_invalid)
        return True

    def grant_foreign_transfer(self, ref: int, domid: int, gfn: int) -> None:
        """Offer to receive a page from `domid` at guest frame `gfn` (GTF_accept_transfer)."""
        self._set_frame(ref, gfn)
        self._set_domid(ref, domid)
        self._set_flags(ref, GTF_accept_transfer)

    def end_foreign_transfer(self, ref: int) -> int | None:
        """Close a transfer offer: the frame that arrived, or None if nothing was transferred."""
        flags = self.flags(ref)
        if not flags & GTF_transfer_committed:
            self._set_flags(ref, GTF_invalid)
            return None
        if not flags & GTF_transfer_completed:
            return None  # committed, frame not written yet: the caller must wait
        frame = self.frame(ref)
        self._set_flags(ref, GTF_invalid)
        return frame


@dataclass(frozen=True)
class Domain:
    """What the grant operations need to know of a domain."""

    domid: int
    memory: GuestMemory


class MapResult(NamedTuple):
    """gnttab_map_grant_ref's OUT fields: status, handle, and the host frame now shared."""

    status: int
    handle: int
    frame: HostFrame | None


@dataclass(frozen=True)
class CopyPtr:
    """struct gnttab_copy_ptr: a grant ref (with GNTCOPY_*_gref) or a guest frame of the caller."""

    ref: int  # u.ref or u.gmfn, by the op's flags
    domid: int
    offset: int


@dataclass(frozen=True)
class Copy:
    """struct gnttab_copy's IN fields."""

    source: CopyPtr
    dest: CopyPtr
    len: int
    flags: int = 0

    @classmethod
    def from_bytes(cls, data: bytes, arch: str = "x86_32") -> Copy:
        """Decode one gnttab_copy as a guest of `arch` laid it out."""
        c = gnttab_copy(arch_named(arch)).from_buffer_copy(data)
        src_ref = c.source.u.ref if c.flags & GNTCOPY_source_gref else c.source.u.gmfn
        dst_ref = c.dest.u.ref if c.flags & GNTCOPY_dest_gref else c.dest.u.gmfn
        return cls(CopyPtr(src_ref, c.source.domid, c.source.offset),
                   CopyPtr(dst_ref, c.dest.domid, c.dest.offset), c.len, c.flags)


@dataclass
class _Active:
    """Xen's active grant entry: who holds the grant pinned, the frame it resolved to, how often."""

    grantee: int
    frame: HostFrame
    readers: int = 0  # read-only pins (mappings or copies in progress)
    writers: int = 0  # writable pins

    @property
    def pin(self) -> int:
        return self.readers + self.writers


@dataclass(frozen=True)
class _MapTrack:
    granter: int
    ref: int
    readonly: bool


@dataclass
class _Claim:
    frame: HostFrame
    pinned: tuple[int, int, bool] | None = None  # (granter, ref, readonly) to release


@dataclass
class GrantOps:
    """The hypervisor's side of GNTTABOP_*: each domain's table, the active entries, the
    grantees' map tracking, and page transfer between domains' p2m.

    Statuses and their order of checks follow Xen's common/grant_table.c. One lock serialises
    the operations (backend threads and hypercalls may call concurrently); the guests' own
    writes to their entries are not under it, as in Xen they are not under its locks either.
    """

    domains: dict[int, GuestMemory] = field(default_factory=dict)
    max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES
    tables: dict[int, GrantTable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._active: dict[tuple[int, int], _Active] = {}
        self._maptrack: dict[int, dict[int, _MapTrack]] = {}
        self._next_handle: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, domains: Mapping[int, GuestMemory] | Iterable[Domain]) -> GrantOps:
        if isinstance(domains, Mapping):
            return cls(domains=dict(domains))
        return cls(domains={d.domid: d.memory for d in domains})

    def add_domain(self, domain: Domain) -> None:
        self.domains[domain.domid] = domain.memory

    # -- GNTTABOP_setup_table / query_size -----------------------------------------------------
    def setup_table(self, domid: int, table: Sequence[int] | int) -> int:
        """Give `domid` a grant table (guest frames, or a frame count for the hypervisor to
        allocate). Tables do not shrink, as in Xen."""
        with self._lock:
            memory = self.domains.get(domid)
            if memory is None:
                return GNTST_bad_domain
            count = table if isinstance(table, int) else len(table)
            if not 0 < count <= self.max_grant_frames:
                return GNTST_general_error
            existing = self.tables.get(domid)
            if existing is not None and existing.nr_frames >= count:
                return GNTST_okay
            if existing is not None and any(k[0] == domid for k in self._active):
                return GNTST_general_error  # cannot move a table whose entries are pinned
            try:
                grown = GrantTable(domid, memory, table)
            except GuestMemoryError:
                return GNTST_bad_page
            if existing is not None:  # growing: the entries already granted stay
                for old, new in zip(existing.frames, grown.frames, strict=False):
                    if old != new:
                        new.view()[:] = old.view()
            self.tables[domid] = grown
            return GNTST_okay

    def query_size(self, domid: int) -> tuple[int, int, int]:
        """(status, nr_frames, max_nr_frames)."""
        if domid not in self.domains:
            return GNTST_bad_domain, 0, 0
        table = self.tables.get(domid)
        return GNTST_okay, table.nr_frames if table else 0, self.max_grant_frames

    # -- pinning: _set_status_v1 and its undo --------------------------------------------------
    def _pin(self, granter: int, ref: int, grantee: int, readonly: bool,
             mapping: bool) -> tuple[int, HostFrame | None]:
        table = self.tables.get(granter)
        if table is None:
            return GNTST_general_error, None  # "remote grant table not yet set up"
        if not 0 <= ref < table.nr_entries:
            return GNTST_bad_gntref, None
        key = (granter, ref)
        act = self._active.get(key)
        # Only one domain at a time may hold an entry pinned.
        if act is not None and act.grantee != grantee:
            return GNTST_general_error, None
        if act is None or (not readonly and act.writers == 0):
            flags, domid = table.flags(ref), table.domid(ref)
            # A sub-page grant may be copied from, never mapped.
            type_mask = GTF_type_mask | (GTF_sub_page if mapping else 0)
            if act is None and ((flags & type_mask) != GTF_permit_access or domid != grantee):
                return GNTST_general_error, None  # "Bad flags or dom"
            if not readonly and flags & GTF_readonly:
                return GNTST_general_error, None  # "Attempt to write-pin a r/o grant entry"
            new_flags = flags | GTF_reading | (0 if readonly else GTF_writing)
            if act is None:
                # The frame is read once, when the entry is first pinned: later changes the
                # guest makes to `frame` do not move an existing mapping.
                gfn = table.frame(ref)
                memory = self.domains[granter]
                try:
                    frame = memory.p2m(gfn)
                except GuestMemoryError:
                    return GNTST_bad_page, None
                act = _Active(grantee, frame)
                self._active[key] = act
            table._set_flags(ref, new_flags)
        if readonly:
            act.readers += 1
        else:
            act.writers += 1
        return GNTST_okay, act.frame

    def _unpin(self, granter: int, ref: int, readonly: bool) -> None:
        key = (granter, ref)
        act = self._active[key]
        table = self.tables[granter]
        clear = 0
        if readonly:
            act.readers -= 1
        else:
            act.writers -= 1
            if act.writers == 0:
                clear |= GTF_writing
        if act.pin == 0:
            clear |= GTF_reading
            del self._active[key]
        if clear:
            table._set_flags(ref, table.flags(ref) & ~clear)

    # -- GNTTABOP_map_grant_ref / unmap_grant_ref ----------------------------------------------
    def map(self, grantee: int, granter: int, ref: int, readonly: bool = False) -> MapResult:
        """Map `granter`'s grant `ref` for `grantee`: the host frame both then share."""
        with self._lock:
            if grantee not in self.domains or granter not in self.domains:
                return MapResult(GNTST_bad_domain, -1, None)
            status, frame = self._pin(granter, ref, grantee, readonly, mapping=True)
            if status != GNTST_okay:
                return MapResult(status, -1, None)
            track = self._maptrack.setdefault(grantee, {})
            handle = self._next_handle.get(grantee, 0)
            self._next_handle[grantee] = handle + 1
            track[handle] = _MapTrack(granter, ref, readonly)
            return MapResult(GNTST_okay, handle, frame)

    def unmap(self, grantee: int, handle: int) -> int:
        """Undo map(): GTF_writing clears with the last writable mapping, GTF_reading with the last."""
        with self._lock:
            track = self._maptrack.get(grantee, {}).pop(handle, None)
            if track is None:
                return GNTST_bad_handle
            self._unpin(track.granter, track.ref, track.readonly)
            return GNTST_okay

    def mapped(self, granter: int, ref: int) -> bool:
        return (granter, ref) in self._active

    # -- GNTTABOP_copy -------------------------------------------------------------------------
    def copy(self, caller: int, ops: Sequence[Copy]) -> list[int]:
        """Copy bytes between pages of two domains on behalf of `caller`; one status per op."""
        with self._lock:
            return [self._copy_one(caller, op) for op in ops]

    def _resolve(self, caller: int, ptr: CopyPtr, is_gref: bool) -> tuple[int, int]:
        domid = caller if ptr.domid == DOMID_SELF else ptr.domid
        if domid not in self.domains:
            return GNTST_bad_domain, domid
        if not is_gref and domid != caller:
            return GNTST_permission_denied, domid  # only the caller's own frames by number
        return GNTST_okay, domid

    def _claim(self, caller: int, domid: int, ptr: CopyPtr, is_gref: bool,
               readonly: bool) -> tuple[int, _Claim | None]:
        if is_gref:
            status, frame = self._pin(domid, ptr.ref, caller, readonly, mapping=False)
            if status != GNTST_okay or frame is None:
                return status, None
            return GNTST_okay, _Claim(frame, (domid, ptr.ref, readonly))
        try:
            return GNTST_okay, _Claim(self.domains[domid].p2m(ptr.ref))
        except GuestMemoryError:
            return GNTST_bad_page, None

    def _copy_one(self, caller: int, op: Copy) -> int:
        src_gref = bool(op.flags & GNTCOPY_source_gref)
        dst_gref = bool(op.flags & GNTCOPY_dest_gref)
        status, src_dom = self._resolve(caller, op.source, src_gref)
        if status != GNTST_okay:
            return status
        status, dst_dom = self._resolve(caller, op.dest, dst_gref)
        if status != GNTST_okay:
            return status
        claims: list[_Claim] = []
        try:
            status, src = self._claim(caller, src_dom, op.source, src_gref, readonly=True)
            if src is None:
                return status
            claims.append(src)
            status, dst = self._claim(caller, dst_dom, op.dest, dst_gref, readonly=False)
            if dst is None:
                return status
            claims.append(dst)
            if (op.len < 0 or op.source.offset < 0 or op.dest.offset < 0
                    or op.source.offset + op.len > PAGE_SIZE
                    or op.dest.offset + op.len > PAGE_SIZE):
                return GNTST_bad_copy_arg
            # Take the bytes first: source and destination may be the same page.
            data = bytes(src.frame.view()[op.source.offset:op.source.offset + op.len])
            dst.frame.view()[op.dest.offset:op.dest.offset + op.len] = data
            return GNTST_okay
        finally:
            for claim in claims:
                if claim.pinned is not None:
                    self._unpin(*claim.pinned)

    # -- GNTTABOP_transfer ---------------------------------------------------------------------
    def transfer(self, sender: int, gfn: int, receiver: int, ref: int) -> int:
        """Give `sender`'s page at `gfn` to `receiver`, which offered grant `ref` for it.

        The page really changes hands: the receiver's guest frame named in the entry is
        re-backed by the sender's host frame (its old frame goes to the sender at `gfn`, a
        page flip), the entry's frame is written, and only then GTF_transfer_completed is set,
        so a receiver that sees the flag also sees the frame.
        """
        with self._lock:
            sender_mem = self.domains.get(sender)
            if sender_mem is None:
                return GNTST_bad_domain
            try:
                page = sender_mem.p2m(gfn)
            except GuestMemoryError:
                return GNTST_bad_page  # "out-of-range" frame
            if any(act.frame == page for act in self._active.values()):
                return GNTST_bad_page  # still granted to someone: Xen cannot steal it
            receiver_mem = self.domains.get(receiver)
            if receiver_mem is None:
                return GNTST_bad_domain
            # gnttab_prepare_for_transfer: a bad ref, an entry not offered to the sender, or a
            # frame outside the receiver's RAM are all GNTST_general_error.
            table = self.tables.get(receiver)
            if table is None or not 0 <= ref < table.nr_entries:
                return GNTST_general_error
            if table.flags(ref) != GTF_accept_transfer or table.domid(ref) != sender:
                return GNTST_general_error
            target = table.frame(ref)
            if not 0 <= target < receiver_mem.nr_pages:
                return GNTST_general_error
            table._set_flags(ref, GTF_accept_transfer | GTF_transfer_committed)
            old = receiver_mem.remap(target, page)
            sender_mem.remap(gfn, old)
            table._set_frame(ref, target)  # the guest frame where the page now is
            table._set_flags(ref, table.flags(ref) | GTF_transfer_completed)
            return GNTST_okay
