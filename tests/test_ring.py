"""Shared rings on a guest page: notify decisions, index wrap, final checks, hostile producers (Xen io/ring.h)."""

from __future__ import annotations

import ctypes
import struct

import pytest

from hvm.memory import PAGE_SIZE, GuestMemory
from pv.layouts import (
    SRING_REQ_EVENT,
    SRING_REQ_PROD,
    SRING_RING_OFFSET,
    SRING_RSP_EVENT,
    SRING_RSP_PROD,
    X86_32,
    blkif_request,
    blkif_response,
    ring_size,
)
from pv.ring import BackRing, FrontRing, RingError, SharedRing

RING_GFN = 3
RING_GPA = RING_GFN * PAGE_SIZE
BlkReq = blkif_request(X86_32)
BlkRsp = blkif_response(X86_32)
REQ_SIZE, RSP_SIZE = ctypes.sizeof(BlkReq), ctypes.sizeof(BlkRsp)


def blk_req(req_id: int, sector: int = 0, nr_segments: int = 1) -> bytes:
    r = BlkReq()
    r.operation, r.nr_segments, r.handle, r.id, r.sector_number = 0, nr_segments, 0x51, req_id, sector
    return bytes(r)


def blk_rsp(req_id: int, status: int = 0) -> bytes:
    r = BlkRsp()
    r.id, r.operation, r.status = req_id, 0, status
    return bytes(r)


@pytest.fixture
def guest() -> GuestMemory:
    return GuestMemory(8 * PAGE_SIZE)


def ring_pair(guest: GuestMemory, index: int = 0) -> tuple[SharedRing, FrontRing, BackRing]:
    """A frontend and a backend on the same guest page, as after SHARED_RING_INIT."""
    sring = SharedRing(guest.p2m(RING_GFN).view(), REQ_SIZE, RSP_SIZE)
    sring.init(index)
    return sring, FrontRing(sring, index), BackRing(SharedRing(guest.p2m(RING_GFN).view(),
                                                               REQ_SIZE, RSP_SIZE), index)


def header(guest: GuestMemory, offset: int) -> int:
    """What guest code reads at one of the sring header's u32s."""
    return guest.read_uint(RING_GPA + offset, 4)


def test_init_writes_the_header_the_guest_reads(guest: GuestMemory) -> None:
    guest.write(RING_GPA, b"\xAA" * PAGE_SIZE)
    sring, _, _ = ring_pair(guest)
    assert [header(guest, off) for off in (SRING_REQ_PROD, SRING_REQ_EVENT,
                                           SRING_RSP_PROD, SRING_RSP_EVENT)] == [0, 1, 0, 1]
    assert guest.read(RING_GPA + 16, SRING_RING_OFFSET - 16) == bytes(SRING_RING_OFFSET - 16)
    assert sring.nr_ents == ring_size(X86_32, "blkif")


def test_requests_land_in_slots_from_offset_64_masked_by_ring_size(guest: GuestMemory) -> None:
    sring, front, back = ring_pair(guest)
    for i in range(sring.nr_ents + 3):  # wrap around the slots once
        front.put_request(blk_req(i))
        front.push_requests()
        slot = (i & (sring.nr_ents - 1))
        gpa = RING_GPA + SRING_RING_OFFSET + slot * REQ_SIZE
        assert BlkReq.from_buffer_copy(guest.read(gpa, REQ_SIZE)).id == i
        assert BlkReq.from_buffer_copy(back.take_request()).id == i
        back.put_response(blk_rsp(i))
        back.push_responses()
        assert BlkRsp.from_buffer_copy(guest.read(gpa, RSP_SIZE)).id == i
        assert BlkRsp.from_buffer_copy(front.take_response()).id == i
    assert header(guest, SRING_REQ_PROD) == sring.nr_ents + 3


def test_batch_of_requests_gives_one_notification(guest: GuestMemory) -> None:
    _, front, back = ring_pair(guest)
    for i in range(5):
        front.put_request(blk_req(i))
    assert header(guest, SRING_REQ_PROD) == 0  # nothing published before the push
    assert front.push_requests() is True
    assert header(guest, SRING_REQ_PROD) == 5
    assert back.unconsumed_requests() == 5
    # The backend has not re-armed req_event: more requests need no further notification.
    front.put_request(blk_req(5))
    assert front.push_requests() is False
    assert [BlkReq.from_buffer_copy(back.take_request()).id for _ in range(6)] == list(range(6))


