"""State-directory deltas, primary side: what the unit changed on disk in an epoch.

The unit declares state directories ("roots"). DiskTracker watches every
directory of each tree with inotify while the unit runs, and capture() —
called while the unit is frozen, from CRIU's post-dump notification —
drains the queued events and looks only at what they name, so the frozen
cost follows the change, not the size of the tree. Changed files are
compared with the per-block hashes kept from the previous capture and only
changed blocks are copied (into a spool: the unit writes again as soon as
it is thawed, long before the sender thread gets to the data).

A delta is a sequence of chunks ``(kind, name, meta, data)`` (the same
shape as memory deltas, remus.checkpoint.delta), per root:

All records have kind KIND_DISK (the store hands one kind's records to its
handler in one call, in arrival order, and the backup needs that order);
``name`` says which record it is. Per root, in this order:

- "tree", once per root and first: ``meta`` is JSON
  ``{"v": 1, "root", "full", "moves": [[old, new]], "deletes": [old],
  "creates": [[path, kind, symlink target or null]], "sizes": [[path, size]],
  "attrs": [[path, mode, uid, gid, mtime_ns]]}``. Paths are relative to the
  root (``os.fsdecode`` form; "" is the root itself in ``attrs``). ``full``
  means "make the root exactly this": the backup wipes it first. Moves are
  net renames of entries that survive from the previous capture (the
  backup holds them at ``old``); kinds are d(irectory), f(ile), l(ink),
  p(fifo).
- "data": ``meta`` is JSON ``{"root", "path", "off", "span",
  "ext": [[rel, len]]}``; the byte range ``[off, off+span)`` of the file
  becomes exactly: the extents' bytes (``data`` is them, concatenated) and
  holes everywhere else. That keeps sparse files sparse.

The backup applies these with remus.checkpoint.disk_apply.DiskApplier.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import stat
import struct
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from remus.checkpoint.delta import KIND_DISK_FIRST, Chunk
from remus.errors import CheckpointError, ProtocolError

log = logging.getLogger(__name__)

KIND_DISK = KIND_DISK_FIRST
TREE, DATA = "tree", "data"
#: granularity of change detection (and of what is re-sent)
BLOCK_SIZE = 64 * 1024
#: at most this much file data per "data" chunk
MAX_RECORD = 1024 * 1024
#: reserved name at the top of every root: the backup's rename staging area
STASH = ".remus-stash"
FORMAT_VERSION = 1

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
              | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
              | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len
_STRUCTURE = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_CONTENT = IN_MODIFY | IN_CLOSE_WRITE

_libc = ctypes.CDLL(None, use_errno=True)
_KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFIFO: "p"}

Attrs = tuple[int, int, int, int]  # mode, uid, gid, mtime_ns
Extents = list[tuple[int, int]]  # (offset relative to the block/span, length)


def kind_of(mode: int) -> str | None:
    """d/f/l/p for what state dirs may hold; None for sockets and devices (not tracked)."""
    return _KINDS.get(stat.S_IFMT(mode))


def attrs_of(st: os.stat_result) -> Attrs:
    return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)


def check_relpath(p: str, allow_root: bool = False) -> str:
    """``p`` if it is a clean path inside a root (not the stash); ProtocolError otherwise."""
    if p == "" and allow_root:
        return p
    parts = p.split("/")
    if (not p or "\0" in p or p.startswith("/") or parts[0] == STASH
            or any(c in ("", ".", "..") for c in parts)):
        raise ProtocolError(f"bad path in disk delta: {p!r}")
    return p


def data_extents(fd: int, size: int) -> Extents:
    """The data (non-hole) ranges of a file, from SEEK_DATA/SEEK_HOLE."""
    out: Extents = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to EOF
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            out.append((start, end - start))
        pos = end
    return out


def block_hash(data: bytes | memoryview, ext: Extents, span: int) -> int:
    """Hash of a block's content including where its holes are (0 = all hole)."""
    if not ext:
        return 0
    if len(ext) == 1 and ext[0] == (0, span):
        return xxhash.xxh3_64_intdigest(data) | 1
    h = xxhash.xxh3_64()
    h.update(json.dumps(ext).encode())
    h.update(data)
    return h.intdigest() | 1


