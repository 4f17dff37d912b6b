"""Domain 0 as the host side: its memory pool, the hypervisor's shared GrantOps, the XenStore daemon, the list of domains, and creating and running PV domains (Xen's control domain and toolstack, tools/libs/light)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

from hvm.console import ConsoleSink
from hvm.loader import GuestImage
from hvm.memory import GuestMemory
from hvm.status import LIMIT, GuestEnded
from pv.domain import DEFAULT_MEM, PvDomain, supervise
from pv.evtchn_pv import PvEventChannels
from pv.grant_table import Domain, GrantOps
from pv.trace_pv import PvTracer
from pv.xenbus import XsClient
from pv.xenstore import DOMID_FIRST_RESERVED
from pv.xenstored import Xenstored

DOM0_GRANT_FRAMES = 4


class Dom0Error(RuntimeError):
    """Domain 0 cannot do what was asked (no free domid, no free frame in its pool)."""


class Dom0:
    """Domain 0: not a guest here but Python threads and objects.

    `memory` is its own RAM pool (domid 0 for GrantOps: the page a backend flips into a
    guest comes from here, and the guest's old page lands here); its grant table has
    DOM0_GRANT_FRAMES frames the hypervisor allocated. `xenstored` serves every domain's
    store ring; `xs` is Dom0's own connection to it. Domains get ids from 1 up.
    """

    def __init__(self, pool_bytes: int = 4 << 20, grant_frames: int = DOM0_GRANT_FRAMES) -> None:
        self.domid = 0
        self.memory = GuestMemory(pool_bytes)
        self.grant_ops = GrantOps()
        self.grant_ops.add_domain(Domain(0, self.memory))
        self.grant_ops.setup_table(0, grant_frames)
        self.xenstored = Xenstored()
        self.xs = XsClient(self.xenstored.connect_local())
        self.domains: dict[int, PvDomain] = {}
        self._lock = threading.Lock()
        self._next_domid = 1
        self._dom0_ports = itertools.count(1)
        self._free_frames = list(range(self.memory.nr_pages - 1, 0, -1))  # frame 0 kept back

    # -- services ---------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.xenstored.running:
            self.xenstored.start()

    def stop(self) -> None:
        """Stop every domain (asking running vCPUs to end), then xenstored."""
        with self._lock:
            domains = list(self.domains.values())
        for domain in domains:
            self.destroy_domain(domain.domid)
        if self.xenstored.running:
            self.xenstored.stop()

    def xs_client(self) -> XsClient:
        """A new Dom0 connection to xenstored (its own watch queue), for one service."""
        return XsClient(self.xenstored.connect_local())

    # -- what domains ask of Dom0 (pv.domain.Dom0Services) ---------------------------------------
    def evtchn_of(self, domid: int) -> PvEventChannels | None:
        domain = self.domains.get(domid)
        return domain.evtchn if domain is not None else None

    def exists(self, domid: int) -> bool:
        return domid == 0 or domid in self.domains

    def next_dom0_port(self) -> int:
        """A port number for Dom0's end of a channel (Dom0's own port table)."""
        with self._lock:
            return next(self._dom0_ports)

    # -- the pool ---------------------------------------------------------------------------------
    def alloc_frame(self) -> int:
        """A free frame of Dom0's pool (e.g. a page to flip into a guest)."""
        with self._lock:
            if not self._free_frames:
                raise Dom0Error(f"Dom0's {self.memory.size >> 20} MiB pool has no free frame")
            return self._free_frames.pop()

    def free_frame(self, gfn: int) -> None:
        if not 0 < gfn < self.memory.nr_pages:
            raise Dom0Error(f"frame {gfn:#x} is not in Dom0's pool")
        with self._lock:
            if gfn not in self._free_frames:
                self._free_frames.append(gfn)

    # -- domains ----------------------------------------------------------------------------------
    def create_pv_domain(self, image: GuestImage, *, name: str = "", mem: int = DEFAULT_MEM,
                         console: ConsoleSink | None = None, tracer: PvTracer | None = None,
                         max_hypercalls: int | None = None) -> PvDomain:
        """Build a PV domain (not started: attach its backends, then domain.start())."""
        with self._lock:
            domid = self._next_domid
            if domid >= DOMID_FIRST_RESERVED:
                raise Dom0Error("no free domain id")
            self._next_domid += 1
        domain = PvDomain(self, image, domid, name=name, mem=mem, console=console, tracer=tracer,
                          max_hypercalls=max_hypercalls)
        with self._lock:
            self.domains[domid] = domain
        return domain

    def destroy_domain(self, domid: int) -> None:
        with self._lock:
            domain = self.domains.get(domid)
        if domain is None:
            return
        if domain.running:
            domain.request_end(GuestEnded("destroyed", LIMIT, "domain destroyed by Dom0"))
            domain.join(5.0)
        domain.destroy()
        with self._lock:
            self.domains.pop(domid, None)

    def run_domains(self, domains: Sequence[PvDomain], timeout_s: float | None) -> None:
        """Start `domains` (built, backends attached) and wait for all to end or time out."""
        for domain in domains:
            domain.start()
        supervise(domains, timeout_s)
