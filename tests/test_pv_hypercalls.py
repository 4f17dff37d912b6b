"""PV hypercall ABI without Unicorn: each number, its x86_32 argument structs in guest memory, Xen's errors for bad arguments, event channels and grant ops (Xen public/*.h)."""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hvm.evtchn import EventChannelError
from hvm.loader import GuestImage, Segment
from hvm.memory import PAGE_SIZE
from pv.dom0 import Dom0
from pv.domain import (
    CONSOLE_PFN,
    GRANT_FRAMES,
    HYPERCALL_PAGE,
    SHARED_INFO,
    START_INFO,
    STORE_PFN,
    PvDomain,
    hypercall_page,
)
from pv.evtchn_pv import EVTCHNSTAT_closed, EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound
from pv.grant_table import (
    DOMID_SELF,
    GNTCOPY_source_gref,
    GNTMAP_host_map,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GTF_transfer_completed,
)
from pv.hypercall_layouts import HYPERCALL_STRUCTS
from pv.layouts import X86_32
from pv.shared_info import StartInfo

EPERM, ENOENT, ESRCH, EFAULT, EINVAL, ENOSYS = 1, 2, 3, 14, 22, 38
SET_CALLBACKS, MEMORY_OP, XEN_VERSION, CONSOLE_IO = 4, 12, 17, 18
GRANT_TABLE_OP, VCPU_OP, SCHED_OP, EVENT_CHANNEL_OP = 20, 24, 29, 32
ARG = 0x20000  # scratch guest memory for argument structs (the guest's own pages)
BAD = 0xFFFF_F000  # far beyond the domain's RAM: a pointer Xen cannot copy through
MEM = 2 << 20


@dataclass
class FakeSched:
    """Records what sched_op asked of the vCPU."""

    calls: list[tuple] = field(default_factory=list)
    upcall_checks: int = 0

    def block(self) -> None:
        self.calls.append(("block",))

    def poll(self, ports, timeout_ns: int) -> None:
        self.calls.append(("poll", list(ports), timeout_ns))

    def yield_(self) -> None:
        self.calls.append(("yield",))

    def shutdown(self, reason: int) -> None:
        self.calls.append(("shutdown", reason))

    def check_upcall(self) -> None:
        self.upcall_checks += 1

    def now_ns(self) -> int:
        return 0


@dataclass
class Env:
    dom0: Dom0
    domain: PvDomain
    sched: FakeSched

    def call(self, number: int, *args: int) -> int:
        return self.domain.hypercalls.dispatch(number, args)

    def put(self, address: int, data: bytes) -> int:
        self.domain.memory.write(address, data)
        return address

    def get(self, address: int, length: int) -> bytes:
        return self.domain.memory.read(address, length)


def tiny_image() -> GuestImage:
    code = b"\xfa\xf4"  # cli; hlt (never run here)
    return GuestImage("tiny", "bin", 32, 0x100000, (Segment(0x100000, code, len(code)),))


def make_env() -> Env:
    dom0 = Dom0(pool_bytes=1 << 20)
    domain = dom0.create_pv_domain(tiny_image(), mem=MEM)
    sched = FakeSched()
    domain.hypercalls.sched = sched
    return Env(dom0, domain, sched)


@pytest.fixture
def env():
    e = make_env()
    yield e
    e.dom0.stop()


# -- the builder's pages ------------------------------------------------------------------------
def test_start_info_page_says_what_the_builder_set_up(env: Env) -> None:
    d = env.domain
    raw = env.get(START_INFO, 1112)
    assert raw[:16] == b"xen-3.0-x86_32p\0"
    si = StartInfo.unpack(raw)
    assert si.nr_pages == MEM // PAGE_SIZE
    assert si.shared_info == SHARED_INFO
    assert (si.store_mfn, si.console_mfn) == (STORE_PFN, CONSOLE_PFN)
    assert si.store_evtchn == d.store_port and si.console_evtchn == d.console_port
    assert {si.store_evtchn, si.console_evtchn} == {1, 2}
    assert si.flags == si.pt_base == si.nr_pt_frames == si.mfn_list == 0
    # Xen's own channels: the store bound to xenstored, the console unbound for Dom0.
    ports = d.evtchn.ports()
    assert ports[d.store_port].status == EVTCHNSTAT_interdomain
    assert (ports[d.console_port].status, ports[d.console_port].remote_dom) == \
        (EVTCHNSTAT_unbound, 0)
    # upcalls start masked (EFLAGS.IF = 0 at entry says the same)
    assert d.shared.upcall_mask(0)