# ---- inotify, through libc (no dependency) ---------------------------------------------


class Inotify:
    """A non-blocking inotify instance; events() drains what is queued."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise CheckpointError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self.fd: int = fd

    def add(self, path: Path) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            hint = " (raise fs.inotify.max_user_watches)" if err == errno.ENOSPC else ""
            raise CheckpointError(f"inotify_add_watch {path}: {os.strerror(err)}{hint}")
        return int(wd)

    def remove(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)  # EINVAL if the kernel already dropped it

    def events(self) -> Iterator[tuple[int, int, int, str]]:
        """(wd, mask, cookie, name) of every queued event, in order."""
        while True:
            try:
                buf = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return
            pos = 0
            while pos < len(buf):
                wd, mask, cookie, n = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size: pos + _EVENT.size + n].rstrip(b"\0")
                pos += _EVENT.size + n
                yield wd, mask, cookie, os.fsdecode(raw)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- the captured delta -------------------------------------------------------------------


@dataclass
class DataRef:
    """A changed range of a file; its bytes wait in the delta's spool."""

    path: str
    off: int
    span: int
    ext: Extents
    pos: int  # in the spool
    length: int


@dataclass
class RootDelta:
    root: Path
    tree: dict[str, Any]
    data: list[DataRef] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)  # paths kept as they were (rescans)


class DiskDelta:
    """One epoch's disk changes, captured; chunks() may run in another thread, once."""

    def __init__(self, full: bool, spool_dir: Path | None, spool_limit: int) -> None:
        self.full = full
        self.roots: list[RootDelta] = []
        self._spool = tempfile.SpooledTemporaryFile(
            max_size=spool_limit, dir=str(spool_dir) if spool_dir else None)  # noqa: SIM115
        self._size = 0

    @property
    def data_bytes(self) -> int:
        return self._size

    def put(self, data: bytes | memoryview) -> int:
        pos = self._size
        self._spool.write(data)
        self._size += len(data)
        return pos

    def chunks(self) -> Iterator[Chunk]:
        """TREE then DATA chunks of every root; closes the delta at the end."""
        try:
            for rd in self.roots:
                tree = json.dumps(rd.tree).encode()
                yield (KIND_DISK, TREE, tree, b"")
                for refs in _records(rd.data):
                    yield self._data_chunk(rd.root, refs)
        finally:
            self.close()

    def _data_chunk(self, root: Path, refs: list[DataRef]) -> Chunk:
        first = refs[0]
        ext: Extents = []
        parts = []
        for r in refs:
            ext += [(r.off - first.off + o, n) for o, n in r.ext]
            self._spool.seek(r.pos)
            parts.append(self._spool.read(r.length))
        meta = {"root": str(root), "path": first.path, "off": first.off,
                "span": refs[-1].off + refs[-1].span - first.off, "ext": ext}
        return (KIND_DISK, DATA, json.dumps(meta).encode(), b"".join(parts))

    def close(self) -> None:
        self._spool.close()


def _records(refs: list[DataRef]) -> Iterator[list[DataRef]]:
    """Adjacent ranges of one file, merged up to MAX_RECORD bytes per chunk."""
    run: list[DataRef] = []
    size = 0
    for r in refs:
        if run and (r.path != run[-1].path or r.off != run[-1].off + run[-1].span
                    or size + r.length > MAX_RECORD):
            yield run
            run, size = [], 0
        run.append(r)
        size += r.length
    if run:
        yield run


@dataclass
class DiskStats:
    full: bool = False
    files_changed: int = 0  # files whose content was (re)read this capture
    entries_changed: int = 0  # creates + moves + deletes + attribute changes
    bytes: int = 0  # file data captured (what will be sent)
    bytes_hashed: int = 0  # file data read to find changed blocks
    events: int = 0
    rescans: int = 0  # full rescans so far (first capture, reset(), queue overflow)
    capture_ms: float = 0.0


