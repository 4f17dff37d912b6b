"""QEMU as the oracle: every shipped real-mode guest prints the same console bytes and ends the same way under QEMU's PC (SeaBIOS, TCG) as under hvmlab."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hvm.console import ConsoleSink
from hvm.loader import load
from hvm.machine import RunOptions, run
from hvm.nasm import assemble_file, assemble_text

REPO = Path(__file__).resolve().parents[1]
GUESTS = REPO / "guests"
QEMU = shutil.which("qemu-system-i386")

SECTOR = 512
FLOPPY_BYTES = 1_474_560            # a 1.44 MB diskette: 80 cylinders, 2 heads, 18 sectors
MAX_GUEST_SECTORS = 17              # sectors 2-18 of the first track: one BIOS read
QEMU_TIMEOUT_S = 20.0
POLL_S = 0.05
EFLAGS_IF = 1 << 9

# What the chain loader writes to the debug console just before it jumps to the guest:
# everything QEMU's debugcon received up to and including it came from the firmware or the
# loader, everything after it from the guest.
MARKER = b"\x00hvmlab oracle: guest starts\x00"

# Guests not compared, with the reason (the name is the file's stem). The device guests that
# are compared (uart, pit, ide, ne2000) print only what both PCs must agree on; ide runs
# without a disk on both and both must report the empty channel.
NOT_COMPARED = {
    "runaway": "never ends (jmp $): only a host timer stops it, so there is no ending to compare",
    "cmos": "prints the RTC's time and the CMOS checksum: QEMU's RTC runs from the host clock "
            "and its CMOS has no checksum at 0x2E/0x2F; hvmlab's RTC starts at a fixed epoch",
    "pci": "QEMU's pc board also has the PIIX4 ACPI function at 00:01.3 (8086:7113), which "
           "hvmlab's PCI bus does not have",
}

# A boot sector that chain-loads the guest, as an MBR chain-loads a volume boot record: it
# moves itself out of the way to 0000:0600, reads the guest from sectors 2.. of the boot
# diskette to 0000:7C00 with INT 13h, prints MARKER on 0xE9 and enters the guest with the
# registers hvmlab's real-mode boot gives (hvm/boot.py): CS = DS = ES = SS = FS = GS = 0,
# SP = 7C00h, IF = 0, and DL = the boot drive as any BIOS leaves it. A failed read ends QEMU
# through the debug-exit port with status (0x7F << 1) | 1 = 255.
LOADER_SOURCE = """\
bits 16
org 0x600

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    cld
    mov si, 0x7c00
    mov di, 0x600
    mov cx, 256
    rep movsw
    jmp 0:relocated
relocated:
    mov [drive], dl
    sti                             ; the BIOS floppy service waits for IRQ 6
    mov bp, 4                       ; tries: a diskette read may need a reset first
.read:
    mov ax, 0x0200 | SECTORS        ; AH 02h read sectors, AL how many
    mov bx, 0x7c00                  ; to ES:BX
    mov cx, 0x0002                  ; cylinder 0, sector 2
    xor dh, dh                      ; head 0
    mov dl, [drive]
    int 0x13
    jnc .loaded
    xor ah, ah                      ; AH 00h reset the drive
    mov dl, [drive]
    int 0x13
    dec bp
    jnz .read
    mov al, 0x7f
    out 0xf4, al
.loaded:
    cli
    mov si, marker
.mark:
    lodsb
    out 0xe9, al
    cmp si, marker_end
    jne .mark
    xor ax, ax
    mov fs, ax
    mov gs, ax
    mov sp, 0x7c00
    mov dl, [drive]
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor esi, esi
    xor edi, edi
    xor ebp, ebp
    jmp 0:0x7c00

drive:  db 0
marker: db MARKER_BYTES
marker_end:
    times 510 - ($ - $$) db 0
    dw 0xaa55
