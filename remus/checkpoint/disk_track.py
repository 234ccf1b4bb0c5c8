"""State-directory deltas, primary side: what the unit changed on disk in an epoch.

The unit declares state directories ("roots"). DiskTracker watches every
directory of each tree with inotify while the unit runs, and capture() —
called while the unit is frozen, from CRIU's post-dump notification —
drains the queued events and looks only at what they name, so the frozen
cost follows the change, not the size of the tree. Changed files are
compared with the per-block hashes kept from the previous capture and only
changed blocks are copied (into a spool: the unit writes again as soon as
it is thawed, long before the sender thread gets to the data).

The records it sends are described in remus.checkpoint.disk_wire; the
backup applies them with remus.checkpoint.disk_apply.DiskApplier.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from remus.checkpoint.delta import Chunk
from remus.checkpoint.disk_blocks import block_hash, blocks
from remus.checkpoint.disk_delta import DataRef, DiskDelta, RootDelta
from remus.checkpoint.disk_tree import Events, Node, attached, entries
from remus.checkpoint.disk_wire import TreeRecord, attrs_of, kind_of
from remus.checkpoint.inotify import IN_IGNORED, IN_Q_OVERFLOW, Inotify
from remus.errors import CheckpointError

log = logging.getLogger(__name__)

#: granularity of change detection (and of what is re-sent)
BLOCK_SIZE = 64 * 1024


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


class _Rescan(Exception):
    """The tree no longer matches what the events said: rescan this root."""


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
                    self._rescan(i, delta, ev.old_index(top))
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

    def _drain(self, stats: DiskStats) -> Events:
        assert self._ino is not None
        ev = Events()
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
                ev.replay(i, self._tops[i], d, mask, cookie, name)
        for _, n in ev.pending.values():  # moved out of the roots
            ev.detached.append(n)
        return ev

    # ---- incremental capture ------------------------------------------------------------------

    def _incremental(self, i: int, top: Node, ev: Events, delta: DiskDelta) -> None:
        rd = RootDelta(TreeRecord(self.roots[i], False))
        try:
            for d in ev.dirty.get(i, ()):
                if attached(d, top):
                    self._reconcile(i, d, rd, ev, delta)
        except _Rescan as e:
            log.warning("%s: %s; rescanning", self.roots[i], e)
            self._rescan(i, delta, ev.old_index(top))
            return
        self._add_mapped(i, top, ev)
        content = {n for n in ev.content.get(i, ()) if n.kind == "f" and attached(n, top)}
        for n in list(content):
            content |= self._other_links(i, top, n)
        # The backup's apply changes the mtime of every file it writes and every
        # directory it touches, so those get their attributes even if unchanged
        # (mmap writes, coarse timestamps).
        forced = {n for n in content if self._reread(i, n, rd, delta)} | ev.dirty.get(i, set())
        for n in ev.meta.get(i, set()) | forced:
            if n.old is not None and attached(n, top):
                self._check_attrs(i, n, rd.tree, n in forced)
        moved = [n for n in dict.fromkeys(ev.moved) if n.old is not None and attached(n, top)]
        rd.tree.moves = [(n.old, n.path()) for n in moved if n.old is not None and n.old != n.path()]
        rd.tree.deletes = _topmost(self._deleted(i, top, ev))
        for n in moved:
            for m in n.walk():
                m.old = m.path()
        self._finish(i, top, rd, delta)

    def _reconcile(self, i: int, d: Node, rd: RootDelta, ev: Events, delta: DiskDelta) -> None:
        """Make d's children equal the directory's entries (new ones are scanned)."""
        full = self.roots[i] / d.path()
        try:
            st = os.lstat(full)
        except FileNotFoundError as e:
            raise _Rescan(f"{full} vanished") from e
        if st.st_ino != d.ino or not stat.S_ISDIR(st.st_mode):
            raise _Rescan(f"{full} is not the directory the events named")
        listing = entries(full, d.parent is None)
        for name, child in list(d.children.items()):
            got = listing.get(name)
            if got is None or got.st_ino != child.ino or kind_of(got.st_mode) != child.kind:
                ev.detach(child)
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
            rd.tree.sizes.append((path, n.size))
        return sent or n.size != old_size

    def _check_attrs(self, i: int, n: Node, tree: TreeRecord, force: bool) -> None:
        path = n.path()
        a = attrs_of(os.lstat(self.roots[i] / path))
        if a != n.attrs or force:
            n.attrs = a
            if path:  # the root's attributes are always sent (see _finish)
                tree.attrs.append((path, *a))

    def _deleted(self, i: int, top: Node, ev: Events) -> set[str]:
        gone: set[str] = set()
        for n in ev.detached:
            if attached(n, top):
                continue
            for m in n.walk():
                if m.old is not None and not attached(m, top):
                    gone.add(m.old)
                    m.old = None
                self._unwatch(m)
        return gone

    def _add_mapped(self, i: int, top: Node, ev: Events) -> None:
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
                    node = top.find(f[5][len(prefix):])
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
        rd = RootDelta(TreeRecord(root, old is None))
        self._watch(i, top)
        self._scan_children(i, top, rd, old, delta)
        if old is not None:
            rd.tree.deletes = _topmost({p for p in old if p and p not in rd.claimed})
        self._finish(i, top, rd, delta)

    def _scan_children(self, i: int, d: Node, rd: RootDelta, old: dict[str, Node] | None,
                       delta: DiskDelta) -> None:
        for name, st in entries(self.roots[i] / d.path(), d.parent is None).items():
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
            tree.creates.append((path, n.kind, n.target))
        written = False
        if n.kind == "f":
            written = self._read_file(root, n, path, prev.hashes if same and prev else None,
                                      rd, delta)
            if not same or (prev is not None and prev.size != n.size):
                tree.sizes.append((path, n.size))
                written = True
        if not same or written or (prev is not None and prev.attrs != n.attrs):
            tree.attrs.append((path, *n.attrs))
        n.old = path
        if n.kind == "d":
            self._watch(i, n)
            # below a replaced directory everything is new: the backup deletes the old one
            self._scan_children(i, n, rd, old if same else None, delta)

    def _finish(self, i: int, top: Node, rd: RootDelta, delta: DiskDelta) -> None:
        top.attrs = attrs_of(os.lstat(self.roots[i]))
        rd.tree.attrs.append(("", *top.attrs))
        t = rd.tree
        self.stats.entries_changed += (len(t.moves) + len(t.deletes) + len(t.creates)
                                       + len(t.attrs) - 1)
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
            for b, ext, data in blocks(fd, size, bs):
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

    def _other_links(self, i: int, top: Node, n: Node) -> set[Node]:
        """Other names of a hard-linked file: a write through one changes them all."""
        if os.lstat(self.roots[i] / n.path()).st_nlink <= 1:
            return set()
        return {m for m in top.walk() if m.ino == n.ino and m.kind == "f" and m is not n}
