"""The PV guest library (guests/pv/lib/*.inc) and its guests: struct offsets against pv/layouts.py, Xen constants against libxen-dev, hypercall-page calls, and the guests run against Dom0's backends."""

from __future__ import annotations

import ctypes
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import capstone
import pytest

from devicemodel.clock import MonotonicClock
from devicemodel.ide_disk import SECTOR_SIZE, FileBlockBackend
from devicemodel.pcap import PcapWriter, read_pcap
from hvm.console import ConsoleSink
from hvm.loader import load
from hvm.nasm import Assembly, assemble_file, assemble_text
from pv import hypercall_layouts as H
from pv import layouts as L
from pv.backends.blkback import Blkback
from pv.backends.console import ConsoleBackend
from pv.backends.netback import Dom0Pages, Netback
from pv.backends.xenbus_glue import XenbusGlue
from pv.bridge import Bridge
from pv.dom0 import Dom0
from pv.domain import PvRunResult

REPO = Path(__file__).resolve().parents[1]
GUESTS = REPO / "guests"
PV_LIB = GUESTS / "pv" / "lib"
PV_GUESTS = ("console", "blk", "net", "net_flip")
NASM = shutil.which("nasm")
GCC = shutil.which("gcc")
XEN_INCLUDE = Path("/usr/include/xen")
HYPERCALL_PAGE = 0x3000
X86_32 = L.X86_32

# Every library file, so one assembly sees every constant.
INCLUDES = "".join(f'%include "pv/lib/{p.name}"\n' for p in sorted(PV_LIB.glob("*.inc")))

# The C struct behind each "struct.member equ N" prefix the library uses.
STRUCTS: dict[str, Callable[[L.Arch], Any]] = {
    "start_info": L.start_info,
    "shared_info": L.shared_info,
    "vcpu_info": L.vcpu_info,
    "grant_entry_v1": L.grant_entry_v1,
    "gnttab_setup_table": L.gnttab_setup_table,
    "evtchn_alloc_unbound": L.evtchn_alloc_unbound,
    "evtchn_send": L.evtchn_send,
    "evtchn_unmask": L.evtchn_unmask,
    "evtchn_close": L.evtchn_close,
    "blkif_request": L.blkif_request,
    "blkif_request_segment": L.blkif_request_segment,
    "blkif_response": L.blkif_response,
    "netif_tx_request": L.netif_tx_request,
    "netif_tx_response": L.netif_tx_response,
    "netif_rx_request": L.netif_rx_request,
    "netif_rx_response": L.netif_rx_response,
    "xencons_interface": L.xencons_interface,
    "xenstore_domain_interface": L.xenstore_domain_interface,
    "xsd_sockmsg": L.xsd_sockmsg,
    "sched_shutdown": H.sched_shutdown,
    "sched_poll": H.sched_poll,
    "sring": lambda a: L.ring_sring(a, "blkif"),   # the header is the same for every ring
    "blkif_sring_entry": lambda a: L.ring_sring_entry(a, "blkif"),
    "netif_tx_sring_entry": lambda a: L.ring_sring_entry(a, "netif_tx"),
    "netif_rx_sring_entry": lambda a: L.ring_sring_entry(a, "netif_rx"),
}
# The library's own structures (no C header declares them).
OWN_STRUCTS = {"front_ring"}

EQU = re.compile(r"^\s*([A-Za-z_][\w.]*)\s+equ\b", re.MULTILINE)
# Constants named as Xen's public headers name them: their values come from the headers.
XEN_NAMED = re.compile(r"^(__HYPERVISOR_|SCHEDOP_|SHUTDOWN_|CONSOLEIO_|XENVER_|DOMID_|EVTCHNOP_"
                       r"|GNTTABOP_|GTF_|GNTST_|GNTTAB_|BLKIF_OP_|BLKIF_RSP_|BLKIF_MAX_|NETIF_RSP_"
                       r"|NETTXF_|NETRXF_|XS_(?!PAYLOAD_BUF$|REPLY_MAX$)|XENSTORE_|XenbusState)")


def library_constants() -> list[str]:
    names: list[str] = []
    for inc in sorted(PV_LIB.glob("*.inc")):
        names += EQU.findall(inc.read_text())
    return names