"""


def real_mode_guests() -> list[Path]:
    """The shipped guests that are boot sectors: `bits 16` and `org 0x7c00` in the source."""
    found = []
    for path in sorted(GUESTS.glob("*.asm")):
        text = path.read_text(errors="replace")
        if (re.search(r"^\s*bits\s+16\b", text, re.M | re.I)
                and re.search(r"^\s*org\s+0x0*7c00\b", text, re.M | re.I)):
            found.append(path)
    return found


def floppy_image(guest: bytes) -> bytes:
    """Sector 1: the chain loader; sectors 2..: the guest; padded to a 1.44 MB diskette so
    the floppy controller sees a standard geometry."""
    sectors = -(-len(guest) // SECTOR)
    marker = ", ".join(str(b) for b in MARKER)
    text = LOADER_SOURCE.replace("SECTORS", str(sectors)).replace("MARKER_BYTES", marker)
    loader = assemble_text(text, "oracle_loader.asm").code
    assert len(loader) == SECTOR and loader.endswith(b"\x55\xaa")
    return (loader + guest.ljust(sectors * SECTOR, b"\0")).ljust(FLOPPY_BYTES, b"\0")


@dataclass
class QemuOutcome:
    console: bytes                  # what the guest wrote to 0xE9 (after MARKER)
    ending: str                     # in the words of hvmlab_ending()
    raw: bytes                      # everything the debugcon received
    serial: bytes                   # what COM1 sent (the loader sends nothing there)
    events: list[dict] = field(default_factory=list)


class Qmp:
    """QEMU's machine protocol over the child's stdin/stdout: one JSON object a line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.buffer = b""
        self.events: list[dict] = []

    def message(self, timeout: float) -> dict | None:
        end = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            left = end - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def take_rest(self, rest: bytes) -> None:
        """Keep the events among what QEMU wrote after the last answer read, as it exited."""
        for line in (self.buffer + rest).splitlines():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and "event" in message:
                self.events.append(message)
        self.buffer = b""

    def execute(self, command: str, arguments: dict[str, object] | None = None,
                timeout: float = 5.0) -> dict | None:
        """The command's reply ("return" or "error"), None if QEMU is gone or silent."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        while True:
            reply = self.message(timeout)
            if reply is None:
                return None
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply


def cpu_halted_with_if_clear(registers: str) -> bool | None:
    """From `info registers`: True if the CPU sits in HLT with IF=0, None if unreadable."""
    flags = re.search(r"EFL=([0-9a-fA-F]+)", registers)
    halted = re.search(r"HLT=(\d)", registers)
    if flags is None or halted is None:
        return None
    return halted.group(1) == "1" and not int(flags.group(1), 16) & EFLAGS_IF


def qemu_pc(workdir: Path) -> list[str]:
    """QEMU options for the PC hvmlab gives a guest (DESIGN.md section 7, hvmlab's default
    run): an i440FX/PIIX3 board (PIC, PIT, RTC, PCI, IDE without a disk) with 16 MiB, the
    debug console at 0xE9 and debug exit at 0xF4, COM1 (to workdir/com1.out), and an NE2000
    at 0x300 IRQ 9 with QEMU's first MAC 52:54:00:12:34:56 on a network that reaches nothing
    (frames it sends are in workdir/ne2000.pcap). No VGA, no option ROMs."""
    return [
        "-nodefaults", "-display", "none", "-no-reboot", "-machine", "pc", "-m", "16",
        "-accel", "tcg",
        "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
        "-chardev", f"file,id=dbg,path={workdir / 'debugcon.out'}",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01",
        "-chardev", f"file,id=com1,path={workdir / 'com1.out'}",
        "-serial", "chardev:com1",
        "-netdev", "hubport,id=net0,hubid=0",
        "-device", "ne2k_isa,iobase=0x300,irq=9,netdev=net0,mac=52:54:00:12:34:56",
        "-object", f"filter-dump,id=dump0,netdev=net0,file={workdir / 'ne2000.pcap'}",
    ]


def run_on_qemu(image: Path, workdir: Path, extra: Sequence[str] = ()) -> QemuOutcome:
    """Boot `image` from the floppy of qemu_pc(workdir) and wait for a terminal state: QEMU
    exited (debug exit, or a triple fault under -no-reboot), or its CPU halted with IF=0,
    which nothing but an NMI could end. The CPU state is asked through QMP's `info
    registers` (HLT=1, EFL.IF). `extra` adds QEMU options (e.g. `-hda disk.img`)."""
    assert QEMU is not None
    debugcon = workdir / "debugcon.out"
    cmd = [
        QEMU, *qemu_pc(workdir), "-boot", "a",
        "-drive", f"format=raw,file={image},if=floppy",
        "-qmp", "stdio", *extra,
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    qmp = Qmp(proc)
    halted = False
    try:
        greeting = qmp.message(QEMU_TIMEOUT_S)
        talking = greeting is not None and "QMP" in greeting \
            and qmp.execute("qmp_capabilities") is not None
        deadline = time.monotonic() + QEMU_TIMEOUT_S
        while talking and proc.poll() is None and time.monotonic() < deadline:
            reply = qmp.execute("human-monitor-command", {"command-line": "info registers"})
            if reply is not None and cpu_halted_with_if_clear(str(reply.get("return", ""))):
                halted = True
                qmp.execute("quit")
                break
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None and not halted:
            proc.kill()
        try:
            rest, stderr = proc.communicate(timeout=QEMU_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, stderr = proc.communicate()
    qmp.take_rest(rest)
    if halted:
        ending = "halted with IF=0"
    elif proc.returncode < 0:
        ending = f"still running after {QEMU_TIMEOUT_S:.0f} s"
    else:
        reset = any(e.get("event") == "SHUTDOWN"
                    and e.get("data", {}).get("reason") == "guest-reset" for e in qmp.events)
        # -no-reboot turns the reset a triple fault causes into a clean exit (status 0).
        ending = "triple fault" if reset else f"exited with status {proc.returncode}"
    raw = debugcon.read_bytes() if debugcon.exists() else b""
    at = raw.find(MARKER)
    if at < 0:
        pytest.fail(f"QEMU never reached the guest (ending: {ending}); debugcon {raw[:200]!r}; "
                    f"stderr {stderr.decode(errors='replace')[-500:]}")
    com1 = workdir / "com1.out"
    serial = com1.read_bytes() if com1.exists() else b""
    return QemuOutcome(raw[at + len(MARKER):], ending, raw, serial, qmp.events)


def hvmlab_ending(ended_by: str, status: int) -> str:
    """hvmlab's ending in the words QEMU's can be said in (DESIGN.md section 7)."""
    if ended_by == "debug_exit":
        return f"exited with status {status}"   # (v << 1) | 1, as isa-debug-exit
    if ended_by == "halt":
        return "halted with IF=0"               # hvmlab's status 0; QEMU does not exit
    if ended_by == "triple_fault":
        return "triple fault"
    return f"ended by {ended_by} (status {status}), which QEMU has no counterpart for"


def test_there_are_real_mode_guests_to_compare() -> None:
    names = {p.stem for p in real_mode_guests()}
    assert {"hello", "pass_through"} <= names
    assert "long_hello" not in names and "string_io" not in names


@pytest.mark.parametrize("source", real_mode_guests(), ids=lambda p: p.stem)
def test_same_console_and_ending_as_qemu(source: Path, tmp_path: Path) -> None:
    """Boot the guest under hvmlab and under QEMU; require the same console bytes on 0xE9, the
    same bytes sent through COM1 (where hvmlab's result reports them), and the same ending.

    How the guest reaches QEMU: a 1.44 MB diskette image whose boot sector is a chain loader
    (LOADER_SOURCE) and whose next sectors hold the guest as our front end assembled it.
    SeaBIOS boots the loader at 0000:7C00; the loader moves itself to 0000:0600, reads the
    guest to 0000:7C00 with INT 13h and enters it with hvmlab's boot registers. So guests
    longer than one sector (up to 17) run too, and the guest's own bytes are at 7C00h exactly.

    Stripping what is not the guest's: firmware may write to the debug console before the
    guest runs (SeaBIOS's own debug output goes to port 0x402 by default, but an option ROM
    or another build could use 0xE9). The loader writes MARKER to 0xE9 right before its jump;
    only the bytes after the marker's first occurrence are compared. This is exact: nothing
    is guessed from the guest's text, and a firmware that prints does not make it fail.

    The ending: a guest that writes V to the debug-exit port 0xF4 ends both with process
    status (V << 1) | 1. A guest that halts with IF=0 is finished for hvmlab (status 0), but
    QEMU never exits on its own then; so the test asks QEMU's monitor (QMP, `info
    registers`) until the CPU is in HLT with EFLAGS.IF clear, a state nothing but an NMI
    could leave, then reads the console and quits QEMU. "QEMU did not exit" alone would not
    tell a halted guest from one still looping; the register state does.
    """
    if QEMU is None:
        pytest.skip("qemu-system-i386 is not installed (apt-get install qemu-system-x86): "
                    "no oracle to compare with")
    if source.stem in NOT_COMPARED:
        pytest.skip(f"{source.stem}: {NOT_COMPARED[source.stem]}")
    assembly = assemble_file(source)
    assert (assembly.bits, assembly.org) == (16, 0x7C00), "not a boot-sector guest"
    sectors = -(-len(assembly.code) // SECTOR)
    if sectors > MAX_GUEST_SECTORS:
        pytest.skip(f"{source.stem} is {len(assembly.code)} bytes, more than the "
                    f"{MAX_GUEST_SECTORS} sectors the chain loader reads in one go")

    console = ConsoleSink()
    result = run(load(str(source)), RunOptions(timeout_s=10), console)
    ours = bytes(console.data)
    our_ending = hvmlab_ending(result.ended_by, result.exit_status)

    image = tmp_path / "floppy.img"
    image.write_bytes(floppy_image(assembly.code))
    theirs = run_on_qemu(image, tmp_path)

    assert ours, "the guest printed nothing under hvmlab: nothing to compare"
    assert theirs.console == ours, (
        f"console differs\n  hvmlab: {ours!r}\n  QEMU:   {theirs.console!r}")
    our_serial = getattr(result, "serial", None)   # COM1's output, where hvmlab reports it
    if our_serial is not None:
        assert theirs.serial.decode("utf-8", errors="replace") == our_serial, (
            f"COM1 differs\n  hvmlab: {our_serial!r}\n  QEMU:   {theirs.serial!r}")
    assert theirs.ending == our_ending, (
        f"ending differs: hvmlab {our_ending} ({result.message}); QEMU {theirs.ending}")
