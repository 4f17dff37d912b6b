"""Dom0's learning Ethernet bridge between netback vifs and HVM NE2000s, every frame to pcap (IEEE 802.1D transparent bridging)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager

from devicemodel.pcap import PcapWriter

ETH_ALEN = 6
ETH_HLEN = 14
DEFAULT_MAX_ADDRESSES = 1024

Deliver = Callable[[bytes], object]


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class BridgePort:
    """One port: frames come in through transmit(), go out through `deliver`.

    A netback vif delivers with Vif.deliver and transmits from its tx path; an HVM NE2000
    transmits from its `tx` callback and delivers with Ne2000.receive.
    """

    def __init__(self, bridge: Bridge, name: str, deliver: Deliver | None,
                 lock: AbstractContextManager[object] | None) -> None:
        self.name = name
        self.frames_in = 0
        self.frames_out = 0
        self._bridge = bridge
        self._deliver = deliver
        self._lock = lock

    def connect(self, deliver: Deliver) -> None:
        """Set where frames for this port go (when the port was made before its device)."""
        self._deliver = deliver

    def transmit(self, frame: bytes) -> None:
        """A frame sent by the device on this port: into the bridge."""
        self._bridge.forward(self, bytes(frame))

    def _out(self, frame: bytes) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        self.frames_out += 1
        if self._lock is not None:
            with self._lock:
                deliver(frame)
        else:
            deliver(frame)

    def __repr__(self) -> str:
        return f"<BridgePort {self.name}>"


class Bridge:
    """A learning bridge: source addresses are learned per port; a frame to a known unicast
    address goes to that port only (or nowhere if that is where it came from); broadcast,
    multicast and unknown destinations flood to every other port. Every frame that enters
    is written to the pcap, once.

    Deliveries run on the sending port's thread, outside the bridge's lock. A device that is
    not thread-safe (an NE2000 driven by its device-model thread) gets a `lock` at add_port,
    held around each delivery to it.
    """

    def __init__(self, pcap: PcapWriter | None = None, *,
                 max_addresses: int = DEFAULT_MAX_ADDRESSES) -> None:
        self.pcap = pcap
        self.max_addresses = max_addresses
        self.frames = 0  # frames that entered the bridge
        self.flooded = 0  # frames sent to every other port
        self.forwarded = 0  # frames sent to the one port that owns the destination
        self.filtered = 0  # frames whose destination is on the port they came from
        self.runts = 0  # frames too short to hold an Ethernet header (captured, not sent)
        self.delivery_errors = 0
        self._ports: list[BridgePort] = []
        self._fdb: OrderedDict[bytes, BridgePort] = OrderedDict()  # MAC -> port, oldest first
        self._lock = threading.Lock()

    def add_port(self, name: str, deliver: Deliver | None = None, *,
                 lock: AbstractContextManager[object] | None = None) -> BridgePort:
        port = BridgePort(self, name, deliver, lock)
        with self._lock:
            self._ports.append(port)
        return port

    def remove_port(self, port: BridgePort) -> None:
        """Unplug a port; the addresses learned on it are forgotten."""
        with self._lock:
            if port in self._ports:
                self._ports.remove(port)
            for mac in [m for m, p in self._fdb.items() if p is port]:
                del self._fdb[mac]

    @property
    def ports(self) -> list[BridgePort]:
        with self._lock:
            return list(self._ports)

    def fdb(self) -> dict[str, str]:
        """The forwarding database: MAC address -> port name."""
        with self._lock:
            return {mac_text(mac): port.name for mac, port in self._fdb.items()}

    def forward(self, ingress: BridgePort, frame: bytes) -> None:
        if self.pcap is not None:
            self.pcap.write(frame)
            self.pcap.flush()
        with self._lock:
            self.frames += 1
            ingress.frames_in += 1
            if ingress not in self._ports:
                return  # unplugged while the device was sending
            if len(frame) < ETH_HLEN:
                self.runts += 1
                return
            dst, src = frame[:ETH_ALEN], frame[ETH_ALEN:2 * ETH_ALEN]
            if not src[0] & 1:  # a group address is never a source: do not learn it
                self._learn(src, ingress)
            owner = None if dst[0] & 1 else self._fdb.get(dst)
            if owner is None:
                targets = [p for p in self._ports if p is not ingress]
                self.flooded += 1
            elif owner is ingress:
                self.filtered += 1
                targets = []
            else:
                targets = [owner]
                self.forwarded += 1
        for port in targets:
            try:
                port._out(frame)
            except Exception:  # one bad receiver must not stop the others
                self.delivery_errors += 1

    def _learn(self, mac: bytes, port: BridgePort) -> None:
        if mac in self._fdb:
            self._fdb.move_to_end(mac)
        elif len(self._fdb) >= self.max_addresses:
            self._fdb.popitem(last=False)  # forget the address heard from longest ago
        self._fdb[mac] = port
