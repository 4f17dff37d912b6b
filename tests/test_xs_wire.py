"""xs_wire framing and the xenstore ring page, byte for byte against Xen's io/xs_wire.h (gcc)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pv import xenstore_ring, xs_wire
from pv.xenstore_ring import (
    XENSTORE_RING_SIZE,
    RingIndexError,
    XenstoreDomainInterface,
    ring_read,
    ring_write,
)
from pv.xs_wire import (
    XS_ERROR,
    XS_READ,
    XS_WATCH_EVENT,
    XS_WRITE,
    WatchEvent,
    XsdSockmsg,
    XsError,
    XsWireError,
    decode,
    decode_stream,
    error_reply,
    join_strings,
    split_strings,
)

XS_WIRE_H = Path("/usr/include/xen/io/xs_wire.h")
GCC = shutil.which("gcc")

TYPE_NAMES = [
    "XS_CONTROL", "XS_DEBUG", "XS_DIRECTORY", "XS_READ", "XS_GET_PERMS", "XS_WATCH",
    "XS_UNWATCH", "XS_TRANSACTION_START", "XS_TRANSACTION_END", "XS_INTRODUCE", "XS_RELEASE",
    "XS_GET_DOMAIN_PATH", "XS_WRITE", "XS_MKDIR", "XS_RM", "XS_SET_PERMS", "XS_WATCH_EVENT",
    "XS_ERROR", "XS_IS_DOMAIN_INTRODUCED", "XS_RESUME", "XS_SET_TARGET", "XS_RESET_WATCHES",
    "XS_DIRECTORY_PART", "XS_TYPE_COUNT", "XS_INVALID", "XS_WATCH_PATH", "XS_WATCH_TOKEN",
    "XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX", "XENSTORE_REL_PATH_MAX",
]
RING_NAMES = [
    "XENSTORE_RING_SIZE", "XENSTORE_SERVER_FEATURE_RECONNECTION",
    "XENSTORE_SERVER_FEATURE_ERROR", "XENSTORE_CONNECTED", "XENSTORE_RECONNECT",
    "XENSTORE_ERROR_NONE", "XENSTORE_ERROR_COMM", "XENSTORE_ERROR_RINGIDX",
    "XENSTORE_ERROR_PROTO",
]
INTF_FIELDS = ["req", "rsp", "req_cons", "req_prod", "rsp_cons", "rsp_prod",
               "server_features", "connection", "error"]


def _header_facts(tmp_path: Path) -> dict:
    assert GCC is not None
    lines = ['#include <stdint.h>', '#include <stddef.h>', '#include <stdio.h>',
             '#include <errno.h>', '#include <xen/io/xs_wire.h>', 'int main(void) {',
             '  printf("{\\"consts\\": {");']
    for i, name in enumerate(TYPE_NAMES + RING_NAMES):
        comma = ", " if i else ""
        lines.append(f'  printf("{comma}\\"{name}\\": %ld", (long)({name}));')
    lines.append('  printf("}, \\"errors\\": [");')
    lines.append('  for (size_t i = 0; i < sizeof xsd_errors / sizeof xsd_errors[0]; i++)')
    lines.append('    printf("%s[%d, \\"%s\\"]", i ? ", " : "", xsd_errors[i].errnum, '
                 'xsd_errors[i].errstring);')
    lines.append('  printf("], \\"sockmsg\\": [%zu, %zu, %zu, %zu, %zu], ", '
                 'sizeof(struct xsd_sockmsg), offsetof(struct xsd_sockmsg, req_id), '
                 'offsetof(struct xsd_sockmsg, tx_id), offsetof(struct xsd_sockmsg, len), '
                 'offsetof(struct xsd_sockmsg, type));')
    lines.append('  printf("\\"intf_size\\": %zu, \\"intf\\": {", '
                 'sizeof(struct xenstore_domain_interface));')
    for i, name in enumerate(INTF_FIELDS):
        comma = ", " if i else ""
        lines.append(f'  printf("{comma}\\"{name}\\": %zu", '
                     f'offsetof(struct xenstore_domain_interface, {name}));')
    lines += ['  printf("}}\\n");', '  return 0;', '}']
    src = tmp_path / "xs_wire_facts.c"
    exe = tmp_path / "xs_wire_facts"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run([GCC, "-std=gnu11", "-Wall", "-o", str(exe), str(src)], check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10)
    return json.loads(out.stdout)


@pytest.mark.skipif(GCC is None or not XS_WIRE_H.exists(),
                    reason="needs gcc and libxen-dev's /usr/include/xen/io/xs_wire.h")
def test_constants_errors_and_layouts_match_the_header(tmp_path: Path) -> None:
    facts = _header_facts(tmp_path)
    for name in TYPE_NAMES:
        assert int(getattr(xs_wire, name)) == facts["consts"][name], name
    for name in RING_NAMES:
        assert getattr(xenstore_ring, name) == facts["consts"][name], name
    assert [list(e) for e in xs_wire.XSD_ERRORS] == facts["errors"]
    assert facts["sockmsg"] == [xs_wire.XSD_SOCKMSG_SIZE, 4, 8, 12, 0]
    assert facts["intf_size"] == xenstore_ring.XENSTORE_DOMAIN_INTERFACE_SIZE
    ours = {name: getattr(xenstore_ring, f"{name.upper()}_OFFSET") for name in INTF_FIELDS}
    assert ours == facts["intf"]


def test_sockmsg_packs_little_endian_header_then_payload() -> None:
    msg = XsdSockmsg(XS_WRITE, 0x11223344, 7, b"/a\0xyz")
    raw = msg.pack()
    assert raw[:16] == bytes.fromhex("0b000000" "44332211" "07000000" "06000000")
    assert raw[16:] == b"/a\0xyz"
    assert decode(raw) == msg
    assert msg.len == 6


def test_stream_decoder_waits_for_whole_messages_and_takes_them_in_order() -> None:
    a = XsdSockmsg(XS_READ, 1, 0, b"/x\0")
    b = XsdSockmsg(XS_READ, 2, 0, b"")
    stream = a.pack() + b.pack()
    buf = bytearray()
    got = []
    for byte in stream:  # one byte at a time, as a ring may deliver it
        buf.append(byte)
        msg = decode_stream(buf)
        if msg is not None:
            got.append(msg)
    assert got == [a, b]
    assert buf == bytearray()


def test_length_over_payload_max_is_rejected_before_waiting_for_it() -> None:
    header = XsdSockmsg(XS_READ, 1, 0).pack()[:12] + (4097).to_bytes(4, "little")
    with pytest.raises(XsWireError):
        decode_stream(bytearray(header))
    ok = XsdSockmsg(XS_WRITE, 1, 0, b"p\0" + b"v" * 4094)  # exactly 4096 is legal
    assert decode(ok.pack()) == ok


def test_decode_refuses_trailing_or_missing_bytes() -> None:
    raw = XsdSockmsg(XS_READ, 1, 0, b"/a\0").pack()
    with pytest.raises(XsWireError):
        decode(raw[:-1])
    with pytest.raises(XsWireError):
        decode(raw + b"\0")


def test_nul_separated_strings() -> None:
    assert join_strings("path", "token") == b"path\0token\0"
    assert split_strings(b"a\0b\0") == ["a", "b"]
    assert split_strings(b"a\0b") == ["a", "b"]
    assert split_strings(b"") == []
    with pytest.raises(XsWireError):
        join_strings("bad\0name")


def test_error_replies_carry_the_name_and_echo_ids() -> None:
    req = XsdSockmsg(XS_READ, 9, 3, b"/nope\0")
    err = error_reply(req, "ENOENT")
    assert (err.type, err.req_id, err.tx_id, err.payload) == (XS_ERROR, 9, 3, b"ENOENT\0")
    assert err.errname == "ENOENT"
    with pytest.raises(ValueError):
        XsError("ENOTANERROR")


def test_watch_event_round_trip() -> None:
    ev = WatchEvent("device/vbd/51712/state", "tok")
    msg = ev.to_message()
    assert msg.type == XS_WATCH_EVENT and msg.req_id == 0
    assert msg.payload == b"device/vbd/51712/state\0tok\0"
    assert WatchEvent.from_message(decode(msg.pack())) == ev


def test_ring_copy_wraps_at_the_end_of_the_ring() -> None:
    ring = memoryview(bytearray(XENSTORE_RING_SIZE))
    cons = prod = 1020
    data = bytes(range(10))
    assert ring_write(ring, cons, prod, data) == 10
    assert bytes(ring[1020:1024]) == data[:4] and bytes(ring[0:6]) == data[4:]
    assert ring_read(ring, cons, prod + 10) == data


def test_ring_indices_run_free_past_2_to_the_32() -> None:
    ring = memoryview(bytearray(XENSTORE_RING_SIZE))
    cons = prod = 0xFFFFFFFC
    data = b"ABCDEFGH"
    n = ring_write(ring, cons, prod, data)
    new_prod = (prod + n) & 0xFFFFFFFF
    assert new_prod == 4
    assert ring_read(ring, cons, new_prod) == data
    assert bytes(ring[1020:1024]) == b"ABCD" and bytes(ring[0:4]) == b"EFGH"


def test_writer_stops_at_a_full_ring_and_reader_at_limit() -> None:
    ring = memoryview(bytearray(XENSTORE_RING_SIZE))
    assert ring_write(ring, 0, 1000, b"x" * 100) == 24
    assert ring_read(ring, 0, 1024, limit=5) == bytes(5)


def test_producer_more_than_a_ring_ahead_is_hostile() -> None:
    ring = memoryview(bytearray(XENSTORE_RING_SIZE))
    with pytest.raises(RingIndexError):
        ring_read(ring, 0, 1025)
    with pytest.raises(RingIndexError):
        ring_write(ring, 10, 5, b"x")  # prod behind cons = 2^32 - 5 bytes "used"
    assert ring_read(ring, 0xFFFFFF00, 0x300) == bytes(0x400)  # exactly full is fine


def test_interface_fields_land_at_header_offsets() -> None:
    page = bytearray(4096)
    intf = XenstoreDomainInterface(page)
    intf.req_prod = 0x01020304
    intf.rsp_cons = 0xFFFFFFFF
    intf.error = xenstore_ring.XENSTORE_ERROR_PROTO
    assert page[2052:2056] == bytes([4, 3, 2, 1])
    assert page[2056:2060] == b"\xff\xff\xff\xff"
    assert page[2072:2076] == bytes([3, 0, 0, 0])
    with pytest.raises(ValueError):
        XenstoreDomainInterface(bytearray(2000))