def test_final_check_rearms_req_event_and_the_next_push_notifies(guest: GuestMemory) -> None:
    _, front, back = ring_pair(guest)
    front.put_request(blk_req(1))
    assert front.push_requests() is True
    back.take_request()
    assert back.final_check_for_requests() is False
    assert header(guest, SRING_REQ_EVENT) == back.req_cons + 1 == 2
    front.put_request(blk_req(2))
    assert front.push_requests() is True


def test_final_check_catches_a_request_pushed_before_the_rearm(guest: GuestMemory) -> None:
    # The frontend pushes while the backend is still busy (req_event stale): no notification,
    # so only the backend's final check can find this request.
    _, front, back = ring_pair(guest)
    front.put_request(blk_req(1))
    front.push_requests()
    back.take_request()
    front.put_request(blk_req(2))
    assert front.push_requests() is False
    assert back.final_check_for_requests() is True
    assert header(guest, SRING_REQ_EVENT) == 1  # not re-armed: there was work
    assert BlkReq.from_buffer_copy(back.take_request()).id == 2


def test_responses_notify_by_rsp_event_and_final_check(guest: GuestMemory) -> None:
    _, front, back = ring_pair(guest)
    for i in range(3):
        front.put_request(blk_req(i))
    front.push_requests()
    for _ in range(3):
        back.take_request()
    back.put_response(blk_rsp(0))
    back.put_response(blk_rsp(1))
    assert back.push_responses() is True  # rsp_event = 1 from init
    back.put_response(blk_rsp(2))
    assert back.push_responses() is False  # frontend has not re-armed
    assert [BlkRsp.from_buffer_copy(front.take_response()).id for _ in range(3)] == [0, 1, 2]
    assert front.final_check_for_responses() is False
    assert header(guest, SRING_RSP_EVENT) == 4
    front.put_request(blk_req(3))
    front.push_requests()
    back.take_request()
    back.put_response(blk_rsp(3, status=-1))
    assert back.push_responses() is True
    assert BlkRsp.from_buffer_copy(front.take_response()).status == -1


@pytest.mark.parametrize("start", [0xFFFF_FFFD, 0xFFFF_FFFF])
def test_indices_wrap_at_2_to_the_32(guest: GuestMemory, start: int) -> None:
    _, front, back = ring_pair(guest, start)
    for i in range(6):
        front.put_request(blk_req(i))
    assert front.push_requests() is True  # req_event = start + 1 lies inside the batch
    assert header(guest, SRING_REQ_PROD) == (start + 6) & 0xFFFF_FFFF
    assert back.unconsumed_requests() == 6
    assert [BlkReq.from_buffer_copy(back.take_request()).id for _ in range(6)] == list(range(6))
    assert back.final_check_for_requests() is False
    assert header(guest, SRING_REQ_EVENT) == (start + 7) & 0xFFFF_FFFF
    for i in range(6):
        back.put_response(blk_rsp(i))
    assert back.push_responses() is True
    assert front.unconsumed_responses() == 6
    assert [BlkRsp.from_buffer_copy(front.take_response()).id for _ in range(6)] == list(range(6))
    assert front.final_check_for_responses() is False
    front.put_request(blk_req(6))
    assert front.push_requests() is True


def test_notify_when_req_event_sits_at_the_wrap(guest: GuestMemory) -> None:
    # req_event = 0 (just wrapped) and the producer moves from 0xFFFFFFFE to 2: notify.
    # Moving from 0xFFFFFFFE to 0xFFFFFFFF does not reach it: no notify.
    _, front, back = ring_pair(guest, 0xFFFF_FFFE)
    guest.write_uint(RING_GPA + SRING_REQ_EVENT, 4, 0)
    front.put_request(blk_req(0))
    assert front.push_requests() is False
    front.put_request(blk_req(1))
    front.put_request(blk_req(2))
    assert front.push_requests() is True


def test_full_ring_refuses_another_request(guest: GuestMemory) -> None:
    sring, front, _ = ring_pair(guest)
    for i in range(sring.nr_ents):
        front.put_request(blk_req(i))
    assert front.full()
    with pytest.raises(RingError, match="full"):
        front.put_request(blk_req(99))


