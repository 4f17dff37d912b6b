"""Grant tables in guest memory: map/unmap flag tracking, copy between domains, page transfer (Xen grant_table.h)."""

from __future__ import annotations

import pytest

from hvm.memory import PAGE_SIZE, GuestMemory, HostFrame
from pv.grant_table import (
    DOMID_SELF,
    GRANT_ENTRIES_PER_FRAME,
    Copy,
    CopyPtr,
    Domain,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GrantOps,
    GTF_accept_transfer,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_transfer_committed,
    GTF_transfer_completed,
    GTF_writing,
)

DOM0, FRONT, PEER = 0, 1, 2
TABLE_GFN = 10  # where each domU keeps its one-frame grant table


def page_of(text: bytes) -> bytes:
    return text + bytes(PAGE_SIZE - len(text))


@pytest.fixture
def ops() -> GrantOps:
    grants = GrantOps.of([Domain(d, GuestMemory(16 * PAGE_SIZE)) for d in (DOM0, FRONT, PEER)])
    assert grants.setup_table(FRONT, [TABLE_GFN]) == GNTST_okay
    assert grants.setup_table(PEER, [TABLE_GFN]) == GNTST_okay
    return grants


def entry_in_guest(ops: GrantOps, domid: int, ref: int) -> tuple[int, int, int]:
    """(flags, domid, frame) as the granting guest reads its own entry."""
    return ops.domains[domid].read_struct(TABLE_GFN * PAGE_SIZE + ref * 8, "<HHI")


def test_entries_live_in_the_granting_domains_frames(ops: GrantOps) -> None:
    table = ops.tables[FRONT]
    table.grant_foreign_access(3, DOM0, gfn=5, readonly=True)
    assert entry_in_guest(ops, FRONT, 3) == (GTF_permit_access | GTF_readonly, DOM0, 5)
    # And the other way: an entry the guest writes with its own stores is what Xen reads.
    ops.domains[FRONT].write(TABLE_GFN * PAGE_SIZE + 4 * 8,
                             (GTF_permit_access).to_bytes(2, "little")
                             + DOM0.to_bytes(2, "little") + (6).to_bytes(4, "little"))
    assert table.entry(4).flags == GTF_permit_access and table.entry(4).frame == 6
    assert table.nr_entries == GRANT_ENTRIES_PER_FRAME == PAGE_SIZE // 8


def test_map_shares_the_granted_page_and_tracks_reading_writing(ops: GrantOps) -> None:
    front = ops.domains[FRONT]
    front.write(5 * PAGE_SIZE, b"ring page of the frontend")
    ops.tables[FRONT].grant_foreign_access(3, DOM0, gfn=5)
    status, handle, frame = ops.map(DOM0, FRONT, 3)
    assert status == GNTST_okay and isinstance(frame, HostFrame)
    assert bytes(frame.view()[:25]) == b"ring page of the frontend"
    frame.view()[:7] = b"backend"  # the backend writes through its mapping...
    assert front.read(5 * PAGE_SIZE, 7) == b"backend"  # ...and the guest sees it
    assert entry_in_guest(ops, FRONT, 3)[0] == GTF_permit_access | GTF_reading | GTF_writing
    assert ops.tables[FRONT].end_foreign_access(3) is False  # still mapped: cannot revoke
    assert ops.unmap(DOM0, handle) == GNTST_okay
    assert entry_in_guest(ops, FRONT, 3)[0] == GTF_permit_access
    assert ops.tables[FRONT].end_foreign_access(3) is True
    assert entry_in_guest(ops, FRONT, 3)[0] == 0


