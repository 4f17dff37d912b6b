"""Event channels: pending counts, blocking waits with a bound, interdomain pairs, port tables."""

from __future__ import annotations

import select
import threading

import pytest

from hvm.evtchn import (
    EventChannel,
    EventChannelError,
    EventChannelTable,
    make_interdomain_pair,
    wait_any,
)


def test_local_port_counts_and_clears_notifications() -> None:
    table = EventChannelTable()
    ch = table.alloc()
    assert ch.consume() == 0
    ch.notify()
    ch.notify()
    ch.notify()
    assert ch.consume() == 3
    assert ch.consume() == 0
    assert ch.notifications == 3
    table.close_all()


def test_wait_without_notification_times_out() -> None:
    ch = EventChannel(1)
    assert ch.wait(0.02) is False
    ch.notify()
    assert ch.wait(0.02) is True
    assert ch.consume() == 0  # wait consumed it
    ch.close()


def test_wait_is_woken_by_another_thread() -> None:
    hyp, dm = make_interdomain_pair()
    t = threading.Timer(0.01, hyp.notify)
    t.start()
    assert dm.wait(10.0) is True
    t.join()
    assert (hyp.notifications, dm.received) == (1, 1)
    hyp.close()
    dm.close()


def test_interdomain_notify_makes_only_the_other_end_pending() -> None:
    hyp, dm = make_interdomain_pair(local_port=5, remote_port=9)
    assert (hyp.remote_port, dm.remote_port) == (9, 5)
    hyp.notify()
    assert hyp.consume() == 0
    assert dm.consume() == 1
    dm.notify()
    dm.notify()
    assert dm.consume() == 0
    assert hyp.consume() == 2
    hyp.close()
    dm.close()


def test_ports_are_selectable() -> None:
    a, b = make_interdomain_pair()
    assert select.select([a, b], [], [], 0)[0] == []
    a.notify()
    assert select.select([a, b], [], [], 0)[0] == [b]
    a.close()
    b.close()


def test_wait_any_returns_the_notified_ports_consumed() -> None:
    table = EventChannelTable()
    chans = [table.alloc() for _ in range(4)]
    chans[1].notify()
    chans[3].notify()
    assert wait_any(chans, 1.0) == [chans[1], chans[3]]
    assert wait_any(chans, 0.01) == []
    table.close_all()


def test_table_allocates_lowest_free_port_from_one() -> None:
    table = EventChannelTable(domid=3)
    assert [table.alloc().port for _ in range(3)] == [1, 2, 3]
    table.close(2)
    assert 2 not in table
    assert table.alloc().port == 2
    assert table.ports() == [1, 2, 3]
    with pytest.raises(EventChannelError):
        table.get(99)
    with pytest.raises(EventChannelError):
        table.close(99)
    table.close_all()
    assert len(table) == 0


def test_table_runs_out_of_ports() -> None:
    table = EventChannelTable(max_ports=3)
    table.alloc()
    table.alloc()
    with pytest.raises(EventChannelError):
        table.alloc()
    table.close_all()


def test_bind_interdomain_allocates_a_port_in_each_table() -> None:
    guest, dom0 = EventChannelTable(domid=1), EventChannelTable(domid=0)
    dom0.alloc()  # dom0's port 1 is taken already
    local, remote = guest.bind_interdomain(dom0)
    assert (local.port, remote.port) == (1, 2)
    assert guest.get(1) is local and dom0.get(2) is remote
    local.notify()
    assert remote.consume() == 1
    with pytest.raises(EventChannelError):
        guest.bind_interdomain(guest)
    guest.close_all()
    dom0.close_all()


def test_closing_one_end_wakes_the_other_and_drops_later_sends() -> None:
    hyp, dm = make_interdomain_pair()
    dm.close()
    assert hyp.peer_closed
    assert hyp.wait(1.0) is True  # woken by the close
    hyp.notify()
    assert hyp.dropped == 1
    with pytest.raises(EventChannelError):
        dm.notify()
    with pytest.raises(EventChannelError):
        dm.fileno()
    dm.close()  # idempotent
    hyp.close()


def test_close_all_closes_every_port_file_descriptor() -> None:
    table = EventChannelTable()
    chans = [table.alloc() for _ in range(3)]
    table.close_all()
    assert all(ch.closed for ch in chans)
    with pytest.raises(ValueError):
        wait_any([], 0.0)