def test_hypercall_page_holds_xens_32_byte_stubs(env: Env) -> None:
    page = env.get(HYPERCALL_PAGE, PAGE_SIZE)
    assert page == hypercall_page()
    for n in (0, 17, 29, 32, 127):
        stub = page[32 * n:32 * n + 32]
        assert stub[:8] == b"\xb8" + struct.pack("<I", n) + b"\xcd\x82\xc3"
        assert stub[8:] == b"\xcc" * 24


def test_xenstore_knows_the_domain_and_its_rings(env: Env) -> None:
    d = env.domain
    home = f"/local/domain/{d.domid}"
    assert env.dom0.xs.read_text(f"{home}/store/port") == str(d.store_port)
    assert env.dom0.xs.read_text(f"{home}/console/ring-ref") == str(CONSOLE_PFN)
    assert env.dom0.xenstored.is_introduced(d.domid)


# -- numbers, console_io, xen_version --------------------------------------------------------
@pytest.mark.parametrize("number", [0, 1, 11, 23, 34, 42, 55, 127, 0xFFFF_FFFF])
def test_unknown_or_unsupported_numbers_are_enosys(env: Env, number: int) -> None:
    assert env.call(number, 1, 2, 3, 4, 5) == -ENOSYS
    assert sum(env.domain.hypercalls.calls.values()) == 1


def test_console_io_write_reaches_the_console(env: Env) -> None:
    env.put(ARG, b"hi there\n")
    assert env.call(CONSOLE_IO, 0, 9, ARG) == 0
    assert env.domain.console.text() == "hi there\n"
    assert env.call(CONSOLE_IO, 0, 9, BAD) == -EFAULT
    assert env.call(CONSOLE_IO, 0, 0x100_0000, ARG) == -EFAULT  # runs past the end of RAM
    assert env.call(CONSOLE_IO, 1, 9, ARG) == 0  # CONSOLEIO_read: nothing to read
    assert env.call(CONSOLE_IO, 7, 9, ARG) == -EINVAL
    assert env.domain.console.text() == "hi there\n"
    assert env.domain.hypercalls.calls == {"console_io": 5}


def test_xen_version_subcommands(env: Env) -> None:
    version = env.call(XEN_VERSION, 0, 0)
    assert version >> 16 == 4 and version & 0xFFFF == env.domain.hypercalls.version[1]
    assert env.call(XEN_VERSION, 1, ARG) == 0
    assert env.get(ARG, 16).rstrip(b"\0") == env.domain.hypercalls.extraversion
    assert env.call(XEN_VERSION, 3, ARG) == 0
    assert env.get(ARG, 16) == b"xen-3.0-x86_32p\0"
    assert env.call(XEN_VERSION, 7, 0) == PAGE_SIZE
    env.put(ARG, struct.pack("<II", 0, 0xFFFF_FFFF))
    assert env.call(XEN_VERSION, 6, ARG) == 0
    assert env.get(ARG + 4, 4) == bytes(4)  # no optional features
    env.put(ARG, struct.pack("<II", 1, 0))
    assert env.call(XEN_VERSION, 6, ARG) == -EINVAL  # XENFEAT_NR_SUBMAPS is 1
    assert env.call(XEN_VERSION, 1, BAD) == -EFAULT
    assert env.call(XEN_VERSION, 99, ARG) == -ENOSYS