def test_writing_clears_with_the_last_writable_mapping_reading_with_the_last(
        ops: GrantOps) -> None:
    ops.tables[FRONT].grant_foreign_access(1, DOM0, gfn=4)
    w1 = ops.map(DOM0, FRONT, 1).handle
    w2 = ops.map(DOM0, FRONT, 1).handle
    r1 = ops.map(DOM0, FRONT, 1, readonly=True).handle
    assert len({w1, w2, r1}) == 3
    assert ops.unmap(DOM0, w1) == GNTST_okay
    assert entry_in_guest(ops, FRONT, 1)[0] == GTF_permit_access | GTF_reading | GTF_writing
    assert ops.unmap(DOM0, w2) == GNTST_okay
    assert entry_in_guest(ops, FRONT, 1)[0] == GTF_permit_access | GTF_reading
    assert ops.unmap(DOM0, r1) == GNTST_okay
    assert entry_in_guest(ops, FRONT, 1)[0] == GTF_permit_access
    assert ops.unmap(DOM0, r1) == GNTST_bad_handle


def test_readonly_grant(ops: GrantOps) -> None:
    ops.tables[FRONT].grant_foreign_access(2, DOM0, gfn=4, readonly=True)
    # Xen: "Attempt to write-pin a r/o grant entry" -> GNTST_general_error, flags untouched.
    result = ops.map(DOM0, FRONT, 2, readonly=False)
    assert (result.status, result.frame) == (GNTST_general_error, None)
    assert entry_in_guest(ops, FRONT, 2)[0] == GTF_permit_access | GTF_readonly
    ro = ops.map(DOM0, FRONT, 2, readonly=True)
    assert ro.status == GNTST_okay
    assert entry_in_guest(ops, FRONT, 2)[0] == GTF_permit_access | GTF_readonly | GTF_reading
    # Already pinned read-only: a writable map is still refused.
    assert ops.map(DOM0, FRONT, 2).status == GNTST_general_error
    assert ops.unmap(DOM0, ro.handle) == GNTST_okay
    assert entry_in_guest(ops, FRONT, 2)[0] == GTF_permit_access | GTF_readonly


def test_bad_refs_domains_and_handles(ops: GrantOps) -> None:
    table = ops.tables[FRONT]
    table.grant_foreign_access(0, DOM0, gfn=4)
    assert ops.map(DOM0, FRONT, table.nr_entries).status == GNTST_bad_gntref
    assert ops.map(DOM0, FRONT, -1).status == GNTST_bad_gntref
    assert ops.map(DOM0, 7, 0).status == GNTST_bad_domain
    assert ops.map(DOM0, DOM0, 0).status == GNTST_general_error  # dom0 set up no table
    assert ops.map(DOM0, FRONT, 1).status == GNTST_general_error  # GTF_invalid entry
    assert ops.unmap(DOM0, 12345) == GNTST_bad_handle


def test_grant_for_another_domain_is_refused(ops: GrantOps) -> None:
    ops.tables[FRONT].grant_foreign_access(0, DOM0, gfn=4)
    assert ops.map(PEER, FRONT, 0).status == GNTST_general_error  # "Bad flags or dom"
    assert entry_in_guest(ops, FRONT, 0)[0] == GTF_permit_access
    handle = ops.map(DOM0, FRONT, 0).handle
    assert ops.unmap(PEER, handle) == GNTST_bad_handle  # handles are per grantee
    assert ops.unmap(DOM0, handle) == GNTST_okay


def test_granted_gfn_outside_guest_ram_is_a_bad_page(ops: GrantOps) -> None:
    ops.tables[FRONT].grant_foreign_access(0, DOM0, gfn=1000)
    assert ops.map(DOM0, FRONT, 0).status == GNTST_bad_page
    assert entry_in_guest(ops, FRONT, 0)[0] == GTF_permit_access


def test_copy_from_a_grant_into_the_callers_own_frame(ops: GrantOps) -> None:
    ops.domains[FRONT].write(6 * PAGE_SIZE + 100, b"packet payload from the frontend")
    ops.tables[FRONT].grant_foreign_access(4, DOM0, gfn=6, readonly=True)
    op = Copy(CopyPtr(4, FRONT, 100), CopyPtr(2, DOMID_SELF, 200), len=32,
              flags=GNTCOPY_source_gref)
    assert ops.copy(DOM0, [op]) == [GNTST_okay]
    assert ops.domains[DOM0].read(2 * PAGE_SIZE + 200, 32) == b"packet payload from the frontend"
    assert ops.domains[DOM0].read(2 * PAGE_SIZE + 232, 1) == b"\0"  # exactly len bytes
    assert entry_in_guest(ops, FRONT, 4)[0] == GTF_permit_access | GTF_readonly  # released


