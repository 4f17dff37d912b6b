"""The Dom0 learning bridge: flooding, learning, filtering, pcap of every frame, an NE2000 as a port."""

from __future__ import annotations

import threading
from pathlib import Path

from devicemodel.bus import Bus
from devicemodel.clock import ManualClock
from devicemodel.irq import RecordingIrq
from devicemodel.ne2000 import Ne2000
from devicemodel.pcap import PcapWriter, read_pcap
from pv.bridge import Bridge, BridgePort

BROADCAST = b"\xff" * 6
A, B, C = (bytes([0x00, 0x16, 0x3E, 0, 0, n]) for n in (1, 2, 3))
NIC_MAC = bytes.fromhex("525400123456")


def ether(dst: bytes, src: bytes, payload: bytes = b"payload") -> bytes:
    return dst + src + b"\x08\x00" + payload


def three_ports(bridge: Bridge) -> tuple[dict[str, list[bytes]], list[BridgePort]]:
    got: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
    ports = [bridge.add_port(name, got[name].append) for name in ("a", "b", "c")]
    return got, ports


def test_unknown_and_broadcast_flood_known_unicast_goes_to_one_port() -> None:
    bridge = Bridge()
    got, (pa, pb, pc) = three_ports(bridge)
    hello = ether(B, A, b"who is B?")  # B not learned yet: flooded
    pa.transmit(hello)
    assert got == {"a": [], "b": [hello], "c": [hello]}
    reply = ether(A, B, b"B here")  # A was learned on port a
    pb.transmit(reply)
    assert got["a"] == [reply] and got["c"] == [hello]
    direct = ether(B, A, b"now I know")
    pa.transmit(direct)
    assert got["b"] == [hello, direct] and got["c"] == [hello]
    bcast = ether(BROADCAST, C, b"everyone")
    pc.transmit(bcast)
    assert got["a"][-1] == bcast and got["b"][-1] == bcast and got["c"] == [hello]
    assert bridge.fdb() == {"00:16:3e:00:00:01": "a", "00:16:3e:00:00:02": "b",
                            "00:16:3e:00:00:03": "c"}
    assert (bridge.flooded, bridge.forwarded) == (2, 2)


def test_frames_for_the_port_they_came_from_are_filtered() -> None:
    bridge = Bridge()
    got, (pa, pb, _) = three_ports(bridge)
    pa.transmit(ether(BROADCAST, A))
    pa.transmit(ether(BROADCAST, C))  # C now lives behind port a too
    before = {k: len(v) for k, v in got.items()}
    pa.transmit(ether(C, A, b"local"))
    assert {k: len(v) for k, v in got.items()} == before
    assert bridge.filtered == 1


def test_group_source_addresses_are_not_learned_and_multicast_floods() -> None:
    bridge = Bridge()
    got, (pa, pb, pc) = three_ports(bridge)
    multicast = bytes.fromhex("01005e000001")
    pa.transmit(ether(B, multicast, b"bogus source"))
    assert bridge.fdb() == {}
    pb.transmit(ether(multicast, B, b"to a group"))
    assert got["a"][-1][:6] == multicast and got["c"][-1][:6] == multicast


def test_every_frame_is_captured_once_even_runts(tmp_path: Path) -> None:
    path = tmp_path / "bridge.pcap"
    clock = ManualClock()
    pcap = PcapWriter(path, clock)
    bridge = Bridge(pcap)
    got, (pa, pb, _) = three_ports(bridge)
    frames = [ether(BROADCAST, A, b"one"), ether(A, B, b"two"), b"\x01\x02\x03"]
    for i, (port, frame) in enumerate(zip((pa, pb, pa), frames, strict=True)):
        clock.advance(1_000_000 * (i + 1))
        port.transmit(frame)
    pcap.close()
    records = read_pcap(path)
    assert [data for _, data in records] == frames
    assert [t for t, _ in records] == [1_000_000, 3_000_000, 6_000_000]
    assert bridge.runts == 1 and b"\x01\x02\x03" not in got["b"] + got["c"]


def test_removed_port_is_forgotten_and_receives_nothing() -> None:
    bridge = Bridge()
    got, (pa, pb, pc) = three_ports(bridge)
    pb.transmit(ether(BROADCAST, B))
    bridge.remove_port(pb)
    assert "00:16:3e:00:00:02" not in bridge.fdb()
    pa.transmit(ether(B, A, b"to a departed port"))  # unknown again: flooded to the rest
    assert got["c"][-1] == ether(B, A, b"to a departed port")
    assert got["b"] == []
    pb.transmit(ether(A, B, b"from beyond"))  # an unplugged port's frames go nowhere
    assert got["a"] == [ether(BROADCAST, B)]  # only what it heard while b was plugged in


