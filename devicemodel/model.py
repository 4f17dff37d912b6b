"""The device model's dispatch: an ioreq (PIO, COPY, PCI_CONFIG; one value or a guest buffer) to the device that owns it (Xen public/hvm/ioreq.h; QEMU hw/xen's handle_ioreq)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from hvm.ioreq import IOREQ_READ, IOREQ_TYPE_COPY, IOREQ_TYPE_PCI_CONFIG, IOREQ_TYPE_PIO, IoReq

from .bus import Bus, Device
from .pci import PciBus
from .server import GuestMemoryView


@dataclass(frozen=True)
class BlockPort:
    """A data port whose string I/O the device can serve in one go (IDE data, NE2000 remote DMA)."""

    read_block: Callable[[int], bytes]
    write_block: Callable[[bytes], None]


class DeviceModel:
    """Everything the device-model thread emulates, reached only through ioreqs.

    Devices stay pure state machines on buses; this class turns each ioreq into bus accesses
    and, for string I/O (data_is_ptr), reads or writes the guest's buffer directly in guest
    memory, as QEMU does through its map cache.
    """

    def __init__(self, pci: PciBus | None = None) -> None:
        self.pio = Bus("device-model-pio", 16)
        self.mmio = Bus("device-model-mmio", 64)
        self.pci = pci
        self._blocks: dict[int, BlockPort] = {}
        self.ioreqs: collections.Counter[str] = collections.Counter()  # by type name
        self.bytes_copied = 0
        self.last_target = ""  # the device the last ioreq reached (for `hvmlab explain`)

    def map_pio(self, base: int, length: int, device: Device, name: str) -> None:
        self.pio.map(base, length, device, name)

    def map_mmio(self, base: int, length: int, device: Device, name: str) -> None:
        self.mmio.map(base, length, device, name)

    def map_block_port(self, port: int, block: BlockPort) -> None:
        self._blocks[port] = block

    # -- the DirectIoreqHandler protocol ----------------------------------------------------------
    def handle(self, req: IoReq, mem: GuestMemoryView) -> int:
        if not req.data_is_ptr:
            return self.access(req.type, req.addr, req.size, req.dir, req.data)
        bus = self._bus_for(req.type)
        if bus is None:
            return 0
        hit = bus.find(req.addr)
        self.last_target = hit[2] if hit is not None else "unassigned"
        self._string(bus, req, mem)
        return 0

    def access(self, type_: int, addr: int, size: int, dir_: int, data: int) -> int:
        """An ioreq with one value (data_is_ptr = 0), as its fields."""
        if type_ == IOREQ_TYPE_PCI_CONFIG:
            self.ioreqs["pci_config"] += 1
            return self._pci_config(addr, size, dir_, data)
        bus = self._bus_for(type_)
        if bus is None:
            return 0
        value, self.last_target = bus.access(addr, size, dir_ == IOREQ_READ, data)
        return value

    def _bus_for(self, type_: int) -> Bus | None:
        """The bus an ioreq type addresses, counting it (PCI_CONFIG is not on a bus)."""
        if type_ == IOREQ_TYPE_PIO:
            self.ioreqs["pio"] += 1
            return self.pio
        if type_ == IOREQ_TYPE_COPY:
            self.ioreqs["copy"] += 1
            return self.mmio
        self.ioreqs["pci_config" if type_ == IOREQ_TYPE_PCI_CONFIG else "other"] += 1
        return None

    def _pci_config(self, addr: int, size: int, dir_: int, data: int) -> int:
        self.last_target = "pci-config-space"
        if self.pci is None:
            return (1 << (8 * size)) - 1 if dir_ == IOREQ_READ else 0
        sbdf, reg = addr >> 32, addr & 0xFFFF_FFFF
        if dir_ == IOREQ_READ:
            return self.pci.config_read(sbdf, reg, size)
        self.pci.config_write(sbdf, reg, size, data)
        return 0

    def _string(self, bus: Bus, req: IoReq, mem: GuestMemoryView) -> None:
        """REP INS/OUTS (or REP MOVS to MMIO): `count` elements between the device and the
        guest buffer at `data`, stepping backwards when df. A PIO data port with a block path
        moves the whole buffer in one call; others take the elements one by one."""
        size, count = req.size, req.count
        block = self._blocks.get(req.addr) if req.type == IOREQ_TYPE_PIO else None
        nbytes = size * count
        self.bytes_copied += nbytes
        if not count:
            return
        if req.dir == IOREQ_READ:  # device -> guest memory (INS)
            if block is not None:
                data = block.read_block(nbytes)
            else:
                data = b"".join(bus.read(req.addr, size).to_bytes(size, "little") for _ in range(count))
            if not req.df:
                mem.write(req.data, data)
            else:
                for addr, i in zip(req.element_addrs(), range(0, nbytes, size), strict=True):
                    mem.write(addr, data[i:i + size])
            return
        # guest memory -> device (OUTS)
        if not req.df:
            data = mem.read(req.data, nbytes)
        else:
            data = b"".join(mem.read(addr, size) for addr in req.element_addrs())
        if block is not None:
            block.write_block(data)
            return
        for i in range(0, nbytes, size):
            bus.write(req.addr, size, int.from_bytes(data[i:i + size], "little"))

    # -- what a user is shown ---------------------------------------------------------------------
    def accesses(self) -> dict[str, int]:
        counts = collections.Counter(self.pio.accesses)
        counts.update(self.mmio.accesses)
        return dict(counts)
