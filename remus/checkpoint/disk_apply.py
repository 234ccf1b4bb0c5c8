"""State-directory deltas, backup side: apply an epoch's disk records at commit.

DiskApplier is the CheckpointStore handler for KIND_DISK records (format:
remus.checkpoint.disk_wire). stage() only validates; the store keeps the records
in the epoch's redo log, so nothing touches the state directories before
the epoch commits, and a partially received epoch simply vanishes.

apply() brings each root from the previous applied epoch's state to this
epoch's, in five phases:

1. vacate: entries that move are renamed into ``<root>/.remus-stash/<n>``
   and deleted entries are removed, deepest old path first (so a moved
   child leaves its deleted or moved parent before the parent goes). A
   full checkpoint instead wipes the root.
2. place: stashed entries go to their new paths and new entries are
   created, shallowest new path first (parents before children).
3. truncate: files get their final sizes (first, so that a shrunk file's
   old tail is gone and a punch at the new EOF can free the last block).
4. write: changed byte ranges are written (holes punched where the
   primary has holes).
5. finish: the stash is removed and attributes (mode, owner, mtime) set
   last, since every earlier phase changes directory mtimes.

Deletes run in phase 1 rather than last: a path deleted and recreated in
one epoch needs its old occupant gone before the new one is placed.
Truncates run before writes: writes never reach past the final size, so
either order ends in the same bytes, and this one keeps holes holes.

Each phase is idempotent on its own (renames check whether they already
happened; writes put the same bytes at the same offsets), but not across
phases (phase 1 re-run after phase 2 would stash a recreated path). So
after every phase the applier records ``(generation, epoch, step)`` in
``<store workdir>/disk-progress``; a redo after a crash skips completed
phases and re-runs the interrupted one, which yields exactly the
committed state.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remus.checkpoint.disk_wire import DATA, KIND_DISK, STASH, TREE, DataRecord, TreeRecord
from remus.checkpoint.redo import Record
from remus.errors import CheckpointError, ProtocolError

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]
PROGRESS = "disk-progress"
_PHASES = ("vacate", "place", "truncate", "write", "finish")
#: punches that reach EOF are rounded up to this, so the file's last block can become a hole
_FS_BLOCK = 4096


@dataclass
class TreeOps(TreeRecord):
    """A parsed, validated "tree" record (root: the local path) and the data records after it."""

    data: list[DataRecord] = field(default_factory=list)


@dataclass
class ApplyStats:
    epochs: int = 0
    bytes_written: int = 0
    entries: int = 0  # moves, deletes, creates
    seconds: float = 0.0


def _depth(p: str) -> int:
    return p.count("/")


class DiskApplier:
    """Keeps the backup's copies of the state directories at the last applied epoch.

    Register with ``applier.register(store)``. ``roots`` are the only
    directories a primary may write (same paths as on the primary); a record
    naming another root is refused at stage(). A mapping instead puts the
    primary's root (key) at another local path (value), e.g. in tests.
    ``on_write`` (None by
    default) is called before every change to a root; fault-injection tests
    raise from it to simulate a crash there.
    """

    def __init__(self, roots: Iterable[Path] | Mapping[Path, Path]) -> None:
        pairs = roots.items() if isinstance(roots, Mapping) else ((r, r) for r in roots)
        self.roots = {Path(os.path.abspath(a)): Path(os.path.abspath(b)) for a, b in pairs}
        for r in self.roots.values():
            if r == Path("/") or r.parent == Path("/"):
                raise CheckpointError(f"refusing {r} as a state directory (too close to /)")
        self.on_write: Callable[[str], None] | None = None
        self.stats = ApplyStats()
        self._fsync = False

    def register(self, store: Any) -> None:
        store.register_kind(KIND_DISK, self)

    # ---- KindHandler ---------------------------------------------------------------------

    def stage(self, record: Record) -> None:
        if record.name == TREE:
            TreeOps.decode(record.meta, self._local)
        elif record.name == DATA:
            DataRecord.decode(record.meta, record.data, self._local)
        else:
            raise ProtocolError(f"unknown disk record {record.name!r}")

    def apply(self, store: Any, records: list[Record]) -> None:
        h = store.applying
        if h is None:
            raise CheckpointError("DiskApplier.apply() outside an apply")
        self._fsync = bool(getattr(store, "fsync", False))
        trees = self._group(records)
        progress = Path(store.workdir) / PROGRESS
        done = self._done(progress, h.generation, h.epoch)
        step = 0
        for tree in trees:
            for phase in _PHASES:
                if step >= done:
                    getattr(self, f"_{phase}")(tree)
                    self._sync(tree.root)
                    self._save(progress, h.generation, h.epoch, step + 1)
                step += 1
            self.stats.entries += len(tree.moves) + len(tree.deletes) + len(tree.creates)
        self.stats.epochs += 1

    # ---- parsing -------------------------------------------------------------------------

    def _local(self, root: Path) -> Path:
        local = self.roots.get(root)
        if local is None:
            raise ProtocolError(f"disk record for {root}, not a state directory here")
        return local

    def _group(self, records: list[Record]) -> list[TreeOps]:
        trees: dict[Path, TreeOps] = {}
        for r in records:
            if r.name == TREE:
                t = TreeOps.decode(r.meta, self._local)
                trees[t.root] = t
            else:
                op = DataRecord.decode(r.meta, r.data, self._local)
                if op.root not in trees:
                    raise CheckpointError(f"disk data for {op.root} before its tree record")
                trees[op.root].data.append(op)
        return list(trees.values())

    # ---- the phases ------------------------------------------------------------------------

    def _vacate(self, t: TreeOps) -> None:
        t.root.mkdir(parents=True, exist_ok=True)
        if t.full:
            for e in list(os.scandir(t.root)):
                self._remove(Path(e.path))
            return
        stash = t.root / STASH
        ops: list[tuple[str, int]] = [(old, i) for i, (old, _) in enumerate(t.moves)]
        ops += [(p, -1) for p in t.deletes]
        for path, i in sorted(ops, key=lambda o: -_depth(o[0])):
            src = t.root / path
            if i < 0:
                self._remove(src)
                continue
            dst = stash / str(i)
            if os.path.lexists(dst):
                continue  # stashed before a crash
            if not os.path.lexists(src):
                raise CheckpointError(f"{src} should move to {t.moves[i][1]} but is missing")
            stash.mkdir(exist_ok=True)
            self._hook(f"stash {path}")
            os.rename(src, dst)

    def _place(self, t: TreeOps) -> None:
        items: list[tuple[str, int, str, str | None]] = [
            (new, i, "", None) for i, (_, new) in enumerate(t.moves)]
        items += [(p, -1, k, target) for p, k, target in t.creates]
        for path, i, kind, target in sorted(items, key=lambda o: _depth(o[0])):
            p = t.root / path
            if i >= 0:
                src = t.root / STASH / str(i)
                if os.path.lexists(src):
                    self._hook(f"place {path}")
                    os.rename(src, p)
            elif kind == "d":
                if not p.is_dir():
                    self._hook(f"mkdir {path}")
                    p.mkdir(mode=0o700)
            elif not os.path.lexists(p):
                self._hook(f"create {path}")
                if kind == "f":
                    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
                elif kind == "l":
                    os.symlink(os.fsencode(target or ""), p)
                else:
                    os.mkfifo(p, 0o600)

    def _write(self, t: TreeOps) -> None:
        fds: dict[str, int] = {}
        try:
            for op in t.data:
                fd = fds.get(op.path)
                if fd is None:
                    fd = fds[op.path] = os.open(t.root / op.path,
                                                os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self._hook(f"write {op.path}@{op.off}+{op.span}")
                self._write_range(fd, op, os.fstat(fd).st_size)
            for fd in fds.values():
                if self._fsync:
                    os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _write_range(self, fd: int, op: DataRecord, size: int) -> None:
        if op.ext != [(0, op.span)] and op.span:
            n = op.span
            if op.off + n >= size:  # the tail: past EOF nothing is lost, and partial blocks stay
                n = -(-n // _FS_BLOCK) * _FS_BLOCK
            if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, op.off, n):
                err = ctypes.get_errno()
                if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise CheckpointError(f"punching {op.path}: {os.strerror(err)}")
                os.pwrite(fd, bytes(op.span), op.off)  # no holes on this filesystem
        view = memoryview(op.data)
        pos = 0
        for o, n in op.ext:
            os.pwrite(fd, view[pos:pos + n], op.off + o)
            pos += n
        self.stats.bytes_written += len(op.data)

    def _truncate(self, t: TreeOps) -> None:
        for path, size in t.sizes:
            self._hook(f"truncate {path}")
            os.truncate(t.root / path, size)

    def _finish(self, t: TreeOps) -> None:
        stash = t.root / STASH
        if stash.exists():
            self._hook("rmdir stash")
            try:
                stash.rmdir()
            except OSError as e:
                raise CheckpointError(f"{stash} is not empty after placing: {e}") from e
        for path, mode, uid, gid, mtime in sorted(t.attrs, key=lambda a: -_depth(a[0]) - bool(a[0])):
            p = t.root / path if path else t.root
            self._hook(f"attrs {path}")
            self._set_attrs(p, mode, uid, gid, mtime)

    @staticmethod
    def _set_attrs(p: Path, mode: int, uid: int, gid: int, mtime: int) -> None:
        st = os.lstat(p)
        if (st.st_uid, st.st_gid) != (uid, gid):
            try:
                os.chown(p, uid, gid, follow_symlinks=False)
            except PermissionError:
                log.warning("cannot give %s to %d:%d (not root?)", p, uid, gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(p, mode)
        os.utime(p, ns=(mtime, mtime), follow_symlinks=False)

    # ---- helpers -------------------------------------------------------------------------------

    def _remove(self, p: Path) -> None:
        if not os.path.lexists(p):
            return
        self._hook(f"remove {p}")
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()

    def _hook(self, what: str) -> None:
        if self.on_write is not None:
            self.on_write(what)

    def _sync(self, root: Path) -> None:
        if self._fsync:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _libc.syncfs(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _done(progress: Path, gen: int, epoch: int) -> int:
        try:
            doc = json.loads(progress.read_text())
        except (FileNotFoundError, ValueError):
            return 0
        if (doc.get("generation"), doc.get("epoch")) != (gen, epoch):
            return 0
        return int(doc.get("step", 0))

    def _save(self, progress: Path, gen: int, epoch: int, step: int) -> None:
        tmp = progress.with_name(f".{progress.name}.tmp")
        with open(tmp, "w") as f:
            json.dump({"generation": gen, "epoch": epoch, "step": step}, f)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, progress)


def sync_to_disk(dirs: list[Path]) -> int:
    """syncfs(2) each distinct filesystem that holds one of `dirs`; how many.

    Called by a takeover after the last apply and before the unit resumes: a
    write the service fsync'd on the primary (and told its client about) is in
    the applied state directory, but only in this host's page cache until now;
    a power cut of this host right after the takeover must not lose it."""
    seen: set[int] = set()
    for d in dirs:
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise CheckpointError(f"cannot open state directory {d} to sync it: {e}") from e
        try:
            dev = os.fstat(fd).st_dev
            if dev in seen:
                continue
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise CheckpointError(f"syncfs of {d} failed: {os.strerror(err)}")
            seen.add(dev)
        finally:
            os.close(fd)
    return len(seen)