# ---- the primary's view of a tree ---------------------------------------------------------


class Node:
    """One entry of a tracked tree as of the last capture (the backup holds it at ``old``)."""

    __slots__ = ("ino", "kind", "attrs", "size", "target", "hashes", "parent", "name",
                 "children", "old", "wd")

    def __init__(self, st: os.stat_result, kind: str, parent: Node | None, name: str) -> None:
        self.ino = st.st_ino
        self.kind = kind
        self.attrs = attrs_of(st)
        self.size = st.st_size if kind == "f" else 0
        self.target: str | None = None
        self.hashes = array("Q")
        self.parent = parent
        self.name = name
        self.children: dict[str, Node] = {}
        self.old: str | None = None  # None: created in the epoch being captured
        self.wd = -1

    def path(self) -> str:
        parts = []
        n: Node | None = self
        while n is not None and n.parent is not None:
            parts.append(n.name)
            n = n.parent
        return "/".join(reversed(parts))

    def walk(self) -> Iterator[Node]:
        yield self
        for c in list(self.children.values()):
            yield from c.walk()


# ---- the tracker ----------------------------------------------------------------------------


class _Rescan(Exception):
    """The tree no longer matches what the events said: rescan this root."""


@dataclass
class _Events:
    """What one drain of the inotify queue said, per root index."""

    dirty: dict[int, set[Node]] = field(default_factory=dict)  # dirs whose entries changed
    content: dict[int, set[Node]] = field(default_factory=dict)
    meta: dict[int, set[Node]] = field(default_factory=dict)
    moved: list[Node] = field(default_factory=list)
    detached: list[Node] = field(default_factory=list)
    pending: dict[int, tuple[int, Node]] = field(default_factory=dict)  # MOVED_FROM by cookie
    rescan: set[int] = field(default_factory=set)

    def add(self, which: dict[int, set[Node]], i: int, node: Node) -> None:
        which.setdefault(i, set()).add(node)


def _detach(node: Node, ev: _Events) -> None:
    if node.parent is not None:
        node.parent.children.pop(node.name, None)
    node.parent = None
    ev.detached.append(node)


def _attached(node: Node, top: Node) -> bool:
    n = node
    while n.parent is not None:
        n = n.parent
    return n is top


def _new_tree(root: Path, full: bool) -> dict[str, Any]:
    return {"v": FORMAT_VERSION, "root": str(root), "full": full, "moves": [], "deletes": [],
            "creates": [], "sizes": [], "attrs": []}


def _topmost(paths: set[str]) -> list[str]:
    return sorted(p for p in paths if os.path.dirname(p) not in paths)