def test_hostile_req_prod_past_the_ring_raises_instead_of_reading_garbage(
        guest: GuestMemory) -> None:
    sring, front, back = ring_pair(guest)
    front.put_request(blk_req(0))
    front.push_requests()
    back.take_request()
    # A guest writes req_prod one beyond anything it could have produced.
    guest.write_uint(RING_GPA + SRING_REQ_PROD, 4, back.req_cons + sring.nr_ents + 1)
    with pytest.raises(RingError, match="hostile req_prod"):
        back.unconsumed_requests()
    with pytest.raises(RingError, match="hostile req_prod"):
        back.take_request()
    with pytest.raises(RingError, match="hostile req_prod"):
        back.final_check_for_requests()
    assert back.req_cons == 1  # nothing consumed


def test_req_prod_moving_backwards_is_hostile(guest: GuestMemory) -> None:
    _, front, back = ring_pair(guest)
    for i in range(4):
        front.put_request(blk_req(i))
    front.push_requests()
    for _ in range(2):
        back.take_request()
    guest.write_uint(RING_GPA + SRING_REQ_PROD, 4, 1)  # behind req_cons = 2
    with pytest.raises(RingError, match="hostile req_prod"):
        back.take_request()


def test_backend_never_takes_more_than_the_ring_holds(guest: GuestMemory) -> None:
    # Every slot holds a request still awaiting its response: nothing more to take, and a
    # req_prod claiming one more is hostile.
    sring, front, back = ring_pair(guest)
    for i in range(sring.nr_ents):
        front.put_request(blk_req(i))
    front.push_requests()
    for _ in range(sring.nr_ents):
        back.take_request()
    assert back.unconsumed_requests() == 0
    with pytest.raises(RingError, match="no unconsumed request"):
        back.take_request()
    guest.write_uint(RING_GPA + SRING_REQ_PROD, 4, sring.nr_ents + 1)
    with pytest.raises(RingError, match="hostile req_prod"):
        back.unconsumed_requests()


def test_request_is_copied_once_so_a_later_guest_write_cannot_change_it(
        guest: GuestMemory) -> None:
    _, front, back = ring_pair(guest)
    front.put_request(blk_req(7, sector=100, nr_segments=2))
    front.push_requests()
    taken = back.take_request()
    # The guest rewrites the slot after the backend took it (the classic double-fetch attack:
    # validate nr_segments, then read it again as 200).
    slot_gpa = RING_GPA + SRING_RING_OFFSET
    guest.write(slot_gpa + BlkReq.nr_segments.offset, bytes([200]))
    guest.write(slot_gpa + BlkReq.sector_number.offset, struct.pack("<Q", 1 << 40))
    req = BlkReq.from_buffer_copy(taken)
    assert (req.id, req.nr_segments, req.sector_number) == (7, 2, 100)


def test_req_prod_moving_while_the_backend_works_is_followed(guest: GuestMemory) -> None:
    _, front, back = ring_pair(guest)
    front.put_request(blk_req(0))
    front.push_requests()
    assert back.unconsumed_requests() == 1
    seen = [BlkReq.from_buffer_copy(back.take_request()).id]
    # Meanwhile the frontend pushes three more; the backend's loop keeps reading req_prod.
    for i in range(1, 4):
        front.put_request(blk_req(i))
    assert front.push_requests() is False  # the backend is still running: no wake-up needed
    while back.unconsumed_requests():
        seen.append(BlkReq.from_buffer_copy(back.take_request()).id)
    assert seen == [0, 1, 2, 3]
    assert back.final_check_for_requests() is False


def test_hostile_rsp_prod_is_refused_by_the_frontend(guest: GuestMemory) -> None:
    _, front, _ = ring_pair(guest)
    front.put_request(blk_req(0))
    front.push_requests()
    guest.write_uint(RING_GPA + SRING_RSP_PROD, 4, 2)  # two responses to one request
    with pytest.raises(RingError, match="hostile rsp_prod"):
        front.take_response()


def test_response_without_a_request_and_oversized_messages_are_refused(
        guest: GuestMemory) -> None:
    _, front, back = ring_pair(guest)
    with pytest.raises(RingError):
        back.put_response(blk_rsp(0))
    with pytest.raises(ValueError):
        front.put_request(bytes(REQ_SIZE + 1))
    with pytest.raises(ValueError):
        SharedRing(memoryview(bytearray(100)), REQ_SIZE, RSP_SIZE)


def test_short_request_is_zero_filled(guest: GuestMemory) -> None:
    guest.write(RING_GPA + SRING_RING_OFFSET, b"\xEE" * REQ_SIZE)
    _, front, back = ring_pair(guest)
    front.put_request(b"\x01\x02")
    front.push_requests()
    assert back.take_request() == b"\x01\x02" + bytes(REQ_SIZE - 2)
