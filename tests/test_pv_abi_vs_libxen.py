"""pv/ layouts, constants and ring/event bytes against Xen's headers compiled with gcc, native and -m32 (libxen-dev)."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from hvm.abi import StructLayout, default_registry
from pv import grant_table as gt
from pv import layouts, shared_info
from pv.abi_pv import X86_64_SUFFIX, pv_layouts
from pv.grant_table import Copy, CopyPtr
from pv.ring import BackRing, FrontRing, SharedRing
from pv.shared_info import SharedInfo, StartInfo

XEN_INCLUDE = Path("/usr/include/xen")
GCC = shutil.which("gcc")

pytestmark = [
    pytest.mark.skipif(GCC is None, reason="gcc is not installed (Debian: gcc, gcc-multilib)"),
    pytest.mark.skipif(not (XEN_INCLUDE / "io/ring.h").exists(),
                       reason=f"{XEN_INCLUDE} missing (Debian: apt-get install libxen-dev)"),
]

ARCH_FLAGS = {"x86_64": "-m64", "x86_32": "-m32"}
ARCHES = sorted(ARCH_FLAGS)

# __XEN_TOOLS__ gives the latest interface version, as QEMU and libxl build against; the
# headers use <stdint.h> types without including it.
PRELUDE = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/console.h>
#include <xen/io/xs_wire.h>
/* ring.h leaves the barriers to its user (libxc defines them for the tools). */
#define xen_mb() __sync_synchronize()
#define xen_rmb() __asm__ __volatile__("" ::: "memory")
#define xen_wmb() __asm__ __volatile__("" ::: "memory")
static int first_item = 1;
static void sep(void) { if (!first_item) printf(", "); first_item = 0; }
static void hex(const char *name, const void *v, size_t n) {
    const unsigned char *p = v;
    sep(); printf("\"%s\": \"", name);
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
    printf("\"");
}
static void num(const char *name, long long v) { sep(); printf("\"%s\": %lld", name, v); }
"""


@cache
def m32_missing() -> str:
    """Why gcc cannot build and run a -m32 program here ("" if it can)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        src.write_text("#include <stdio.h>\nint main(void) { return 0; }\n")
        cc = subprocess.run([GCC or "gcc", "-m32", "-o", str(exe), str(src)],
                            capture_output=True, text=True, timeout=60)
        if cc.returncode != 0:
            return cc.stderr[-300:]
        return "" if subprocess.run([str(exe)], timeout=30).returncode == 0 else "cannot run"


def run_c(tmp_path: Path, body: str, arch: str, name: str) -> dict[str, Any]:
    """Compile `body` (statements printing JSON items) for `arch`, run it, parse its object."""
    if arch == "x86_32" and m32_missing():
        pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {m32_missing()}")
    src, exe = tmp_path / f"{name}_{arch}.c", tmp_path / f"{name}_{arch}"
    src.write_text(PRELUDE + "int main(void) {\n    printf(\"{\");\n" + body
                   + "    printf(\"}\\n\");\n    return 0;\n}\n")
    cc = subprocess.run([GCC or "gcc", "-std=gnu11", "-D__XEN_TOOLS__", ARCH_FLAGS[arch],
                         "-o", str(exe), str(src)], capture_output=True, text=True, timeout=60)
    if cc.returncode != 0:
        raise AssertionError(f"gcc failed:\n{cc.stderr}\n{src.read_text()}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def pv_layouts_for(arch: str) -> list[StructLayout]:
    return [lay for lay in pv_layouts() if arch in lay.arches]


# --- layouts ------------------------------------------------------------------------------------

def test_every_pv_struct_is_registered_for_both_arches() -> None:
    names = {lay.name for lay in default_registry().layouts()}
    for spec in layouts.pv_structs():
        assert spec.name in names
        claimed = {arch for lay in pv_layouts()
                   if lay.name in (spec.name, spec.name + X86_64_SUFFIX) for arch in lay.arches}
        assert claimed == set(ARCH_FLAGS), spec.name


@pytest.mark.parametrize("arch", ARCHES)
def test_pv_layouts_equal_what_gcc_says(tmp_path: Path, arch: str) -> None:
    body = []
    for lay in pv_layouts_for(arch):
        body.append(f'    num("{lay.name}:size", (long long)sizeof({lay.c_type}));\n')
        for member in lay.fields:
            body.append(f'    num("{lay.name}:{member}", '
                        f"(long long)offsetof({lay.c_type}, {member}));\n")
    c_says = run_c(tmp_path, "".join(body), arch, "pv_layouts")
    for lay in pv_layouts_for(arch):
        mine = {"size": lay.size, **lay.fields}
        from_c = {key.split(":", 1)[1]: v for key, v in c_says.items()
                  if key.split(":", 1)[0] == lay.name}
        assert mine == from_c, f"{lay.name} ({arch}) differs from {lay.header}"


@pytest.mark.parametrize("arch", ARCHES)
def test_design_facts_hold_in_the_headers(tmp_path: Path, arch: str) -> None:
    # The numbers DESIGN.md section 5 quotes, asked of gcc rather than of our own layouts.
    got = run_c(tmp_path, r"""
    num("start_info", sizeof(struct start_info));
    num("blkif_request", sizeof(struct blkif_request));
    num("blkif_request.id", offsetof(struct blkif_request, id));
    num("blkif_request.sector_number", offsetof(struct blkif_request, sector_number));
    num("blkif_request.seg", offsetof(struct blkif_request, seg));
    num("gnttab_copy", sizeof(struct gnttab_copy));
    num("evtchn_pending", offsetof(struct shared_info, evtchn_pending));
    num("evtchn_mask", offsetof(struct shared_info, evtchn_mask));
    num("ring", offsetof(struct blkif_sring, ring));
