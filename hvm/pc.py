"""The PC an HVM guest sees, and who emulates each part: the hypervisor (Xen's split) or the device model (DESIGN.md §2, §7)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devicemodel.bus import Bus, Device
from devicemodel.clock import Clock
from devicemodel.cmos_rtc import CmosRtc
from devicemodel.ide import IdeChannel, IdeControl
from devicemodel.ide_disk import DiskError, FileBlockBackend
from devicemodel.model import BlockPort, DeviceModel
from devicemodel.ne2000 import Ne2000
from devicemodel.pcap import PcapWriter
from devicemodel.pci import PciConfigPorts, make_i440fx_bus
from devicemodel.pic8259 import Elcr, PicPair
from devicemodel.pit8254 import Pit8254, Port61
from devicemodel.pmtimer import PmTimer
from devicemodel.uart16550 import Uart16550
from devicemodel.vga_text import WINDOW as VGA_WINDOW
from devicemodel.vga_text import VgaText

from .platform_ports import DebugConsole, DebugExit

PLACEMENTS = ("xen", "all-dm")
COM1, COM1_IRQ = 0x3F8, 4
IDE_PRIMARY, IDE_CONTROL, IDE_IRQ = 0x1F0, 0x3F6, 14
NE2000_BASE, NE2000_IRQ = 0x300, 9
PM_TIMER_PORT = 0xB008
VGA_TEXT_BASE = 0xB8000
VGA_HOLE = (0xA0000, 0x20000)  # legacy VGA window: not RAM on a PC
NE2000_MAC = bytes.fromhex("525400123456")
RTC_EPOCH = dt.datetime(2026, 1, 1, 12, 0, 0)  # the RTC's time at power-on: runs are repeatable


class PlatformError(Exception):
    """The machine cannot be built as asked (a missing disk image...): one line, status 2."""


@dataclass
class ShutdownRequest:
    """The device model asks the hypervisor to end the domain (xendevicemodel_shutdown)."""

    value: int | None = None

    def request(self, value: int) -> None:
        if self.value is None:
            self.value = value


class InterruptRouter:
    """The wires from devices to the vPIC. The PIC lives with the hypervisor; devices on the
    device-model thread change lines through here (Xen: hvm_op set_isa_irq_level), under a
    lock, and the vCPU is woken or kicked out of the guest when INTR rises."""

    def __init__(self, pic: PicPair, lock: threading.RLock) -> None:
        self.pic = pic
        self.lock = lock
        self.on_intr: Callable[[], None] = lambda: None
        self.level_changes = 0

    def line(self, irq: int) -> _RoutedLine:
        return _RoutedLine(self, irq)


@dataclass
class _RoutedLine:
    router: InterruptRouter
    irq: int

    def set_level(self, level: bool) -> None:
        router = self.router
        with router.lock:
            router.pic.irq_line(self.irq).set_level(level)
            router.level_changes += 1
            rising = router.pic.has_interrupt()
        if rising:
            router.on_intr()

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)


@dataclass
class PlatformOptions:
    placement: str = "xen"
    mem: int = 16 << 20
    disk: Path | None = None
    disk_read_only: bool = False
    pcap: Path | None = None
    serial_in: bytes | None = None
    buffered_ports: list[int] = field(default_factory=list)
    nic_tx: Callable[[bytes], None] | None = None  # frames the NE2000 sends also go here (a bridge)
    nic_mac: bytes = NE2000_MAC


@dataclass
class Platform:
    """The devices of one HVM domain and where each is served."""

    placement: str
    hv_pio: Bus                      # ports served on the vCPU thread by the hypervisor
    dm: DeviceModel                  # everything else, served by the device-model thread
    pic: PicPair
    router: InterruptRouter
    lock: threading.RLock            # guards the platform devices shared by both threads
    timers: list                     # devices with next_deadline_ns()/run_timers()
    shutdown: ShutdownRequest
    vga: VgaText
    ide: IdeChannel
    uart: Uart16550
    ne2000: Ne2000
    pcap: PcapWriter | None
    disk: FileBlockBackend | None
    mmio_ranges: list[tuple[int, int, str]]  # guest-physical ranges the device model emulates
    buffered_ports: frozenset[int]
    pci_in_hypervisor: bool          # Xen latches 0xCF8 itself and sends PCI_CONFIG ioreqs
    frames_sent: list[bytes] = field(default_factory=list)
    nic_lock: threading.Lock = field(default_factory=threading.Lock)
    nic_connected: bool = False  # frames come in from a bridge's thread

    def receive_frame(self, frame: bytes) -> bool:
        """A frame for the NE2000 from outside (the bridge's thread): under the card's lock."""
        with self.nic_lock:
            return self.ne2000.receive(frame)

    def run_timers(self, now_ns: int) -> None:
        with self.lock:
            for device in self.timers:
                device.run_timers(now_ns)

    def next_deadline_ns(self) -> int | None:
        with self.lock:
            deadlines = [d for d in (t.next_deadline_ns() for t in self.timers) if d is not None]
        return min(deadlines) if deadlines else None

    def close(self) -> None:
        if self.pcap is not None:
            self.pcap.close()
        if self.disk is not None:
            self.disk.close()


class _Locked:
    """A device reached from more than one thread: every access under its lock."""

    def __init__(self, device: Device, lock: threading.RLock | threading.Lock) -> None:
        self._device = device
        self._lock = lock

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._device.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._device.write(offset, size, value)


def build(options: PlatformOptions, clock: Clock, console: Callable[[bytes], None],
          serial: Callable[[bytes], None], on_debug_exit: Callable[[int], None]) -> Platform:
    if options.placement not in PLACEMENTS:
        raise PlatformError(f"unknown placement {options.placement!r}: use one of {', '.join(PLACEMENTS)}")
    lock = threading.RLock()
    pic = PicPair()
    router = InterruptRouter(pic, lock)
    pit = Pit8254(clock, router.line(0))
    rtc = CmosRtc(clock, router.line(8), options.mem, RTC_EPOCH)
    pm = PmTimer(clock)
    disk = None
    if options.disk is not None:
        try:
            disk = FileBlockBackend(options.disk, read_only=options.disk_read_only)
        except DiskError as exc:
            raise PlatformError(str(exc)) from None
    pcap = None
    if options.pcap is not None:
        try:
            pcap = PcapWriter(options.pcap, clock)
        except OSError as exc:
            raise PlatformError(f"{options.pcap}: cannot write the capture: {exc.strerror}") from None
    frames: list[bytes] = []

    def transmit(frame: bytes) -> None:
        frames.append(frame)
        if pcap is not None:
            pcap.write(frame)
            pcap.flush()
        if options.nic_tx is not None:
            options.nic_tx(frame)

    uart = Uart16550(router.line(COM1_IRQ), serial, options.serial_in)
    ide = IdeChannel(disk, router.line(IDE_IRQ))
    ne2000 = Ne2000(options.nic_mac, router.line(NE2000_IRQ), transmit)
    vga = VgaText()
    shutdown = ShutdownRequest()
    pci = make_i440fx_bus()
    dm = DeviceModel(pci)
    hv_pio = Bus("hypervisor-pio", 16)

    # Xen emulates these in the hypervisor (arch/x86/hvm: vpic, i8254, rtc, pmtimer, and the
    # debug console); with --placement all-dm they are served by the device model instead.
    platform_devices: list[tuple[int, int, Device, str]] = [
        (0x20, 2, _Locked(pic.master, lock), "pic-master"),
        (0xA0, 2, _Locked(pic.slave, lock), "pic-slave"),
        (0x4D0, 2, _Locked(Elcr(pic), lock), "elcr"),
        (0x40, 4, _Locked(pit, lock), "pit"),
        (0x61, 1, _Locked(Port61(pit), lock), "port61"),
        (0x70, 2, _Locked(rtc, lock), "rtc"),
        (PM_TIMER_PORT, 4, _Locked(pm, lock), "pmtimer"),
    ]
    in_hypervisor = options.placement == "xen"
    for base, length, device, name in platform_devices:
        (hv_pio if in_hypervisor else dm.pio).map(base, length, device, name)
    if in_hypervisor:
        hv_pio.map(0xE9, 1, DebugConsole(console), "debugcon")
        hv_pio.map(0xF4, 1, DebugExit(on_debug_exit), "debug-exit")
    else:
        dm.map_pio(0xE9, 1, DebugConsole(console), "debugcon")
        dm.map_pio(0xF4, 1, DebugExit(shutdown.request), "debug-exit")
        dm.map_pio(0xCF8, 8, PciConfigPorts(pci), "pci-config")
    dm.map_pio(COM1, 8, uart, "uart16550")
    dm.map_pio(IDE_PRIMARY, 8, ide, "ide")
    dm.map_pio(IDE_CONTROL, 1, IdeControl(ide), "ide-control")
    dm.map_block_port(IDE_PRIMARY, BlockPort(ide.read_data_block, ide.write_data_block))
    nic_lock = threading.Lock()  # the bridge delivers frames from its own thread
    dm.map_pio(NE2000_BASE, 32, _Locked(ne2000, nic_lock), "ne2000")

    def nic_read_block(nbytes: int) -> bytes:
        with nic_lock:
            return ne2000.read_remote_block(nbytes)

    def nic_write_block(data: bytes) -> None:
        with nic_lock:
            ne2000.write_remote_block(data)

    dm.map_block_port(NE2000_BASE + 0x10, BlockPort(nic_read_block, nic_write_block))
    dm.map_mmio(VGA_TEXT_BASE, VGA_WINDOW, vga, "vga-text")
    return Platform(
        placement=options.placement, hv_pio=hv_pio, dm=dm, pic=pic, router=router, lock=lock,
        timers=[pit, rtc], shutdown=shutdown, vga=vga, ide=ide, uart=uart, ne2000=ne2000,
        pcap=pcap, disk=disk, mmio_ranges=[(VGA_TEXT_BASE, VGA_WINDOW, "vga-text")],
        buffered_ports=frozenset(options.buffered_ports), pci_in_hypervisor=in_hypervisor,
        frames_sent=frames, nic_lock=nic_lock, nic_connected=options.nic_tx is not None,
    )
