"""hvm.abi layouts and our packed bytes against Xen's headers, compiled with gcc (libxen-dev)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hvm import bufioreq, ioreq
from hvm.abi import StructLayout, abi_facts, default_registry

XEN_INCLUDE = Path("/usr/include")
IOREQ_HEADER = XEN_INCLUDE / "xen/hvm/ioreq.h"
GCC = shutil.which("gcc")

pytestmark = [
    pytest.mark.skipif(GCC is None, reason="gcc is not installed (Debian: gcc, gcc-multilib)"),
    pytest.mark.skipif(not IOREQ_HEADER.exists(),
                       reason=f"{IOREQ_HEADER} missing (Debian: apt-get install libxen-dev)"),
]

ARCH_FLAGS = {"x86_64": "-m64", "x86_32": "-m32"}

# Xen's public headers take the interface version from __XEN_INTERFACE_VERSION__; tools
# (QEMU, libxl) get the latest one by defining __XEN_TOOLS__, and so do we. The headers
# use the <stdint.h> types without including it themselves.
C_PRELUDE = """\
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
"""

C_HELPERS = r"""
static int first_item = 1;
static void sep(void) { if (!first_item) printf(", "); first_item = 0; }
/* Print [lowest set bit, span, number of set bits] of a struct in which one member is all-ones. */
static void bit_span(const char *name, const unsigned char *p, size_t n) {
    long lo = -1, hi = -1, count = 0;
    for (size_t i = 0; i < n * 8; i++) {
        if ((p[i / 8] >> (i % 8)) & 1) { if (lo < 0) lo = (long)i; hi = (long)i; count++; }
    }
    sep(); printf("\"%s\": [%ld, %ld, %ld]", name, lo, hi - lo + 1, count);
}
static void hex_bytes(const char *name, const void *v, size_t n) {
    const unsigned char *p = v;
    sep(); printf("\"%s\": \"", name);
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
    printf("\"");
}
"""


def _layouts_program(layouts: list[StructLayout]) -> str:
    headers = sorted({layout.header for layout in layouts})
    out = [C_PRELUDE, *[f"#include <{h}>\n" for h in headers], C_HELPERS, "int main(void) {\n",
           '    printf("{");\n']
    for i, lay in enumerate(layouts):
        comma = ", " if i else ""
        out.append(f'    printf("{comma}\\"{lay.name}\\": {{\\"size\\": %zu, \\"fields\\": {{",'
                   f" sizeof({lay.c_type}));\n")
        out.append("    first_item = 1;\n")
        for member in lay.fields:
            out.append(f'    sep(); printf("\\"{member}\\": %zu", '
                       f"offsetof({lay.c_type}, {member}));\n")
        out.append('    printf("}, \\"bits\\": {");\n    first_item = 1;\n')
        for member in lay.bits:
            out.append(f"    {{ {lay.c_type} s; memset(&s, 0, sizeof s); s.{member} = ~s.{member};"
                       f' bit_span("{member}", (const unsigned char *)&s, sizeof s); }}\n')
        out.append('    printf("}}");\n')
    out.append('    printf("}\\n");\n    return 0;\n}\n')
    return "".join(out)


def _compile_and_run(tmp_path: Path, source: str, flags: list[str], name: str) -> str:
    src = tmp_path / f"{name}.c"
    exe = tmp_path / name
    src.write_text(source)
    cc = subprocess.run([GCC or "gcc", "-std=gnu11", "-D__XEN_TOOLS__", *flags, "-o", str(exe),
                         str(src)], capture_output=True, text=True, timeout=60)
    if cc.returncode != 0:
        if "-m32" in flags:
            pytest.skip(f"gcc -m32 cannot build here (install gcc-multilib): {cc.stderr[-300:]}")
        raise AssertionError(f"gcc failed on the generated program:\n{cc.stderr}\n{source}")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    return run.stdout


@pytest.mark.parametrize("arch", sorted(ARCH_FLAGS))
def test_layouts_equal_what_gcc_says(tmp_path: Path, arch: str) -> None:
    layouts = [lay for lay in default_registry().layouts() if arch in lay.arches]
    assert layouts, f"no layout claims {arch}"
    c_says: dict[str, Any] = json.loads(_compile_and_run(
        tmp_path, _layouts_program(layouts), [ARCH_FLAGS[arch]], f"layouts_{arch}"))
    ours = abi_facts()
    for lay in layouts:
        got = c_says[lay.name]
        for member, (_, span, count) in got["bits"].items():
            assert span == count, f"{lay.name}.{member} bits are not contiguous"
        from_c = {
            "size": got["size"],
            "fields": got["fields"],
            "bits": {member: [lo, span] for member, (lo, span, _) in got["bits"].items()},
        }
        mine = ours[lay.name]
        assert {"size": mine["size"], "fields": mine["fields"], "bits": mine.get("bits", {})} \
            == from_c, f"{lay.name} ({arch}) differs from {lay.header}"


def test_hypervisor_view_of_buffered_iopage_has_one_u64_for_both_pointers(tmp_path: Path) -> None:
    # Inside Xen (__XEN__) the pointers are a union with a u64 `full`: the one 8-byte store
    # our producer uses when it pulls both pointers back must cover exactly those two.
    source = C_PRELUDE + "#include <xen/hvm/ioreq.h>\n" + C_HELPERS + r"""