""", arch, "facts")
    assert got["ring"] == 64
    assert (got["evtchn_pending"], got["evtchn_mask"]) == \
        ((2048, 2176) if arch == "x86_32" else (2048, 2560))
    if arch == "x86_32":
        assert got["start_info"] == 1112 and got["gnttab_copy"] == 24
        assert [got[k] for k in ("blkif_request", "blkif_request.id",
                                 "blkif_request.sector_number", "blkif_request.seg")] \
            == [108, 4, 12, 20]


@pytest.mark.parametrize("arch", ARCHES)
def test_ring_sizes_equal_const_ring_size(tmp_path: Path, arch: str) -> None:
    body = "".join(f'    num("{r}", __CONST_RING_SIZE({r}, 4096));\n' for r in layouts.RINGS)
    got = run_c(tmp_path, body, arch, "ring_sizes")
    a = layouts.arch_named(arch)
    assert got == {r: layouts.ring_size(a, r) for r in layouts.RINGS}
    for ring, (req, rsp) in layouts.RINGS.items():
        sring = SharedRing(memoryview(bytearray(4096)), ctypes.sizeof(req(a)),
                           ctypes.sizeof(rsp(a)))
        assert sring.nr_ents == got[ring]


# --- constants ----------------------------------------------------------------------------------

GRANT_CONSTANTS = [name for name in dir(gt) if name.startswith(("GTF_", "GNTST_", "GNTTABOP_",
                                                                "GNTMAP_", "GNTCOPY_"))
                   and name != "GNTST_NAMES"] + ["DOMID_SELF"]
OTHER_CONSTANTS = {
    "SIF_PRIVILEGED": shared_info.SIF_PRIVILEGED, "SIF_INITDOMAIN": shared_info.SIF_INITDOMAIN,
    "SIF_MULTIBOOT_MOD": shared_info.SIF_MULTIBOOT_MOD,
    "SIF_MOD_START_PFN": shared_info.SIF_MOD_START_PFN,
    "SIF_VIRT_P2M_4TOOLS": shared_info.SIF_VIRT_P2M_4TOOLS,
    "MAX_GUEST_CMDLINE": layouts.MAX_GUEST_CMDLINE,
    "XEN_LEGACY_MAX_VCPUS": layouts.XEN_LEGACY_MAX_VCPUS,
    "BLKIF_MAX_SEGMENTS_PER_REQUEST": layouts.BLKIF_MAX_SEGMENTS_PER_REQUEST,
    "XENSTORE_RING_SIZE": layouts.XENSTORE_RING_SIZE,
}


def test_constants_equal_the_headers(tmp_path: Path) -> None:
    ours = {name: getattr(gt, name) for name in GRANT_CONSTANTS} | OTHER_CONSTANTS
    body = "".join(f'    num("{name}", (long long)({name}));\n' for name in ours)
    assert run_c(tmp_path, body, "x86_64", "constants") == ours


# --- bytes: rings, event bits, start_info, gnttab_copy ------------------------------------------

RING_SCRIPT = r"""
    static unsigned char page[4096] __attribute__((aligned(4096)));
    blkif_sring_t *s = (blkif_sring_t *)page;
    blkif_front_ring_t f; blkif_back_ring_t b;
    const RING_IDX start = 0xfffffffeu;
    int n1, n2, n3, n4, w1, w2;
    SHARED_RING_INIT(s);
    s->req_prod = s->rsp_prod = start; s->req_event = s->rsp_event = start + 1;
    FRONT_RING_ATTACH(&f, s, start, 4096);
    BACK_RING_ATTACH(&b, s, start, 4096);
    for (int i = 0; i < 3; i++) {
        struct blkif_request *r = RING_GET_REQUEST(&f, f.req_prod_pvt++);
        memset(r, 0, sizeof *r);
        r->operation = BLKIF_OP_READ; r->nr_segments = 1; r->id = 100 + i;
        r->sector_number = 8 * i; r->seg[0].gref = 20 + i; r->seg[0].last_sect = 7;
    }
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f, n1);
    struct blkif_request got[5]; int taken = 0;
    while (RING_HAS_UNCONSUMED_REQUESTS(&b)) RING_COPY_REQUEST(&b, b.req_cons++, &got[taken++]);
    RING_FINAL_CHECK_FOR_REQUESTS(&b, w1);
    for (int i = 3; i < 5; i++) {
        struct blkif_request *r = RING_GET_REQUEST(&f, f.req_prod_pvt++);
        memset(r, 0, sizeof *r);
        r->operation = BLKIF_OP_WRITE; r->nr_segments = 1; r->id = 100 + i;
        r->sector_number = 8 * i; r->seg[0].gref = 20 + i; r->seg[0].last_sect = 7;
    }
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f, n2);
    while (RING_HAS_UNCONSUMED_REQUESTS(&b)) RING_COPY_REQUEST(&b, b.req_cons++, &got[taken++]);
    for (int i = 0; i < taken; i++) {
        struct blkif_response *p = RING_GET_RESPONSE(&b, b.rsp_prod_pvt++);
        memset(p, 0, sizeof *p);
        p->id = got[i].id; p->operation = got[i].operation; p->status = BLKIF_RSP_OKAY;
    }
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b, n3);
    while (RING_HAS_UNCONSUMED_RESPONSES(&f)) f.rsp_cons++;
    RING_FINAL_CHECK_FOR_RESPONSES(&f, w2);
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b, n4);
    num("n1", n1); num("n2", n2); num("n3", n3); num("n4", n4); num("w1", !!w1); num("w2", !!w2);
    num("req_cons", b.req_cons); num("rsp_cons", f.rsp_cons);
    hex("page", page, sizeof page);
