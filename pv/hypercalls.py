"""PV hypercalls (`int 0x82`, EAX = number, args in EBX, ECX, EDX, ESI, EDI, result in EAX) dispatched by number with Xen's x86_32 argument structs (Xen public/xen.h, sched.h, event_channel.h, memory.h, version.h, vcpu.h)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hvm.boot import SEL_CODE32
from hvm.memory import PAGE_SIZE, GuestMemory
from pv.evtchn_pv import DOMID_SELF, PortStatus, PvEventChannels
from pv.gnttab_pv import OP_NAMES as GNTTABOP_NAMES
from pv.gnttab_pv import GuestGrantTable
from pv.guest_copy import GuestCopy
from pv.hypercall_layouts import (
    XEN_CAPABILITIES_INFO_LEN,
    XEN_CHANGESET_INFO_LEN,
    XEN_DOMAIN_HANDLE_LEN,
    XEN_EXTRAVERSION_LEN,
    sched_poll,
    sched_shutdown,
    xen_compile_info,
    xen_feature_info,
    xen_memory_reservation,
    xen_platform_parameters,
)
from pv.layouts import (
    arch_named,
    evtchn_alloc_unbound,
    evtchn_bind_interdomain,
    evtchn_close,
    evtchn_send,
    evtchn_status,
    evtchn_unmask,
)

# public/xen.h __HYPERVISOR_* (the names the result and trace use)
HYPERCALL_NAMES = {
    0: "set_trap_table", 1: "mmu_update", 2: "set_gdt", 3: "stack_switch", 4: "set_callbacks",
    5: "fpu_taskswitch", 6: "sched_op_compat", 7: "platform_op", 8: "set_debugreg",
    9: "get_debugreg", 10: "update_descriptor", 12: "memory_op", 13: "multicall",
    14: "update_va_mapping", 15: "set_timer_op", 16: "event_channel_op_compat",
    17: "xen_version", 18: "console_io", 19: "physdev_op_compat", 20: "grant_table_op",
    21: "vm_assist", 22: "update_va_mapping_otherdomain", 23: "iret", 24: "vcpu_op",
    25: "set_segment_base", 26: "mmuext_op", 27: "xsm_op", 28: "nmi_op", 29: "sched_op",
    30: "callback_op", 31: "xenoprof_op", 32: "event_channel_op", 33: "physdev_op",
    34: "hvm_op", 35: "sysctl", 36: "domctl", 37: "kexec_op", 38: "tmem_op", 39: "argo_op",
    40: "xenpmu_op", 41: "dm_op", 42: "hypfs_op",
}
HYPERVISOR_set_callbacks = 4
HYPERVISOR_memory_op = 12
HYPERVISOR_xen_version = 17
HYPERVISOR_console_io = 18
HYPERVISOR_grant_table_op = 20
HYPERVISOR_vcpu_op = 24
HYPERVISOR_sched_op = 29
HYPERVISOR_event_channel_op = 32

# public/errno.h, returned negated
EPERM, ENOENT, ESRCH, EFAULT, EINVAL, ENOSYS = 1, 2, 3, 14, 22, 38

SCHEDOP_yield, SCHEDOP_block, SCHEDOP_shutdown, SCHEDOP_poll = 0, 1, 2, 3
SCHEDOP_remote_shutdown, SCHEDOP_shutdown_code = 4, 5
SCHEDOP_NAMES = {0: "yield", 1: "block", 2: "shutdown", 3: "poll", 4: "remote_shutdown",
                 5: "shutdown_code", 6: "watchdog"}
SHUTDOWN_poweroff, SHUTDOWN_reboot, SHUTDOWN_suspend, SHUTDOWN_crash = 0, 1, 2, 3
SHUTDOWN_watchdog, SHUTDOWN_soft_reset = 4, 5
SHUTDOWN_NAMES = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog",
                  5: "soft_reset"}
MAX_POLL_PORTS = 128  # Xen's "fairly arbitrary limit" on sched_poll.nr_ports

EVTCHNOP_bind_interdomain, EVTCHNOP_close, EVTCHNOP_send = 0, 3, 4
EVTCHNOP_status, EVTCHNOP_alloc_unbound, EVTCHNOP_unmask = 5, 6, 9
EVTCHNOP_NAMES = {0: "bind_interdomain", 1: "bind_virq", 2: "bind_pirq", 3: "close", 4: "send",
                  5: "status", 6: "alloc_unbound", 7: "bind_ipi", 8: "bind_vcpu", 9: "unmask",
                  10: "reset", 11: "init_control", 12: "expand_array", 13: "set_priority"}

XENMEM_decrease_reservation, XENMEM_maximum_ram_page = 1, 2
XENMEM_current_reservation, XENMEM_maximum_reservation, XENMEM_maximum_gpfn = 3, 4, 14
XENMEM_NAMES = {0: "increase_reservation", 1: "decrease_reservation", 2: "maximum_ram_page",
                3: "current_reservation", 4: "maximum_reservation", 6: "populate_physmap",
                14: "maximum_gpfn"}
MEMOP_EXTENT_SHIFT, MEMOP_CMD_MASK = 6, (1 << 6) - 1
PREEMPT_EVERY = 256  # extents given back per entry before the call continues itself

XENVER_NAMES = {0: "version", 1: "extraversion", 2: "compile_info", 3: "capabilities",
                4: "changeset", 5: "platform_parameters", 6: "get_features", 7: "pagesize",
                8: "guest_handle"}
XENFEAT_NR_SUBMAPS = 1
HYPERVISOR_VIRT_START_PAE = 0xF580_0000  # x86_32 PAE (nothing is mapped there in this model)
CONSOLEIO_write, CONSOLEIO_read = 0, 1
VCPUOP_is_up = 3

FLAT_KERNEL_CS = 0xE019  # Xen x86_32's ring-1 flat code selector; here the same as SEL_CODE32
CALLBACK_SELECTORS = {SEL_CODE32: SEL_CODE32, FLAT_KERNEL_CS: SEL_CODE32}


def hypercall_name(number: int) -> str:
    return HYPERCALL_NAMES.get(number, f"unknown_{number}")


class Scheduler(Protocol):
    """What sched_op needs of the vCPU that made the call (it runs on that vCPU's thread)."""

    def block(self) -> None: ...  # SCHEDOP_block: until an event is pending (or the run ends)
    def poll(self, ports: Sequence[int], timeout_ns: int) -> None: ...
    def yield_(self) -> None: ...
    def shutdown(self, reason: int) -> None: ...  # the domain ends after this hypercall
    def check_upcall(self) -> None: ...  # an upcall may be deliverable now: deliver it at once
    def now_ns(self) -> int: ...  # the domain's system time (vcpu_time_info.system_time)


@dataclass
class Callbacks:
    """set_callbacks(event_selector, event_address, failsafe_selector, failsafe_address)."""

    event_selector: int = 0
    event_address: int = 0  # 0: no event callback (events only wake SCHEDOP_block / poll)
    failsafe_selector: int = 0
    failsafe_address: int = 0


class Hypercalls:
    """One PV domain's hypercall table. Every outcome is a value for EAX: a result, or a
    negative errno as Xen returns it (-ENOSYS for an unknown number or sub-op, -EFAULT for a
    guest pointer that cannot be copied, -EINVAL for a bad port or argument); nothing a
    guest passes can raise out of dispatch()."""

    def __init__(self, *, domid: int, memory: GuestMemory, evtchn: PvEventChannels,
                 gnttab: GuestGrantTable, console: Callable[[bytes], None], sched: Scheduler,
                 exists: Callable[[int], bool], protected: frozenset[int] = frozenset(),
                 callbacks: Callbacks | None = None, version: tuple[int, int] = (4, 17),
                 extraversion: bytes = b".0-hvmlab") -> None:
        self.domid = domid
        self.memory = memory
        self.guest = GuestCopy(memory)
        self.evtchn = evtchn
        self.gnttab = gnttab
        self.console = console
        self.sched = sched
        self.exists = exists
        self.protected = protected
        self.callbacks = callbacks or Callbacks()
        self.version = version
        self.extraversion = extraversion
        self.arch = arch_named("x86_32")
        self.calls: dict[str, int] = {}
        self.op: str | None = None  # the sub-operation of the last call, for the trace
        self.on_event_send: Callable[[int, PortStatus], None] | None = None
        self.released: set[int] = set()  # frames given back by XENMEM_decrease_reservation
        self.shutdown_code: int | None = None
        # The argument registers to re-enter the same hypercall with when a long one was
        # preempted (Xen's hypercall_create_continuation): the vCPU re-executes int 0x82.
        self.continuation: tuple[int, ...] | None = None
        self._table: dict[int, Callable[[tuple[int, ...]], int]] = {
            HYPERVISOR_set_callbacks: self._set_callbacks,
            HYPERVISOR_memory_op: self._memory_op,
            HYPERVISOR_xen_version: self._xen_version,
            HYPERVISOR_console_io: self._console_io,
            HYPERVISOR_grant_table_op: self._grant_table_op,
            HYPERVISOR_vcpu_op: self._vcpu_op,
            HYPERVISOR_sched_op: self._sched_op,
            HYPERVISOR_event_channel_op: self._event_channel_op,
        }

    def dispatch(self, number: int, args: Sequence[int]) -> int:
        """The hypercall `number` with its five argument registers; the value for EAX."""
        name = hypercall_name(number)
        self.calls[name] = self.calls.get(name, 0) + 1
        self.op = None
        self.continuation = None
        handler = self._table.get(number)
        if handler is None:
            return -ENOSYS
        regs = tuple(a & 0xFFFF_FFFF for a in args) + (0,) * (5 - len(args))
        return handler(regs)

    def _dom(self, dom: int) -> int:
        return self.domid if dom == DOMID_SELF else dom

    def _not_self(self, dom: int) -> int:
        """Xen's answer when a domU names another domain where only Dom0 may."""
        return -EPERM if self.exists(dom) else -ESRCH

    # -- set_callbacks --------------------------------------------------------------------------
    def _set_callbacks(self, a: tuple[int, ...]) -> int:
        event_sel, event_addr, failsafe_sel, failsafe_addr = a[0] & 0xFFFF, a[1], a[2] & 0xFFFF, a[3]
        # Xen fixes up any selector's RPL; this model has one flat code segment, so only its
        # selector (or Xen's FLAT_KERNEL_CS naming the same flat segment) can be entered.
        if event_sel not in CALLBACK_SELECTORS or failsafe_sel not in CALLBACK_SELECTORS:
            return -EINVAL
        cb = self.callbacks
        cb.event_selector, cb.event_address = CALLBACK_SELECTORS[event_sel], event_addr
        cb.failsafe_selector, cb.failsafe_address = CALLBACK_SELECTORS[failsafe_sel], failsafe_addr
        self.sched.check_upcall()
        return 0

    # -- console_io and xen_version -------------------------------------------------------------
    def _console_io(self, a: tuple[int, ...]) -> int:
        cmd, count, buf = a[0], a[1], a[2]
        self.op = {CONSOLEIO_write: "CONSOLEIO_write", CONSOLEIO_read: "CONSOLEIO_read"}.get(cmd)
        if cmd == CONSOLEIO_write:
            data = self.guest.read(buf, count)
            if data is None:
                return -EFAULT
            self.console(data)
            return 0  # a debug build of Xen lets a domU write, and returns 0
        if cmd == CONSOLEIO_read:
            return 0  # no console input here: 0 bytes read
        return -EINVAL

    def _xen_version(self, a: tuple[int, ...]) -> int:
        cmd, arg = a[0], a[1]
        self.op = f"XENVER_{XENVER_NAMES[cmd]}" if cmd in XENVER_NAMES else None
        if cmd == 0:
            return (self.version[0] << 16) | self.version[1]
        if cmd == 7:
            return PAGE_SIZE
        if cmd == 6:
            fi = self.guest.read_struct(arg, xen_feature_info(self.arch))
            if fi is None:
                return -EFAULT
            if fi.submap_idx >= XENFEAT_NR_SUBMAPS:
                return -EINVAL
            fi.submap = 0  # no optional feature (no paging: page-table features mean nothing)
            return 0 if self.guest.write_struct(arg, fi) else -EFAULT
        if cmd == 2:
            ci = xen_compile_info(self.arch)()
            ci.compiler, ci.compile_by, ci.compile_domain = b"Python", b"hvmlab", b"hvmlab"
            out = bytes(ci)
        elif cmd == 5:
            out = bytes(xen_platform_parameters(self.arch)(HYPERVISOR_VIRT_START_PAE))
        else:
            text = {1: (self.extraversion, XEN_EXTRAVERSION_LEN),
                    3: (b"xen-3.0-x86_32p", XEN_CAPABILITIES_INFO_LEN),
                    4: (b"hvmlab", XEN_CHANGESET_INFO_LEN),
                    8: (b"", XEN_DOMAIN_HANDLE_LEN)}.get(cmd)
            if text is None:
                return -ENOSYS
            value, size = text
            out = value[:size - 1].ljust(size, b"\0")
        return 0 if self.guest.write(arg, out) else -EFAULT

    # -- sched_op -------------------------------------------------------------------------------
    def _sched_op(self, a: tuple[int, ...]) -> int:
        cmd, arg = a[0], a[1]
        self.op = f"SCHEDOP_{SCHEDOP_NAMES[cmd]}" if cmd in SCHEDOP_NAMES else None
        if cmd == SCHEDOP_yield:
            self.sched.yield_()
            return 0
        if cmd == SCHEDOP_block:
            self.sched.block()
            return 0
        if cmd in (SCHEDOP_shutdown, SCHEDOP_shutdown_code):
            s = self.guest.read_struct(arg, sched_shutdown(self.arch))
            if s is None:
                return -EFAULT
            if cmd == SCHEDOP_shutdown_code:
                self.shutdown_code = s.reason & 0xFF  # reported if the domain later shuts down
                return 0
            self.sched.shutdown(s.reason & 0xFF)  # Xen keeps the low byte of the reason
            return 0
        if cmd == SCHEDOP_poll:
            return self._poll(arg)
        if cmd == SCHEDOP_remote_shutdown:
            return -EPERM  # only a privileged domain may shut another down
        return -ENOSYS

    def _poll(self, arg: int) -> int:
        p = self.guest.read_struct(arg, sched_poll(self.arch))
        if p is None:
            return -EFAULT
        if p.nr_ports > MAX_POLL_PORTS:
            return -EINVAL
        ports = self.guest.read_u32s(p.ports, p.nr_ports)
        if ports is None:
            return -EFAULT
        if any(not self.evtchn.valid(port) for port in ports):
            return -EINVAL
        self.sched.poll(ports, p.timeout)
        return 0

    # -- event_channel_op -----------------------------------------------------------------------
    def _event_channel_op(self, a: tuple[int, ...]) -> int:
        cmd, arg = a[0], a[1]
        self.op = f"EVTCHNOP_{EVTCHNOP_NAMES[cmd]}" if cmd in EVTCHNOP_NAMES else None
        ev = self.evtchn
        if cmd == EVTCHNOP_alloc_unbound:
            op = self.guest.read_struct(arg, evtchn_alloc_unbound(self.arch))
            if op is None:
                return -EFAULT
            port = ev.alloc_unbound(op.remote_dom, op.dom)
            if port < 0:
                return port
            op.port = port
            return 0 if self.guest.write_struct(arg, op) else -EFAULT
        if cmd == EVTCHNOP_bind_interdomain:
            bi = self.guest.read_struct(arg, evtchn_bind_interdomain(self.arch))
            if bi is None:
                return -EFAULT
            port = ev.bind_interdomain(bi.remote_dom, bi.remote_port)
            if port < 0:
                return port
            bi.local_port = port
            return 0 if self.guest.write_struct(arg, bi) else -EFAULT
        if cmd == EVTCHNOP_status:
            return self._status(arg)
        simple = {EVTCHNOP_send: (evtchn_send, ev.send), EVTCHNOP_close: (evtchn_close, ev.close),
                  EVTCHNOP_unmask: (evtchn_unmask, ev.unmask)}.get(cmd)
        if simple is None:
            return -ENOSYS
        layout, action = simple
        one = self.guest.read_struct(arg, layout(self.arch))
        if one is None:
            return -EFAULT
        result = action(one.port)
        if cmd == EVTCHNOP_send and result == 0 and self.on_event_send is not None:
            status = ev.status(one.port)
            if isinstance(status, PortStatus):
                self.on_event_send(one.port, status)
        if cmd == EVTCHNOP_unmask and result == 0:
            self.sched.check_upcall()  # an event that waited behind the mask is delivered now
        return result

    def _status(self, arg: int) -> int:
        st = self.guest.read_struct(arg, evtchn_status(self.arch))
        if st is None:
            return -EFAULT
        dom = self._dom(st.dom)
        if dom != self.domid:
            return self._not_self(dom)
        status = self.evtchn.status(st.port)
        if not isinstance(status, PortStatus):
            return status
        st.status, st.vcpu = status.status, 0
        if status.status == 1:
            st.u.unbound.dom = status.remote_dom
        elif status.status == 2:
            st.u.interdomain.dom, st.u.interdomain.port = status.remote_dom, status.remote_port
        return 0 if self.guest.write_struct(arg, st) else -EFAULT

    # -- grant_table_op, memory_op, vcpu_op -----------------------------------------------------
    def _grant_table_op(self, a: tuple[int, ...]) -> int:
        cmd, uop, count = a[0], a[1], a[2]
        self.op = f"GNTTABOP_{GNTTABOP_NAMES[cmd]}" if cmd in GNTTABOP_NAMES else None
        result = self.gnttab.op(cmd, uop, count)
        if self.gnttab.continuation is not None:
            rest_uop, rest_count = self.gnttab.continuation
            self.continuation = (cmd, rest_uop, rest_count, a[3], a[4])
        return result

    def _memory_op(self, a: tuple[int, ...]) -> int:
        cmd, arg = a[0] & MEMOP_CMD_MASK, a[1]
        start = a[0] >> MEMOP_EXTENT_SHIFT
        self.op = f"XENMEM_{XENMEM_NAMES[cmd]}" if cmd in XENMEM_NAMES else None
        nr_pages = self.memory.nr_pages
        if cmd == XENMEM_decrease_reservation:
            done = self._decrease_reservation(arg, start)
            if self.continuation is not None:  # preempted: on with the extents from `done`
                self.continuation = ((done << MEMOP_EXTENT_SHIFT) | cmd, arg, *a[2:])
            return done
        if cmd in (XENMEM_current_reservation, XENMEM_maximum_reservation):
            raw = self.guest.read(arg, 2)
            if raw is None:
                return -EFAULT
            dom = self._dom(int.from_bytes(raw, "little"))
            if dom != self.domid:
                return self._not_self(dom)
            return nr_pages - len(self.released) if cmd == XENMEM_current_reservation else nr_pages
        if cmd in (XENMEM_maximum_ram_page, XENMEM_maximum_gpfn):
            return nr_pages - 1
        return -ENOSYS

    def _decrease_reservation(self, arg: int, start: int) -> int:
        """Give frames back to Xen (a netfront does before offering them for a page flip).

        The count done is returned, as Xen does. The frames are only accounted as released:
        they stay backed (a later transfer re-backs them anyway), so a guest that touches one
        is not faulted as it would be on Xen."""
        r = self.guest.read_struct(arg, xen_memory_reservation(self.arch))
        if r is None:
            return -EFAULT
        if start >= r.nr_extents:
            return start
        dom = self._dom(r.domid)
        if dom != self.domid:
            return self._not_self(dom)
        if r.extent_order != 0:
            return start  # larger extents than a page are not given back here: none done
        for i in range(start, r.nr_extents):
            if i - start == PREEMPT_EVERY:
                self.continuation = ()  # filled in by the caller
                return i
            gfn = self.guest.read_u32s(r.extent_start + 4 * i, 1)
            if gfn is None or not 0 <= gfn[0] < self.memory.nr_pages or gfn[0] in self.protected:
                return i  # Xen stops at the first extent it cannot remove
            self.released.add(gfn[0])
        return r.nr_extents

    def _vcpu_op(self, a: tuple[int, ...]) -> int:
        cmd, vcpuid = a[0], a[1]
        self.op = "VCPUOP_is_up" if cmd == VCPUOP_is_up else None
        if vcpuid != 0:
            return -ENOENT  # one vCPU per domain
        if cmd == VCPUOP_is_up:
            return 1
        return -ENOSYS
