"""The XenStore tree: every operation, permissions, watches and transactions, without a ring."""

from __future__ import annotations

import pytest

from pv.xenstore import Connection, NodePerm, Quota, XenStore, parse_perms
from pv.xs_wire import WatchEvent, XsError


class Client:
    """A connection plus the watch events delivered to it."""

    def __init__(self, store: XenStore, domid: int) -> None:
        self.events: list[WatchEvent] = []
        self.conn: Connection = store.connect(domid, self.events.append)

    def take(self) -> list[tuple[str, str]]:
        got = [(e.path, e.token) for e in self.events]
        self.events.clear()
        return got


def errname(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(XsError) as info:
        fn(*args, **kwargs)
    return info.value.errname


@pytest.fixture
def store() -> XenStore:
    return XenStore()


def make_home(store: XenStore, dom0: Connection, domid: int) -> str:
    """The toolstack's /local/domain/<domid>: Dom0's, the domain may read; device/ is its own."""
    home = f"/local/domain/{domid}"
    store.mkdir(dom0, home)
    store.set_perms(dom0, home, parse_perms(["n0", f"r{domid}"]))
    store.mkdir(dom0, f"{home}/device")
    store.set_perms(dom0, f"{home}/device", parse_perms([f"n{domid}"]))
    return home


def test_write_creates_parents_and_read_returns_raw_value(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    store.write(d0, "/a/b/c", b"hello\0world")
    assert store.read(d0, "/a/b/c") == b"hello\0world"
    assert store.read(d0, "/a/b") == b""
    assert store.directory(d0, "/a") == ["b"]
    assert store.directory(d0, "/a/b/c") == []
    assert "a" in store.directory(d0, "/")


def test_directory_keeps_creation_order(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    for name in ("zeta", "alpha", "mid"):
        store.write(d0, f"/dir/{name}", b"1")
    assert store.directory(d0, "/dir") == ["zeta", "alpha", "mid"]


def test_missing_nodes_are_enoent(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    assert errname(store.read, d0, "/nope") == "ENOENT"
    assert errname(store.directory, d0, "/nope") == "ENOENT"
    assert errname(store.get_perms, d0, "/nope") == "ENOENT"
    assert errname(store.set_perms, d0, "/nope", parse_perms(["n0"])) == "ENOENT"


def test_mkdir_is_idempotent_and_keeps_the_value(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    store.write(d0, "/m", b"v")
    store.mkdir(d0, "/m")
    store.mkdir(d0, "/m/n/o")
    assert store.read(d0, "/m") == b"v"
    assert store.directory(d0, "/m/n") == ["o"]


def test_rm_removes_the_subtree_and_tolerates_a_missing_leaf(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    store.write(d0, "/r/x/y", b"1")
    store.write(d0, "/r/z", b"2")
    store.rm(d0, "/r/x")
    assert store.directory(d0, "/r") == ["z"]
    assert errname(store.read, d0, "/r/x/y") == "ENOENT"
    assert not store.exists("/r/x/y")
    store.rm(d0, "/r/x")  # gone already, parent exists: OK as in xenstored
    assert errname(store.rm, d0, "/r/x/y") == "ENOENT"  # parent gone too
    assert errname(store.rm, d0, "/") == "EINVAL"


def test_relative_paths_are_under_the_domains_home(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    make_home(store, d0, 3)
    d3 = Client(store, 3).conn
    store.write(d3, "device/vbd/51712/state", b"1")
    assert store.read(d0, "/local/domain/3/device/vbd/51712/state") == b"1"
    assert store.read(d3, "/local/domain/3/device/vbd/51712/state") == b"1"


@pytest.mark.parametrize("path", ["/a//b", "/a/", "/bad name", "/caf\u00e9", ""])
def test_invalid_paths_are_einval(store: XenStore, path: str) -> None:
    d0 = Client(store, 0).conn
    assert errname(store.write, d0, path, b"x") == "EINVAL"


def test_permission_string_format() -> None:
    perms = parse_perms(["n0", "r5", "w7", "b12"])
    assert [str(p) for p in perms] == ["n0", "r5", "w7", "b12"]
    assert perms[1] == NodePerm(5, 1)
    for bad in ("x1", "r", "rr", "r-1"):
        with pytest.raises(XsError):
            NodePerm.parse(bad)
    with pytest.raises(XsError):
        parse_perms([])


def test_domu_reading_an_unreadable_node_gets_eacces(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    d1 = Client(store, 1).conn
    d2 = Client(store, 2).conn
    store.write(d0, "/secret", b"s")
    store.set_perms(d0, "/secret", parse_perms(["n0", "r1"]))
    assert store.read(d1, "/secret") == b"s"
    assert errname(store.read, d2, "/secret") == "EACCES"
    assert errname(store.directory, d2, "/secret") == "EACCES"
    assert errname(store.write, d1, "/secret", b"x") == "EACCES"  # r only
    store.set_perms(d0, "/secret", parse_perms(["r0"]))  # default: everyone reads
    assert store.read(d2, "/secret") == b"s"
    assert store.get_perms(d2, "/secret") == (NodePerm(0, 1),)


def test_domain_owns_what_it_creates_and_dom0_can_do_everything(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    home = make_home(store, d0, 4)
    d4 = Client(store, 4).conn
    d5 = Client(store, 5).conn
    assert errname(store.write, d4, f"{home}/top", b"x") == "EACCES"  # home is Dom0's
    store.write(d4, "device/x/y", b"mine")
    assert [str(p) for p in store.get_perms(d0, f"{home}/device/x/y")] == ["n4"]
    assert errname(store.read, d5, f"{home}/device/x/y") == "EACCES"
    store.set_perms(d4, "device/x/y", parse_perms(["n4", "r5"]))
    assert store.read(d5, f"{home}/device/x/y") == b"mine"
    assert errname(store.set_perms, d5, f"{home}/device/x/y",
                   parse_perms(["b5"])) == "EACCES"
    assert errname(store.set_perms, d4, "device/x/y", parse_perms(["b5"])) == "EPERM"
    store.write(d0, f"{home}/device/x/y", b"dom0 wins")
    store.rm(d0, f"{home}/device/x")
    assert store.node_count(owner=4) == 1  # device/ itself


def test_domain_created_node_inherits_other_entries(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    store.mkdir(d0, "/shared")
    store.set_perms(d0, "/shared", parse_perms(["n0", "w6", "r7"]))
    d6 = Client(store, 6).conn
    store.write(d6, "/shared/note", b"hi")
    assert [str(p) for p in store.get_perms(d0, "/shared/note")] == ["n6", "r7"]
    d7 = Client(store, 7).conn
    assert store.read(d7, "/shared/note") == b"hi"


def test_watch_fires_on_registration_and_on_changes_at_or_below(store: XenStore) -> None:
    d0c = Client(store, 0)
    d0 = d0c.conn
    store.watch(d0, "/w", "tok")
    assert d0c.take() == [("/w", "tok")]  # once straight away, even though /w is missing
    store.write(d0, "/w", b"1")
    store.write(d0, "/w/deep/er", b"2")
    store.write(d0, "/wx", b"3")  # a sibling sharing the prefix: not below /w
    store.mkdir(d0, "/w")  # exists: no change, no event
    assert d0c.take() == [("/w", "tok"), ("/w/deep/er", "tok")]
    store.set_perms(d0, "/w", parse_perms(["b0"]))
    assert d0c.take() == [("/w", "tok")]
    store.unwatch(d0, "/w", "tok")
    store.write(d0, "/w", b"4")
    assert d0c.take() == []
    assert errname(store.unwatch, d0, "/w", "tok") == "ENOENT"


def test_duplicate_and_invalid_watches(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    store.watch(d0, "/w", "t")
    assert errname(store.watch, d0, "/w", "t") == "EEXIST"
    store.watch(d0, "/w", "t2")  # another token is another watch
    assert errname(store.watch, d0, "@bogus", "t") == "EINVAL"


def test_rm_fires_for_the_node_its_ancestors_and_watches_inside_it(store: XenStore) -> None:
    c = Client(store, 0)
    d0 = c.conn
    store.write(d0, "/p/q/r", b"1")
    store.watch(d0, "/p", "top")
    store.watch(d0, "/p/q/r", "leaf")
    store.watch(d0, "/p/q/never/created", "ghost")
    store.watch(d0, "/other", "none")
    c.take()
    store.rm(d0, "/p/q")
    # Watches inside the removed subtree see their own path (docs/misc/xenstore.txt).
    assert sorted(c.take()) == [("/p/q", "top"), ("/p/q/never/created", "ghost"),
                                ("/p/q/r", "leaf")]


def test_relative_watch_reports_relative_paths(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    make_home(store, d0, 2)
    c2 = Client(store, 2)
    store.watch(c2.conn, "device", "rel")
    store.write(c2.conn, "device/vif/0/state", b"1")
    assert c2.take() == [("device", "rel"), ("device/vif/0/state", "rel")]


def test_watch_events_only_for_nodes_the_watcher_may_read(store: XenStore) -> None:
    d0 = Client(store, 0).conn
    c8 = Client(store, 8)
    store.mkdir(d0, "/pub")
    store.set_perms(d0, "/pub", parse_perms(["r0"]))
    store.watch(c8.conn, "/pub", "t")
    store.write(d0, "/pub/open", b"1")
    store.write(d0, "/pub/closed", b"2")
    store.set_perms(d0, "/pub/closed", parse_perms(["n0"]))
    store.write(d0, "/pub/closed", b"3")
    assert c8.take() == [("/pub", "t"), ("/pub/open", "t"), ("/pub/closed", "t")]


def test_special_watches(store: XenStore) -> None:
    c = Client(store, 0)
    store.watch(c.conn, "@releaseDomain", "rel")
    store.fire_special("@introduceDomain")
    store.fire_special("@releaseDomain")
    assert c.take() == [("@releaseDomain", "rel"), ("@releaseDomain", "rel")]


def test_transaction_commit_applies_and_fires_at_commit(store: XenStore) -> None:
    writer = Client(store, 0)
    other = Client(store, 0)
    store.watch(other.conn, "/t", "w")
    other.take()
    tx = store.transaction_start(writer.conn)
    store.write(writer.conn, "/t/a", b"1", tx)
    store.write(writer.conn, "/t/b", b"2", tx)
    assert store.read(writer.conn, "/t/a", tx) == b"1"  # the transaction sees its writes
    assert errname(store.read, other.conn, "/t/a") == "ENOENT"  # nobody else does yet
    assert other.take() == []  # no event before the commit
    store.transaction_end(writer.conn, tx, commit=True)
    assert store.read(other.conn, "/t/b") == b"2"
    assert store.directory(other.conn, "/t") == ["a", "b"]
    assert other.take() == [("/t/a", "w"), ("/t/b", "w")]


def test_transaction_abort_changes_nothing_and_fires_nothing(store: XenStore) -> None:
    c = Client(store, 0)
    store.write(c.conn, "/t/keep", b"old")
    store.watch(c.conn, "/t", "w")
    c.take()
    tx = store.transaction_start(c.conn)
    store.write(c.conn, "/t/keep", b"new", tx)
    store.rm(c.conn, "/t/keep", tx)
    store.write(c.conn, "/t/added", b"x", tx)
    store.transaction_end(c.conn, tx, commit=False)
    assert store.read(c.conn, "/t/keep") == b"old"
    assert store.directory(c.conn, "/t") == ["keep"]
    assert c.take() == []
    assert errname(store.transaction_end, c.conn, tx, True) == "ENOENT"


def test_conflicting_commit_is_eagain_and_leaves_the_store_alone(store: XenStore) -> None:
    a = Client(store, 0)
    b = Client(store, 0)
    store.write(a.conn, "/c/x", b"0")
    tx = store.transaction_start(a.conn)
    assert store.read(a.conn, "/c/x", tx) == b"0"
    store.write(a.conn, "/c/y", b"from tx", tx)
    store.write(b.conn, "/c/x", b"1")  # someone changes what the transaction read
    assert errname(store.transaction_end, a.conn, tx, True) == "EAGAIN"
    assert store.read(a.conn, "/c/x") == b"1"
    assert errname(store.read, a.conn, "/c/y") == "ENOENT"


def test_unrelated_changes_do_not_conflict(store: XenStore) -> None:
    a = Client(store, 0)
    b = Client(store, 0)
    store.write(a.conn, "/u/x", b"0")
    store.write(a.conn, "/v", b"0")
    tx = store.transaction_start(a.conn)
    store.write(a.conn, "/u/x", b"tx", tx)
    store.write(b.conn, "/v", b"outside")
    store.transaction_end(a.conn, tx, commit=True)
    assert store.read(b.conn, "/u/x") == b"tx"
    assert store.read(b.conn, "/v") == b"outside"


def test_transactions_belong_to_their_connection(store: XenStore) -> None:
    a = Client(store, 0)
    b = Client(store, 0)
    tx = store.transaction_start(a.conn)
    assert errname(store.write, b.conn, "/x", b"1", tx) == "ENOENT"
    assert errname(store.read, a.conn, "/x", tx + 1000) == "ENOENT"


def test_quotas_for_domains() -> None:
    store = XenStore(Quota(max_entries=3, max_value_size=8, max_watches=2, max_transactions=1))
    d0 = Client(store, 0).conn
    store.mkdir(d0, "/q")
    store.set_perms(d0, "/q", parse_perms(["w0"]))
    d9 = Client(store, 9).conn
    store.write(d9, "/q/a", b"12345678")
    assert errname(store.write, d9, "/q/b", b"123456789") == "ENOSPC"
    store.write(d9, "/q/b/c", b"")
    assert errname(store.write, d9, "/q/d", b"") == "ENOSPC"  # a, b, c owned already
    store.watch(d9, "/q", "1")
    store.watch(d9, "/q", "2")
    assert errname(store.watch, d9, "/q", "3") == "E2BIG"
    store.transaction_start(d9)
    assert errname(store.transaction_start, d9) == "ENOSPC"
    for i in range(10):  # Dom0 is not limited
        store.write(d0, f"/q/dom0/{i}", b"x" * 100)


def test_disconnect_drops_watches(store: XenStore) -> None:
    c = Client(store, 0)
    store.watch(c.conn, "/", "all")
    c.take()
    store.disconnect(c.conn)
    store.write(Client(store, 0).conn, "/z", b"1")
    assert c.take() == []
