"""PCI configuration space, bus and configuration mechanism #1 at 0xCF8/0xCFC (PCI Local Bus Specification 3.0, ch. 3.2.2.3.2 and 6)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# Type 0 configuration header (PCI 3.0 section 6.1).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A  # subclass at 0x0A, base class at 0x0B
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_NUM_BARS = 6
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_CONFIG_SPACE_SIZE = 256
PCI_HEADER_TYPE_MULTI_FUNCTION = 0x80

# Command register bits.
PCI_COMMAND_IO = 0x0001
PCI_COMMAND_MEMORY = 0x0002
PCI_COMMAND_MASTER = 0x0004
PCI_COMMAND_SPECIAL = 0x0008
PCI_COMMAND_PARITY = 0x0040
PCI_COMMAND_SERR = 0x0100
PCI_COMMAND_INTX_DISABLE = 0x0400

# Status register: these error bits are "write 1 to clear"; the rest are read-only.
PCI_STATUS_CAP_LIST = 0x0010
PCI_STATUS_FAST_BACK = 0x0080
PCI_STATUS_PARITY = 0x0100
PCI_STATUS_DEVSEL_MEDIUM = 0x0200
PCI_STATUS_SIG_TARGET_ABORT = 0x0800
PCI_STATUS_REC_TARGET_ABORT = 0x1000
PCI_STATUS_REC_MASTER_ABORT = 0x2000
PCI_STATUS_SIG_SYSTEM_ERROR = 0x4000
PCI_STATUS_DETECTED_PARITY = 0x8000
PCI_STATUS_W1C = (
    PCI_STATUS_PARITY
    | PCI_STATUS_SIG_TARGET_ABORT
    | PCI_STATUS_REC_TARGET_ABORT
    | PCI_STATUS_REC_MASTER_ABORT
    | PCI_STATUS_SIG_SYSTEM_ERROR
    | PCI_STATUS_DETECTED_PARITY
)

# Base address register type bits (PCI 3.0 section 6.2.5.1).
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_32 = 0x00
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_IO_MASK = ~0x03
PCI_BASE_ADDRESS_MEM_MASK = ~0x0F

# CONFIG_ADDRESS (0xCF8) layout: bit 31 enable, 23:16 bus, 15:11 device, 10:8 function,
# 7:2 dword register number; bits 30:24 are reserved and bits 1:0 read as 0.
CONFIG_ADDRESS_ENABLE = 0x8000_0000
CONFIG_ADDRESS_MASK = 0x80FF_FFFC

ALL_ONES = (1 << 64) - 1


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


def make_sbdf(bus: int, dev: int, fn: int, segment: int = 0) -> int:
    """Xen's SBDF: segment << 16 | bus << 8 | dev << 3 | fn (what a PCI_CONFIG ioreq carries)."""
    return ((segment & 0xFFFF) << 16) | ((bus & 0xFF) << 8) | ((dev & 0x1F) << 3) | (fn & 0x7)


def split_sbdf(sbdf: int) -> tuple[int, int, int, int]:
    """(segment, bus, device, function) of an SBDF."""
    return (sbdf >> 16) & 0xFFFF, (sbdf >> 8) & 0xFF, (sbdf >> 3) & 0x1F, sbdf & 0x7


def decode_config_address(value: int) -> tuple[int, int]:
    """CONFIG_ADDRESS -> (sbdf, reg): segment 0, the bus/device/function bits, and the
    dword-aligned register (bits 7:2). The enable bit (31) is the caller's to check."""
    return (value >> 8) & 0xFFFF, value & 0xFC


def encode_config_address(bus: int, dev: int, fn: int, reg: int, enable: bool = True) -> int:
    """The CONFIG_ADDRESS value a guest writes to reach (bus, dev, fn, reg & 0xFC)."""
    return (
        (CONFIG_ADDRESS_ENABLE if enable else 0)
        | ((bus & 0xFF) << 16)
        | ((dev & 0x1F) << 11)
        | ((fn & 0x7) << 8)
        | (reg & 0xFC)
    )


class BarKind(Enum):
    IO = "io"
    MEM32 = "mem32"