class DiskTracker:
    """Tracks changes under state directories between captures (primary side).

    Contract:
    - start() before the first capture; it only opens inotify, so it is
      cheap and may run while the unit runs. The first capture is a full
      one (and so is the first after reset() or a queue overflow, which
      rescans without wiping).
    - capture(full) must run while the unit is frozen and nothing else
      writes to the roots: it reads the tree as the checkpoint's view. Its
      cost follows the events and the files they name. It returns a
      DiskDelta holding copies of the changed data; the tree then becomes
      the base of the next capture. If that delta does not reach the
      backup, call reset() so the next capture is full.
    - chunks(delta) may run later in another thread; once per delta.
    - Files the unit writes through shared writable mmap produce no
      inotify event; ``pids`` (the unit's processes) lets capture() find
      them in /proc/PID/maps and re-read them every epoch.
    - Hard links inside a root are replicated as separate files.
    - reset() may be called from any thread; the rest is one thread's.
    """

    def __init__(self, dirs: Iterable[Path], pids: Callable[[], Iterable[int]] | None = None,
                 spool_dir: Path | None = None, spool_limit: int = 64 << 20,
                 block_size: int = BLOCK_SIZE) -> None:
        self.roots = [Path(os.path.abspath(d)) for d in dirs]
        self.pids = pids
        self.spool_dir = spool_dir
        self.spool_limit = spool_limit
        self.block_size = block_size
        self.stats = DiskStats()
        self._tops: list[Node | None] = [None] * len(self.roots)
        self._ino: Inotify | None = None
        self._wds: dict[int, tuple[int, Node]] = {}
        self._lock = threading.Lock()
        self._need_full = True
        self._rescans = 0

    def start(self) -> None:
        for r in self.roots:
            if not r.is_dir():
                raise CheckpointError(f"state directory {r} does not exist")
        if self._ino is None:
            self._ino = Inotify()
        self.reset()

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()
            self._ino = None
        self._wds.clear()
        self._tops = [None] * len(self.roots)

    def reset(self) -> None:
        """Make the next capture full (a new generation)."""
        with self._lock:
            self._need_full = True

    def chunks(self, delta: DiskDelta) -> Iterator[Chunk]:
        return delta.chunks()

    def capture(self, full: bool = False) -> DiskDelta:
        """Snapshot what changed since the last capture (the unit must be frozen)."""
        if self._ino is None:
            raise CheckpointError("DiskTracker.start() was not called")
        t0 = time.perf_counter()
        with self._lock:
            full, self._need_full = full or self._need_full, False
        delta = DiskDelta(full, self.spool_dir, self.spool_limit)
        self.stats = stats = DiskStats(full=full)
        try:
            ev = self._drain(stats)
            for i, top in enumerate(self._tops):
                if full or top is None:
                    self._rescan(i, delta, None)
                elif i in ev.rescan:
                    self._rescan(i, delta, self._old_index(top, ev))
                else:
                    self._incremental(i, top, ev, delta)
        except BaseException:
            delta.close()
            self.reset()
            raise
        stats.bytes = delta.data_bytes
        stats.rescans = self._rescans
        stats.capture_ms = (time.perf_counter() - t0) * 1e3
        log.debug("disk capture: %d files, %d entries, %d bytes, %.2f ms", stats.files_changed,
                  stats.entries_changed, stats.bytes, stats.capture_ms)
        return delta

    # ---- events ---------------------------------------------------------------------------

    def _drain(self, stats: DiskStats) -> _Events:
        assert self._ino is not None
        ev = _Events()
        for wd, mask, cookie, name in self._ino.events():
            stats.events += 1
            if mask & IN_Q_OVERFLOW:
                log.warning("inotify queue overflowed: rescanning the state directories")
                ev.rescan.update(range(len(self.roots)))
                continue
            got = self._wds.get(wd)
            if got is None:
                continue
            i, d = got
            if mask & IN_IGNORED:
                del self._wds[wd]
            elif i not in ev.rescan:
                self._on_event(ev, i, d, mask, cookie, name)
        for _, n in ev.pending.values():  # moved out of the roots
            ev.detached.append(n)
        return ev

    def _on_event(self, ev: _Events, i: int, d: Node, mask: int, cookie: int, name: str) -> None:
        if not name:  # about the watched directory itself
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and d is self._tops[i]:
                ev.rescan.add(i)
            elif mask & IN_ATTRIB:
                ev.add(ev.meta, i, d)
            return
        if mask & _STRUCTURE:
            ev.add(ev.dirty, i, d)
        child = d.children.get(name)
        if mask & IN_MOVED_FROM:
            if child is not None:
                d.children.pop(name)
                child.parent = None
                ev.pending[cookie] = (i, child)
        elif mask & IN_MOVED_TO:
            if child is not None:
                _detach(child, ev)  # replaced by the rename
            got = ev.pending.pop(cookie, None)
            if got is not None and got[0] == i:
                node = got[1]
                d.children[name] = node
                node.parent, node.name = d, name
                ev.moved.append(node)
            elif got is not None:  # across roots: a delete there, a create here
                ev.detached.append(got[1])
        elif mask & (IN_CREATE | IN_DELETE):
            if child is not None:
                _detach(child, ev)
        elif child is not None and mask & _CONTENT:
            ev.add(ev.content, i, child)
        elif child is not None and mask & IN_ATTRIB:
            ev.add(ev.meta, i, child)

    # ---- incremental capture ------------------------------------------------------------------

    def _incremental(self, i: int, top: Node, ev: _Events, delta: DiskDelta) -> None:
        rd = RootDelta(self.roots[i], _new_tree(self.roots[i], False))
        try:
            for d in ev.dirty.get(i, ()):
                if _attached(d, top):
                    self._reconcile(i, d, rd, ev, delta)
        except _Rescan as e:
            log.warning("%s: %s; rescanning", self.roots[i], e)
            self._rescan(i, delta, self._old_index(top, ev))
            return
        self._add_mapped(i, top, ev)
        content = {n for n in ev.content.get(i, ()) if n.kind == "f" and _attached(n, top)}
        for n in list(content):
            content |= self._other_links(i, top, n)
        # The backup's apply changes the mtime of every file it writes and every
        # directory it touches, so those get their attributes even if unchanged
        # (mmap writes, coarse timestamps).
        forced = {n for n in content if self._reread(i, n, rd, delta)} | ev.dirty.get(i, set())
        for n in ev.meta.get(i, set()) | forced:
            if n.old is not None and _attached(n, top):
                self._check_attrs(i, n, rd.tree, n in forced)
        moved = [n for n in dict.fromkeys(ev.moved) if n.old is not None and _attached(n, top)]
        rd.tree["moves"] = [[n.old, n.path()] for n in moved if n.old != n.path()]
        rd.tree["deletes"] = _topmost(self._deleted(i, top, ev))
        for n in moved:
            for m in n.walk():
                m.old = m.path()
        self._finish(i, top, rd, delta)

    def _reconcile(self, i: int, d: Node, rd: RootDelta, ev: _Events, delta: DiskDelta) -> None:
        """Make d's children equal the directory's entries (new ones are scanned)."""
        full = self.roots[i] / d.path()
        try:
            st = os.lstat(full)
        except FileNotFoundError as e:
            raise _Rescan(f"{full} vanished") from e
        if st.st_ino != d.ino or not stat.S_ISDIR(st.st_mode):
            raise _Rescan(f"{full} is not the directory the events named")
        listing = self._list(full, d.parent is None)
        for name, child in list(d.children.items()):
            got = listing.get(name)
            if got is None or got.st_ino != child.ino or kind_of(got.st_mode) != child.kind:
                _detach(child, ev)
        for name, st in listing.items():
            if name not in d.children:
                k = kind_of(st.st_mode)
                assert k is not None
                child = Node(st, k, d, name)
                d.children[name] = child
                self._add_entry(i, child, rd, None, delta)

    def _reread(self, i: int, n: Node, rd: RootDelta, delta: DiskDelta) -> bool:
        """Compare n's blocks with the last capture; True if anything is sent."""
        path = n.path()
        st = os.lstat(self.roots[i] / path)
        if st.st_ino != n.ino:
            raise CheckpointError(f"{self.roots[i] / path} changed identity without an event")
        old_size = n.size
        n.size = st.st_size
        sent = self._read_file(self.roots[i], n, path, n.hashes, rd, delta)
        if n.size != old_size:
            rd.tree["sizes"].append([path, n.size])
        return sent or n.size != old_size

    def _check_attrs(self, i: int, n: Node, tree: dict[str, Any], force: bool) -> None:
        path = n.path()
        a = attrs_of(os.lstat(self.roots[i] / path))
        if a != n.attrs or force:
            n.attrs = a
            if path:  # the root's attributes are always sent (see _finish)
                tree["attrs"].append([path, *a])

    def _deleted(self, i: int, top: Node, ev: _Events) -> set[str]:
        gone: set[str] = set()
        for n in ev.detached:
            if _attached(n, top):
                continue
            for m in n.walk():
                if m.old is not None and not _attached(m, top):
                    gone.add(m.old)
                    m.old = None
                self._unwatch(m)
        return gone

    def _add_mapped(self, i: int, top: Node, ev: _Events) -> None:
        """Files of this root mapped shared and writable by the unit: always re-read."""
        if self.pids is None:
            return
        prefix = f"{self.roots[i]}/"
        for pid in self.pids():
            try:
                lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                f = line.split(maxsplit=5)
                if len(f) == 6 and f[1][1] == "w" and f[1][3] == "s" and f[5].startswith(prefix):
                    node = self._lookup(top, f[5][len(prefix):])
                    if node is not None:
                        ev.add(ev.content, i, node)

    # ---- scanning --------------------------------------------------------------------------------

    def _rescan(self, i: int, delta: DiskDelta, old: dict[str, Node] | None) -> None:
        """Scan root i afresh; against ``old`` (by path) or, if None, as a full copy."""
        root = self.roots[i]
        self._rescans += 1
        for wd, (ri, _) in list(self._wds.items()):
            if ri == i:
                self._wds.pop(wd)
                assert self._ino is not None
                self._ino.remove(wd)
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"state directory {root} is gone")
        top = Node(st, "d", None, "")
        top.old = ""
        rd = RootDelta(root, _new_tree(root, old is None))
        self._watch(i, top)
        self._scan_children(i, top, rd, old, delta)
        if old is not None:
            rd.tree["deletes"] = _topmost({p for p in old if p and p not in rd.claimed})
        self._finish(i, top, rd, delta)

    def _scan_children(self, i: int, d: Node, rd: RootDelta, old: dict[str, Node] | None,
                       delta: DiskDelta) -> None:
        for name, st in self._list(self.roots[i] / d.path(), d.parent is None).items():
            k = kind_of(st.st_mode)
            assert k is not None
            child = Node(st, k, d, name)
            d.children[name] = child
            self._add_entry(i, child, rd, old, delta)

    def _add_entry(self, i: int, n: Node, rd: RootDelta, old: dict[str, Node] | None,
                   delta: DiskDelta) -> None:
        """Describe a newly scanned entry (compared with what ``old`` has at its path)."""
        root, path, tree = self.roots[i], n.path(), rd.tree
        prev = old.get(path) if old is not None else None
        if n.kind == "l":
            n.target = os.fsdecode(os.readlink(root / path))
        same = (prev is not None and prev.ino == n.ino and prev.kind == n.kind
                and prev.target == n.target)
        if same:
            rd.claimed.add(path)
        else:
            tree["creates"].append([path, n.kind, n.target])
        written = False
        if n.kind == "f":
            written = self._read_file(root, n, path, prev.hashes if same and prev else None,
                                      rd, delta)
            if not same or (prev is not None and prev.size != n.size):
                tree["sizes"].append([path, n.size])
                written = True
        if not same or written or (prev is not None and prev.attrs != n.attrs):
            tree["attrs"].append([path, *n.attrs])
        n.old = path
        if n.kind == "d":
            self._watch(i, n)
            # below a replaced directory everything is new: the backup deletes the old one
            self._scan_children(i, n, rd, old if same else None, delta)

    def _finish(self, i: int, top: Node, rd: RootDelta, delta: DiskDelta) -> None:
        top.attrs = attrs_of(os.lstat(self.roots[i]))
        rd.tree["attrs"].append(["", *top.attrs])
        t = rd.tree
        self.stats.entries_changed += (len(t["moves"]) + len(t["deletes"]) + len(t["creates"])
                                       + len(t["attrs"]) - 1)
        rd.data.sort(key=lambda r: (r.path, r.off))
        self._tops[i] = top
        delta.roots.append(rd)

    def _read_file(self, root: Path, n: Node, path: str, old: array[int] | None,
                   rd: RootDelta, delta: DiskDelta) -> bool:
        """Hash n's blocks; copy the ones that differ from ``old`` into the delta.

        True if any range is sent."""
        before = len(rd.data)
        fd = os.open(root / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = n.size = os.fstat(fd).st_size
            bs = self.block_size
            new = array("Q", bytes(8 * -(-size // bs)))
            for b, ext, data in _blocks(fd, size, bs):
                h = new[b] = block_hash(data, ext, min(bs, size - b * bs))
                self.stats.bytes_hashed += len(data)
                if old is None or b >= len(old) or old[b] != h:
                    rd.data.append(DataRef(path, b * bs, min(bs, size - b * bs), ext,
                                           delta.put(data), len(data)))
            if old is not None:  # blocks that became holes
                for b in range(min(len(old), len(new))):
                    if old[b] and not new[b]:
                        rd.data.append(DataRef(path, b * bs, min(bs, size - b * bs), [], 0, 0))
            n.hashes = new
            self.stats.files_changed += 1
        finally:
            os.close(fd)
        return len(rd.data) > before

    # ---- small helpers ---------------------------------------------------------------------

    @staticmethod
    def _list(path: Path, is_top: bool) -> dict[str, os.stat_result]:
        out = {}
        with os.scandir(path) as it:
            for e in it:
                if is_top and e.name == STASH:
                    continue
                st = e.stat(follow_symlinks=False)
                if kind_of(st.st_mode) is not None:
                    out[e.name] = st
        return out

    def _watch(self, i: int, d: Node) -> None:
        assert self._ino is not None
        d.wd = self._ino.add(self.roots[i] / d.path())
        self._wds[d.wd] = (i, d)

    def _unwatch(self, n: Node) -> None:
        got = self._wds.get(n.wd)
        if n.kind == "d" and got is not None and got[1] is n:
            del self._wds[n.wd]
            assert self._ino is not None
            self._ino.remove(n.wd)

    @staticmethod
    def _lookup(top: Node, rel: str) -> Node | None:
        n: Node | None = top
        for part in rel.split("/"):
            n = n.children.get(part) if n is not None else None
        return n

    def _other_links(self, i: int, top: Node, n: Node) -> set[Node]:
        """Other names of a hard-linked file: a write through one changes them all."""
        if os.lstat(self.roots[i] / n.path()).st_nlink <= 1:
            return set()
        return {m for m in top.walk() if m.ino == n.ino and m.kind == "f" and m is not n}

    @staticmethod
    def _old_index(top: Node, ev: _Events) -> dict[str, Node]:
        """Every node the backup holds, by its path there (valid mid-capture)."""
        out: dict[str, Node] = {}
        for start in [top, *ev.detached, *(n for _, n in ev.pending.values())]:
            for n in start.walk():
                if n.old is not None:
                    out[n.old] = n
        return out


def _blocks(fd: int, size: int, bs: int) -> Iterator[tuple[int, Extents, memoryview]]:
    """(block index, extents relative to the block, their bytes) of every block with data.

    Dense stretches are read a slab (1 MiB) per pread; blocks entirely in
    holes are skipped, so a sparse file costs its data, not its size.
    """
    exts = data_extents(fd, size)
    slab = max(1, (1 << 20) // bs)
    j, b = 0, 0
    while j < len(exts):
        s, e = exts[j][0], exts[j][0] + exts[j][1]
        b = max(b, s // bs)
        lo = b * bs
        if lo >= e:
            j += 1
            continue
        dense = -(-(size - lo) // bs) if e >= size else (e - lo) // bs
        if lo >= s and dense > 0:
            k = min(dense, slab)
            buf = memoryview(os.pread(fd, min(k * bs, size - lo), lo))
            for x in range(k):
                yield b + x, [(0, min(bs, size - lo - x * bs))], buf[x * bs:(x + 1) * bs]
            b += k
            continue
        hi = min(lo + bs, size)
        ext: Extents = []
        for s2, n2 in exts[j:]:
            if s2 >= hi:
                break
            a, z = max(s2, lo), min(s2 + n2, hi)
            if z > a:
                ext.append((a - lo, z - a))
        yield b, ext, memoryview(b"".join(os.pread(fd, n, lo + o) for o, n in ext))
        b += 1
