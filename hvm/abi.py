"""Struct layouts for `hvmlab abi --json`, from the formats the code packs with (Xen headers)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hvm import bufioreq, ioreq
from pv.abi_pv import pv_layouts

ALL_X86 = ("x86_32", "x86_64")


@dataclass(frozen=True)
class StructLayout:
    """One C struct as our code lays it out.

    fields: C member designator -> byte offset (what offsetof() gives).
    bits: bitfield member -> (bit offset from the start of the struct, width), counting bits
    little-endian (bit 0 = lowest bit of byte 0), as gcc allocates them on x86.
    arches: the ABIs on which this layout holds.
    """

    name: str
    c_type: str
    header: str
    size: int
    fields: Mapping[str, int]
    bits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    arches: tuple[str, ...] = ALL_X86
    notes: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "fields": dict(self.fields)}
        if self.bits:
            out["bits"] = {name: list(pos) for name, pos in self.bits.items()}
        out["header"] = self.header
        out["arches"] = list(self.arches)
        if self.notes:
            out["notes"] = self.notes
        return out


LayoutProvider = Callable[[], Iterable[StructLayout]]


class AbiRegistry:
    """The layouts to report, gathered by calling providers (nothing is filled at import)."""

    def __init__(self) -> None:
        self._providers: list[LayoutProvider] = []

    def add(self, provider: LayoutProvider) -> None:
        self._providers.append(provider)

    def layouts(self) -> list[StructLayout]:
        out: list[StructLayout] = []
        seen: set[str] = set()
        for provider in self._providers:
            for layout in provider():
                if layout.name in seen:
                    raise ValueError(f"two layouts named {layout.name!r}")
                seen.add(layout.name)
                out.append(layout)
        return out

    def facts(self) -> dict[str, dict[str, Any]]:
        return {layout.name: layout.as_json() for layout in self.layouts()}


def hvm_ioreq_layouts() -> list[StructLayout]:
    """public/hvm/ioreq.h: ioreq, shared_iopage, buf_ioreq, buffered_iopage."""
    header = "xen/hvm/ioreq.h"
    flags_bit = 8 * ioreq.IOREQ_FLAGS_OFFSET
    return [
        StructLayout(
            name="ioreq", c_type="struct ioreq", header=header, size=ioreq.IOREQ_SIZE,
            fields=dict(ioreq.IOREQ_OFFSETS),
            bits={name: (flags_bit + shift, width)
                  for name, (shift, width) in ioreq.IOREQ_FLAG_BITS.items()},
        ),
        StructLayout(
            name="shared_iopage", c_type="struct shared_iopage", header=header,
            size=ioreq.IOREQ_SIZE,
            fields={"vcpu_ioreq": ioreq.SHARED_IOPAGE_VCPU_IOREQ_OFFSET},
            notes=f"declared with one slot; one {ioreq.IOREQ_SIZE}-byte ioreq per vCPU fills "
                  f"the page ({ioreq.MAX_VCPUS} slots)",
        ),
        StructLayout(
            name="buf_ioreq", c_type="struct buf_ioreq", header=header,
            size=bufioreq.BUF_IOREQ_SIZE, fields=dict(bufioreq.BUF_IOREQ_OFFSETS),
            bits={name: pos for name, pos in bufioreq.BUF_IOREQ_BITS.items() if name != "type"},
            notes="size: 0=>1, 1=>2, 2=>4, 3=>8 bytes; an 8-byte write takes two slots, "
                  "the second carrying the high 32 bits",
        ),
        StructLayout(
            name="buffered_iopage", c_type="struct buffered_iopage", header=header,
            size=bufioreq.BUFFERED_IOPAGE_SIZE, fields=dict(bufioreq.BUFFERED_IOPAGE_OFFSETS),
            notes=f"{bufioreq.IOREQ_BUFFER_SLOT_NUM} slots; inside Xen the two pointers are a "
                  "union with a u64 (ptrs.full) so both move in one store",
        ),
    ]


def default_registry() -> AbiRegistry:
    """Every layout hvmlab reports. pv/ modules add their providers here."""
    registry = AbiRegistry()
    registry.add(hvm_ioreq_layouts)
    registry.add(pv_layouts)
    return registry


def abi_facts() -> dict[str, dict[str, Any]]:
    """struct name -> {"size", "fields": {member: offset}, "bits"?, "header", "arches"}."""
    return default_registry().facts()