@dataclass(frozen=True)
class PciBar:
    """One base address register: a naturally aligned window of `size` bytes.

    `decode_bits` is how many address bits the device decodes: PIIX3's I/O BARs decode
    16 (bits 31:16 are hardwired to 0), so a size probe of a 16-byte I/O BAR reads
    0x0000FFF1 there, not 0xFFFFFFF1.
    """

    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False
    decode_bits: int = 32

    def __post_init__(self) -> None:
        if not 0 <= self.index < PCI_NUM_BARS:
            raise ValueError(f"BAR index {self.index} out of range")
        if self.size <= 0 or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two")
        minimum = 4 if self.kind is BarKind.IO else 16
        if self.size < minimum:
            raise ValueError(f"{self.kind.value} BAR size must be at least {minimum}")

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return PCI_BASE_ADDRESS_SPACE_IO
        return PCI_BASE_ADDRESS_MEM_TYPE_32 | (
            PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0
        )

    @property
    def address_mask(self) -> int:
        """The writable address bits: what all-ones written then read back shows (minus type bits)."""
        return ~(self.size - 1) & ((1 << self.decode_bits) - 1) & 0xFFFF_FFFF

    @property
    def reg(self) -> int:
        return PCI_BASE_ADDRESS_0 + 4 * self.index


