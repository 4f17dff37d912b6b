"""start_info and shared_info of a PV guest, with the 2-level event-channel bits (Xen public/xen.h, common/event_2l.c)."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, fields
from typing import Literal

from pv.layouts import (
    MAX_GUEST_CMDLINE,
    PAGE_SIZE,
    XEN_LEGACY_MAX_VCPUS,
    Arch,
    arch_named,
    field_offsets,
    shared_info,
    start_info,
    vcpu_info,
)

# start_info.flags (SIF_*)
SIF_PRIVILEGED = 1 << 0
SIF_INITDOMAIN = 1 << 1
SIF_MULTIBOOT_MOD = 1 << 2
SIF_MOD_START_PFN = 1 << 3
SIF_VIRT_P2M_4TOOLS = 1 << 4

# "xen-<version>-<platform>": 32-bit guests run PAE ("p"), the only 32-bit mode Xen has left.
START_INFO_MAGIC = {"x86_32": b"xen-3.0-x86_32p", "x86_64": b"xen-3.0-x86_64"}


@dataclass
class StartInfo:
    """The page a PV guest finds at boot (ESI on x86_32): its memory, shared_info and the
    xenstore and console rings with their event channels."""

    nr_pages: int
    shared_info: int  # machine address of the shared_info page
    flags: int = 0
    store_mfn: int = 0
    store_evtchn: int = 0
    console_mfn: int = 0  # console.domU.mfn
    console_evtchn: int = 0  # console.domU.evtchn
    pt_base: int = 0
    nr_pt_frames: int = 0
    mfn_list: int = 0
    mod_start: int = 0
    mod_len: int = 0
    cmd_line: bytes = b""
    first_p2m_pfn: int = 0
    nr_p2m_frames: int = 0
    magic: bytes = b""  # empty: the arch's START_INFO_MAGIC

    def pack(self, arch: str = "x86_32") -> bytes:
        """The struct start_info bytes for a guest of `arch` (1112 bytes on x86_32)."""
        a = arch_named(arch)
        s = start_info(a)()
        magic = self.magic or START_INFO_MAGIC[a.name]
        if len(magic) >= type(s).magic.size:
            raise ValueError(f"start_info magic {magic!r} does not fit with its NUL")
        if len(self.cmd_line) >= MAX_GUEST_CMDLINE:
            raise ValueError(f"command line of {len(self.cmd_line)} bytes: at most "
                             f"{MAX_GUEST_CMDLINE - 1} fit with the NUL")
        s.magic = magic
        s.cmd_line = self.cmd_line
        for f in fields(self):
            if f.name in ("magic", "cmd_line"):
                continue
            value = getattr(self, f.name)
            target, member = (s.console.domU, f.name.split("_", 1)[1]) \
                if f.name.startswith("console_") else (s, f.name)
            width = 8 * getattr(type(target), member).size
            if not 0 <= value < 1 << width:
                raise ValueError(f"start_info.{f.name} = {value:#x} does not fit in {width} bits")
            setattr(target, member, value)
        return bytes(s)

    @classmethod
    def unpack(cls, data: bytes, arch: str = "x86_32") -> StartInfo:
        s = start_info(arch_named(arch)).from_buffer_copy(data)
        values = {f.name: getattr(s, f.name) for f in fields(cls)
                  if not f.name.startswith("console_")}
        return cls(**values, console_mfn=s.console.domU.mfn,
                   console_evtchn=s.console.domU.evtchn)


class SharedInfo:
    """A domain's shared_info page and the 2-level event-channel ABI on it.

    Ports are bits: evtchn_pending[port / BITS] bit (port % BITS), the same in evtchn_mask,
    BITS being the guest's word size. A 0->1 pending transition on an unmasked port sets the
    word's bit in the notified vCPU's evtchn_pending_sel and raises its evtchn_upcall_pending;
    the guest scans selector, then words, then bits.

    Words are read and written whole through native casts. Xen uses locked bit operations on
    this page while the guest runs; here each update is a Python read-modify-write, so an
    update must not race a guest writing the same word (call it while the vCPU is stopped,
    e.g. at an exit, or accept a rare lost bit).
    """

    def __init__(self, view: memoryview, arch: str = "x86_32") -> None:
        if sys.byteorder != "little":  # pragma: no cover
            raise ValueError("shared_info needs a little-endian host")
        self.arch: Arch = arch_named(arch)
        layout = shared_info(self.arch)
        if view.nbytes < PAGE_SIZE:
            raise ValueError(f"shared_info needs a {PAGE_SIZE}-byte page, got {view.nbytes}")
        self.view = view[:PAGE_SIZE]
        self.bits_per_word = self.arch.ulong_bits
        self.nr_ports = self.bits_per_word * self.bits_per_word  # 1024 on x86_32, 4096 on x86_64
        offsets = field_offsets(layout)
        word = ctypes.sizeof(self.arch.ulong)
        code: Literal["I", "Q"] = "I" if word == 4 else "Q"
        span = self.bits_per_word * word
        self._pending = self.view[offsets["evtchn_pending"]:offsets["evtchn_pending"] + span].cast(code)
        self._mask = self.view[offsets["evtchn_mask"]:offsets["evtchn_mask"] + span].cast(code)
        vcpu = field_offsets(vcpu_info(self.arch))
        self._vcpu_size = ctypes.sizeof(vcpu_info(self.arch))
        self._vcpu_base = offsets["vcpu_info"]
        self._upcall_pending = vcpu["evtchn_upcall_pending"]
        self._upcall_mask = vcpu["evtchn_upcall_mask"]
        self._sel = [self._vcpu_view(v, vcpu["evtchn_pending_sel"], word).cast(code)
                     for v in range(XEN_LEGACY_MAX_VCPUS)]

    def _vcpu_view(self, v: int, offset: int, size: int) -> memoryview:
        start = self._vcpu_base + v * self._vcpu_size + offset
        return self.view[start:start + size]

    def _split(self, port: int) -> tuple[int, int]:
        if not 0 <= port < self.nr_ports:
            raise ValueError(f"port {port} is outside the 2-level ABI's {self.nr_ports} ports")
        return divmod(port, self.bits_per_word)

    @staticmethod
    def _check_vcpu(vcpu: int) -> None:
        if not 0 <= vcpu < XEN_LEGACY_MAX_VCPUS:
            raise ValueError(f"vcpu {vcpu} has no vcpu_info in shared_info")

    # -- per-vCPU flags ------------------------------------------------------------------------
    def upcall_pending(self, vcpu: int = 0) -> bool:
        self._check_vcpu(vcpu)
        return bool(self.view[self._vcpu_base + vcpu * self._vcpu_size + self._upcall_pending])

    def upcall_mask(self, vcpu: int = 0) -> bool:
        self._check_vcpu(vcpu)
        return bool(self.view[self._vcpu_base + vcpu * self._vcpu_size + self._upcall_mask])

    def set_upcall_mask(self, vcpu: int, masked: bool) -> None:
        self._check_vcpu(vcpu)
        self.view[self._vcpu_base + vcpu * self._vcpu_size + self._upcall_mask] = int(masked)

    def pending_sel(self, vcpu: int = 0) -> int:
        self._check_vcpu(vcpu)
        return self._sel[vcpu][0]

    def upcall_deliverable(self, vcpu: int = 0) -> bool:
        """An upcall is pending and the vCPU has not masked upcalls."""
        return self.upcall_pending(vcpu) and not self.upcall_mask(vcpu)

    def _mark_events_pending(self, vcpu: int) -> bool:
        """vcpu_mark_events_pending: raise evtchn_upcall_pending; True if it was clear (the
        moment Xen kicks the vCPU)."""
        at = self._vcpu_base + vcpu * self._vcpu_size + self._upcall_pending
        if self.view[at]:
            return False
        self.view[at] = 1
        return True

    def _set_sel_bit(self, vcpu: int, word: int) -> bool:
        """Set selector bit `word`; True if it was clear."""
        sel = self._sel[vcpu]
        if sel[0] >> word & 1:
            return False
        sel[0] |= 1 << word
        return True

    # -- per-port bits -------------------------------------------------------------------------
    def is_pending(self, port: int) -> bool:
        word, bit = self._split(port)
        return bool(self._pending[word] >> bit & 1)

    def is_masked(self, port: int) -> bool:
        word, bit = self._split(port)
        return bool(self._mask[word] >> bit & 1)

    def set_pending(self, port: int, vcpu: int = 0) -> bool:
        """evtchn_2l_set_pending; True if the vCPU must be kicked for an upcall.

        Order as in Xen: the pending bit first (already set: nothing more, the guest has not
        handled the last event yet); then, only if the port is unmasked and its selector bit
        was clear, the selector bit and evtchn_upcall_pending. A masked port stays pending
        with no upcall: unmask() delivers it later.
        """
        self._check_vcpu(vcpu)
        word, bit = self._split(port)
        if self._pending[word] >> bit & 1:
            return False
        self._pending[word] |= 1 << bit
        if self._mask[word] >> bit & 1:
            return False
        if not self._set_sel_bit(vcpu, word):
            return False
        return self._mark_events_pending(vcpu)

    def clear_pending(self, port: int) -> None:
        word, bit = self._split(port)
        self._pending[word] &= ~(1 << bit)

    def mask(self, port: int) -> None:
        word, bit = self._split(port)
        self._mask[word] |= 1 << bit

    def unmask(self, port: int, vcpu: int = 0) -> bool:
        """evtchn_2l_unmask; True if the vCPU must be kicked: an event that arrived while the
        port was masked raised no upcall, so unmasking a pending port raises it now."""
        self._check_vcpu(vcpu)
        word, bit = self._split(port)
        if not self._mask[word] >> bit & 1:
            return False
        self._mask[word] &= ~(1 << bit)
        if not self._pending[word] >> bit & 1:
            return False
        if not self._set_sel_bit(vcpu, word):
            return False
        return self._mark_events_pending(vcpu)

    # -- what the guest's upcall handler does, for Dom0-side tests -----------------------------
    def pending_ports(self, vcpu: int = 0) -> list[int]:
        """Scan as a guest's evtchn_do_upcall does and acknowledge what it finds.

        Clear evtchn_upcall_pending first (an event arriving during the scan raises it again),
        take the selector whole (swap with 0), then for each selected word the pending and
        unmasked bits, clearing each pending bit as its port is handled.
        """
        self._check_vcpu(vcpu)
        self.view[self._vcpu_base + vcpu * self._vcpu_size + self._upcall_pending] = 0
        sel = self._sel[vcpu][0]
        self._sel[vcpu][0] = 0
        ports: list[int] = []
        for word in range(self.bits_per_word):
            if not sel >> word & 1:
                continue
            ready = self._pending[word] & ~self._mask[word]
            for bit in range(self.bits_per_word):
                if ready >> bit & 1:
                    self._pending[word] &= ~(1 << bit)
                    ports.append(word * self.bits_per_word + bit)
        return ports
