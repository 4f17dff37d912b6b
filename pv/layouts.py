"""C layouts of Xen's PV structures on x86_32 and x86_64, built with ctypes (xen.h, grant_table.h, event_channel.h, io/*.h)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

PAGE_SIZE = 4096

# C types the headers use. On x86 `unsigned long`, xen_ulong_t and xen_pfn_t are the
# word size; everything else has a fixed width.
u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
i8, i16 = ctypes.c_int8, ctypes.c_int16
char = ctypes.c_char
domid_t = u16
grant_ref_t = u32
grant_handle_t = u32
evtchn_port_t = u32
RING_IDX = u32

CStruct = type[ctypes.Structure]
CUnion = type[ctypes.Union]
CAggregate = type[ctypes.Structure] | type[ctypes.Union]
FieldSpec = tuple[str, Any]


@dataclass(frozen=True)
class Arch:
    """One x86 ABI as gcc lays structs out for it.

    i386 System V aligns 8-byte scalars to 4 inside structs; ctypes' `_pack_ = 4` caps every
    member's alignment at 4, which on x86 changes exactly those members and nothing else.
    """

    name: str
    ulong: Any  # unsigned long, xen_ulong_t, xen_pfn_t
    pack: int  # 0: natural alignment

    @property
    def ulong_bits(self) -> int:
        return 8 * ctypes.sizeof(self.ulong)

    def struct(self, name: str, fields: Iterable[FieldSpec]) -> CStruct:
        return self._make(ctypes.Structure, name, fields)

    def union(self, name: str, fields: Iterable[FieldSpec]) -> CUnion:
        return self._make(ctypes.Union, name, fields)

    def _make(self, base: Any, name: str, fields: Iterable[FieldSpec]) -> Any:
        body: dict[str, Any] = {"_fields_": list(fields)}
        if self.pack:
            body["_pack_"] = self.pack
            body["_layout_"] = "ms"  # what _pack_ means; newer Pythons want it said
        return type(f"{name}_{self.name}", (base,), body)


X86_32 = Arch("x86_32", ctypes.c_uint32, 4)
X86_64 = Arch("x86_64", ctypes.c_uint64, 0)
ARCHES: dict[str, Arch] = {X86_32.name: X86_32, X86_64.name: X86_64}


def arch_named(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; expected one of {sorted(ARCHES)}") from None


def field_offsets(cls: CAggregate) -> dict[str, int]:
    """C member designator -> offsetof(), for every member a reader would look up.

    Nested structs and unions give dotted leaves ("console.domU.mfn"); an array of structs
    gives its start and its second element ("seg", "seg[1]"), which pins the stride; arrays
    of scalars give their start.
    """
    out: dict[str, int] = {}
    _walk(cls, "", 0, out)
    return out


def _walk(cls: Any, prefix: str, base: int, out: dict[str, int]) -> None:
    for entry in cls._fields_:
        name, ctype = entry[0], entry[1]
        assert isinstance(name, str)
        off = base + getattr(cls, name).offset
        path = prefix + name
        if _is_aggregate(ctype):
            _walk(ctype, path + ".", off, out)
        elif issubclass(ctype, ctypes.Array):
            out[path] = off
            elem = ctype._type_
            if _is_aggregate(elem) and ctype._length_ > 1:
                out[f"{path}[1]"] = off + ctypes.sizeof(elem)
        else:
            out[path] = off


def _is_aggregate(ctype: Any) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union))


# --- xen.h, arch-x86/xen-x86_{32,64}.h ---------------------------------------------------------

XEN_LEGACY_MAX_VCPUS = 32
MAX_GUEST_CMDLINE = 1024


@cache
def vcpu_time_info(a: Arch) -> CStruct:
    return a.struct("vcpu_time_info", [
        ("version", u32), ("pad0", u32), ("tsc_timestamp", u64), ("system_time", u64),
        ("tsc_to_system_mul", u32), ("tsc_shift", i8), ("flags", u8), ("pad1", u8 * 2),
    ])


@cache
def arch_vcpu_info(a: Arch) -> CStruct:
    # Padded so that sizeof(vcpu_info) is 64 on both: cr2 + 5 words (x86_32) or + 1 (x86_64).
    pad_words = 5 if a is X86_32 else 1
    return a.struct("arch_vcpu_info", [("cr2", a.ulong), ("pad", a.ulong * pad_words)])


@cache
def vcpu_info(a: Arch) -> CStruct:
    return a.struct("vcpu_info", [
        ("evtchn_upcall_pending", u8), ("evtchn_upcall_mask", u8),
        ("evtchn_pending_sel", a.ulong), ("arch", arch_vcpu_info(a)), ("time", vcpu_time_info(a)),
    ])


@cache
def arch_shared_info(a: Arch) -> CStruct:
    fields: list[FieldSpec] = [
        ("max_pfn", a.ulong), ("pfn_to_mfn_frame_list_list", a.ulong), ("nmi_reason", a.ulong),
        ("p2m_cr3", a.ulong), ("p2m_vaddr", a.ulong), ("p2m_generation", a.ulong),
    ]
    if a is X86_32:  # "no room for this field in the generic structure" on i386
        fields.append(("wc_sec_hi", u32))
    return a.struct("arch_shared_info", fields)


@cache
def shared_info(a: Arch) -> CStruct:
    words = a.ulong_bits  # sizeof(xen_ulong_t) * 8 words of pending and of mask bits
    fields: list[FieldSpec] = [
        ("vcpu_info", vcpu_info(a) * XEN_LEGACY_MAX_VCPUS),
        ("evtchn_pending", a.ulong * words), ("evtchn_mask", a.ulong * words),
        ("wc_version", u32), ("wc_sec", u32), ("wc_nsec", u32),
    ]
    if a is X86_64:
        fields.append(("wc_sec_hi", u32))
    fields.append(("arch", arch_shared_info(a)))
    return a.struct("shared_info", fields)


@cache
def start_info(a: Arch) -> CStruct:
    console = a.union("start_info_console", [
        ("domU", a.struct("start_info_console_domU", [("mfn", a.ulong), ("evtchn", u32)])),
        ("dom0", a.struct("start_info_console_dom0", [("info_off", u32), ("info_size", u32)])),
    ])
    return a.struct("start_info", [
        ("magic", char * 32), ("nr_pages", a.ulong), ("shared_info", a.ulong), ("flags", u32),
        ("store_mfn", a.ulong), ("store_evtchn", u32), ("console", console),
        ("pt_base", a.ulong), ("nr_pt_frames", a.ulong), ("mfn_list", a.ulong),
        ("mod_start", a.ulong), ("mod_len", a.ulong), ("cmd_line", char * MAX_GUEST_CMDLINE),
        ("first_p2m_pfn", a.ulong), ("nr_p2m_frames", a.ulong),
    ])


# --- grant_table.h ------------------------------------------------------------------------------

@cache
def grant_entry_v1(a: Arch) -> CStruct:
    return a.struct("grant_entry_v1", [("flags", u16), ("domid", domid_t), ("frame", u32)])


@cache
def gnttab_map_grant_ref(a: Arch) -> CStruct:
    return a.struct("gnttab_map_grant_ref", [
        ("host_addr", u64), ("flags", u32), ("ref", grant_ref_t), ("dom", domid_t),
        ("status", i16), ("handle", grant_handle_t), ("dev_bus_addr", u64),
    ])


@cache
def gnttab_unmap_grant_ref(a: Arch) -> CStruct:
    return a.struct("gnttab_unmap_grant_ref", [
        ("host_addr", u64), ("dev_bus_addr", u64), ("handle", grant_handle_t), ("status", i16),
    ])


@cache
def gnttab_setup_table(a: Arch) -> CStruct:
    # frame_list is XEN_GUEST_HANDLE(xen_pfn_t): a struct holding one guest pointer.
    return a.struct("gnttab_setup_table", [
        ("dom", domid_t), ("nr_frames", u32), ("status", i16), ("frame_list", a.ulong),
    ])


@cache
def gnttab_transfer(a: Arch) -> CStruct:
    return a.struct("gnttab_transfer", [
        ("mfn", a.ulong), ("domid", domid_t), ("ref", grant_ref_t), ("status", i16),
    ])


@cache
def gnttab_copy_ptr(a: Arch) -> CStruct:
    u = a.union("gnttab_copy_ptr_u", [("ref", grant_ref_t), ("gmfn", a.ulong)])
    return a.struct("gnttab_copy_ptr", [("u", u), ("domid", domid_t), ("offset", u16)])


@cache
def gnttab_copy(a: Arch) -> CStruct:
    return a.struct("gnttab_copy", [
        ("source", gnttab_copy_ptr(a)), ("dest", gnttab_copy_ptr(a)),
        ("len", u16), ("flags", u16), ("status", i16),
    ])


# --- event_channel.h ----------------------------------------------------------------------------

@cache
def evtchn_alloc_unbound(a: Arch) -> CStruct:
    return a.struct("evtchn_alloc_unbound",
                    [("dom", domid_t), ("remote_dom", domid_t), ("port", evtchn_port_t)])


@cache
def evtchn_bind_interdomain(a: Arch) -> CStruct:
    return a.struct("evtchn_bind_interdomain", [
        ("remote_dom", domid_t), ("remote_port", evtchn_port_t), ("local_port", evtchn_port_t),
    ])


@cache
def evtchn_send(a: Arch) -> CStruct:
    return a.struct("evtchn_send", [("port", evtchn_port_t)])


@cache
def evtchn_close(a: Arch) -> CStruct:
    return a.struct("evtchn_close", [("port", evtchn_port_t)])


@cache
def evtchn_unmask(a: Arch) -> CStruct:
    return a.struct("evtchn_unmask", [("port", evtchn_port_t)])


@cache
def evtchn_status(a: Arch) -> CStruct:
    u = a.union("evtchn_status_u", [
        ("unbound", a.struct("evtchn_status_unbound", [("dom", domid_t)])),
        ("interdomain", a.struct("evtchn_status_interdomain",
                                 [("dom", domid_t), ("port", evtchn_port_t)])),
        ("pirq", u32), ("virq", u32),
    ])
    return a.struct("evtchn_status", [
        ("dom", domid_t), ("port", evtchn_port_t), ("status", u32), ("vcpu", u32), ("u", u),
    ])


# --- io/ring.h and the rings of io/blkif.h, io/netif.h ------------------------------------------

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11


@cache
def blkif_request_segment(a: Arch) -> CStruct:
    return a.struct("blkif_request_segment",
                    [("gref", grant_ref_t), ("first_sect", u8), ("last_sect", u8)])


@cache
def blkif_request(a: Arch) -> CStruct:
    return a.struct("blkif_request", [
        ("operation", u8), ("nr_segments", u8), ("handle", u16), ("id", u64),
        ("sector_number", u64),
        ("seg", blkif_request_segment(a) * BLKIF_MAX_SEGMENTS_PER_REQUEST),
    ])


@cache
def blkif_response(a: Arch) -> CStruct:
    return a.struct("blkif_response", [("id", u64), ("operation", u8), ("status", i16)])


@cache
def netif_tx_request(a: Arch) -> CStruct:
    return a.struct("netif_tx_request", [
        ("gref", grant_ref_t), ("offset", u16), ("flags", u16), ("id", u16), ("size", u16),
    ])


@cache
def netif_tx_response(a: Arch) -> CStruct:
    return a.struct("netif_tx_response", [("id", u16), ("status", i16)])


@cache
def netif_rx_request(a: Arch) -> CStruct:
    return a.struct("netif_rx_request", [("id", u16), ("pad", u16), ("gref", grant_ref_t)])


@cache
def netif_rx_response(a: Arch) -> CStruct:
    return a.struct("netif_rx_response",
                    [("id", u16), ("offset", u16), ("flags", u16), ("status", i16)])


def sring_entry(a: Arch, ring: str, req: CStruct, rsp: CStruct) -> CUnion:
    """union NAME_sring_entry: one ring slot holds a request or its response."""
    return a.union(f"{ring}_sring_entry", [("req", req), ("rsp", rsp)])


def sring(a: Arch, ring: str, req: CStruct, rsp: CStruct) -> CStruct:
    """struct NAME_sring as DEFINE_RING_TYPES declares it: four indices, 48 bytes of padding
    (a 4-byte `pvt` union, then `__pad[44]`), then the slots from offset 64 (declared `ring[1]`)."""
    pvt = a.union(f"{ring}_sring_pvt", [
        ("netif", a.struct(f"{ring}_sring_pvt_netif", [("smartpoll_active", u8)])),
        ("tapif_user", a.struct(f"{ring}_sring_pvt_tapif_user", [("msg", u8)])),
        ("pvt_pad", u8 * 4),
    ])
    return a.struct(f"{ring}_sring", [
        ("req_prod", RING_IDX), ("req_event", RING_IDX),
        ("rsp_prod", RING_IDX), ("rsp_event", RING_IDX),
        ("pvt", pvt), ("__pad", u8 * 44), ("ring", sring_entry(a, ring, req, rsp) * 1),
    ])


# The ring.h rings hvmlab uses: name -> (request layout, response layout).
RINGS: dict[str, tuple[Callable[[Arch], CStruct], Callable[[Arch], CStruct]]] = {
    "blkif": (blkif_request, blkif_response),
    "netif_tx": (netif_tx_request, netif_tx_response),
    "netif_rx": (netif_rx_request, netif_rx_response),
}


@cache
def ring_sring(a: Arch, ring: str) -> CStruct:
    req, rsp = RINGS[ring]
    return sring(a, ring, req(a), rsp(a))


@cache
def ring_sring_entry(a: Arch, ring: str) -> CUnion:
    req, rsp = RINGS[ring]
    return sring_entry(a, ring, req(a), rsp(a))


# The shared ring header is the same for every ring and arch (u32 indices, byte padding).
_SRING_HEADER = field_offsets(sring(X86_32, "header", blkif_response(X86_32),
                                    blkif_response(X86_32)))
SRING_REQ_PROD = _SRING_HEADER["req_prod"]
SRING_REQ_EVENT = _SRING_HEADER["req_event"]
SRING_RSP_PROD = _SRING_HEADER["rsp_prod"]
SRING_RSP_EVENT = _SRING_HEADER["rsp_event"]
SRING_RING_OFFSET = _SRING_HEADER["ring"]  # 64: where slot 0 starts


def round_down_pow2(n: int) -> int:
    """__RD32: the largest power of two <= n (0 for 0)."""
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def ring_slots(entry_size: int, page_size: int = PAGE_SIZE) -> int:
    """__CONST_RING_SIZE: how many entries of `entry_size` bytes fit after the header, rounded
    down to a power of two so that an index masks to a slot."""
    if entry_size <= 0:
        raise ValueError(f"ring entry size must be positive, not {entry_size}")
    return round_down_pow2((page_size - SRING_RING_OFFSET) // entry_size)


def ring_size(a: Arch, ring: str, page_size: int = PAGE_SIZE) -> int:
    return ring_slots(ctypes.sizeof(ring_sring_entry(a, ring)), page_size)


# --- io/console.h, io/xs_wire.h -----------------------------------------------------------------

XENSTORE_RING_SIZE = 1024


@cache
def xencons_interface(a: Arch) -> CStruct:
    return a.struct("xencons_interface", [
        ("in", char * 1024), ("out", char * 2048),
        ("in_cons", u32), ("in_prod", u32), ("out_cons", u32), ("out_prod", u32),
    ])


@cache
def xenstore_domain_interface(a: Arch) -> CStruct:
    return a.struct("xenstore_domain_interface", [
        ("req", char * XENSTORE_RING_SIZE), ("rsp", char * XENSTORE_RING_SIZE),
        ("req_cons", u32), ("req_prod", u32), ("rsp_cons", u32), ("rsp_prod", u32),
        ("server_features", u32), ("connection", u32), ("error", u32),
    ])


@cache
def xsd_sockmsg(a: Arch) -> CStruct:
    return a.struct("xsd_sockmsg", [("type", u32), ("req_id", u32), ("tx_id", u32), ("len", u32)])


# --- The catalogue reported by `hvmlab abi` -----------------------------------------------------

@dataclass(frozen=True)
class PvStruct:
    """One C type of Xen's public headers and how to build its ctypes layout for an arch."""

    name: str
    c_type: str
    header: str
    build: Callable[[Arch], CAggregate]
    notes: str = ""


