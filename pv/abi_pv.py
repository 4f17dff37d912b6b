"""The PV structure layouts for hvm.abi's registry (Xen public headers: xen.h, grant_table.h, event_channel.h, io/*.h)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from pv.layouts import X86_32, X86_64, field_offsets, pv_structs

# hvmlab's PV guests are 32-bit (int 0x82 hypercalls, "xen-3.0-x86_32p"): where the two ABIs
# differ, the x86_32 layout keeps the plain C name and the x86_64 one gets this suffix.
X86_64_SUFFIX = "@x86_64"

if TYPE_CHECKING:
    from hvm.abi import StructLayout


def pv_layouts() -> list[StructLayout]:
    """One StructLayout per PV structure and ABI: shared when x86_32 and x86_64 agree."""
    from hvm.abi import StructLayout  # here, not at the top: hvm.abi imports this module

    out: list[StructLayout] = []
    for spec in pv_structs():
        per_arch: dict[str, tuple[int, dict[str, int]]] = {}
        for arch in (X86_32, X86_64):
            cls = spec.build(arch)
            per_arch[arch.name] = (ctypes.sizeof(cls), field_offsets(cls))
        size32, fields32 = per_arch[X86_32.name]
        size64, fields64 = per_arch[X86_64.name]
        if (size32, fields32) == (size64, fields64):
            out.append(StructLayout(name=spec.name, c_type=spec.c_type, header=spec.header,
                                    size=size32, fields=fields32, notes=spec.notes))
            continue
        out.append(StructLayout(name=spec.name, c_type=spec.c_type, header=spec.header,
                                size=size32, fields=fields32, arches=(X86_32.name,),
                                notes=spec.notes))
        out.append(StructLayout(name=spec.name + X86_64_SUFFIX, c_type=spec.c_type,
                                header=spec.header, size=size64, fields=fields64,
                                arches=(X86_64.name,), notes=spec.notes))
    return out