def test_set_callbacks_takes_the_flat_code_selector(env: Env) -> None:
    cb = env.domain.callbacks
    assert env.call(SET_CALLBACKS, 0x08, 0x100100, 0x08, 0x100200) == 0
    assert (cb.event_selector, cb.event_address, cb.failsafe_address) == (0x08, 0x100100, 0x100200)
    assert env.call(SET_CALLBACKS, 0xE019, 0x100300, 0xE019, 0) == 0  # FLAT_KERNEL_CS
    assert (cb.event_selector, cb.event_address) == (0x08, 0x100300)
    assert env.call(SET_CALLBACKS, 0x10, 0x100400, 0x08, 0) == -EINVAL  # a data segment
    assert cb.event_address == 0x100300
    assert env.sched.upcall_checks == 2


def test_vcpu_op_knows_one_vcpu(env: Env) -> None:
    assert env.call(VCPU_OP, 3, 0, 0) == 1
    assert env.call(VCPU_OP, 3, 1, 0) == -ENOENT
    assert env.call(VCPU_OP, 0, 0, 0) == -ENOSYS


# -- sched_op ------------------------------------------------------------------------------------
def test_sched_op_yield_block_shutdown(env: Env) -> None:
    assert env.call(SCHED_OP, 0, 0) == 0
    assert env.call(SCHED_OP, 1, 0) == 0
    env.put(ARG, struct.pack("<I", 3))
    assert env.call(SCHED_OP, 2, ARG) == 0
    assert env.sched.calls == [("yield",), ("block",), ("shutdown", 3)]
    assert env.call(SCHED_OP, 2, BAD) == -EFAULT
    assert env.call(SCHED_OP, 4, ARG) == -EPERM  # remote_shutdown: Dom0's business
    assert env.call(SCHED_OP, 77, ARG) == -ENOSYS
    assert env.sched.calls[-1] == ("shutdown", 3)


def test_sched_op_poll_reads_sched_poll(env: Env) -> None:
    ports_at = env.put(ARG + 0x100, struct.pack("<3I", 1, 2, 5))
    env.put(ARG, struct.pack("<IIQ", ports_at, 3, 123456789))
    assert env.call(SCHED_OP, 3, ARG) == 0
    assert env.sched.calls == [("poll", [1, 2, 5], 123456789)]
    env.put(ARG, struct.pack("<IIQ", ports_at, 129, 0))
    assert env.call(SCHED_OP, 3, ARG) == -EINVAL  # more than 128 ports
    env.put(ARG, struct.pack("<IIQ", BAD, 2, 0))
    assert env.call(SCHED_OP, 3, ARG) == -EFAULT
    env.put(ports_at, struct.pack("<I", 1024))
    env.put(ARG, struct.pack("<IIQ", ports_at, 1, 0))
    assert env.call(SCHED_OP, 3, ARG) == -EINVAL  # past the 2-level ABI's 1024 ports
    assert env.call(SCHED_OP, 3, BAD) == -EFAULT
    assert len(env.sched.calls) == 1


def test_sched_poll_layout_is_x86_32() -> None:
    sp = HYPERCALL_STRUCTS["sched_poll"][2](X86_32)
    assert (sp.nr_ports.offset, sp.timeout.offset, struct.calcsize("<IIQ")) == (4, 8, 16)


# -- event_channel_op ---------------------------------------------------------------------------
def alloc_unbound(env: Env, remote: int, dom: int = DOMID_SELF) -> tuple[int, int]:
    env.put(ARG, struct.pack("<HHI", dom, remote, 0xFFFF))
    result = env.call(EVENT_CHANNEL_OP, 6, ARG)
    return result, struct.unpack("<I", env.get(ARG + 4, 4))[0]


def port_op(env: Env, cmd: int, port: int) -> int:
    env.put(ARG + 0x80, struct.pack("<I", port))
    return env.call(EVENT_CHANNEL_OP, cmd, ARG + 0x80)


