"""Domain 0 services attached to one PV domain for `hvmlab run --pv`: the console backend and, with a disk, blkback with the xenbus handshake (Xen's xenconsoled, blkback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devicemodel.ide_disk import FileBlockBackend
from pv.backends.blkback import Blkback
from pv.backends.console import ConsoleBackend
from pv.backends.xenbus_glue import XenbusGlue

XVDA = 51712  # (202 << 8): xvda, as Xen's toolstack numbers it


class ConsoleService:
    """xenconsoled's part: the guest's console ring to its console sink."""

    def __init__(self, dom0: Any, domain: Any) -> None:
        self.backend = ConsoleBackend(on_ring_push=domain.on_ring_push)
        self.backend.attach(domain, domain.console_gfn, domain.console_port, domain.console)
        self.backend.start()

    def stop(self) -> None:
        self.backend.stop()


class BlkService:
    """blkback serving one raw image as the domain's xvda."""

    def __init__(self, dom0: Any, domain: Any, disk: Path, reorder: bool = False) -> None:
        tracer = getattr(domain, "tracer", None)
        self.blkback = Blkback(reorder=reorder, on_ring_push=domain.on_ring_push,
                               on_step=tracer.step if tracer is not None else None)
        self.glue = XenbusGlue(dom0.xs_client(), "vbd")
        self.disk = FileBlockBackend(disk)
        self.glue.add_device(domain.domid, XVDA, self.blkback.vbd(domain, XVDA, self.disk))
        self.blkback.start()
        self.glue.start()

    def stop(self) -> None:
        self.glue.stop()
        self.blkback.stop()
        self.disk.close()


def blk_factory(disk: Path, reorder: bool = False):  # noqa: ANN201 - a backend factory
    def attach(dom0: Any, domain: Any) -> BlkService:
        return BlkService(dom0, domain, disk, reorder)
    return attach