@cache
def constant_values() -> dict[str, int]:
    """Every equ of the library, as our assembler and (when installed) nasm compute it."""
    names = library_constants()
    text = ("bits 32\norg 0x100000\n" + INCLUDES
            + "".join(f"dd {name}\n" for name in names))
    ours = assemble_text(text, "constants.asm", include_dirs=[GUESTS]).code
    table = ours[-4 * len(names):]
    if NASM is not None:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "constants.asm", Path(tmp) / "constants.bin"
            src.write_text(text)
            done = subprocess.run([NASM, "-f", "bin", "-o", str(out), "-i", f"{GUESTS}/",
                                   str(src)], capture_output=True, text=True, cwd=REPO)
            assert done.returncode == 0, done.stderr
            assert out.read_bytes() == ours, "nasm and our front end disagree on the library"
    values = struct.unpack(f"<{len(names)}i", table)
    return dict(zip(names, values, strict=True))


def test_library_files_open_with_their_header_and_are_guarded() -> None:
    for inc in sorted(PV_LIB.glob("*.inc")):
        text = inc.read_text()
        assert text.splitlines()[0].startswith(f"; {inc.name} - "), inc
        assert re.search(r"^%ifndef HVMLAB_PV_\w+_INC$", text, re.MULTILINE), inc
    for name in PV_GUESTS:
        first = (GUESTS / "pv" / f"{name}.asm").read_text().splitlines()[0]
        assert first.startswith(f"; {name}: "), name


def test_including_the_library_twice_adds_nothing() -> None:
    once = assemble_text("bits 32\norg 0x100000\n" + INCLUDES, "once.asm",
                         include_dirs=[GUESTS])
    twice = assemble_text("bits 32\norg 0x100000\n" + INCLUDES + INCLUDES, "twice.asm",
                          include_dirs=[GUESTS])
    assert once.code == twice.code
    assert len(once.code) > 1000   # code, not only constants


def test_struct_offsets_and_sizes_match_the_x86_32_layouts() -> None:
    values = constant_values()
    checked = 0
    for name, value in values.items():
        if name.startswith("SIZEOF_"):
            struct_name, member = name[len("SIZEOF_"):], None
        elif "." in name:
            struct_name, member = name.split(".", 1)
        else:
            continue
        if struct_name in OWN_STRUCTS:
            continue
        assert struct_name in STRUCTS, f"{name}: no layout known for struct {struct_name}"
        layout = STRUCTS[struct_name](X86_32)
        if member is None:
            assert value == ctypes.sizeof(layout), name
        else:
            offsets = L.field_offsets(layout)
            key = "ring" if (struct_name, member) == ("sring", "ring") else member
            assert key in offsets, f"{name}: {struct_name} has no member {member}"
            assert value == offsets[key], f"{name} = {value}, the x86_32 layout says {offsets[key]}"
        checked += 1
    assert checked >= 60   # the library really declares the structures it uses


def test_ring_sizes_and_byte_rings_match_the_layouts() -> None:
    v = constant_values()
    assert v["BLKIF_RING_SIZE"] == L.ring_size(X86_32, "blkif") == 32
    assert v["NET_TX_RING_SIZE"] == L.ring_size(X86_32, "netif_tx") == 256
    assert v["NET_RX_RING_SIZE"] == L.ring_size(X86_32, "netif_rx") == 256
    cons = L.xencons_interface(X86_32)
    assert v["XENCONS_IN_SIZE"] == getattr(cons, "in").size
    assert v["XENCONS_OUT_SIZE"] == cons.out.size
    assert v["SIZEOF_vcpu_info"] == ctypes.sizeof(L.vcpu_info(X86_32))
    assert v["sring.req_prod"] == L.SRING_REQ_PROD and v["sring.rsp_event"] == L.SRING_RSP_EVENT


def test_fixed_pages_are_those_of_the_pv_domain_design() -> None:
    v = constant_values()
    assert (v["PV_START_INFO"], v["PV_SHARED_INFO"], v["HYPERCALL_PAGE"]) == \
        (0x1000, 0x2000, HYPERCALL_PAGE)


