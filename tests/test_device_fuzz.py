"""Seeded random port/value fuzz over every device class in devicemodel/: no guest access may raise into the host."""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import pkgutil
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import devicemodel
from devicemodel.clock import ManualClock
from devicemodel.irq import RecordingIrq

ACCESSES = 4000
SEEDS = (0x5EED, 0xC0FFEE, 1)
SIZES = (1, 1, 1, 2, 2, 4, 4, 8)  # what a bus can deliver; bytes dominate on ISA ports
# Modules that hold no guest-facing devices (the bus itself raises on host misuse).
NOT_DEVICES = {"bus", "clock", "irq", "server"}
# Classes this helper wrote: the fuzz must reach them, or discovery is broken.
MUST_FUZZ = {
    "uart16550.Uart16550",
    "pit8254.Pit8254",
    "pit8254.Port61",
    "pic8259.Pic8259",
    "pic8259.Elcr",
    "cmos_rtc.CmosRtc",
    "pmtimer.PmTimer",
}
MAX_DEPTH = 3


class MemoryDisk:
    """A BlockBackend in memory: 64 sectors of a recognisable pattern."""

    SECTOR = 512

    def __init__(self, sectors: int = 64) -> None:
        self.data = bytearray(bytes(range(256)) * (sectors * self.SECTOR // 256))

    @property
    def sectors(self) -> int:
        return len(self.data) // self.SECTOR

    @property
    def read_only(self) -> bool:
        return False

    def read(self, lba: int, count: int) -> bytes:
        if lba < 0 or count < 0 or lba + count > self.sectors:
            raise ValueError("out of range")  # a backend may fail; the device must cope
        return bytes(self.data[lba * self.SECTOR : (lba + count) * self.SECTOR])

    def write(self, lba: int, data: bytes) -> None:
        if lba < 0 or lba * self.SECTOR + len(data) > len(self.data):
            raise ValueError("out of range")
        self.data[lba * self.SECTOR : lba * self.SECTOR + len(data)] = data

    def flush(self) -> None:
        pass


@dataclass
class Rig:
    """One device under fuzz, with the collaborators the fuzzer can drive."""

    name: str
    device: Any
    clock: ManualClock
    sinks: list[bytes] = field(default_factory=list)
    extras: list[Any] = field(default_factory=list)  # collaborator objects built for it

    def targets(self) -> list[Any]:
        """The device, and devices among its collaborators (Port61's PIT, Elcr's PICs,
        IdeControl's channel), so accesses interleave as a guest's would."""
        found = [self.device]
        for extra in self.extras:
            candidates = [extra, *vars(extra).values()] if hasattr(extra, "__dict__") else [extra]
            for obj in candidates:
                if is_device_class(type(obj)) and all(obj is not f for f in found):
                    found.append(obj)
        return found


def is_device_class(cls: type) -> bool:
    if getattr(cls, "_is_protocol", False) or inspect.isabstract(cls):
        return False
    read = getattr(cls, "read", None)
    write = getattr(cls, "write", None)
    if not (callable(read) and callable(write)):
        return False
    try:
        rp = list(inspect.signature(read).parameters)
        wp = list(inspect.signature(write).parameters)
    except (TypeError, ValueError):
        return False
    # read(self, offset, size), write(self, offset, size, value)
    return len(rp) == 3 and len(wp) == 4


def device_modules() -> Iterator[Any]:
    for info in pkgutil.iter_modules(devicemodel.__path__):
        if info.name in NOT_DEVICES or info.name.startswith("_"):
            continue
        try:
            yield importlib.import_module(f"devicemodel.{info.name}")
        except ImportError:
            continue  # a module another helper has not finished: nothing to fuzz yet


def device_classes() -> list[tuple[str, type]]:
    found = []
    for module in device_modules():
        short = module.__name__.split(".")[-1]
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and is_device_class(cls):
                found.append((f"{short}.{cls.__name__}", cls))
    return sorted(found, key=lambda item: item[0])


class Unbuildable(Exception):
    pass


class Builder:
    """Builds an instance of a class by reading its constructor's annotations."""

    def __init__(self, clock: ManualClock, sinks: list[bytes]) -> None:
        self.clock = clock
        self.sinks = sinks
        self.extras: list[Any] = []

    def sink(self, *args: Any, **kwargs: Any) -> None:
        for a in args:
            if isinstance(a, bytes | bytearray):
                self.sinks.append(bytes(a))

    def value_for(self, name: str, annotation: str, depth: int) -> Any:
        ann = annotation.replace("typing.", "")
        lname = name.lower()
        if "Clock" in ann:
            return self.clock
        if "IrqLine" in ann or lname.startswith("irq") or lname in ("intr", "int_out"):
            irq = RecordingIrq()
            self.extras.append(irq)
            return irq
        if "BlockBackend" in ann or lname == "disk":
            disk = MemoryDisk()
            self.extras.append(disk)
            return disk
        if "Callable" in ann or lname in ("output", "tx", "sink"):
            return self.sink
        if "datetime" in ann:
            return dt.datetime(2024, 2, 29, 23, 59, 50)
        if lname == "mac":
            return bytes.fromhex("525400123456")
        if ann.startswith("bytes"):
            return b"fuzz input \x00\xff"
        if "int" in ann.split("|")[0] and "mem" in lname:
            return 16 * 1024 * 1024
        if ann.strip() == "bool" or lname.startswith("is_"):
            return True
        if ann.strip() == "str":
            return f"fuzz-{name}"
        if ann.strip() == "int":
            return 0
        # A collaborator from devicemodel itself (PciBus, IdeChannel, Pit8254, PicPair...).
        for module in device_modules():
            for cname, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and cname in ann.split("|")[0]:
                    factory = self.factory_for(cls)
                    obj = factory() if factory else self.build(cls, depth + 1)
                    self.extras.append(obj)
                    return obj
        raise Unbuildable(f"no value for {name}: {annotation}")

    def factory_for(self, cls: type) -> Callable[[], Any] | None:
        """A module-level make_* helper returning this class, if there is one (a full bus)."""
        module = inspect.getmodule(cls)
        for fname, fn in inspect.getmembers(module, inspect.isfunction):
            if not fname.startswith("make_"):
                continue
            ret = inspect.signature(fn).return_annotation
            if isinstance(ret, str) and ret == cls.__name__:
                params = inspect.signature(fn).parameters.values()
                if all(p.default is not inspect.Parameter.empty for p in params):
                    return fn
        return None

    def build(self, cls: type, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise Unbuildable(f"{cls.__name__}: collaborators nest too deep")
        kwargs: dict[str, Any] = {}
        for p in inspect.signature(cls).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            ann = (
                p.annotation
                if isinstance(p.annotation, str)
                else getattr(p.annotation, "__name__", str(p.annotation))
            )
            if p.default is not inspect.Parameter.empty and not (
                "IrqLine" in ann or "BlockBackend" in ann
            ):
                continue
            kwargs[p.name] = self.value_for(p.name, ann, depth)
        return cls(**kwargs)


def rigs() -> tuple[list[Rig], dict[str, str]]:
    built: list[Rig] = []
    skipped: dict[str, str] = {}
    for name, cls in device_classes():
        clock = ManualClock(1_000_000_000)
        sinks: list[bytes] = []
        builder = Builder(clock, sinks)
        try:
            device = builder.build(cls)
        except Exception as exc:  # noqa: BLE001 - report why, fuzz the rest
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        built.append(Rig(name, device, clock, sinks, builder.extras))
    return built, skipped


def pick_offset(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.randrange(8)  # most ISA devices decode 8 ports or fewer
    if r < 0.85:
        return rng.randrange(0x20)
    if r < 0.97:
        return rng.randrange(0x100)
    return rng.choice([0x1000, 0xFFFF, 1 << 20, rng.randrange(1 << 32)])


def pick_value(rng: random.Random, size: int) -> int:
    r = rng.random()
    if r < 0.1:
        return 0
    if r < 0.2:
        return (1 << (8 * size)) - 1
    if r < 0.45:
        return rng.randrange(0x40)  # register indexes, small counts, single bits
    return rng.getrandbits(8 * size)


def drive_side_channels(rig: Rig, rng: random.Random) -> None:
    """What the machine does around guest accesses: time passes, timers run, input
    arrives, interrupts are acknowledged, IRQ lines move."""
    dev = rig.device
    rig.clock.advance(rng.choice((0, 1, 838, 50_000, 1_000_000, 5_000_000)))
    if rng.random() < 0.01:
        rig.clock.advance(rng.randrange(3_000_000_000))
    if hasattr(dev, "run_timers") and rng.random() < 0.5:
        deadline = dev.next_deadline_ns()
        assert deadline is None or isinstance(deadline, int)
        dev.run_timers(rig.clock.now_ns())
    if hasattr(dev, "feed") and rng.random() < 0.05:
        dev.feed(rng.randbytes(rng.randrange(1, 40)))
    if hasattr(dev, "set_irq") and rng.random() < 0.2:
        dev.set_irq(rng.randrange(8), rng.random() < 0.5)
    if hasattr(dev, "intack") and rng.random() < 0.1:
        dev.intack()
    if hasattr(dev, "receive") and rng.random() < 0.05:
        try:
            dev.receive(rng.randbytes(rng.randrange(0, 1600)))
        except TypeError:
            pass  # a different receive signature: not ours to guess


def fuzz(rig: Rig, seed: int) -> None:
    rng = random.Random(f"{rig.name}/{seed}")
    targets = rig.targets()
    recent: list[str] = []
    for i in range(ACCESSES):
        offset = pick_offset(rng)
        size = rng.choice(SIZES)
        # Mostly the device itself; sometimes a collaborator that is a device too.
        k = 0 if len(targets) == 1 or rng.random() < 0.7 else rng.randrange(1, len(targets))
        target = targets[k]
        who = type(target).__name__
        try:
            if rng.random() < 0.1:
                drive_side_channels(rig, rng)
            if rng.random() < 0.5:
                recent.append(f"{who}.read({offset:#x}, {size})")
                value = target.read(offset, size)
                assert isinstance(value, int), f"read returned {type(value).__name__}"
                assert 0 <= value < 1 << (8 * size), f"read({offset:#x}, {size}) = {value:#x}"
            else:
                value = pick_value(rng, size)
                recent.append(f"{who}.write({offset:#x}, {size}, {value:#x})")
                target.write(offset, size, value)
        except Exception as exc:
            trail = "; ".join(recent[-12:])
            raise AssertionError(
                f"{rig.name} seed {seed:#x} access {i}: {type(exc).__name__}: {exc}\n"
                f"  last accesses: {trail}"
            ) from exc
        del recent[:-12]


BUILT, SKIPPED = rigs()


def test_discovery_reaches_every_device_of_the_first_half() -> None:
    names = {rig.name for rig in BUILT}
    missing = MUST_FUZZ - names
    assert not missing, f"not fuzzed: {missing}; skipped: {SKIPPED}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", [rig.name for rig in BUILT])
def test_random_accesses_never_raise(name: str, seed: int) -> None:
    # Each case gets fresh devices, so a seed reproduces exactly.
    rebuilt, _ = rigs()
    rig = next(r for r in rebuilt if r.name == name)
    fuzz(rig, seed)


def test_pic_pair_fuzz_keeps_inta_answers_in_range() -> None:
    """The PIC pair seen from the CPU side: whatever the guest programs, an INTA
    returns a vector byte or None, and ISR/IRR stay 8-bit."""
    from devicemodel.pic8259 import Elcr, PicPair

    rng = random.Random(0x8259)
    pair = PicPair(intr=RecordingIrq())
    elcr = Elcr(pair)
    chips = [pair.master, pair.slave]
    lines = [pair.irq_line(n) for n in range(16) if n != 2]
    for _ in range(ACCESSES):
        r = rng.random()
        if r < 0.3:
            rng.choice(lines).set_level(rng.random() < 0.5)
        elif r < 0.6:
            rng.choice(chips).write(rng.randrange(2), 1, rng.getrandbits(8))
        elif r < 0.7:
            elcr.write(rng.randrange(2), 1, rng.getrandbits(8))
        elif r < 0.85:
            vector = pair.acknowledge()
            assert vector is None or 0 <= vector <= 0xFF
        else:
            assert 0 <= rng.choice(chips).read(rng.randrange(2), 1) <= 0xFF
        for chip in chips:
            assert 0 <= chip.isr <= 0xFF and 0 <= chip.irr <= 0xFF


def test_skipped_classes_are_reported() -> None:
    """Classes the builder could not construct are listed, so a new device whose
    constructor it cannot guess shows up here rather than going silently unfuzzed."""
    ours = {name for name in SKIPPED if name in MUST_FUZZ}
    assert not ours, SKIPPED
