"""Guests in: NASM source, flat binaries and ELF executables turned into a loadable image (ELF: System V gABI, PT_LOAD)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import boot
from .memory import GuestMemory

DEFAULT_LOAD = {16: 0x7C00, 32: 0x100000, 64: 0x100000}
MODES = {"real": 16, "16": 16, "protected": 32, "32": 32, "long": 64, "64": 64}
MODE_NAMES = {16: "real", 32: "protected", 64: "long"}
ELF_MAGIC = b"\x7fELF"


class LoadError(Exception):
    """The guest cannot be loaded; the message is one line for the user (exit status 2)."""


@dataclass(frozen=True)
class Segment:
    gpa: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class GuestImage:
    name: str
    kind: str                       # "asm", "bin" or "elf"
    bits: int
    entry: int
    segments: tuple[Segment, ...]
    path: Path | None = None
    symbols: dict[str, int] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return MODE_NAMES[self.bits]

    @property
    def size(self) -> int:
        return sum(len(s.data) for s in self.segments)


def guests_dir() -> Path:
    import guests
    return Path(guests.__file__).parent


def shipped_guests() -> list[Path]:
    """HVM guests in guests/, then PV guests in guests/pv/ (run as `pv/NAME`)."""
    return sorted(guests_dir().glob("*.asm")) + sorted(guests_dir().glob("pv/*.asm"))


def guest_name(path: Path) -> str:
    """The name `hvmlab run` knows a shipped guest by (`hello`, `pv/blk`)."""
    return f"pv/{path.stem}" if path.parent.name == "pv" else path.stem


def resolve(spec: str) -> Path:
    """A path, or the name of a shipped guest (`hello` -> guests/hello.asm)."""
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise LoadError(f"{spec}: is a directory, not a guest")
        return path
    for candidate in (guests_dir() / spec, guests_dir() / f"{spec}.asm"):
        if candidate.is_file():
            return candidate
    raise LoadError(f"{spec}: no such file, and no shipped guest of that name (see 'hvmlab guests')")


def parse_mode(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return MODES[text.lower()]
    except KeyError:
        raise LoadError(f"unknown mode {text!r}: use real, protected or long (16, 32, 64)") from None


def load(spec: str, mode: int | None = None, load_address: int | None = None) -> GuestImage:
    path = resolve(spec)
    try:
        head = path.read_bytes()[:4]
    except OSError as exc:
        raise LoadError(f"{spec}: cannot read: {exc.strerror}") from None
    if head == ELF_MAGIC:
        return load_elf(path, mode)
    if path.suffix.lower() in (".asm", ".s", ".nasm"):
        return load_asm(path, mode, load_address)
    return load_bin(path, mode, load_address)


def load_asm(path: Path, mode: int | None, load_address: int | None) -> GuestImage:
    from .nasm import AsmError, assemble_file

    try:
        asm = assemble_file(path)
    except AsmError as exc:
        raise LoadError(str(exc)) from None
    except OSError as exc:
        raise LoadError(f"{path.name}: cannot read: {exc.strerror}") from None
    bits = mode or asm.bits
    base = load_address if load_address is not None else (asm.org if asm.org is not None else DEFAULT_LOAD[bits])
    return GuestImage(path.stem, "asm", bits, base, (Segment(base, asm.code, len(asm.code)),), path,
                      dict(asm.symbols))


def load_bin(path: Path, mode: int | None, load_address: int | None) -> GuestImage:
    bits = mode or 16
    base = load_address if load_address is not None else DEFAULT_LOAD[bits]
    data = path.read_bytes()
    if not data:
        raise LoadError(f"{path.name}: empty binary")
    return GuestImage(path.stem, "bin", bits, base, (Segment(base, data, len(data)),), path)


def load_elf(path: Path, mode: int | None) -> GuestImage:
    raw = path.read_bytes()
    try:
        elf = ELFFile(io.BytesIO(raw))
        machine = elf["e_machine"]
        if machine not in ("EM_386", "EM_X86_64"):
            raise LoadError(f"{path.name}: ELF for {machine}, not x86")
        bits = mode or (64 if elf.elfclass == 64 else 32)
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            offset, filesz = seg["p_offset"], seg["p_filesz"]
            if offset + filesz > len(raw):
                raise LoadError(f"{path.name}: truncated ELF: segment at file offset {offset:#x} "
                                f"runs past the end of the file ({len(raw)} bytes)")
            segments.append(Segment(seg["p_paddr"] or seg["p_vaddr"], raw[offset:offset + filesz],
                                    seg["p_memsz"]))
        entry = elf["e_entry"]
    except LoadError:
        raise
    except (ELFError, ValueError, KeyError, IndexError) as exc:
        raise LoadError(f"{path.name}: malformed or truncated ELF: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pyelftools raises assorted errors on short files
        raise LoadError(f"{path.name}: malformed or truncated ELF ({type(exc).__name__})") from None
    if not segments:
        raise LoadError(f"{path.name}: ELF has no PT_LOAD segment")
    return GuestImage(path.stem, "elf", bits, entry, tuple(segments), path)


def place(image: GuestImage, memory: GuestMemory) -> None:
    """Copy the image into guest RAM, refusing overlaps with RAM's end or the loader's tables."""
    for seg in image.segments:
        end = seg.gpa + max(seg.memsz, len(seg.data))
        if not memory.contains(seg.gpa, end - seg.gpa):
            raise LoadError(f"{image.name}: segment at {seg.gpa:#x}-{end:#x} does not fit in guest RAM "
                            f"({memory.size // (1 << 20)} MiB); use --mem or --load")
        lo, hi = boot.SYSTEM_AREA
        if image.bits != 16 and seg.gpa < hi and end > lo:
            raise LoadError(f"{image.name}: segment at {seg.gpa:#x}-{end:#x} overlaps the loader's "
                            f"GDT and page tables at {lo:#x}-{hi:#x}; load it elsewhere (--load)")
        memory.write(seg.gpa, seg.data)
        if seg.memsz > len(seg.data):
            memory.write(seg.gpa + len(seg.data), bytes(seg.memsz - len(seg.data)))
    if not any(s.gpa <= image.entry < s.gpa + max(s.memsz, 1) for s in image.segments):
        raise LoadError(f"{image.name}: entry point {image.entry:#x} is outside every loaded segment")
