"""Guests in three forms (.asm, flat .bin, ELF), mode and load-address rules, and bad input."""

from __future__ import annotations

import pytest
from elf_builder import elf32, elf64

from hvm.loader import LoadError, load, shipped_guests
from hvm.nasm import assemble_text

PRINT_E32 = "bits 32\n cli\n mov al, 'E'\n out 0xe9, al\n hlt\n"
PRINT_L64 = "bits 64\n cli\n mov al, 'L'\n out 0xe9, al\n hlt\n"


def test_asm_bits_and_org_choose_mode_and_load_address():
    image = load("hello")
    assert (image.bits, image.entry, image.kind) == (16, 0x7C00, "asm")
    image = load("string_io")
    assert (image.bits, image.entry) == (32, 0x100000)


def test_flags_override_the_source(tmp_path):
    src = tmp_path / "noorg.asm"
    src.write_text("bits 32\n cli\n hlt\n")
    assert load(str(src)).entry == 0x100000  # default for protected mode
    assert load(str(src), load_address=0x200000).entry == 0x200000


def test_flat_binary_defaults_to_real_mode_at_7c00(tmp_path, run_guest):
    binary = tmp_path / "e.bin"
    binary.write_bytes(assemble_text("bits 16\n cli\n mov al, 'B'\n out 0xe9, al\n hlt\n").code)
    image = load(str(binary))
    assert (image.bits, image.entry, image.kind) == (16, 0x7C00, "bin")
    result, _ = run_guest(str(binary))
    assert result.console == "B" and result.exit_status == 0
    binary32 = tmp_path / "e32.bin"
    binary32.write_bytes(assemble_text(PRINT_E32).code)
    result, _ = run_guest(str(binary32), mode=32, load_address=0x300000)
    assert result.console == "E" and result.mode == "protected"


def test_elf32_and_elf64_run_from_their_entry_points(tmp_path, run_guest):
    e32 = tmp_path / "g32.elf"
    e32.write_bytes(elf32(assemble_text(PRINT_E32).code, bss=64))
    image = load(str(e32))
    assert (image.kind, image.bits, image.entry) == ("elf", 32, 0x200000)
    result, records = run_guest(str(e32))
    assert result.console == "E" and records[0]["rip"] == 0x200000 + 1 + 2
    e64 = tmp_path / "g64.elf"
    e64.write_bytes(elf64(assemble_text(PRINT_L64).code))
    result, _ = run_guest(str(e64))
    assert result.console == "L" and result.mode == "long"


def test_truncated_and_malformed_elf_are_one_line_errors(tmp_path):
    good = elf32(assemble_text(PRINT_E32).code)
    for name, data in (("short.elf", good[:60]), ("cut.elf", good[:-3]), ("junk.elf", b"\x7fELF" + b"\xff" * 10)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(LoadError) as err:
            load(str(path))
        assert name in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_unknown_guest(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        load(str(tmp_path / "nope.asm"))
    with pytest.raises(LoadError, match="no shipped guest"):
        load("no-such-guest")


def test_image_that_does_not_fit_or_overlaps_the_loader_tables(tmp_path, run_guest):
    src = tmp_path / "low.asm"
    src.write_text("bits 32\norg 0x1000\n cli\n hlt\n")
    with pytest.raises(LoadError, match="overlaps"):
        run_guest(str(src))
    with pytest.raises(LoadError, match="does not fit"):
        run_guest("string_io", load_address=0x10_0000, mem=1 << 20)


def test_every_shipped_guest_has_a_header_comment():
    guests = shipped_guests()
    assert len(guests) >= 10
    for path in guests:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"; {path.stem}:"), path.name