def test_copy_into_a_grant_and_between_two_grants(ops: GrantOps) -> None:
    ops.tables[FRONT].grant_foreign_access(5, DOM0, gfn=7)
    ops.tables[PEER].grant_foreign_access(6, DOM0, gfn=8)
    ops.domains[DOM0].write(3 * PAGE_SIZE, b"response data")
    to_front = Copy(CopyPtr(3, DOM0, 0), CopyPtr(5, FRONT, 10), 13, GNTCOPY_dest_gref)
    front_to_peer = Copy(CopyPtr(5, FRONT, 10), CopyPtr(6, PEER, 4000), 13,
                         GNTCOPY_source_gref | GNTCOPY_dest_gref)
    assert ops.copy(DOM0, [to_front, front_to_peer]) == [GNTST_okay, GNTST_okay]
    assert ops.domains[FRONT].read(7 * PAGE_SIZE + 10, 13) == b"response data"
    assert ops.domains[PEER].read(8 * PAGE_SIZE + 4000, 13) == b"response data"


def test_copy_checks_offsets_grants_and_frame_ownership(ops: GrantOps) -> None:
    ops.tables[FRONT].grant_foreign_access(4, DOM0, gfn=6, readonly=True)
    ops.domains[DOM0].write(2 * PAGE_SIZE + 4000, b"\x55" * 96)
    crossing = Copy(CopyPtr(4, FRONT, 4000), CopyPtr(2, DOM0, 0), 200, GNTCOPY_source_gref)
    dest_crossing = Copy(CopyPtr(4, FRONT, 0), CopyPtr(2, DOM0, 3990), 200, GNTCOPY_source_gref)
    into_readonly = Copy(CopyPtr(2, DOM0, 0), CopyPtr(4, FRONT, 0), 8, GNTCOPY_dest_gref)
    bad_ref = Copy(CopyPtr(999_999, FRONT, 0), CopyPtr(2, DOM0, 0), 8, GNTCOPY_source_gref)
    foreign_frame = Copy(CopyPtr(6, FRONT, 0), CopyPtr(2, DOM0, 0), 8)  # by gfn, not grant
    unknown_dom = Copy(CopyPtr(0, 9, 0), CopyPtr(2, DOM0, 0), 8, GNTCOPY_source_gref)
    bad_gfn = Copy(CopyPtr(4, FRONT, 0), CopyPtr(500, DOM0, 0), 8, GNTCOPY_source_gref)
    statuses = ops.copy(DOM0, [crossing, dest_crossing, into_readonly, bad_ref, foreign_frame,
                               unknown_dom, bad_gfn])
    assert statuses == [GNTST_bad_copy_arg, GNTST_bad_copy_arg, GNTST_general_error,
                        GNTST_bad_gntref, GNTST_permission_denied, GNTST_bad_domain,
                        GNTST_bad_page]
    assert ops.domains[DOM0].read(2 * PAGE_SIZE + 4000, 96) == b"\x55" * 96  # untouched
    assert entry_in_guest(ops, FRONT, 4)[0] == GTF_permit_access | GTF_readonly


def test_transfer_flips_the_page_into_the_receivers_p2m(ops: GrantOps) -> None:
    sender, receiver = ops.domains[FRONT], ops.domains[PEER]
    sender.write(4 * PAGE_SIZE, page_of(b"datagram for dom2"))
    receiver.write(9 * PAGE_SIZE, page_of(b"free page offered by dom2"))
    data_frame, free_frame = sender.p2m(4), receiver.p2m(9)
    remapped: list[tuple[int, HostFrame]] = []
    receiver.on_remap(lambda pfn, frame: remapped.append((pfn, frame)))
    ops.tables[PEER].grant_foreign_transfer(7, FRONT, gfn=9)

    assert ops.transfer(FRONT, 4, PEER, 7) == GNTST_okay

    # The receiver reads the datagram at its own frame 9, on the very host page it was in.
    assert receiver.read(9 * PAGE_SIZE, 17) == b"datagram for dom2"
    assert receiver.p2m(9) == data_frame
    assert remapped == [(9, data_frame)]  # the vCPUs would remap Unicorn here
    # The sender no longer has that page; its frame 4 is now backed by the free page.
    assert sender.p2m(4) != data_frame and sender.p2m(4) == free_frame
    assert sender.read(4 * PAGE_SIZE, 25) == b"free page offered by dom2"
    flags, domid, frame = entry_in_guest(ops, PEER, 7)
    assert flags == GTF_accept_transfer | GTF_transfer_committed | GTF_transfer_completed
    assert (domid, frame) == (FRONT, 9)
    assert ops.tables[PEER].end_foreign_transfer(7) == 9
    assert entry_in_guest(ops, PEER, 7)[0] == 0