int main(void) {
    printf("{\"size\": %zu, \"full\": %zu, \"full_size\": %zu, \"read_pointer\": %zu,"
           " \"write_pointer\": %zu, \"buf_ioreq\": %zu}\n",
           sizeof(struct buffered_iopage), offsetof(struct buffered_iopage, ptrs.full),
           sizeof(((struct buffered_iopage *)0)->ptrs),
           offsetof(struct buffered_iopage, ptrs.read_pointer),
           offsetof(struct buffered_iopage, ptrs.write_pointer),
           offsetof(struct buffered_iopage, buf_ioreq));
    return 0;
}
"""
    got = json.loads(_compile_and_run(tmp_path, source, ["-D__XEN__"], "xen_view"))
    offsets = bufioreq.BUFFERED_IOPAGE_OFFSETS
    assert got == {
        "size": bufioreq.BUFFERED_IOPAGE_SIZE,
        "full": bufioreq.BUFIOREQ_POINTERS_OFFSET,
        "full_size": 8,
        "read_pointer": offsets["read_pointer"],
        "write_pointer": offsets["write_pointer"],
        "buf_ioreq": offsets["buf_ioreq"],
    }


CONSTANTS = (
    "IOREQ_READ", "IOREQ_WRITE", "STATE_IOREQ_NONE", "STATE_IOREQ_READY",
    "STATE_IOREQ_INPROCESS", "STATE_IORESP_READY", "IOREQ_TYPE_PIO", "IOREQ_TYPE_COPY",
    "IOREQ_TYPE_PCI_CONFIG", "IOREQ_TYPE_TIMEOFFSET", "IOREQ_TYPE_INVALIDATE",
    "IOREQ_BUFFER_SLOT_NUM",
)


def test_constants_equal_the_header(tmp_path: Path) -> None:
    body = "".join(f'    sep(); printf("\\"{c}\\": %d", (int)({c}));\n' for c in CONSTANTS)
    source = (C_PRELUDE + "#include <xen/hvm/ioreq.h>\n" + C_HELPERS
              + 'int main(void) {\n    printf("{");\n' + body
              + '    printf("}\\n");\n    return 0;\n}\n')
    got = json.loads(_compile_and_run(tmp_path, source, [], "constants"))
    ours = {c: getattr(ioreq, c) if hasattr(ioreq, c) else getattr(bufioreq, c)
            for c in CONSTANTS}
    assert ours == got


def test_packed_bytes_equal_a_struct_filled_in_c(tmp_path: Path) -> None:
    # The same requests built field by field in C: our pack() must give the same bytes.
    source = C_PRELUDE + "#include <xen/hvm/ioreq.h>\n" + C_HELPERS + r"""
int main(void) {
    struct ioreq r; memset(&r, 0, sizeof r);
    r.addr = 0x1f0; r.data = 0x8000; r.count = 256; r.size = 2; r.vp_eport = 7;
    r.state = STATE_IOREQ_READY; r.data_is_ptr = 1; r.dir = IOREQ_READ; r.df = 1;
    r.type = IOREQ_TYPE_PIO;
    struct buf_ioreq b[2]; memset(b, 0, sizeof b);
    b[0].type = IOREQ_TYPE_COPY; b[0].dir = IOREQ_WRITE; b[0].size = 3; b[0].addr = 0xa0000;
    b[0].data = 0x55667788u;
    b[1] = b[0]; b[1].data = 0x11223344u;
    printf("{");
    hex_bytes("ioreq", &r, sizeof r);
    hex_bytes("buf_ioreq", b, sizeof b);
    printf("}\n");
    return 0;
}
"""
    got = json.loads(_compile_and_run(tmp_path, source, [], "packed"))
    req = ioreq.IoReq(addr=0x1F0, data=0x8000, count=256, size=2, vp_eport=7,
                      state=ioreq.STATE_IOREQ_READY, data_is_ptr=True, dir=ioreq.IOREQ_READ,
                      df=True, type=ioreq.IOREQ_TYPE_PIO)
    assert req.pack().hex() == got["ioreq"]
    backing = bytearray(bufioreq.BUFFERED_IOPAGE_SIZE)
    page = bufioreq.BufferedIoPage(memoryview(backing))
    assert page.try_put(ioreq.IOREQ_TYPE_COPY, 0xA0000, 8, 0x1122_3344_5566_7788)
    start = bufioreq.BUFFERED_IOPAGE_OFFSETS["buf_ioreq"]
    assert backing[start:start + 16].hex() == got["buf_ioreq"]
