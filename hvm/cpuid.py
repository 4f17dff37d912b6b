"""The CPUID a guest sees: a defined CPU model plus Xen's hypervisor leaves at 0x40000000 (Intel SDM Vol. 2A CPUID; Xen public/arch-x86/cpuid.h)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

XEN_CPUID_SIGNATURE = b"XenVMMXenVMM"  # what Xen puts in EBX, ECX, EDX of leaf 0x40000000
HYPERVISOR_BASE = 0x4000_0000


def _regs(text: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(text) // 4}I", text)


@dataclass(frozen=True)
class CpuModel:
    """The leaves of one model; leaves not listed behave as Intel documents for out-of-range leaves."""

    name: str
    leaves: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)
    max_basic: int = 0
    max_extended: int = 0x8000_0000
    xen_version: tuple[int, int] = (4, 17)

    def query(self, leaf: int, subleaf: int = 0) -> tuple[int, ...]:
        """EAX, EBX, ECX, EDX for CPUID(leaf, subleaf)."""
        if HYPERVISOR_BASE <= leaf <= HYPERVISOR_BASE + 0xFF:
            return self._hypervisor(leaf - HYPERVISOR_BASE)
        if leaf >= 0x8000_0000:
            if leaf > self.max_extended:
                leaf = self.max_basic  # Intel: beyond the highest leaf, the highest basic leaf's data
            else:
                return self.leaves.get((leaf, 0), (0, 0, 0, 0))
        if leaf > self.max_basic:
            leaf = self.max_basic
        return self.leaves.get((leaf, subleaf), self.leaves.get((leaf, 0), (0, 0, 0, 0)))

    def _hypervisor(self, index: int) -> tuple[int, ...]:
        ebx, ecx, edx = _regs(XEN_CPUID_SIGNATURE)
        major, minor = self.xen_version
        if index == 0:
            return (HYPERVISOR_BASE + 2, ebx, ecx, edx)  # max hypervisor leaf, signature
        if index == 1:
            return ((major << 16) | minor, 0, 0, 0)      # Xen version
        if index == 2:
            return (1, HYPERVISOR_BASE, 0, 0)            # one hypercall page, via MSR 0x40000000
        return (0, 0, 0, 0)


def hvmlab_cpu() -> CpuModel:
    """A plain Intel family 6 CPU with what Unicorn's TCG really executes (SSE2, CMOV, PAE, LM)."""
    vendor = _regs(b"GenuineIntel")
    brand = b"hvmlab virtual CPU (Unicorn TCG)".ljust(48, b"\0")
    b = _regs(brand)
    fpu, tsc, msr, pae, cx8, sep, pge, cmov, pat, clfsh, mmx, fxsr, sse, sse2 = (
        1 << 0, 1 << 4, 1 << 5, 1 << 6, 1 << 8, 1 << 11, 1 << 13, 1 << 15, 1 << 16, 1 << 19,
        1 << 23, 1 << 24, 1 << 25, 1 << 26)
    sse3, cx16, hypervisor = 1 << 0, 1 << 13, 1 << 31
    leaves: dict[tuple[int, int], tuple[int, ...]] = {
        (0, 0): (0xD, vendor[0], vendor[2], vendor[1]),  # max basic leaf, "Genu" "ntel" "ineI"
        # family 6, model 0x3A (Ivy Bridge), stepping 9; CLFLUSH line 8*8 bytes, 1 logical CPU
        (1, 0): (0x000306A9, 0x00010800, sse3 | cx16 | hypervisor,
                 fpu | tsc | msr | pae | cx8 | sep | pge | cmov | pat | clfsh | mmx | fxsr | sse | sse2),
        (0x8000_0000, 0): (0x8000_0008, 0, 0, 0),
        (0x8000_0001, 0): (0, 0, 1 << 0, (1 << 11) | (1 << 20) | (1 << 29)),  # LAHF; SYSCALL, NX, LM
        (0x8000_0002, 0): b[0:4],
        (0x8000_0003, 0): b[4:8],
        (0x8000_0004, 0): b[8:12],
        (0x8000_0008, 0): (0x0000_3027, 0, 0, 0),  # 39-bit physical, 48-bit linear addresses
    }
    return CpuModel("hvmlab-ivybridge", leaves, max_basic=0xD, max_extended=0x8000_0008)
