"""Where a port or MMIO access goes: a device the hypervisor emulates, an ioreq to the device model (sync or buffered), or nowhere (Xen arch/x86/hvm/io.c, intercept.c)."""

from __future__ import annotations

from devicemodel.bus import Bus, Device
from devicemodel.pci import decode_config_address

from .ioreq import IOREQ_TYPE_COPY, IOREQ_TYPE_PIO
from .ioreq_client import IoreqClient
from .memory import GuestMemory
from .pc import Platform
from .status import GuestEnded, debug_exit_status

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC

HYPERVISOR, DEVICE_MODEL, UNASSIGNED = "hypervisor", "device-model", "unassigned"


class IoRouter:
    """Routes one domain's port and MMIO accesses. Local devices answer on the vCPU thread;
    everything else becomes an ioreq. Xen keeps the PCI CONFIG_ADDRESS latch (0xCF8) itself and
    turns CONFIG_DATA accesses into PCI_CONFIG ioreqs (addr = SBDF << 32 | register)."""

    def __init__(self, local: Bus, memory: GuestMemory, platform: Platform | None = None,
                 ioreq: IoreqClient | None = None) -> None:
        self.local = local
        self.memory = memory
        self.platform = platform
        self.ioreq = ioreq
        self._cache: dict[int, tuple[int, Device, str] | None] = {}
        self.cf8 = 0
        self.pci_latch = platform is not None and platform.pci_in_hypervisor
        self.buffered_ports = platform.buffered_ports if platform is not None else frozenset()
        self.unassigned_reads = 0
        self.unassigned_writes = 0

    def local_device(self, port: int) -> tuple[int, Device, str] | None:
        try:
            return self._cache[port]
        except KeyError:
            hit = self._cache[port] = self.local.find(port)
            return hit

    # -- one access ------------------------------------------------------------------------------
    def pio(self, port: int, size: int, direction_in: bool, value: int) -> tuple[int, str]:
        hit = self.local_device(port)
        if hit is not None:
            base, device, _name = hit
            if direction_in:
                return device.read(port - base, size), HYPERVISOR
            device.write(port - base, size, value)
            return 0, HYPERVISOR
        if self.pci_latch and PCI_CONFIG_ADDRESS <= port < PCI_CONFIG_DATA + 4:
            return self._pci(port, size, direction_in, value)
        if self.ioreq is None:
            if direction_in:
                self.unassigned_reads += 1
                return (1 << (8 * size)) - 1, UNASSIGNED
            self.unassigned_writes += 1
            return 0, UNASSIGNED
        if not direction_in and port in self.buffered_ports:
            self.ioreq.buffered_write(IOREQ_TYPE_PIO, port, size, value)
        else:
            value = self.ioreq.pio(port, size, direction_in, value)
        return value, DEVICE_MODEL

    def _pci(self, port: int, size: int, direction_in: bool, value: int) -> tuple[int, str]:
        if port < PCI_CONFIG_DATA:  # CONFIG_ADDRESS: only dword accesses reach the latch
            if port != PCI_CONFIG_ADDRESS or size != 4:
                return ((1 << (8 * size)) - 1 if direction_in else 0), HYPERVISOR
            if direction_in:
                return self.cf8, HYPERVISOR
            self.cf8 = value & 0x8FFF_FFFC
            return 0, HYPERVISOR
        if not self.cf8 & (1 << 31):  # configuration space disabled: nothing answers
            return ((1 << (8 * size)) - 1 if direction_in else 0), HYPERVISOR
        sbdf, reg = decode_config_address(self.cf8)
        assert self.ioreq is not None
        result = self.ioreq.pci_config(sbdf, reg + (port & 3), size, direction_in, value)
        return result, DEVICE_MODEL

    def string_pio(self, port: int, size: int, direction_in: bool, gpa: int, count: int,
                   df: bool) -> tuple[list[int] | None, str, int]:
        """REP INS/OUTS at the exit: (values for INS, who served it, ioreqs used)."""
        step = -size if df else size
        if self.local_device(port) is None and self.ioreq is not None and not (
                self.pci_latch and PCI_CONFIG_ADDRESS <= port < PCI_CONFIG_DATA + 4):
            in_ram = self.memory.contains(min(gpa, gpa + step * (count - 1)), count * size)
            if in_ram:
                sent = self.ioreq.string_pio(port, size, direction_in, gpa, count, df)
                if not direction_in:
                    return None, DEVICE_MODEL, sent
                return self.memory.read_elements(gpa, size, count, step), DEVICE_MODEL, sent
        values: list[int] = []
        handled = HYPERVISOR
        for i in range(count):
            address = gpa + i * step
            if direction_in:
                value, handled = self.pio(port, size, True, 0)
                values.append(value)
            else:
                if not self.memory.contains(address, size):
                    break  # Unicorn itself turns this element into an EPT violation
                _, handled = self.pio(port, size, False, self.memory.read_uint(address, size))
        return (values if direction_in else None), handled, 0

    def mmio(self, gpa: int, size: int, write: bool, value: int) -> tuple[int, str] | None:
        """An access to a guest-physical range the device model emulates; None if none does."""
        if self.platform is None or self.ioreq is None:
            return None
        for base, length, _name in self.platform.mmio_ranges:
            if base <= gpa < base + length:
                if write:
                    # Like Xen's VGA window: writes need no answer, they go buffered.
                    self.ioreq.buffered_write(IOREQ_TYPE_COPY, gpa, size, value)
                    return 0, DEVICE_MODEL
                return self.ioreq.mmio(gpa, size, True, 0), DEVICE_MODEL
        return None

    def check_shutdown(self) -> None:
        """After an ioreq: did the device model ask to end the domain (the debug-exit port)?"""
        platform = self.platform
        if platform is not None and platform.shutdown.value is not None:
            value = platform.shutdown.value
            raise GuestEnded("debug_exit", debug_exit_status(value),
                             f"guest wrote {value:#x} to the debug-exit port 0xf4 (device model)")