def test_transfer_refusals_change_nothing(ops: GrantOps) -> None:
    sender, receiver = ops.domains[FRONT], ops.domains[PEER]
    before = (sender.p2m(4), receiver.p2m(9))
    ops.tables[PEER].grant_foreign_transfer(7, FRONT, gfn=9)
    ops.tables[PEER].grant_foreign_access(8, FRONT, gfn=9)  # access, not transfer
    ops.tables[PEER].grant_foreign_transfer(11, DOM0, gfn=9)  # offered to another domain
    ops.tables[PEER].grant_foreign_transfer(12, FRONT, gfn=5000)  # outside its RAM
    # Xen's gnttab_prepare_for_transfer failing (any of these) is GNTST_general_error.
    assert ops.transfer(FRONT, 4, PEER, 8) == GNTST_general_error
    assert ops.transfer(FRONT, 4, PEER, 11) == GNTST_general_error
    assert ops.transfer(FRONT, 4, PEER, 12) == GNTST_general_error
    assert ops.transfer(FRONT, 4, PEER, ops.tables[PEER].nr_entries) == GNTST_general_error
    assert ops.transfer(FRONT, 4, PEER, 1) == GNTST_general_error  # GTF_invalid
    assert ops.transfer(FRONT, 4000, PEER, 7) == GNTST_bad_page
    assert ops.transfer(FRONT, 4, 9, 7) == GNTST_bad_domain
    # A page the sender has granted and that is mapped cannot be given away.
    ops.tables[FRONT].grant_foreign_access(0, DOM0, gfn=4)
    handle = ops.map(DOM0, FRONT, 0).handle
    assert ops.transfer(FRONT, 4, PEER, 7) == GNTST_bad_page
    assert (sender.p2m(4), receiver.p2m(9)) == before
    assert entry_in_guest(ops, PEER, 7)[0] == GTF_accept_transfer
    assert ops.unmap(DOM0, handle) == GNTST_okay
    assert ops.transfer(FRONT, 4, PEER, 7) == GNTST_okay
    # An offer is used once: completed flags no longer equal GTF_accept_transfer.
    assert ops.transfer(FRONT, 5, PEER, 7) == GNTST_general_error


def test_hypervisor_allocated_table_mapped_into_the_guest() -> None:
    ops = GrantOps({DOM0: GuestMemory(4 * PAGE_SIZE), FRONT: GuestMemory(8 * PAGE_SIZE)})
    assert ops.setup_table(FRONT, 2) == GNTST_okay
    table = ops.tables[FRONT]
    table.map_into([6, 7])
    ref = GRANT_ENTRIES_PER_FRAME + 1  # in the second frame
    ops.domains[FRONT].write(7 * PAGE_SIZE + 8, bytes([GTF_permit_access, 0, DOM0, 0, 3, 0, 0, 0]))
    assert table.entry(ref).frame == 3
    assert ops.map(DOM0, FRONT, ref).status == GNTST_okay
    assert ops.query_size(FRONT) == (GNTST_okay, 2, ops.max_grant_frames)
    assert ops.query_size(5)[0] == GNTST_bad_domain
    assert ops.setup_table(5, 1) == GNTST_bad_domain
    assert ops.setup_table(FRONT, ops.max_grant_frames + 1) == GNTST_general_error