def status(env: Env, port: int, dom: int = DOMID_SELF) -> tuple[int, tuple[int, ...]]:
    env.put(ARG + 0x40, struct.pack("<HxxI16x", dom, port))
    result = env.call(EVENT_CHANNEL_OP, 5, ARG + 0x40)
    return result, struct.unpack("<IIHxxI", env.get(ARG + 0x48, 16))


def test_alloc_unbound_gives_the_lowest_free_port(env: Env) -> None:
    assert alloc_unbound(env, 0) == (0, 3)  # 1 and 2 are the store and the console
    assert alloc_unbound(env, DOMID_SELF) == (0, 4)
    assert status(env, 3) == (0, (EVTCHNSTAT_unbound, 0, 0, 0))
    assert status(env, 4)[1][:3] == (EVTCHNSTAT_unbound, 0, env.domain.domid)
    assert alloc_unbound(env, 0, dom=0)[0] == -EPERM  # only Dom0 allocates for others
    assert alloc_unbound(env, 0, dom=77)[0] == -ESRCH
    assert env.call(EVENT_CHANNEL_OP, 6, BAD) == -EFAULT


def test_bad_ports_are_einval_and_unknown_ops_enosys(env: Env) -> None:
    for cmd in (4, 3, 9):  # send, close, unmask
        assert port_op(env, cmd, 1024) == -EINVAL
        assert port_op(env, cmd, 0xFFFF_FFFF) == -EINVAL
    assert port_op(env, 4, 600) == -EINVAL  # free
    assert port_op(env, 3, 600) == -EINVAL
    assert port_op(env, 4, 0) == -EINVAL  # reserved
    assert status(env, 0) == (0, (EVTCHNSTAT_closed, 0, 0, 0))
    assert status(env, 1024)[0] == -EINVAL
    assert status(env, 1, dom=0)[0] == -EPERM
    assert status(env, 1, dom=9)[0] == -ESRCH
    assert env.call(EVENT_CHANNEL_OP, 1, ARG) == -ENOSYS  # bind_virq
    assert env.call(EVENT_CHANNEL_OP, 4, BAD) == -EFAULT


def test_send_on_an_unbound_port_is_dropped_silently(env: Env) -> None:
    _, port = alloc_unbound(env, 0)
    assert port_op(env, 4, port) == 0
    assert (env.domain.evtchn.sent, env.domain.evtchn.dropped) == (0, 1)


