"""ctypes layouts of the hypercall argument structs pv/layouts.py lacks, x86_32 and x86_64 (Xen public/sched.h, memory.h, grant_table.h, version.h)."""

from __future__ import annotations

from functools import cache

from pv.layouts import Arch, CStruct, char, domid_t, i16, u32, u64

XEN_EXTRAVERSION_LEN = 16
XEN_CAPABILITIES_INFO_LEN = 1024
XEN_CHANGESET_INFO_LEN = 64
XEN_DOMAIN_HANDLE_LEN = 16


@cache
def sched_shutdown(a: Arch) -> CStruct:
    return a.struct("sched_shutdown", [("reason", u32)])


@cache
def sched_poll(a: Arch) -> CStruct:
    # ports is XEN_GUEST_HANDLE(evtchn_port_t): one guest pointer (4 bytes on x86_32);
    # timeout is a u64 that i386 aligns to 4, so the struct is 16 bytes there.
    return a.struct("sched_poll", [("ports", a.ulong), ("nr_ports", u32), ("timeout", u64)])


@cache
def gnttab_query_size(a: Arch) -> CStruct:
    return a.struct("gnttab_query_size", [
        ("dom", domid_t), ("nr_frames", u32), ("max_nr_frames", u32), ("status", i16),
    ])


@cache
def xen_memory_reservation(a: Arch) -> CStruct:
    # extent_start is XEN_GUEST_HANDLE(xen_pfn_t); mem_flags is the old address_bits.
    return a.struct("xen_memory_reservation", [
        ("extent_start", a.ulong), ("nr_extents", a.ulong), ("extent_order", u32),
        ("mem_flags", u32), ("domid", domid_t),
    ])


@cache
def xen_feature_info(a: Arch) -> CStruct:
    return a.struct("xen_feature_info", [("submap_idx", u32), ("submap", u32)])


@cache
def xen_compile_info(a: Arch) -> CStruct:
    return a.struct("xen_compile_info", [
        ("compiler", char * 64), ("compile_by", char * 16), ("compile_domain", char * 32),
        ("compile_date", char * 32),
    ])


@cache
def xen_platform_parameters(a: Arch) -> CStruct:
    return a.struct("xen_platform_parameters", [("virt_start", a.ulong)])


# name -> (C type, header, builder): for an ABI check against libxen-dev (see tests).
HYPERCALL_STRUCTS = {
    "sched_shutdown": ("struct sched_shutdown", "xen/sched.h", sched_shutdown),
    "sched_poll": ("struct sched_poll", "xen/sched.h", sched_poll),
    "gnttab_query_size": ("struct gnttab_query_size", "xen/grant_table.h", gnttab_query_size),
    "xen_memory_reservation": ("struct xen_memory_reservation", "xen/memory.h",
                               xen_memory_reservation),
    "xen_feature_info": ("xen_feature_info_t", "xen/version.h", xen_feature_info),
    "xen_compile_info": ("xen_compile_info_t", "xen/version.h", xen_compile_info),
    "xen_platform_parameters": ("xen_platform_parameters_t", "xen/version.h",
                                xen_platform_parameters),
}