@cache
def header_values(names: tuple[str, ...]) -> dict[str, int]:
    """The named constants as gcc -m32 evaluates them from Xen's public headers."""
    prelude = "".join(f"#include <xen/{h}>\n" for h in (
        "xen.h", "sched.h", "version.h", "grant_table.h", "event_channel.h", "io/ring.h",
        "io/blkif.h", "io/netif.h", "io/console.h", "io/xs_wire.h", "io/xenbus.h"))
    body = "".join(f'    printf("%s %lld\\n", "{n}", (long long)({n}));\n' for n in names)
    source = f"#include <stdint.h>\n#include <stdio.h>\n{prelude}int main(void) {{\n{body}" \
             "    return 0;\n}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "consts.c", Path(tmp) / "consts"
        src.write_text(source)
        cc = subprocess.run([GCC or "gcc", "-m32", "-D__XEN_TOOLS__", "-o", str(exe), str(src)],
                            capture_output=True, text=True, timeout=60)
        if cc.returncode != 0 and ("gnu/stubs-32" in cc.stderr or "-lgcc" in cc.stderr):
            pytest.skip("gcc cannot build -m32 programs here (Debian: gcc-multilib)")
        assert cc.returncode == 0, cc.stderr[-2000:]
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    return {n: int(v) for n, v in (line.split() for line in run.stdout.splitlines())}


@pytest.mark.skipif(GCC is None, reason="gcc is not installed")
@pytest.mark.skipif(not (XEN_INCLUDE / "xen.h").exists(),
                    reason=f"{XEN_INCLUDE} missing (Debian: apt-get install libxen-dev)")
def test_xen_named_constants_have_the_values_of_the_headers() -> None:
    ours = constant_values()
    names = tuple(sorted(n for n in ours if XEN_NAMED.match(n)))
    assert len(names) >= 60
    theirs = header_values(names)
    # Signed 32-bit on both sides (DOMID_SELF and the GTF flags are unsigned but small).
    wrong = {n: (ours[n], theirs[n]) for n in names if ours[n] != theirs[n]}
    assert not wrong, f"ours vs the headers: {wrong}"


# -- hypercall-page calls of the guests -------------------------------------------------------