class PciConfigFunction:
    """One PCI function's 256-byte type 0 configuration space.

    Every byte has a write mask (1 = the guest may change that bit) and a
    write-1-to-clear mask (the status error bits). Vendor/device/class/header type and
    anything not made writable are read-only, so a guest write to them is ignored as on
    hardware. BAR size probing falls out of the masks: the low address bits of a BAR are
    read-only zero, so writing all-ones reads back the size mask with the type bits.
    """

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        *,
        revision: int = 0,
        header_type: int = 0,
        command: int = 0,
        command_writable: int = (
            PCI_COMMAND_IO
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_PARITY
            | PCI_COMMAND_SERR
            | PCI_COMMAND_INTX_DISABLE
        ),
        status: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
        bars: tuple[PciBar, ...] = (),
        name: str = "",
    ) -> None:
        self.name = name or f"{vendor_id:04x}:{device_id:04x}"
        self.config = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.bars: dict[int, PciBar] = {}
        self.ignored_accesses = 0

        self.init_u16(PCI_VENDOR_ID, vendor_id)
        self.init_u16(PCI_DEVICE_ID, device_id)
        self.init_u8(PCI_REVISION_ID, revision)
        self.init_u8(PCI_CLASS_PROG, class_code & 0xFF)
        self.init_u8(PCI_CLASS_DEVICE, (class_code >> 8) & 0xFF)
        self.init_u8(PCI_CLASS_DEVICE + 1, (class_code >> 16) & 0xFF)
        self.init_u8(PCI_HEADER_TYPE, header_type)
        self.init_u16(PCI_COMMAND, command)
        self.set_writable(PCI_COMMAND, 2, command_writable)
        self.init_u16(PCI_STATUS, status)
        self.set_w1c(PCI_STATUS, 2, PCI_STATUS_W1C)
        self.init_u16(PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.init_u16(PCI_SUBSYSTEM_ID, subsystem_id)
        self.init_u8(PCI_INTERRUPT_PIN, interrupt_pin)
        if interrupt_pin:
            # Firmware writes the IRQ it routed INTx# to here; the device only stores it.
            self.set_writable(PCI_INTERRUPT_LINE, 1, 0xFF)
        for bar in bars:
            self.add_bar(bar)

    # -- building (host side, bypasses the masks) -----------------------------------

    def init_u8(self, reg: int, value: int) -> None:
        self.config[reg] = value & 0xFF

    def init_u16(self, reg: int, value: int) -> None:
        self.config[reg : reg + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def init_u32(self, reg: int, value: int) -> None:
        self.config[reg : reg + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def set_writable(self, reg: int, length: int, mask: int = -1) -> None:
        """Let the guest change the bits of `mask` (little-endian over `length` bytes)."""
        for i in range(length):
            self.wmask[reg + i] = (mask >> (8 * i)) & 0xFF

    def set_w1c(self, reg: int, length: int, mask: int) -> None:
        for i in range(length):
            self.w1cmask[reg + i] = (mask >> (8 * i)) & 0xFF

    def add_bar(self, bar: PciBar) -> None:
        self.bars[bar.index] = bar
        self.init_u32(bar.reg, bar.type_bits)
        self.set_writable(bar.reg, 4, bar.address_mask)

    # -- what the guest sees ----------------------------------------------------------

    def read(self, reg: int, size: int) -> int:
        """A configuration read of `size` bytes at `reg`; all-ones if it falls outside."""
        if size not in (1, 2, 4) or reg < 0 or reg + size > PCI_CONFIG_SPACE_SIZE:
            self.ignored_accesses += 1
            return _ones(size) if 0 < size <= 8 else ALL_ONES
        return int.from_bytes(self.config[reg : reg + size], "little")

    def write(self, reg: int, size: int, value: int) -> None:
        """A configuration write: read-only bits keep their value, W1C bits clear on 1."""
        if size not in (1, 2, 4) or reg < 0 or reg + size > PCI_CONFIG_SPACE_SIZE:
            self.ignored_accesses += 1
            return
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            at = reg + i
            old = self.config[at]
            wmask = self.wmask[at]
            new = (old & ~wmask) | (byte & wmask)
            new &= ~(byte & self.w1cmask[at])
            self.config[at] = new & 0xFF

    # -- conveniences for whoever wires the function to real decoders -----------------

    @property
    def vendor_id(self) -> int:
        return self.read(PCI_VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.read(PCI_DEVICE_ID, 2)

    @property
    def class_code(self) -> int:
        return self.read(PCI_REVISION_ID, 4) >> 8

    @property
    def command(self) -> int:
        return self.read(PCI_COMMAND, 2)

    @property
    def multi_function(self) -> bool:
        return bool(self.config[PCI_HEADER_TYPE] & PCI_HEADER_TYPE_MULTI_FUNCTION)

    def bar_address(self, index: int) -> int | None:
        """The base address BAR `index` decodes at, or None if it is absent or its space
        (I/O or memory) is disabled in the command register."""
        bar = self.bars.get(index)
        if bar is None:
            return None
        enable = PCI_COMMAND_IO if bar.kind is BarKind.IO else PCI_COMMAND_MEMORY
        if not self.command & enable:
            return None
        return self.read(bar.reg, 4) & bar.address_mask


class PciBus:
    """Functions by (bus, device, function); what configuration cycles reach.

    `config_read`/`config_write` take the SBDF and register exactly as Xen's
    IOREQ_TYPE_PCI_CONFIG delivers them (addr = sbdf << 32 | reg). A cycle to a function
    that is not there ends in master abort: reads return all-ones, writes vanish.
    """

    def __init__(self) -> None:
        self._functions: dict[tuple[int, int, int], PciConfigFunction] = {}
        self.master_aborts = 0

    def add(self, bus: int, dev: int, fn: int, function: PciConfigFunction) -> None:
        if not (0 <= bus <= 0xFF and 0 <= dev <= 0x1F and 0 <= fn <= 7):
            raise ValueError(f"bad PCI address {bus:02x}:{dev:02x}.{fn}")
        key = (bus, dev, fn)
        if key in self._functions:
            raise ValueError(f"PCI {bus:02x}:{dev:02x}.{fn} is already taken")
        self._functions[key] = function

    def function(self, bus: int, dev: int, fn: int) -> PciConfigFunction | None:
        return self._functions.get((bus, dev, fn))

    def functions(self) -> list[tuple[tuple[int, int, int], PciConfigFunction]]:
        return sorted(self._functions.items())

    def _lookup(self, sbdf: int) -> PciConfigFunction | None:
        segment, bus, dev, fn = split_sbdf(sbdf)
        if segment != 0:
            return None
        return self._functions.get((bus, dev, fn))

    def config_read(self, sbdf: int, reg: int, size: int) -> int:
        function = self._lookup(sbdf)
        if function is None:
            self.master_aborts += 1
            return _ones(size) if 0 < size <= 8 else ALL_ONES
        return function.read(reg, size)

    def config_write(self, sbdf: int, reg: int, size: int, value: int) -> None:
        function = self._lookup(sbdf)
        if function is None:
            self.master_aborts += 1
            return
        function.write(reg, size, value)


class PciConfigPorts:
    """Configuration mechanism #1 as an 8-port device (map it at 0xCF8).

    Offsets 0-3 are CONFIG_ADDRESS (0xCF8): only a dword access reaches it; a guest's
    byte or word access there is not a configuration access (on a PC it would go to
    other ISA decoders) and is ignored here. Offsets 4-7 are CONFIG_DATA (0xCFC-0xCFF):
    a byte at 0xCFD reaches register (CONFIG_ADDRESS & 0xFC) + 1, a word at 0xCFE
    reaches + 2, so each access lands on its own byte lane. With the enable bit clear,
    CONFIG_DATA reads all-ones and ignores writes.
    """

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus
        self.config_address = 0
        self.ignored_accesses = 0

    def _target(self, offset: int, size: int) -> tuple[int, int] | None:
        lane = offset - 4
        if size not in (1, 2, 4) or lane < 0 or lane + size > 4:
            return None
        if not self.config_address & CONFIG_ADDRESS_ENABLE:
            return None
        sbdf, reg = decode_config_address(self.config_address)
        return sbdf, reg + lane

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.config_address
        target = self._target(offset, size)
        if target is None:
            self.ignored_accesses += 1
            return _ones(size) if 0 < size <= 8 else ALL_ONES
        return self.bus.config_read(target[0], target[1], size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.config_address = value & CONFIG_ADDRESS_MASK
            return
        target = self._target(offset, size)
        if target is None:
            self.ignored_accesses += 1
            return
        self.bus.config_write(target[0], target[1], size, value & _ones(size))


# -- the functions of a PC with an i440FX chipset --------------------------------------

I440FX_VENDOR_ID = 0x8086
I440FX_DEVICE_ID = 0x1237  # 82441FX PCI and Memory Controller (PMC)
PIIX3_ISA_DEVICE_ID = 0x7000  # 82371SB function 0: PCI-to-ISA bridge
PIIX3_IDE_DEVICE_ID = 0x7010  # 82371SB function 1: IDE controller

PCI_CLASS_BRIDGE_HOST = 0x060000
PCI_CLASS_BRIDGE_ISA = 0x060100
# Mass storage / IDE, programming interface 0x80: bus-master capable, both channels in
# fixed compatibility mode (0x1F0/0x3F6 IRQ14, 0x170/0x376 IRQ15), so BAR0-3 are unused.
PCI_CLASS_STORAGE_IDE_LEGACY_BM = 0x010180

PIIX3_IDE_BMIBA_BAR = 4  # BMIBA at 0x20: bus-master IDE I/O registers, 16 bytes
PIIX3_IDE_BMIBA_SIZE = 16
PIIX3_IDETIM = 0x40  # primary (0x40) and secondary (0x42) IDE timing registers
PIIX3_SIDETIM = 0x44
PIIX3_PIRQRC = 0x60  # PIRQ[A-D] route control, 0x80 = routing disabled
I440FX_SMRAM = 0x72


def i440fx_host_bridge() -> PciConfigFunction:
    """82441FX PMC at 00:00.0: memory and bus master always on (command 0006h)."""
    fn = PciConfigFunction(
        I440FX_VENDOR_ID,
        I440FX_DEVICE_ID,
        PCI_CLASS_BRIDGE_HOST,
        revision=0x02,
        command=PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
        command_writable=PCI_COMMAND_PARITY | PCI_COMMAND_SERR,
        status=PCI_STATUS_DEVSEL_MEDIUM | PCI_STATUS_FAST_BACK,
        name="i440fx-host",
    )
    fn.set_writable(PCI_LATENCY_TIMER, 1, 0xF8)
    # Device-specific registers (PMCCFG, PAM0-6, DRB0-7, SMRAM ...) are kept as plain
    # storage so firmware can program them; their effects on decoding are not modelled.
    fn.set_writable(0x50, 0x30, -1)
    fn.init_u8(I440FX_SMRAM, 0x02)
    return fn


def piix3_isa_bridge() -> PciConfigFunction:
    """PIIX3 function 0 at 00:01.0: PCI-to-ISA bridge, multi-function header."""
    fn = PciConfigFunction(
        I440FX_VENDOR_ID,
        PIIX3_ISA_DEVICE_ID,
        PCI_CLASS_BRIDGE_ISA,
        header_type=PCI_HEADER_TYPE_MULTI_FUNCTION,
        command=PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
        command_writable=PCI_COMMAND_SPECIAL,
        status=PCI_STATUS_DEVSEL_MEDIUM,
        name="piix3-isa",
    )
    # Device-specific registers (IORT, XBCS, PIRQRC, TOM ...) as plain storage.
    fn.set_writable(0x4C, 0xFF - 0x4C + 1, -1)
    for i in range(4):
        fn.init_u8(PIIX3_PIRQRC + i, 0x80)
    return fn


def piix3_ide() -> PciConfigFunction:
    """PIIX3 function 1 at 00:01.1: IDE in legacy mode, BMIBA (BAR4) 16 bytes of I/O."""
    fn = PciConfigFunction(
        I440FX_VENDOR_ID,
        PIIX3_IDE_DEVICE_ID,
        PCI_CLASS_STORAGE_IDE_LEGACY_BM,
        command_writable=PCI_COMMAND_IO | PCI_COMMAND_MASTER,
        status=PCI_STATUS_DEVSEL_MEDIUM | PCI_STATUS_FAST_BACK,
        bars=(PciBar(PIIX3_IDE_BMIBA_BAR, PIIX3_IDE_BMIBA_SIZE, BarKind.IO, decode_bits=16),),
        name="piix3-ide",
    )
    fn.set_writable(PCI_LATENCY_TIMER, 1, 0xF0)
    fn.set_writable(PIIX3_IDETIM, 4, -1)
    fn.set_writable(PIIX3_SIDETIM, 1, -1)
    return fn


def make_i440fx_bus() -> PciBus:
    """Bus 0 of an i440FX PC: host bridge at 00:00.0, PIIX3 ISA at 00:01.0, IDE at 00:01.1.

    The NE2000 stays an ISA card and is not on PCI.
    """
    bus = PciBus()
    bus.add(0, 0, 0, i440fx_host_bridge())
    bus.add(0, 1, 0, piix3_isa_bridge())
    bus.add(0, 1, 1, piix3_ide())
    return bus
