"""Split-driver shared rings: one page of requests and responses with free-running indices (Xen public/io/ring.h)."""

from __future__ import annotations

import sys

from pv.layouts import (
    PAGE_SIZE,
    SRING_REQ_EVENT,
    SRING_REQ_PROD,
    SRING_RING_OFFSET,
    SRING_RSP_EVENT,
    SRING_RSP_PROD,
    ring_slots,
)

RING_IDX_MASK = 0xFFFF_FFFF  # RING_IDX is a u32: indices run free and wrap at 2^32


class RingError(Exception):
    """The other end broke the ring protocol (a hostile or buggy peer), or the caller misused it."""


def _u32(value: int) -> int:
    return value & RING_IDX_MASK


def _notify(new: int, old: int, event: int) -> bool:
    """RING_PUSH_*_AND_CHECK_NOTIFY's test: did the producer just move past `event`?

    The consumer sets `event` to the index whose arrival should wake it; the producer moved
    from `old` to `new`. In u32 arithmetic, `event` lies in (old, new] exactly when
    new - event < new - old, which stays true across the wrap at 2^32.
    """
    return _u32(new - event) < _u32(new - old)


class SharedRing:
    """The `struct NAME_sring` page both ends see: the header indices and the slots.

    `view` is the ring page itself (a memoryview of the host frame backing the guest page), so
    whatever either end writes is what the guest reads. The four indices are read and written
    as whole aligned u32s through a native-endian cast, one load or store each, as the C code
    reads `sring->req_prod`.
    """

    def __init__(self, view: memoryview, req_size: int, rsp_size: int) -> None:
        if sys.byteorder != "little":  # pragma: no cover - x86 guests, little-endian hosts
            raise RingError("shared rings need a little-endian host")
        if req_size <= 0 or rsp_size <= 0:
            raise ValueError(f"request and response sizes must be positive ({req_size}, {rsp_size})")
        if view.nbytes < PAGE_SIZE:
            raise ValueError(f"a shared ring needs a {PAGE_SIZE}-byte page, got {view.nbytes}")
        self.view = view[:PAGE_SIZE]
        self.req_size = req_size
        self.rsp_size = rsp_size
        self.entry_size = max(req_size, rsp_size)  # the slot is a union of request and response
        self.nr_ents = ring_slots(self.entry_size, PAGE_SIZE)
        if self.nr_ents == 0:
            raise ValueError(f"a {self.entry_size}-byte entry does not fit in a ring page")
        self._idx = self.view[:SRING_RING_OFFSET].cast("I")

    # -- the header, as Xen names it ----------------------------------------------------------
    def _get(self, offset: int) -> int:
        return self._idx[offset // 4]

    def _set(self, offset: int, value: int) -> None:
        self._idx[offset // 4] = _u32(value)

    @property
    def req_prod(self) -> int:
        return self._get(SRING_REQ_PROD)

    @req_prod.setter
    def req_prod(self, value: int) -> None:
        self._set(SRING_REQ_PROD, value)

    @property
    def req_event(self) -> int:
        return self._get(SRING_REQ_EVENT)

    @req_event.setter
    def req_event(self, value: int) -> None:
        self._set(SRING_REQ_EVENT, value)

    @property
    def rsp_prod(self) -> int:
        return self._get(SRING_RSP_PROD)

    @rsp_prod.setter
    def rsp_prod(self, value: int) -> None:
        self._set(SRING_RSP_PROD, value)

    @property
    def rsp_event(self) -> int:
        return self._get(SRING_RSP_EVENT)

    @rsp_event.setter
    def rsp_event(self, value: int) -> None:
        self._set(SRING_RSP_EVENT, value)

    def init(self, index: int = 0) -> None:
        """SHARED_RING_INIT (the frontend, before it shares the page): both producers at
        `index` (0 in Xen), both events one past it so the first message notifies, padding
        zeroed."""
        self.view[:SRING_RING_OFFSET] = bytes(SRING_RING_OFFSET)
        self.req_prod = self.rsp_prod = index
        self.req_event = self.rsp_event = index + 1

    def slot(self, idx: int) -> memoryview:
        """RING_GET_REQUEST/RESPONSE: the slot a free-running index masks to."""
        start = SRING_RING_OFFSET + (idx & (self.nr_ents - 1)) * self.entry_size
        return self.view[start:start + self.entry_size]


class FrontRing:
    """The frontend's private state (`NAME_front_ring`): it produces requests, consumes responses."""

    def __init__(self, sring: SharedRing, index: int = 0) -> None:
        # FRONT_RING_ATTACH: both private indices start where the shared producers are.
        self.sring = sring
        self.req_prod_pvt = _u32(index)
        self.rsp_cons = _u32(index)

    @property
    def size(self) -> int:
        return self.sring.nr_ents

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS: slots not holding a request or an unconsumed response."""
        return self.size - _u32(self.req_prod_pvt - self.rsp_cons)

    def full(self) -> bool:
        return self.free_requests() == 0

    def get_request(self) -> memoryview:
        """The next free slot, to fill in place (RING_GET_REQUEST(r, r->req_prod_pvt++)).

        The backend sees nothing until push_requests() publishes req_prod.
        """
        if self.full():
            raise RingError(f"ring full: {self.size} requests await responses")
        view = self.sring.slot(self.req_prod_pvt)[:self.sring.req_size]
        self.req_prod_pvt = _u32(self.req_prod_pvt + 1)
        return view

    def put_request(self, data: bytes | bytearray | memoryview) -> None:
        """get_request() and copy `data` in, zero-filling the rest of the request."""
        if len(data) > self.sring.req_size:
            raise ValueError(f"request of {len(data)} bytes exceeds {self.sring.req_size}")
        slot = self.get_request()
        slot[:len(data)] = data
        slot[len(data):] = bytes(self.sring.req_size - len(data))

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish req_prod, say whether to notify.

        The requests were written before req_prod (the backend must see them first), and
        req_event is read only after req_prod is published: a backend that re-armed
        req_event in between either sees the new requests or gets the notification.
        """
        old = self.sring.req_prod
        new = self.req_prod_pvt
        self.sring.req_prod = new
        return _notify(new, old, self.sring.req_event)

    def unconsumed_responses(self) -> int:
        """XEN_RING_NR_UNCONSUMED_RESPONSES, refusing a producer that ran past what was asked."""
        rsp_prod = self.sring.rsp_prod
        # RING_RESPONSE_PROD_OVERFLOW: more responses than requests outstanding.
        if _u32(rsp_prod - self.rsp_cons) > _u32(self.req_prod_pvt - self.rsp_cons):
            raise RingError(f"hostile rsp_prod {rsp_prod:#x}: rsp_cons {self.rsp_cons:#x}, only "
                            f"{_u32(self.req_prod_pvt - self.rsp_cons)} requests outstanding")
        return _u32(rsp_prod - self.rsp_cons)

    def take_response(self) -> bytes:
        """Copy the next response out of its slot (once) and consume it."""
        if self.unconsumed_responses() == 0:
            raise RingError("no unconsumed response")
        data = bytes(self.sring.slot(self.rsp_cons)[:self.sring.rsp_size])
        self.rsp_cons = _u32(self.rsp_cons + 1)
        return data

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: before sleeping, ask to be woken by the next
        response (rsp_event = rsp_cons + 1), then look again: a response pushed before the
        re-arm was seen by its producer as needing no notification, so only this second look
        catches it."""
        if self.unconsumed_responses():
            return True
        self.sring.rsp_event = self.rsp_cons + 1
        return self.unconsumed_responses() > 0


class BackRing:
    """The backend's private state (`NAME_back_ring`): it consumes requests, produces responses.

    Everything on the shared page is written by a guest that may be hostile: each request is
    copied out of its slot once and then only the copy is used (no double fetch), and a
    req_prod the frontend could not legitimately have produced raises RingError.
    """

    def __init__(self, sring: SharedRing, index: int = 0) -> None:
        # BACK_RING_ATTACH
        self.sring = sring
        self.rsp_prod_pvt = _u32(index)
        self.req_cons = _u32(index)

    @property
    def size(self) -> int:
        return self.sring.nr_ents

    def unconsumed_requests(self) -> int:
        """XEN_RING_NR_UNCONSUMED_REQUESTS, with req_prod checked before it is believed.

        A frontend can have published at most the slots that do not still hold requests
        awaiting responses: req_prod must lie in [req_cons, rsp_prod_pvt + RING_SIZE]. Past
        that (RING_REQUEST_PROD_OVERFLOW), or behind req_cons (which in u32 arithmetic is a
        jump of almost 2^32), the frontend is lying, and reading on would hand the backend
        slots it already consumed or answered.
        """
        req_prod = self.sring.req_prod
        published = _u32(req_prod - self.req_cons)
        room = self.size - _u32(self.req_cons - self.rsp_prod_pvt)
        if published > room:
            raise RingError(f"hostile req_prod {req_prod:#x}: req_cons {self.req_cons:#x}, "
                            f"rsp_prod_pvt {self.rsp_prod_pvt:#x}, ring of {self.size}")
        return published

    def take_request(self) -> bytes:
        """Copy the next request out of the ring, once, and consume it."""
        if self.unconsumed_requests() == 0:
            raise RingError("no unconsumed request")
        data = bytes(self.sring.slot(self.req_cons)[:self.sring.req_size])
        self.req_cons = _u32(self.req_cons + 1)
        return data

    def put_response(self, data: bytes | bytearray | memoryview) -> None:
        """Write the next response (it shares a slot with an already-consumed request)."""
        if len(data) > self.sring.rsp_size:
            raise ValueError(f"response of {len(data)} bytes exceeds {self.sring.rsp_size}")
        if _u32(self.req_cons - self.rsp_prod_pvt) == 0:
            raise RingError("a response with no request taken to answer")
        slot = self.sring.slot(self.rsp_prod_pvt)
        slot[:len(data)] = data
        slot[len(data):self.sring.rsp_size] = bytes(self.sring.rsp_size - len(data))
        self.rsp_prod_pvt = _u32(self.rsp_prod_pvt + 1)

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish rsp_prod, say whether to notify."""
        old = self.sring.rsp_prod
        new = self.rsp_prod_pvt
        self.sring.rsp_prod = new
        return _notify(new, old, self.sring.rsp_event)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event = req_cons + 1, then look again."""
        if self.unconsumed_requests():
            return True
        self.sring.req_event = self.req_cons + 1
        return self.unconsumed_requests() > 0
