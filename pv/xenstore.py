"""The XenStore tree: nodes, permissions, watches and transactions (Xen docs/misc/xenstore.txt, io/xs_wire.h)."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pv.xs_wire import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    WatchEvent,
    XsError,
)

XS_PERM_NONE = 0
XS_PERM_READ = 1
XS_PERM_WRITE = 2
XS_PERM_BOTH = XS_PERM_READ | XS_PERM_WRITE
PERM_LETTERS = "nrwb"  # index = permission bits: n none, r read, w write, b both

DOMID_FIRST_RESERVED = 0x7FF0
SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")

_NODE_NAME_CHARS = re.compile(r"[A-Za-z0-9_@/-]*\Z")


def domain_path(domid: int) -> str:
    """What XS_GET_DOMAIN_PATH answers, and where a domain's relative paths start."""
    return f"/local/domain/{domid}"


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def basename_of(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _is_below(path: str, top: str) -> bool:
    """path is top or a descendant of it."""
    return path == top or top == "/" or path.startswith(top + "/")


@dataclass(frozen=True)
class NodePerm:
    """One entry of a node's permission list, written "r5" on the wire."""

    domid: int
    perm: int

    def __str__(self) -> str:
        return f"{PERM_LETTERS[self.perm]}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> NodePerm:
        if len(text) < 2 or text[0] not in PERM_LETTERS or not text[1:].isdigit():
            raise XsError("EINVAL", f"bad permission {text!r}")
        domid = int(text[1:])
        if domid > 0xFFFF:
            raise XsError("EINVAL", f"bad domid in permission {text!r}")
        return cls(domid, PERM_LETTERS.index(text[0]))


def parse_perms(texts: Iterable[str]) -> tuple[NodePerm, ...]:
    perms = tuple(NodePerm.parse(t) for t in texts)
    if not perms:
        raise XsError("EINVAL", "a permission list needs at least the owner entry")
    return perms


@dataclass
class Node:
    """A node: value, permissions (entry 0 = owner + everyone's default), ordered children."""

    value: bytes
    perms: tuple[NodePerm, ...]
    children: list[str] = field(default_factory=list)
    generation: int = 0  # the store's change counter when this node last changed

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def copy(self) -> Node:
        return Node(self.value, self.perms, list(self.children), self.generation)


@dataclass
class Quota:
    """Per-domain limits, C xenstored's defaults. Domain 0 is not limited."""

    max_entries: int = 1000  # nodes a domain may own
    max_value_size: int = 2048
    max_watches: int = 128
    max_transactions: int = 10


@dataclass
class Watch:
    path: str  # absolute path, or a special "@..." name
    token: str
    relative_prefix: str = ""  # set when registered relative: stripped from reported paths

    def reported(self, path: str) -> str:
        if self.relative_prefix and path.startswith(self.relative_prefix):
            return path[len(self.relative_prefix):]
        return path


class _Tree:
    """Flat map path -> Node. Nodes are never changed in place, so a clone shares them."""

    def __init__(self, nodes: dict[str, Node], owned: Counter[int]) -> None:
        self.nodes = nodes
        self.owned = owned  # nodes per owner domid, for the entry quota

    def clone(self) -> _Tree:
        return _Tree(dict(self.nodes), Counter(self.owned))

    def put(self, path: str, node: Node | None) -> None:
        old = self.nodes.pop(path, None)
        if old is not None:
            self.owned[old.owner] -= 1
        if node is not None:
            self.nodes[path] = node
            self.owned[node.owner] += 1


@dataclass
class _PendingEvent:
    path: str
    perms: tuple[NodePerm, ...]
    removal: bool  # the subtree at path was removed: watches below it fire too


@dataclass
class Transaction:
    tx_id: int
    tree: _Tree
    accessed: dict[str, int | None] = field(default_factory=dict)  # path -> generation seen
    changed: set[str] = field(default_factory=set)
    events: list[_PendingEvent] = field(default_factory=list)


@dataclass
class Connection:
    """One client of the store (a domain's ring, or a Dom0 process). `deliver` must not block."""

    domid: int
    deliver: Callable[[WatchEvent], None]
    target: int | None = None  # XS_SET_TARGET: also acts with this domain's rights
    watches: list[Watch] = field(default_factory=list)
    transactions: dict[int, Transaction] = field(default_factory=dict)

    @property
    def privileged(self) -> bool:
        return self.domid == 0


class _View:
    """The tree an operation works on: the store itself, or a transaction's copy of it."""

    def __init__(self, store: XenStore, txn: Transaction | None) -> None:
        self.store = store
        self.txn = txn
        self.tree = txn.tree if txn is not None else store._tree

    def get(self, path: str) -> Node | None:
        node = self.tree.nodes.get(path)
        if self.txn is not None and path not in self.txn.accessed:
            self.txn.accessed[path] = node.generation if node is not None else None
        return node

    def put(self, path: str, node: Node | None) -> None:
        self.get(path)  # a transaction remembers what it overwrote, for the commit check
        if self.txn is not None:
            self.txn.changed.add(path)
        elif node is not None:
            node.generation = self.store._next_generation()
        self.tree.put(path, node)

    def event(self, path: str, perms: tuple[NodePerm, ...], removal: bool = False) -> None:
        if self.txn is not None:
            self.txn.events.append(_PendingEvent(path, perms, removal))  # fired at commit
        else:
            self.store._fire(path, perms, removal)


class XenStore:
    """The tree and everything attached to it. Thread-safe: every call takes `lock`."""

    def __init__(self, quota: Quota | None = None) -> None:
        self.quota = quota or Quota()
        self.lock = threading.RLock()
        self._generation = 0
        self._next_tx_id = 1
        self._connections: list[Connection] = []
        self._targets: dict[int, int] = {}
        root_perms = (NodePerm(0, XS_PERM_NONE),)
        self._tree = _Tree({}, Counter())
        # What a freshly started toolstack finds: the root, and /local/domain for the domains.
        self._tree.put("/", Node(b"", root_perms, ["local"]))
        self._tree.put("/local", Node(b"", root_perms, ["domain"]))
        self._tree.put("/local/domain", Node(b"", root_perms))

    # -- connections -------------------------------------------------------------------

    def connect(self, domid: int, deliver: Callable[[WatchEvent], None]) -> Connection:
        with self.lock:
            conn = Connection(domid, deliver, target=self._targets.get(domid))
            self._connections.append(conn)
            return conn

    def disconnect(self, conn: Connection) -> None:
        """Forget the connection with its watches and open transactions."""
        with self.lock:
            self.reset_watches(conn)
            if conn in self._connections:
                self._connections.remove(conn)

    def reset_watches(self, conn: Connection) -> None:
        """XS_RESET_WATCHES: drop every watch and transaction of this connection."""
        with self.lock:
            conn.watches.clear()
            conn.transactions.clear()

    def set_target(self, domid: int, target: int) -> None:
        """XS_SET_TARGET: `domid` (e.g. a device-model stub domain) gets `target`'s rights."""
        with self.lock:
            self._targets[domid] = target
            for conn in self._connections:
                if conn.domid == domid:
                    conn.target = target

    # -- helpers -----------------------------------------------------------------------

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def _view(self, conn: Connection, tx_id: int) -> _View:
        if tx_id == 0:
            return _View(self, None)
        txn = conn.transactions.get(tx_id)
        if txn is None:
            raise XsError("ENOENT", f"no transaction {tx_id}")
        return _View(self, txn)

    def resolve(self, conn: Connection, path: str) -> str:
        """Absolute, validated path; relative ones start at /local/domain/<domid>."""
        if not path:
            raise XsError("EINVAL", "empty path")
        if not path.startswith("/"):
            if len(path) > XENSTORE_REL_PATH_MAX:
                raise XsError("EINVAL", "relative path too long")
            path = f"{domain_path(conn.domid)}/{path}"
        if len(path) > XENSTORE_ABS_PATH_MAX:
            raise XsError("EINVAL", "path too long")
        if not _NODE_NAME_CHARS.match(path) or "//" in path or (
                path != "/" and path.endswith("/")):
            raise XsError("EINVAL", f"invalid path {path!r}")
        return path

    def _perm_for(self, conn: Connection, perms: tuple[NodePerm, ...]) -> int:
        if conn.privileged:
            return XS_PERM_BOTH
        ids = (conn.domid,) if conn.target is None else (conn.domid, conn.target)
        if perms[0].domid in ids:
            return XS_PERM_BOTH  # the owner may do everything
        for entry in perms[1:]:
            if entry.domid in ids:
                return entry.perm
        return perms[0].perm

    def _need(self, conn: Connection, node: Node, perm: int, path: str) -> None:
        if self._perm_for(conn, node.perms) & perm != perm:
            raise XsError("EACCES", path)

    def _readable(self, view: _View, conn: Connection, path: str) -> Node:
        node = view.get(path)
        if node is None:
            raise XsError("ENOENT", path)
        self._need(conn, node, XS_PERM_READ, path)
        return node

    def _create(self, view: _View, conn: Connection, path: str, value: bytes) -> Node:
        """Create path and any missing ancestors; needs write access to the nearest that exists."""
        missing = []
        cur = path
        while view.get(cur) is None:
            missing.append(cur)
            cur = parent_of(cur)
        ancestor = view.get(cur)
        assert ancestor is not None  # "/" always exists
        self._need(conn, ancestor, XS_PERM_WRITE, path)
        if not conn.privileged and (
                view.tree.owned[conn.domid] + len(missing) > self.quota.max_entries):
            raise XsError("ENOSPC", f"domain {conn.domid} node quota")
        node = ancestor
        for p in reversed(missing):
            parent = view.get(parent_of(p))
            assert parent is not None
            perms = parent.perms
            if not conn.privileged:
                # A domain owns what it creates; its own entry in the list becomes redundant.
                rest = tuple(e for e in perms[1:] if e.domid != conn.domid)
                perms = (NodePerm(conn.domid, perms[0].perm), *rest)
            node = Node(value if p == path else b"", perms)
            view.put(p, node)
            updated = parent.copy()
            updated.children.append(basename_of(p))
            view.put(parent_of(p), updated)
        return node

    # -- operations (each as its XS_* request) ----------------------------------------

    def read(self, conn: Connection, path: str, tx_id: int = 0) -> bytes:
        with self.lock:
            view = self._view(conn, tx_id)
            return self._readable(view, conn, self.resolve(conn, path)).value

    def directory(self, conn: Connection, path: str, tx_id: int = 0) -> list[str]:
        with self.lock:
            view = self._view(conn, tx_id)
            return list(self._readable(view, conn, self.resolve(conn, path)).children)

    def directory_generation(self, conn: Connection, path: str,
                             tx_id: int = 0) -> tuple[int, list[str]]:
        """For XS_DIRECTORY_PART: the node's generation (changes when children change)."""
        with self.lock:
            view = self._view(conn, tx_id)
            node = self._readable(view, conn, self.resolve(conn, path))
            return node.generation, list(node.children)

    def get_perms(self, conn: Connection, path: str, tx_id: int = 0) -> tuple[NodePerm, ...]:
        with self.lock:
            view = self._view(conn, tx_id)
            return self._readable(view, conn, self.resolve(conn, path)).perms

    def write(self, conn: Connection, path: str, value: bytes, tx_id: int = 0) -> None:
        with self.lock:
            view = self._view(conn, tx_id)
            p = self.resolve(conn, path)
            if not conn.privileged and len(value) > self.quota.max_value_size:
                raise XsError("ENOSPC", f"value of {len(value)} bytes over quota")
            if len(value) > XENSTORE_PAYLOAD_MAX:
                raise XsError("E2BIG", "value longer than XENSTORE_PAYLOAD_MAX")
            node = view.get(p)
            if node is None:
                node = self._create(view, conn, p, value)
            else:
                self._need(conn, node, XS_PERM_WRITE, p)
                node = node.copy()
                node.value = value
                view.put(p, node)
            view.event(p, node.perms)

    def mkdir(self, conn: Connection, path: str, tx_id: int = 0) -> None:
        with self.lock:
            view = self._view(conn, tx_id)
            p = self.resolve(conn, path)
            node = view.get(p)
            if node is not None:
                self._need(conn, node, XS_PERM_WRITE, p)  # exists and writable: nothing to do
                return
            node = self._create(view, conn, p, b"")
            view.event(p, node.perms)

    def rm(self, conn: Connection, path: str, tx_id: int = 0) -> None:
        with self.lock:
            view = self._view(conn, tx_id)
            p = self.resolve(conn, path)
            if p == "/":
                raise XsError("EINVAL", "the root cannot be removed")
            node = view.get(p)
            if node is None:
                if view.get(parent_of(p)) is None:
                    raise XsError("ENOENT", p)
                return  # already gone and its parent exists: xenstored says OK
            self._need(conn, node, XS_PERM_WRITE, p)
            stack = [f"{p}/{c}" for c in node.children]
            while stack:
                sub = stack.pop()
                sub_node = view.get(sub)
                if sub_node is not None:
                    stack.extend(f"{sub}/{c}" for c in sub_node.children)
                    view.put(sub, None)
            view.put(p, None)
            parent = view.get(parent_of(p))
            assert parent is not None
            updated = parent.copy()
            updated.children.remove(basename_of(p))
            view.put(parent_of(p), updated)
            view.event(p, node.perms, removal=True)

    def set_perms(self, conn: Connection, path: str, perms: Sequence[NodePerm],
                  tx_id: int = 0) -> None:
        with self.lock:
            view = self._view(conn, tx_id)
            p = self.resolve(conn, path)
            new_perms = tuple(perms)
            if not new_perms:
                raise XsError("EINVAL", "empty permission list")
            node = view.get(p)
            if node is None:
                raise XsError("ENOENT", p)
            if not conn.privileged:
                if node.owner not in (conn.domid, conn.target):
                    raise XsError("EACCES", f"{p}: only the owner may set permissions")
                if new_perms[0].domid != node.owner:
                    raise XsError("EPERM", f"{p}: a domain cannot give its node away")
            updated = node.copy()
            updated.perms = new_perms
            view.put(p, updated)
            view.event(p, new_perms)

    # -- watches -----------------------------------------------------------------------

    def watch(self, conn: Connection, path: str, token: str,
              initial_event: bool = True) -> Watch:
        """Register a watch. xenstored fires it once straight away; the daemon, which must
        send the OK reply first, passes initial_event=False and calls fire_initial()."""
        with self.lock:
            if path.startswith("@"):
                if path not in SPECIAL_WATCHES:
                    raise XsError("EINVAL", f"unknown special watch {path!r}")
                w = Watch(path, token)
            else:
                absolute = self.resolve(conn, path)
                prefix = "" if path.startswith("/") else domain_path(conn.domid) + "/"
                w = Watch(absolute, token, prefix)
            if any(x.path == w.path and x.token == token for x in conn.watches):
                raise XsError("EEXIST", f"watch {path!r} {token!r}")
            if not conn.privileged and len(conn.watches) >= self.quota.max_watches:
                raise XsError("E2BIG", f"domain {conn.domid} watch quota")
            conn.watches.append(w)
            if initial_event:
                self.fire_initial(conn, w)
            return w

    def fire_initial(self, conn: Connection, w: Watch) -> None:
        with self.lock:
            if w in conn.watches:
                conn.deliver(WatchEvent(w.reported(w.path), w.token))

    def unwatch(self, conn: Connection, path: str, token: str) -> None:
        with self.lock:
            absolute = path if path.startswith("@") else self.resolve(conn, path)
            for w in conn.watches:
                if w.path == absolute and w.token == token:
                    conn.watches.remove(w)
                    return
            raise XsError("ENOENT", f"no watch {path!r} {token!r}")

    def fire_special(self, name: str) -> None:
        """@introduceDomain / @releaseDomain, fired by the daemon when domains come and go."""
        with self.lock:
            for conn in list(self._connections):
                for w in conn.watches:
                    if w.path == name:
                        conn.deliver(WatchEvent(name, w.token))

    def _fire(self, path: str, perms: tuple[NodePerm, ...], removal: bool) -> None:
        """An event on `path` matches watches at or above it; the removal of a subtree also
        matches watches inside it, reported with the watch's own path (xenstore.txt)."""
        for conn in list(self._connections):
            if not self._perm_for(conn, perms) & XS_PERM_READ:
                continue  # a domain hears only about nodes it may read
            for w in conn.watches:
                if w.path.startswith("@"):
                    continue
                if _is_below(path, w.path):
                    conn.deliver(WatchEvent(w.reported(path), w.token))
                elif removal and _is_below(w.path, path):
                    conn.deliver(WatchEvent(w.reported(w.path), w.token))

    # -- transactions ------------------------------------------------------------------

    def transaction_start(self, conn: Connection) -> int:
        with self.lock:
            if not conn.privileged and len(conn.transactions) >= self.quota.max_transactions:
                raise XsError("ENOSPC", f"domain {conn.domid} transaction quota")
            tx_id = self._next_tx_id
            self._next_tx_id = (tx_id % 0xFFFFFFFF) + 1  # u32, never 0 (0 = no transaction)
            conn.transactions[tx_id] = Transaction(tx_id, self._tree.clone())
            return tx_id

    def transaction_end(self, conn: Connection, tx_id: int, commit: bool) -> None:
        """Commit or abort. EAGAIN when a node the transaction looked at changed meanwhile."""
        with self.lock:
            txn = conn.transactions.pop(tx_id, None)
            if txn is None:
                raise XsError("ENOENT", f"no transaction {tx_id}")
            if not commit:
                return
            for path, seen in txn.accessed.items():
                now = self._tree.nodes.get(path)
                if (now.generation if now is not None else None) != seen:
                    raise XsError("EAGAIN", f"{path} changed during transaction {tx_id}")
            for path in txn.changed:
                node = txn.tree.nodes.get(path)
                if node is not None:
                    node = node.copy()
                    node.generation = self._next_generation()
                self._tree.put(path, node)
            for ev in txn.events:
                self._fire(ev.path, ev.perms, ev.removal)

    # -- inspection --------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        with self.lock:
            return path in self._tree.nodes

    def node_count(self, owner: int | None = None) -> int:
        with self.lock:
            if owner is None:
                return len(self._tree.nodes)
            return self._tree.owned[owner]