"""


@pytest.mark.parametrize("arch", ARCHES)
def test_blkif_ring_session_leaves_the_same_page_as_ring_h(tmp_path: Path, arch: str) -> None:
    # The same session, across the 2^32 wrap, through ring.h's macros and through pv.ring:
    # the same notify decisions and the same bytes on the page.
    c = run_c(tmp_path, RING_SCRIPT, arch, "ring_session")
    a = layouts.arch_named(arch)
    Req, Rsp = layouts.blkif_request(a), layouts.blkif_response(a)
    page = bytearray(4096)
    sring = SharedRing(memoryview(page), ctypes.sizeof(Req), ctypes.sizeof(Rsp))
    start = 0xFFFF_FFFE
    sring.init(start)
    front, back = FrontRing(sring, start), BackRing(sring, start)

    def request(i: int, op: int) -> bytes:
        r = Req()
        r.operation, r.nr_segments, r.id, r.sector_number = op, 1, 100 + i, 8 * i
        r.seg[0].gref, r.seg[0].last_sect = 20 + i, 7
        return bytes(r)

    for i in range(3):
        front.put_request(request(i, 0))
    n1 = front.push_requests()
    got = [Req.from_buffer_copy(back.take_request()) for _ in range(back.unconsumed_requests())]
    w1 = back.final_check_for_requests()
    for i in range(3, 5):
        front.put_request(request(i, 1))
    n2 = front.push_requests()
    got += [Req.from_buffer_copy(back.take_request()) for _ in range(back.unconsumed_requests())]
    for req in got:
        rsp = Rsp()
        rsp.id, rsp.operation, rsp.status = req.id, req.operation, 0
        back.put_response(bytes(rsp))
    n3 = back.push_responses()
    while front.unconsumed_responses():
        front.take_response()
    w2 = front.final_check_for_responses()
    n4 = back.push_responses()
    assert [g.id for g in got] == [100, 101, 102, 103, 104]
    ours = {"n1": n1, "n2": n2, "n3": n3, "n4": n4, "w1": w1, "w2": w2,
            "req_cons": back.req_cons, "rsp_cons": front.rsp_cons}
    assert ours == {k: (bool(v) if k[0] in "nw" else v) for k, v in c.items() if k != "page"}
    assert page.hex() == c["page"]


@pytest.mark.parametrize("arch", ARCHES)
def test_event_bits_land_where_the_header_puts_them(tmp_path: Path, arch: str) -> None:
    # Ports 3 and 37 (two words on x86_32, one on x86_64), a masked port 70, vCPU 1's port 900.
    c = run_c(tmp_path, r"""
    static struct shared_info si; memset(&si, 0, sizeof si);
    const unsigned bits = sizeof(xen_ulong_t) * 8;
    unsigned ports[] = {3, 37};
    si.evtchn_mask[70 / bits] |= (xen_ulong_t)1 << (70 % bits);
    si.evtchn_pending[70 / bits] |= (xen_ulong_t)1 << (70 % bits);
    for (int i = 0; i < 2; i++) {
        si.evtchn_pending[ports[i] / bits] |= (xen_ulong_t)1 << (ports[i] % bits);
        si.vcpu_info[0].evtchn_pending_sel |= (xen_ulong_t)1 << (ports[i] / bits);
    }
    si.vcpu_info[0].evtchn_upcall_pending = 1;
    si.evtchn_pending[900 / bits] |= (xen_ulong_t)1 << (900 % bits);
    si.vcpu_info[1].evtchn_pending_sel |= (xen_ulong_t)1 << (900 / bits);
    si.vcpu_info[1].evtchn_upcall_pending = 1;
    hex("shared_info", &si, sizeof si);