def _ring(ring: str) -> Callable[[Arch], CAggregate]:
    return lambda a: ring_sring(a, ring)


def _entry(ring: str) -> Callable[[Arch], CAggregate]:
    return lambda a: ring_sring_entry(a, ring)


def pv_structs() -> tuple[PvStruct, ...]:
    """Every PV structure hvmlab shares with guests, in header order."""
    xen, gnt, evt = "xen/xen.h", "xen/grant_table.h", "xen/event_channel.h"
    blk, net = "xen/io/blkif.h", "xen/io/netif.h"
    ring_note = ("declared with one slot (ring[1]); the header pads to 64 bytes and "
                 "RING_SIZE slots fill the page")
    return (
        PvStruct("start_info", "struct start_info", xen, start_info,
                 "magic \"xen-3.0-x86_32p\" on 32-bit PAE guests, \"xen-3.0-x86_64\" on 64-bit"),
        PvStruct("shared_info", "struct shared_info", xen, shared_info,
                 "2-level event channels: one pending and one mask bit per port"),
        PvStruct("vcpu_info", "struct vcpu_info", xen, vcpu_info),
        PvStruct("vcpu_time_info", "struct vcpu_time_info", xen, vcpu_time_info),
        PvStruct("grant_entry_v1", "struct grant_entry_v1", gnt, grant_entry_v1),
        PvStruct("gnttab_map_grant_ref", "struct gnttab_map_grant_ref", gnt,
                 gnttab_map_grant_ref),
        PvStruct("gnttab_unmap_grant_ref", "struct gnttab_unmap_grant_ref", gnt,
                 gnttab_unmap_grant_ref),
        PvStruct("gnttab_setup_table", "struct gnttab_setup_table", gnt, gnttab_setup_table),
        PvStruct("gnttab_transfer", "struct gnttab_transfer", gnt, gnttab_transfer),
        PvStruct("gnttab_copy", "struct gnttab_copy", gnt, gnttab_copy),
        PvStruct("evtchn_alloc_unbound", "struct evtchn_alloc_unbound", evt,
                 evtchn_alloc_unbound),
        PvStruct("evtchn_bind_interdomain", "struct evtchn_bind_interdomain", evt,
                 evtchn_bind_interdomain),
        PvStruct("evtchn_close", "struct evtchn_close", evt, evtchn_close),
        PvStruct("evtchn_send", "struct evtchn_send", evt, evtchn_send),
        PvStruct("evtchn_status", "struct evtchn_status", evt, evtchn_status),
        PvStruct("evtchn_unmask", "struct evtchn_unmask", evt, evtchn_unmask),
        PvStruct("blkif_request", "struct blkif_request", blk, blkif_request),
        PvStruct("blkif_response", "struct blkif_response", blk, blkif_response),
        PvStruct("blkif_sring_entry", "union blkif_sring_entry", blk, _entry("blkif")),
        PvStruct("blkif_sring", "struct blkif_sring", blk, _ring("blkif"), ring_note),
        PvStruct("netif_tx_request", "struct netif_tx_request", net, netif_tx_request),
        PvStruct("netif_tx_response", "struct netif_tx_response", net, netif_tx_response),
        PvStruct("netif_rx_request", "struct netif_rx_request", net, netif_rx_request),
        PvStruct("netif_rx_response", "struct netif_rx_response", net, netif_rx_response),
        PvStruct("netif_tx_sring_entry", "union netif_tx_sring_entry", net,
                 _entry("netif_tx")),
        PvStruct("netif_tx_sring", "struct netif_tx_sring", net, _ring("netif_tx"), ring_note),
        PvStruct("netif_rx_sring_entry", "union netif_rx_sring_entry", net,
                 _entry("netif_rx")),
        PvStruct("netif_rx_sring", "struct netif_rx_sring", net, _ring("netif_rx"), ring_note),
        PvStruct("xencons_interface", "struct xencons_interface", "xen/io/console.h",
                 xencons_interface, "two byte rings (in 1024, out 2048), not an io/ring.h ring"),
        PvStruct("xenstore_domain_interface", "struct xenstore_domain_interface",
                 "xen/io/xs_wire.h", xenstore_domain_interface,
                 f"two {XENSTORE_RING_SIZE}-byte rings of xsd_sockmsg + payload"),
        PvStruct("xsd_sockmsg", "struct xsd_sockmsg", "xen/io/xs_wire.h", xsd_sockmsg),
    )
