"""Every shipped guest and every sample assembles to the same bytes with our front end and nasm."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hvm.nasm import assemble_file, assemble_text

REPO = Path(__file__).resolve().parents[1]
GUESTS = REPO / "guests"
NASM = shutil.which("nasm")

# Discovered at collection time: guests are added beside this test all the time.
SOURCES = sorted(GUESTS.glob("**/*.asm")) + sorted((REPO / "tests" / "asm_samples").glob("*.asm"))


def nasm_bin(source: Path, out: Path) -> bytes:
    if NASM is None:
        pytest.skip("nasm is not installed (apt-get install nasm): nothing to compare with")
    done = subprocess.run([NASM, "-f", "bin", "-o", str(out), str(source), "-i", f"{GUESTS}/"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def test_there_are_samples_to_compare() -> None:
    samples = [p for p in SOURCES if "asm_samples" in p.parts]
    assert len(samples) >= 5
    assert {assemble_file(p).bits for p in samples} == {16, 32, 64}


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_same_bytes_as_nasm(source: Path, tmp_path: Path) -> None:
    theirs = nasm_bin(source, tmp_path / "nasm.bin")
    ours = assemble_file(source).code
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                  min(len(ours), len(theirs)))
        pytest.fail(f"{source.name}: {len(ours)} bytes vs nasm's {len(theirs)}; first "
                    f"difference at offset {at:#x}: ours {ours[at:at + 8].hex()} "
                    f"nasm {theirs[at:at + 8].hex()}")


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_console_library_assembles_in_every_mode_like_nasm(bits: int, tmp_path: Path) -> None:
    text = (f"bits {bits}\n%include \"lib/ports.inc\"\n%include \"lib/console.inc\"\n"
            "%include \"lib/console.inc\"\n"    # guarded: a second include adds nothing
            "call puts\ncall putc\ncall puthex16\nmov al, EXIT_PORT\n")
    ours = assemble_text(text, "uses_console.asm")
    assert {"putc", "puts", "puthex16"} <= set(ours.symbols)
    src = tmp_path / "uses_console.asm"
    src.write_text(text)
    assert ours.code == nasm_bin(src, tmp_path / "out.bin")


def test_library_include_files_open_with_a_header_comment() -> None:
    for inc in (GUESTS / "lib" / "console.inc", GUESTS / "lib" / "ports.inc"):
        first = inc.read_text().splitlines()[0]
        assert first.startswith(f"; {inc.name} - "), inc
