"""VM-execution controls that decide what exits: the processor-based controls and I/O bitmaps A/B (Intel SDM Vol. 3C 25.6.2, 25.6.4)."""

from __future__ import annotations

from dataclasses import dataclass

from . import vmcs as V

IO_BITMAP_A_BASE = 0x0000  # bitmap A: ports 0000-7FFF, bitmap B: ports 8000-FFFF, one bit per port


class IoBitmaps:
    """The two 4 KiB I/O bitmaps. A set bit makes an access to that port exit."""

    def __init__(self, all_exit: bool = True) -> None:
        fill = 0xFF if all_exit else 0x00
        self.a = bytearray([fill]) * 4096
        self.b = bytearray([fill]) * 4096

    def _locate(self, port: int) -> tuple[bytearray, int, int]:
        bitmap = self.a if port < 0x8000 else self.b
        index = port & 0x7FFF
        return bitmap, index >> 3, 1 << (index & 7)

    def set_exit(self, port: int, exits: bool) -> None:
        bitmap, byte, bit = self._locate(port)
        if exits:
            bitmap[byte] |= bit
        else:
            bitmap[byte] &= ~bit & 0xFF

    def exits(self, port: int, size: int = 1) -> bool:
        """SDM 25.6.4: the access exits if the bit of ANY port it touches is set; an access that
        wraps past 0xFFFF exits too."""
        if port + size > 0x10000:
            return True
        for p in range(port, port + size):
            bitmap, byte, bit = self._locate(p)
            if bitmap[byte] & bit:
                return True
        return False


def parse_ports(text: str) -> list[int]:
    """'0x80,0x3F8-0x3FF,0x1F0' -> list of ports; ValueError with a one-line reason."""
    ports: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, _, hi_text = part.partition("-")
        lo = int(lo_text, 0)
        hi = int(hi_text, 0) if hi_text else lo
        if not 0 <= lo <= hi <= 0xFFFF:
            raise ValueError(f"bad port range {part!r} (ports are 0-0xFFFF)")
        ports.extend(range(lo, hi + 1))
    return ports


@dataclass
class ExecutionControls:
    """The controls hvmlab's hypervisor sets for a guest (mirrored into the VMCS)."""

    use_io_bitmaps: bool = True
    unconditional_io_exiting: bool = False
    hlt_exiting: bool = True
    rdtsc_exiting: bool = False
    interrupt_window_exiting: bool = False
    exception_bitmap: int = 0xFFFF_FFFF  # every guest fault exits, so the trace shows it
    io_bitmaps: IoBitmaps | None = None

    def __post_init__(self) -> None:
        if self.io_bitmaps is None:
            self.io_bitmaps = IoBitmaps(all_exit=True)

    def primary(self) -> int:
        value = 0
        if self.interrupt_window_exiting:
            value |= V.CPU_INTR_WINDOW_EXITING
        if self.hlt_exiting:
            value |= V.CPU_HLT_EXITING
        if self.rdtsc_exiting:
            value |= V.CPU_RDTSC_EXITING
        if self.unconditional_io_exiting:
            value |= V.CPU_UNCOND_IO_EXITING
        if self.use_io_bitmaps:
            value |= V.CPU_USE_IO_BITMAPS
        return value | V.CPU_ACTIVATE_SECONDARY_CONTROLS

    def io_exits(self, port: int, size: int) -> bool:
        """SDM 25.6.2: with 'use I/O bitmaps' set the bitmaps decide and the unconditional control
        is ignored; otherwise unconditional I/O exiting decides."""
        if self.use_io_bitmaps:
            assert self.io_bitmaps is not None
            return self.io_bitmaps.exits(port, size)
        return self.unconditional_io_exiting

    def write_to(self, vmcs: V.Vmcs, io_bitmap_a_gpa: int = 0, io_bitmap_b_gpa: int = 0) -> None:
        vmcs.vmwrite(V.CPU_BASED_VM_EXEC_CONTROL, self.primary())
        vmcs.vmwrite(V.SECONDARY_VM_EXEC_CONTROL, V.SECONDARY_ENABLE_EPT | V.SECONDARY_UNRESTRICTED_GUEST)
        vmcs.vmwrite(V.PIN_BASED_VM_EXEC_CONTROL, V.PIN_EXTERNAL_INTERRUPT_EXITING | V.PIN_NMI_EXITING)
        vmcs.vmwrite(V.EXCEPTION_BITMAP, self.exception_bitmap)
        vmcs.vmwrite(V.IO_BITMAP_A, io_bitmap_a_gpa)
        vmcs.vmwrite(V.IO_BITMAP_B, io_bitmap_b_gpa)
