"""Integration: the shipped device guests on hvmlab's PC, checked the way a user would (disk
bytes, pcap frames, serial output, interrupt counts)."""

from __future__ import annotations

import os

from devicemodel.pcap import read_pcap


def test_uart_prints_through_com1_and_its_scratch_and_loopback_work(run_guest):
    result, records = run_guest("uart")
    assert result.exit_status == 0 and result.console.endswith("Test result: SUCCESS\n")
    assert "Test result: SUCCESS" in result.serial  # the same line went out through THR
    uart_ports = {r["port"] for r in records if r["handled_by"] == "device-model"}
    assert uart_ports <= set(range(0x3F8, 0x400)) and 0x3FF in uart_ports  # the scratch register
    assert result.ioreqs_by_type["pio"] == len([r for r in records if r["handled_by"] == "device-model"])


def test_pit_guest_counts_ten_timer_interrupts_with_hlt_between(run_guest):
    result, records = run_guest("pit")
    assert "10 timer interrupts" in result.console and result.exit_status == 0
    assert result.interrupts_injected == 10
    assert result.exits["HLT"] >= 2  # halts between ticks (a tick may land before the HLT)
    # the PIT and PIC are the hypervisor's in Xen's split: no ioreq for them
    assert all(r["handled_by"] == "hypervisor" for r in records if r.get("port") in (0x20, 0x21, 0x40, 0x43))


def test_cmos_reports_memory_size_from_mem_and_the_rtc_time(run_guest):
    small, _ = run_guest("cmos")
    big, _ = run_guest("cmos", mem=64 << 20)
    assert "RAM: 16384 KiB (16 MiB)" in small.console
    assert "RAM: 65536 KiB (64 MiB)" in big.console
    assert "RTC: 2026-01-01 12:00:" in small.console
    assert small.exit_status == big.exit_status == 0


def test_pci_guest_lists_the_i440fx_functions(run_guest):
    result, _ = run_guest("pci")
    assert "i440FX host bridge at 00:00.0, PIIX3 ISA bridge at 00:01.0" in result.console
    assert "3 functions answer on bus 0" in result.console
    assert result.ioreqs_by_type.get("pci_config", 0) > 0 and result.exit_status == 0


def test_ide_guest_reads_writes_and_flushes_exactly_one_sector(tmp_path, run_guest):
    disk = tmp_path / "disk.img"
    before = bytearray(os.urandom(512 * 16))
    before[512:512 + 16] = b"sector one here!"
    disk.write_bytes(before)
    result, records = run_guest("ide", disk=disk)
    assert result.exit_status == 0, result.console
    assert "LBA 1, first 16 bytes: " + b"sector one here!".hex(" ") in result.console
    after = disk.read_bytes()
    sector2 = after[1024:1536]
    text = b"hvmlab was here: LBA 2\n"
    assert sector2.startswith(text)
    assert sector2[len(text):] == bytes(i & 0xFF for i in range(len(text), 512))
    assert after[:1024] == before[:1024] and after[1536:] == before[1536:]  # nothing else changed
    sectors = [r for r in records if r.get("port") == 0x1F0 and r.get("string")]
    assert sectors and all(r["count"] == 256 and r["ioreqs"] == 1 for r in sectors)


def test_ide_guest_without_a_disk_says_so(run_guest):
    result, _ = run_guest("ide")
    assert result.exit_status == 3 and "Test result: FAILURE" in result.console


def test_ne2000_guest_sends_a_frame_that_lands_in_the_pcap(tmp_path, run_guest):
    pcap = tmp_path / "out.pcap"
    result, _ = run_guest("ne2000", pcap=pcap)
    assert result.exit_status == 0 and result.frames_sent == 1
    frames = read_pcap(pcap)
    assert len(frames) == 1
    frame = frames[0][1]
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == bytes.fromhex("525400123456")
    assert frame[12:14] == b"\x88\xb5" and b"hello from ne2000" in frame


def test_irq_guest_shows_the_interrupt_window(run_guest):
    result, records = run_guest("irq")
    assert "Test result: SUCCESS" in result.console and result.exit_status == 0
    assert result.exits.get("INTERRUPT_WINDOW", 0) >= 1
    assert result.interrupts_injected >= 4


def test_all_dm_placement_runs_the_same_device_guests(run_guest):
    for guest in ("pit", "cmos", "pci"):
        xen, _ = run_guest(guest)
        all_dm, _ = run_guest(guest, placement="all-dm")
        assert all_dm.exit_status == xen.exit_status == 0, guest
        assert all_dm.ioreqs > xen.ioreqs, guest