""", arch, "event_bits")
    page = bytearray(4096)
    si = SharedInfo(memoryview(page), arch)
    si.mask(70)
    assert si.set_pending(70) is False
    assert si.set_pending(3) is True
    assert si.set_pending(37) is False
    assert si.set_pending(900, vcpu=1) is True
    size = ctypes.sizeof(layouts.shared_info(layouts.arch_named(arch)))
    assert page[:size].hex() == c["shared_info"]


@pytest.mark.parametrize("arch", ARCHES)
def test_start_info_packs_as_c_fills_it(tmp_path: Path, arch: str) -> None:
    c = run_c(tmp_path, r"""
    static struct start_info s; memset(&s, 0, sizeof s);
    strcpy(s.magic, sizeof(long) == 4 ? "xen-3.0-x86_32p" : "xen-3.0-x86_64");
    s.nr_pages = 8192; s.shared_info = 0x3000; s.flags = SIF_INITDOMAIN;
    s.store_mfn = 0x1f; s.store_evtchn = 1; s.console.domU.mfn = 0x20; s.console.domU.evtchn = 2;
    s.pt_base = 0xc0400000u; s.nr_pt_frames = 6; s.mfn_list = 0xc0200000u;
    s.mod_start = 0xc0800000u; s.mod_len = 4096;
    strcpy((char *)s.cmd_line, "earlyprintk=xen");
    s.first_p2m_pfn = 0x200; s.nr_p2m_frames = 3;
    hex("start_info", &s, sizeof s);
""", arch, "start_info")
    info = StartInfo(nr_pages=8192, shared_info=0x3000, flags=shared_info.SIF_INITDOMAIN,
                     store_mfn=0x1F, store_evtchn=1, console_mfn=0x20, console_evtchn=2,
                     pt_base=0xC0400000, nr_pt_frames=6, mfn_list=0xC0200000,
                     mod_start=0xC0800000, mod_len=4096, cmd_line=b"earlyprintk=xen",
                     first_p2m_pfn=0x200, nr_p2m_frames=3)
    assert info.pack(arch).hex() == c["start_info"]


@pytest.mark.parametrize("arch", ARCHES)
def test_gnttab_copy_decodes_what_a_guest_filled(tmp_path: Path, arch: str) -> None:
    c = run_c(tmp_path, r"""
    struct gnttab_copy op[2]; memset(op, 0, sizeof op);
    op[0].source.u.ref = 17; op[0].source.domid = 1; op[0].source.offset = 100;
    op[0].dest.u.gmfn = 0x2345; op[0].dest.domid = DOMID_SELF; op[0].dest.offset = 8;
    op[0].len = 1500; op[0].flags = GNTCOPY_source_gref;
    op[1].source.u.gmfn = 0x77; op[1].source.domid = DOMID_SELF; op[1].source.offset = 0;
    op[1].dest.u.ref = 0x1234; op[1].dest.domid = 3; op[1].dest.offset = 4095;
    op[1].len = 1; op[1].flags = GNTCOPY_dest_gref;
    hex("op0", &op[0], sizeof op[0]); hex("op1", &op[1], sizeof op[1]);
""", arch, "gnttab_copy")
    assert Copy.from_bytes(bytes.fromhex(c["op0"]), arch) == Copy(
        CopyPtr(17, 1, 100), CopyPtr(0x2345, gt.DOMID_SELF, 8), 1500, gt.GNTCOPY_source_gref)
    assert Copy.from_bytes(bytes.fromhex(c["op1"]), arch) == Copy(
        CopyPtr(0x77, gt.DOMID_SELF, 0), CopyPtr(0x1234, 3, 4095), 1, gt.GNTCOPY_dest_gref)