def test_address_table_is_bounded_oldest_forgotten_first() -> None:
    bridge = Bridge(max_addresses=2)
    got, (pa, pb, pc) = three_ports(bridge)
    pa.transmit(ether(BROADCAST, A))
    pb.transmit(ether(BROADCAST, B))
    pc.transmit(ether(BROADCAST, C))
    assert bridge.fdb() == {"00:16:3e:00:00:02": "b", "00:16:3e:00:00:03": "c"}


def test_a_failing_receiver_does_not_stop_the_others() -> None:
    bridge = Bridge()
    seen: list[bytes] = []

    def broken(_frame: bytes) -> None:
        raise RuntimeError("device gone")

    pa = bridge.add_port("a", seen.append)
    bridge.add_port("b", broken)
    pc = bridge.add_port("c", seen.append)
    pc.transmit(ether(BROADCAST, C))
    pa.transmit(ether(BROADCAST, A))
    assert len(seen) == 2 and bridge.delivery_errors == 2


# -- an HVM guest's NE2000 on the bridge ---------------------------------------------------------

BASE = 0x300
CR, PSTART, PSTOP, BNRY, TPSR, TBCR0, TBCR1, ISR = (BASE + r for r in range(8))
RSAR0, RSAR1, RBCR0, RBCR1, RCR, TCR, DCR, IMR = (BASE + r for r in range(8, 16))
DATA = BASE + 0x10
RX_START, RX_STOP, TX_PAGE = 0x46, 0x80, 0x40


class Nic:
    """An NE2000 driven through its registers, as the HVM guest's driver drives it."""

    def __init__(self, port: BridgePort) -> None:
        self.nic = Ne2000(NIC_MAC, RecordingIrq(), port.transmit)
        self.io = Bus("io", 16)
        self.io.map(BASE, 0x20, self.nic, "ne2000")
        out = self.io.write
        for reg, value in ((CR, 0x21), (DCR, 0x49), (RCR, 0x04), (TCR, 0x02), (TPSR, TX_PAGE),
                           (PSTART, RX_START), (BNRY, RX_START), (PSTOP, RX_STOP),
                           (ISR, 0xFF), (CR, 0x61)):
            out(reg, 1, value)
        for i, b in enumerate(NIC_MAC):
            out(BASE + 1 + i, 1, b)
        out(BASE + 7, 1, RX_START)  # CURR (page 1)
        out(CR, 1, 0x22)
        out(TCR, 1, 0x00)

    def remote(self, addr: int, count: int, cr: int) -> None:
        for reg, value in ((RBCR0, count & 0xFF), (RBCR1, count >> 8), (RSAR0, addr & 0xFF),
                           (RSAR1, addr >> 8), (CR, cr)):
            self.io.write(reg, 1, value)

    def send(self, frame: bytes) -> None:
        self.remote(TX_PAGE << 8, len(frame), 0x12)
        for byte in frame:
            self.io.write(DATA, 1, byte)
        self.io.write(TBCR0, 1, len(frame) & 0xFF)
        self.io.write(TBCR1, 1, len(frame) >> 8)
        self.io.write(CR, 1, 0x26)  # transmit

    def first_received(self) -> bytes:
        """The first packet in the receive ring: 4-byte header, then the frame."""
        self.remote(RX_START << 8, 4, 0x0A)
        header = bytes(self.io.read(DATA, 1) for _ in range(4))
        length = header[2] | header[3] << 8
        self.remote((RX_START << 8) + 4, length - 4, 0x0A)
        return bytes(self.io.read(DATA, 1) for _ in range(length - 4))


def test_an_ne2000_sends_and_receives_through_the_bridge(tmp_path: Path) -> None:
    pcap = PcapWriter(tmp_path / "mixed.pcap", ManualClock())
    bridge = Bridge(pcap)
    vif: list[bytes] = []
    other: list[bytes] = []
    pv_port = bridge.add_port("vif1.0", vif.append)
    bridge.add_port("vif2.0", other.append)
    dm_lock = threading.Lock()  # the device model's lock: deliveries must take it too
    nic_port = bridge.add_port("ne2000", lock=dm_lock)
    nic = Nic(nic_port)
    nic_port.connect(nic.nic.receive)
    # The PV guest says hello to the world; the NIC accepts broadcast (RCR.AB).
    hello = ether(BROADCAST, A, b"hello from PV" + bytes(40))
    pv_port.transmit(hello)
    assert nic.nic.frames_received == 1
    assert nic.io.read(ISR, 1) & 0x01  # PRX: what the HVM guest's interrupt handler sees
    assert nic.first_received() == hello
    # The HVM guest answers through its registers; the bridge knows where A lives.
    reply = ether(A, NIC_MAC, b"hello from HVM" + bytes(40))
    with dm_lock:
        nic.send(reply)
    assert vif == [reply] and other == [hello]
    assert bridge.fdb()["52:54:00:12:34:56"] == "ne2000"
    pcap.close()
    assert [data for _, data in read_pcap(tmp_path / "mixed.pcap")] == [hello, reply]