def hypercall_calls(asm: Assembly) -> list[tuple[int, int]]:
    """(address, target) of every `call` into the hypercall page, over the instructions the
    assembler laid out (data between them is never decoded)."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    base = asm.org or 0
    calls = []
    for addr in sorted(asm.lines):
        insn = next(md.disasm(asm.code[addr - base:addr - base + 15], addr), None)
        if insn is None or insn.mnemonic != "call" or not insn.op_str.startswith("0x"):
            continue
        target = int(insn.op_str, 16)
        if HYPERCALL_PAGE <= target < HYPERCALL_PAGE + 0x1000:
            calls.append((addr, target))
    return calls


@pytest.mark.parametrize("name", PV_GUESTS)
def test_guests_call_hypercall_stubs_at_page_plus_32_n(name: str) -> None:
    asm = assemble_file(GUESTS / "pv" / f"{name}.asm")
    assert asm.org == 0x100000 and asm.bits == 32
    v = constant_values()
    implemented = {v[f"__HYPERVISOR_{h}"] for h in (
        "set_callbacks", "xen_version", "console_io", "grant_table_op", "sched_op",
        "event_channel_op")}
    calls = hypercall_calls(asm)
    numbers = set()
    for addr, target in calls:
        offset = target - HYPERCALL_PAGE
        assert offset % 32 == 0, f"call at {addr:#x} lands inside a stub ({target:#x})"
        numbers.add(offset // 32)
    assert numbers == implemented, sorted(numbers)
    # Each stub is called from exactly one wrapper of hypercall.inc.
    assert len(calls) == len(implemented)
    hypercall_lines = {asm.lines[a][0] for a, _ in calls}
    assert hypercall_lines == {"hypercall.inc"}


@pytest.mark.parametrize("name", PV_GUESTS)
def test_guests_start_at_their_load_address(name: str) -> None:
    asm = assemble_file(GUESTS / "pv" / f"{name}.asm")
    assert asm.symbols["start"] == 0x100000
    assert asm.code[:1] == b"\xfc"   # cld: the library's string routines count on DF = 0


def test_blk_batch_size_is_a_parameter() -> None:
    source = (GUESTS / "pv" / "blk.asm").read_text()
    default = assemble_text(source, "blk.asm", include_dirs=[GUESTS])
    eight = assemble_text("%define BLK_BATCH 8\n" + source, "blk.asm", include_dirs=[GUESTS])
    assert default.code != eight.code
    with pytest.raises(Exception, match="BLK_BATCH must be 1..32"):
        assemble_text("%define BLK_BATCH 33\n" + source, "blk.asm", include_dirs=[GUESTS])


# -- the guests, run as PV domains against Dom0's backends ------------------------------------

@dataclass
class Ran:
    results: list[PvRunResult]
    flushes: int = 0
    netback: Any = None
    pcap: list[tuple[int, bytes]] = field(default_factory=list)


class CountingDisk:
    """A raw image whose flush() calls are counted (BLKIF_OP_FLUSH_DISKCACHE reaches it)."""

    def __init__(self, path: Path) -> None:
        self.disk = FileBlockBackend(path)
        self.flushes = 0
        self.sectors = self.disk.sectors
        self.read_only = self.disk.read_only

    def read(self, lba: int, count: int) -> bytes:
        return self.disk.read(lba, count)

    def write(self, lba: int, data: bytes) -> None:
        self.disk.write(lba, data)

    def flush(self) -> None:
        self.flushes += 1
        self.disk.flush()


def run_guests(sources: list[Path], tmp_path: Path, *, disk: Path | None = None,
               reorder: bool = False, vifs: bool = False) -> Ran:
    """Build one domain per source with a console backend (and a vbd 51712 on `disk`, a
    vif 0 on a bridge), run them all to their end, stop everything."""
    dom0 = Dom0()
    dom0.start()
    stops: list[Callable[[], None]] = []
    counting = CountingDisk(disk) if disk is not None else None
    netback = None
    pcap_path = tmp_path / "bridge.pcap"
    try:
        consoles = ConsoleBackend()
        consoles.start()
        stops.append(consoles.stop)
        vbds = vif_glue = bridge = None
        if counting is not None:
            blkback = Blkback(reorder=reorder)
            blkback.start()
            stops.append(blkback.stop)
            vbds = XenbusGlue(dom0.xs_client(), "vbd")
            vbds.start()
            stops.append(vbds.stop)
        if vifs:
            pcap = PcapWriter(pcap_path, MonotonicClock())
            stops.append(pcap.close)
            bridge = Bridge(pcap)
            netback = Netback(Dom0Pages(dom0.memory, [dom0.alloc_frame() for _ in range(32)]))
            netback.start()
            stops.append(netback.stop)
            vif_glue = XenbusGlue(dom0.xs_client(), "vif")
            vif_glue.start()
            stops.append(vif_glue.stop)
        domains = []
        for source in sources:
            domain = dom0.create_pv_domain(load(str(source)), console=ConsoleSink())
            consoles.attach(domain, domain.console_gfn, domain.console_port, domain.console)
            if vbds is not None and counting is not None:
                vbds.add_device(domain.domid, 51712, blkback.vbd(domain, 51712, counting))
            if vif_glue is not None and netback is not None:
                vif_glue.add_device(domain.domid, 0, netback.vif_driver(domain, 0, bridge))
            domains.append(domain)
        dom0.run_domains(domains, 20.0)
        results = [d.result(0.0) for d in domains]
    finally:
        for stop in reversed(stops):
            stop()
        dom0.stop()
    return Ran(results, counting.flushes if counting is not None else 0,
               netback.stats() if netback is not None else None,
               read_pcap(pcap_path) if vifs else [])


def sector_pattern(sector: int) -> bytes:
    text = f"hvmlab pv blk sector {sector}".encode()
    return text + bytes(i & 0xFF for i in range(len(text), SECTOR_SIZE))


def test_console_guest_prints_through_its_ring_only(tmp_path: Path) -> None:
    (r,) = run_guests([GUESTS / "pv" / "console.asm"], tmp_path).results
    assert (r.ended_by, r.exit_status) == ("shutdown_poweroff", 0), r.message
    lines = r.console.splitlines()
    assert lines[-1] == "Test result: SUCCESS"
    numbered = [ln for ln in lines if ln.startswith("console: line ")]
    assert len(numbered) == 40 and numbered[-1].startswith("console: line 40 of 40: ")
    assert sum(len(ln) + 1 for ln in lines) > 2048   # more than out[] holds: it wrapped
    assert "console_io" not in r.hypercalls            # not one byte through the hypercall
    assert "console: xencons_interface at 00005000, event channel 2" in lines


@pytest.mark.parametrize("reorder", [False, True], ids=["fifo", "by-sector"])
def test_blk_guest_writes_flushes_reads_back_and_batches(tmp_path: Path, reorder: bool) -> None:
    disk = tmp_path / "xvda.img"
    disk.write_bytes(bytes(64 * SECTOR_SIZE))
    ran = run_guests([GUESTS / "pv" / "blk.asm"], tmp_path, disk=disk, reorder=reorder)
    (r,) = ran.results
    assert (r.ended_by, r.exit_status) == ("shutdown_poweroff", 0), r.console
    assert r.console.splitlines()[-1] == "Test result: SUCCESS"
    data = disk.read_bytes()
    for sector in (5, 8, 9, 10, 11):
        assert data[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE] == sector_pattern(sector)
    assert data[12 * SECTOR_SIZE:] == bytes(52 * SECTOR_SIZE)   # nothing else written
    assert ran.flushes == 1
    # Each batch of 4 was pushed once, while the backend slept: one notification each.
    assert r.console.count("blk: batch of 4 WRITEs, one push, notifications: 1") == 1
    assert r.console.count("blk: batch of 4 READs, one push, notifications: 1") == 1
    orders = [ln for ln in r.console.splitlines() if ln.startswith("blk: responses by id:")]
    # Queued from the highest sector down: a backend serving by sector answers backwards.
    expected = ["00000103 00000102 00000101 00000100", "00000203 00000202 00000201 00000200"] \
        if reorder else ["00000100 00000101 00000102 00000103",
                         "00000200 00000201 00000202 00000203"]
    assert [ln.removeprefix("blk: responses by id: ").split(" (")[0] for ln in orders] == expected


def test_blk_guest_without_a_vbd_fails_cleanly(tmp_path: Path) -> None:
    (r,) = run_guests([GUESTS / "pv" / "blk.asm"], tmp_path).results
    assert r.ended_by == "shutdown_crash"
    lines = r.console.splitlines()
    assert lines[-1] == "Test result: FAILURE"
    assert "xenstore: device/vbd/51712/backend-id: ENOENT" in lines


@pytest.mark.parametrize("guest", ["net", "net_flip"])
def test_two_net_guests_greet_each_other_through_the_bridge(tmp_path: Path, guest: str) -> None:
    ran = run_guests([GUESTS / "pv" / f"{guest}.asm"] * 2, tmp_path, vifs=True)
    for me, r in enumerate(ran.results, start=1):
        other = 3 - me
        assert (r.ended_by, r.exit_status) == ("shutdown_poweroff", 0), r.console
        assert r.console.splitlines()[-1] == "Test result: SUCCESS"
        assert (f"net: received 60 bytes from 00:16:3e:00:00:{other:02x}: "
                f"hello from pv net {other}") in r.console
    assert ran.netback.tx_errors == ran.netback.rx_errors == 0
    if guest == "net_flip":
        assert ran.netback.flips >= 2
    else:
        assert ran.netback.flips == 0 and ran.netback.rx_frames >= 2
    # On the wire: broadcast, the sender's MAC, ethertype 88b5, the greeting, 60 bytes.
    frames = [f for _, f in ran.pcap]
    for domid in (1, 2):
        mac = bytes([0x00, 0x16, 0x3E, 0, 0, domid])
        greeting = b"\xff" * 6 + mac + b"\x88\xb5" + f"hello from pv net {domid}".encode()
        assert greeting.ljust(60, b"\0") in frames