def test_dom0_binding_carries_events_both_ways(env: Env) -> None:
    d = env.domain
    _, port = alloc_unbound(env, 0)
    end = d.bind_evtchn(port)
    assert end.consume() == 1  # the binder's end starts notified, as on Xen
    assert status(env, port)[1][0] == EVTCHNSTAT_interdomain
    assert status(env, port)[1][2] == 0  # u.interdomain.dom
    # guest -> Dom0
    assert port_op(env, 4, port) == 0
    assert end.wait(1.0)
    # Dom0 -> guest: the delivery pump turns the eventfd into a pending bit + upcall_pending
    end.notify()
    assert d.evtchn.pump(1.0) == 1
    assert d.evtchn.drain() == [port]
    assert d.shared.is_pending(port) and d.shared.upcall_pending(0)
    assert d.shared.pending_sel(0) == 1 << (port // 32)
    with pytest.raises(EventChannelError):
        d.bind_evtchn(port)  # bound already
    with pytest.raises(EventChannelError):
        d.bind_evtchn(600)  # free
    # Dom0 closes its end: the guest's port goes back to unbound for Dom0
    end.close()
    d.evtchn.pump(1.0)
    assert status(env, port)[1][:2] == (EVTCHNSTAT_unbound, 0)
    again = d.bind_evtchn(port)
    assert port_op(env, 3, port) == 0  # the guest closes it
    d.evtchn.pump(0.0)
    assert again.peer_closed
    assert status(env, port)[1][0] == EVTCHNSTAT_closed
    assert not d.shared.is_pending(port)  # closing clears the port's pending bit


def test_masked_port_pends_without_upcall_until_unmask(env: Env) -> None:
    d = env.domain
    _, port = alloc_unbound(env, 0)
    end = d.bind_evtchn(port)
    d.shared.mask(port)
    end.notify()
    d.evtchn.pump(1.0)
    d.evtchn.drain()
    assert d.shared.is_pending(port) and not d.shared.upcall_pending(0)
    checks = env.sched.upcall_checks
    assert port_op(env, 9, port) == 0
    assert d.shared.upcall_pending(0) and not d.shared.is_masked(port)
    assert env.sched.upcall_checks == checks + 1  # the vCPU is told to deliver now


def test_loopback_and_domu_to_domu_binding(env: Env) -> None:
    a = env
    b = Env(a.dom0, a.dom0.create_pv_domain(tiny_image(), mem=MEM), FakeSched())
    b.domain.hypercalls.sched = b.sched
    result, offered = alloc_unbound(b, a.domain.domid)
    assert result == 0
    a.put(ARG, struct.pack("<HxxII", b.domain.domid, offered, 0))
    assert a.call(EVENT_CHANNEL_OP, 0, ARG) == 0
    local = struct.unpack("<I", a.get(ARG + 8, 4))[0]
    # Xen sets the binder's new port pending: notifications may have been lost before
    assert a.domain.evtchn.drain() == [local]
    assert port_op(a, 4, local) == 0
    assert b.domain.evtchn.drain() == [offered]
    assert status(b, offered)[1] == (EVTCHNSTAT_interdomain, 0, a.domain.domid, local)
    # binding the same port again is -EINVAL; a domain that does not exist, -ESRCH
    assert a.call(EVENT_CHANNEL_OP, 0, ARG) == -EINVAL
    a.put(ARG, struct.pack("<HxxII", 99, 1, 0))
    assert a.call(EVENT_CHANNEL_OP, 0, ARG) == -ESRCH
    # closing one end leaves the other unbound for its old peer
    assert port_op(a, 3, local) == 0
    assert status(b, offered)[1][:3] == (EVTCHNSTAT_unbound, 0, a.domain.domid)
    # loopback: a port of our own, bound by ourselves
    _, mine = alloc_unbound(a, DOMID_SELF)
    a.put(ARG, struct.pack("<HxxII", DOMID_SELF, mine, 0))
    assert a.call(EVENT_CHANNEL_OP, 0, ARG) == 0
    other = struct.unpack("<I", a.get(ARG + 8, 4))[0]
    a.domain.evtchn.drain()
    assert port_op(a, 4, other) == 0
    assert a.domain.evtchn.drain() == [mine]


# -- grant_table_op -----------------------------------------------------------------------------
def setup_table(env: Env, nr: int, dom: int = DOMID_SELF, frames_at: int = ARG + 0x100,
                count: int = 1) -> tuple[int, int, list[int]]:
    env.put(ARG, struct.pack("<HxxIhxxI", dom, nr, 0x7777, frames_at))
    env.put(ARG + 0x100, bytes(64))
    result = env.call(GRANT_TABLE_OP, 2, ARG, count)
    status_ = struct.unpack("<h", env.get(ARG + 8, 2))[0]
    return result, status_, list(struct.unpack("<8I", env.get(ARG + 0x100, 32)))


def test_setup_table_returns_the_builders_frames(env: Env) -> None:
    result, st, frames = setup_table(env, 4)
    assert (result, st) == (0, GNTST_okay)
    assert frames[:4] == list(GRANT_FRAMES) and frames[4:] == [0] * 4
    assert setup_table(env, 2)[2][:3] == [GRANT_FRAMES[0], GRANT_FRAMES[1], 0]
    assert setup_table(env, 5)[1] == GNTST_general_error  # more than the 4 frames there are
    assert setup_table(env, 1, dom=0)[1] == GNTST_permission_denied
    assert setup_table(env, 1, dom=55)[1] == GNTST_bad_domain
    assert setup_table(env, 1, count=2)[0] == -EINVAL
    assert setup_table(env, 1, frames_at=BAD)[0] == -EFAULT
    assert env.call(GRANT_TABLE_OP, 2, BAD, 1) == -EFAULT
    # query_size: 4 frames of 4
    env.put(ARG, struct.pack("<HxxIIhxx", DOMID_SELF, 0, 0, 99))
    assert env.call(GRANT_TABLE_OP, 6, ARG, 1) == 0
    assert struct.unpack("<IIh", env.get(ARG + 4, 10)) == (4, 4, GNTST_okay)
    assert env.call(GRANT_TABLE_OP, 3, ARG, 1) == -ENOSYS  # dump_table
    assert env.call(GRANT_TABLE_OP, 5, ARG, 1 << 31) == -EINVAL
    assert env.domain.gnttab.counts["setup_table"] == 7


def test_copy_from_a_dom0_grant_and_a_bad_ref(env: Env) -> None:
    d, dom0 = env.domain, env.dom0
    frame = dom0.alloc_frame()
    dom0.memory.write(frame * PAGE_SIZE + 100, b"from dom0")
    dom0.grant_ops.tables[0].grant_foreign_access(5, d.domid, frame, readonly=True)
    # source: Dom0's grant 5 at offset 100; dest: our own frame 0x30 at offset 8
    op = struct.pack("<IHHIHHHHhxx", 5, 0, 100, 0x30, DOMID_SELF, 8, 9, GNTCOPY_source_gref, 99)
    bad = struct.pack("<IHHIHHHHhxx", 4000, 0, 0, 0x30, DOMID_SELF, 0, 9, GNTCOPY_source_gref, 99)
    env.put(ARG, op + bad)
    assert env.call(GRANT_TABLE_OP, 5, ARG, 2) == 0
    assert env.get(0x30 * PAGE_SIZE + 8, 9) == b"from dom0"
    assert struct.unpack("<h", env.get(ARG + 20, 2))[0] == GNTST_okay
    assert struct.unpack("<h", env.get(ARG + 24 + 20, 2))[0] == GNTST_bad_gntref
    # the array runs off the end of RAM: the ops before are done, then -EFAULT
    assert env.call(GRANT_TABLE_OP, 5, MEM - 24, 2) == -EFAULT


def test_host_map_rebacks_a_frame_until_unmap(env: Env) -> None:
    d, dom0 = env.domain, env.dom0
    frame = dom0.alloc_frame()
    dom0.memory.write(frame * PAGE_SIZE, b"dom0 page")
    dom0.grant_ops.tables[0].grant_foreign_access(7, d.domid, frame)
    env.put(0x40000, b"our page")
    env.put(ARG, struct.pack("<QIIHhIQ", 0x40000, GNTMAP_host_map, 7, 0, 99, 0, 0))
    assert env.call(GRANT_TABLE_OP, 0, ARG, 1) == 0
    _, _, _, _, st, handle, _ = struct.unpack("<QIIHhIQ", env.get(ARG, 32))
    assert st == GNTST_okay
    assert env.get(0x40000, 9) == b"dom0 page"
    env.put(0x40000, b"written by the guest")  # a writable mapping: Dom0's page changes
    assert dom0.memory.read(frame * PAGE_SIZE, 20) == b"written by the guest"
    env.put(ARG + 0x40, struct.pack("<QQIhxx", 0x40000, 0, handle, 99))
    assert env.call(GRANT_TABLE_OP, 1, ARG + 0x40, 1) == 0
    assert struct.unpack("<h", env.get(ARG + 0x40 + 20, 2))[0] == GNTST_okay
    assert env.get(0x40000, 8) == b"our page"
    assert env.call(GRANT_TABLE_OP, 1, ARG + 0x40, 1) == 0
    assert struct.unpack("<h", env.get(ARG + 0x40 + 20, 2))[0] == GNTST_bad_handle
    # no mapping over the builder's pages, none without a map flag, none of a bad ref
    for host_addr, flags, ref, want in ((SHARED_INFO, GNTMAP_host_map, 7, GNTST_general_error),
                                        (0x40001, GNTMAP_host_map, 7, GNTST_general_error),
                                        (0x40000, 0, 7, GNTST_bad_gntref),
                                        (0x40000, GNTMAP_host_map, 900, GNTST_general_error)):
        env.put(ARG, struct.pack("<QIIHhIQ", host_addr, flags, ref, 0, 99, 0, 0))
        assert env.call(GRANT_TABLE_OP, 0, ARG, 1) == 0
        assert struct.unpack("<h", env.get(ARG + 18, 2))[0] == want
    env.put(ARG, struct.pack("<QIIHhIQ", 0x40000, GNTMAP_host_map, 7, 66, 99, 0, 0))
    assert env.call(GRANT_TABLE_OP, 0, ARG, 1) == 0
    assert struct.unpack("<h", env.get(ARG + 18, 2))[0] == GNTST_bad_domain


def test_transfer_flips_a_page_to_dom0_and_refuses_fixed_pages(env: Env) -> None:
    d, dom0 = env.domain, env.dom0
    receive_at = dom0.alloc_frame()
    dom0.memory.write(receive_at * PAGE_SIZE, b"dom0's old page")
    dom0.grant_ops.tables[0].grant_foreign_transfer(2, d.domid, receive_at)
    env.put(0x50000, b"guest page content")
    env.put(ARG, struct.pack("<IHxxIhxx", 0x50, 0, 2, 99))
    assert env.call(GRANT_TABLE_OP, 4, ARG, 1) == 0
    assert struct.unpack("<h", env.get(ARG + 12, 2))[0] == GNTST_okay
    assert dom0.memory.read(receive_at * PAGE_SIZE, 18) == b"guest page content"
    assert env.get(0x50000, 15) == b"dom0's old page"
    assert dom0.grant_ops.tables[0].flags(2) & GTF_transfer_completed
    for gfn, receiver, want in ((SHARED_INFO >> 12, 0, GNTST_bad_page),
                                (GRANT_FRAMES[0], 0, GNTST_bad_page),
                                (0x51, DOMID_SELF, GNTST_bad_domain),
                                (0x51, 0, GNTST_general_error)):  # ref 2 no longer offered
        env.put(ARG, struct.pack("<IHxxIhxx", gfn, receiver, 2, 99))
        assert env.call(GRANT_TABLE_OP, 4, ARG, 1) == 0
        assert struct.unpack("<h", env.get(ARG + 12, 2))[0] == want


def copy_ops(n: int, status: int = 99) -> bytes:
    """n zero-length copies from our own frame 0x30 to itself: each one GNTST_okay."""
    one = struct.pack("<IHHIHHHHhxx", 0x30, DOMID_SELF, 0, 0x30, DOMID_SELF, 0, 0, 0, status)
    return one * n


def test_a_long_grant_op_is_preempted_with_a_continuation(env: Env) -> None:
    hc = env.domain.hypercalls
    env.put(0x40000, copy_ops(600))
    assert env.call(GRANT_TABLE_OP, 5, 0x40000, 600, 7, 8) == 0
    assert hc.continuation == (5, 0x40000 + 256 * 24, 600 - 256, 7, 8)
    statuses = [struct.unpack_from("<h", env.get(0x40000 + 24 * i + 20, 2))[0]
                for i in range(600)]
    assert statuses[:256] == [GNTST_okay] * 256 and statuses[256:] == [99] * 344
    assert env.call(GRANT_TABLE_OP, *hc.continuation) == 0  # what the guest re-executes
    assert env.call(GRANT_TABLE_OP, *hc.continuation) == 0
    assert hc.continuation is None
    assert struct.unpack_from("<h", env.get(0x40000 + 24 * 599 + 20, 2))[0] == GNTST_okay
    assert env.domain.gnttab.counts["copy"] == 600


# -- memory_op ----------------------------------------------------------------------------------
def test_memory_op_decrease_reservation_and_reservations(env: Env) -> None:
    pages = MEM // PAGE_SIZE
    env.put(ARG + 0x100, struct.pack("<3I", 0x60, 0x61, 0x62))
    env.put(ARG, struct.pack("<IIIIHxx", ARG + 0x100, 3, 0, 0, DOMID_SELF))
    assert env.call(MEMORY_OP, 1, ARG) == 3
    env.put(ARG + 0x40, struct.pack("<H", DOMID_SELF))
    assert env.call(MEMORY_OP, 3, ARG + 0x40) == pages - 3
    assert env.call(MEMORY_OP, 4, ARG + 0x40) == pages
    env.put(ARG + 0x100, struct.pack("<3I", 0x63, pages + 5, 0x64))
    assert env.call(MEMORY_OP, 1, ARG) == 1  # stops at the frame it cannot give back
    env.put(ARG + 0x100, struct.pack("<I", STORE_PFN))
    assert env.call(MEMORY_OP, 1, ARG) == 0  # the builder's pages are not the guest's to give
    env.put(ARG, struct.pack("<IIIIHxx", ARG + 0x100, 3, 0, 0, 0))
    assert env.call(MEMORY_OP, 1, ARG) == -EPERM
    env.put(ARG, struct.pack("<IIIIHxx", BAD, 3, 0, 0, DOMID_SELF))
    assert env.call(MEMORY_OP, 1, ARG) == 0  # the first extent cannot be read: none done
    assert env.call(MEMORY_OP, 1, BAD) == -EFAULT
    assert env.call(MEMORY_OP, 3, BAD) == -EFAULT
    assert env.call(MEMORY_OP, 6, ARG) == -ENOSYS  # populate_physmap


def test_decrease_reservation_continues_itself_past_256_extents(env: Env) -> None:
    hc = env.domain.hypercalls
    env.put(0x40000, struct.pack("<300I", *range(0x20, 0x20 + 300)))
    env.put(ARG, struct.pack("<IIIIHxx", 0x40000, 300, 0, 0, DOMID_SELF))
    assert env.call(MEMORY_OP, 1, ARG) == 256
    assert hc.continuation is not None
    assert hc.continuation[0] == (256 << 6) | 1  # MEMOP_EXTENT_SHIFT: where to go on from
    assert env.call(MEMORY_OP, *hc.continuation) == 300
    assert hc.continuation is None and len(hc.released) == 300


# -- the structs this runtime adds, against libxen-dev -------------------------------------------
GCC = shutil.which("gcc")


@pytest.mark.skipif(GCC is None or not Path("/usr/include/xen/xen.h").exists(),
                    reason="needs gcc and libxen-dev headers")
def test_hypercall_structs_match_libxen_on_x86_32(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
             "#include <xen/xen.h>", "#include <xen/sched.h>", "#include <xen/memory.h>",
             "#include <xen/grant_table.h>", "#include <xen/version.h>", "int main(void) {"]
    expected = []
    for _name, (c_type, _header, build) in HYPERCALL_STRUCTS.items():
        layout = build(X86_32)
        lines.append(f'printf("%zu\\n", sizeof({c_type}));')
        expected.append(ctypes.sizeof(layout))
        for member, *_ in layout._fields_:
            lines.append(f'printf("%zu\\n", offsetof({c_type}, {member}));')
            expected.append(getattr(layout, member).offset)
    lines.append("return 0; }")
    src = tmp_path / "abi.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "abi"
    build_ = subprocess.run([GCC, "-m32", "-D__XEN_INTERFACE_VERSION__=0x00040e00", str(src),
                             "-o", str(exe)], capture_output=True, text=True)
    if build_.returncode != 0 and "multilib" in build_.stderr + build_.stdout:
        pytest.skip("gcc -m32 is not available")
    assert build_.returncode == 0, build_.stderr
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True,
                                          check=True).stdout.split()]
    assert got == expected
