"""The backup's checkpoint store: crash-only, one committed image set.

Layout under ``workdir``::

    incoming/<gen>-<epoch>.part   the epoch being received (a redo log)
    redo/<gen>-<epoch>.redo       committed epochs not yet applied
    images/                       CRIU image set of the last applied epoch;
                                  pages-<id>.img are symlinks into pages/
    pages/                        page data of each pagemap, in its layout
                                  (see remus.checkpoint.pages_dir)
    STATE                         {"generation", "epoch"} last applied

The rename of a finished redo log (remus.checkpoint.redo) from incoming/
into redo/ is the commit point (epochs are received by
remus.checkpoint.staging): after it the epoch survives kill -9 of the
agent. Applying a redo log is idempotent, so recover() (run on every start)
simply discards incoming/ and re-applies what is in redo/.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from remus import faults
from remus.checkpoint import pagemap
from remus.checkpoint.delta import (
    KIND_FILE,
    KIND_FILE_LZ4,
    KIND_FILES,
    KIND_MANIFEST,
    PAGE_KINDS,
    Manifest,
)
from remus.checkpoint.pages_dir import PagesDir
from remus.checkpoint.redo import LogHeader, Record, RedoLog, RedoWriter
from remus.checkpoint.staging import StagedEpoch
from remus.errors import CheckpointError, ProtocolError

log = logging.getLogger(__name__)

Position = tuple[int, int]  # (generation, epoch)

#: A run of delta epochs applied as one holds the newest version of every page
#: its records write in memory: at most this many pages (64 MiB; the apply's
#: peak is ~2.5x that), and at most MERGE_MAX_EPOCHS redo logs (each an open
#: file), unless it is the run an interrupted apply began (which was bounded
#: so when it began, and must be completed as it was).
MERGE_MAX_PAGES = 16384
MERGE_MAX_EPOCHS = 64
EMPTY: Position = (-1, -1)


class KindHandler(Protocol):
    """Handles records of a kind the store does not know (e.g. disk deltas).

    stage(record) is called by StagedEpoch.add() when the record arrives;
    raise ProtocolError to refuse it (the epoch is then not committable).
    apply(store, records) is called while a committed epoch is applied,
    after memory images and before STATE moves, with that epoch's records of
    the kind in arrival order; ``store.applying`` tells the epoch. It must
    be idempotent: after a crash the same records are applied again.
    """

    def stage(self, record: Record) -> None: ...

    def apply(self, store: CheckpointStore, records: list[Record]) -> None: ...


@dataclass
class StoreStats:
    epochs_applied: int = 0
    bytes_applied: int = 0  # page and file bytes written into images/ and pages/
    pages_written: int = 0  # pages taken from redo logs
    pages_copied: int = 0  # unchanged pages copied into a new layout
    seconds: float = 0.0  # last apply
    runs_applied: int = 0  # applies, each of one epoch or of several in a row


class CheckpointStore:
    """Crash-only store of the last committed checkpoint (backup side).

    Call recover() before anything else, on every start. Positions are
    (generation, epoch); (-1, -1) means empty. Not thread-safe, except that
    apply_pending may be called from several threads (the backup's apply loop
    and a takeover): applies are serialized.
    ``on_write`` (None by default) is called with a description before
    every mutation of images/ or pages/ while applying; fault-injection
    tests raise from it to simulate a crash at that point.
    """

    def __init__(self, workdir: Path, fsync: bool = False, verify_pages: bool = False) -> None:
        self.workdir = workdir
        self.fsync = fsync
        self.verify_pages = verify_pages
        self.stats = StoreStats()
        self.handlers: dict[int, KindHandler] = {}
        self.applying: LogHeader | None = None
        self.on_write: Callable[[str], None] | None = None
        self._incoming = workdir / "incoming"
        self._redo = workdir / "redo"
        self._images = workdir / "images"
        self._pages = workdir / "pages"
        self._state_path = workdir / "STATE"
        self._applied: Position = EMPTY
        self._committed: Position = EMPTY
        self._staged: StagedEpoch | None = None
        self._pages_dir = PagesDir(self._pages, self.stats, fsync, self._hook, self._write_file)
        self._recovered = False
        self._apply_lock = threading.Lock()

    # ---- public API -------------------------------------------------

    def register_kind(self, kind: int, handler: KindHandler) -> None:
        """Route records of ``kind`` (16 and up: disk deltas) to ``handler``."""
        if kind in (KIND_FILE, KIND_FILES, KIND_FILE_LZ4, *PAGE_KINDS, KIND_MANIFEST) or kind <= 0:
            raise ValueError(f"kind {kind} is reserved")
        self.handlers[kind] = handler

    def recover(self, apply: bool = True) -> Position:
        """Discard partial epochs, apply committed ones; the committed position.

        apply=False leaves the committed epochs in redo/ for apply_pending()
        (the backup agent applies them in the background so that it listens
        at once, even with a long backlog after a crash under load)."""
        for d in (self._incoming, self._redo, self._images, self._pages):
            d.mkdir(parents=True, exist_ok=True)
        for p in self._incoming.iterdir():
            log.info("discarding partially received epoch %s", p.name)
            p.unlink()
        for d in (self._images, self._pages):
            for p in d.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    p.unlink()
        self._applied = self._read_state()
        self._pages_dir.load()
        self._recovered = True
        self._committed = max([self._applied] + [h.position for h, _ in self._redo_logs()])
        if apply:
            self.apply_pending()
        return self._committed

    def pending(self) -> int:
        """Committed epochs not applied yet."""
        return sum(1 for h, _ in self._redo_logs() if h.position > self._applied)

    def committed(self) -> Position:
        """Newest committed (gen, epoch), applied or still in redo/."""
        return self._committed

    def images_dir(self) -> Path:
        """The materialized image set (of the applied epoch: apply_pending first)."""
        return self._images

    def begin(self, generation: int, epoch: int, base_epoch: int, full: bool) -> StagedEpoch:
        """Start receiving an epoch; a delta must be based on the committed epoch."""
        self._require_recovered()
        gen, committed = self._committed
        if full:
            if (generation, epoch) <= self._committed:
                raise ProtocolError(
                    f"full checkpoint {generation}/{epoch} is not newer than {gen}/{committed}"
                )
        elif generation != gen or base_epoch != committed or epoch <= base_epoch:
            raise ProtocolError(
                f"delta {generation}/{epoch} is based on {generation}/{base_epoch}, "
                f"but the committed checkpoint is {gen}/{committed}: send a full one"
            )
        if self._staged is not None and self._staged.open:  # (a refused one is closed already)
            log.warning("abandoning unfinished epoch %d", self._staged.header.epoch)
            self._staged.abort()
        header = LogHeader(generation, epoch, base_epoch, full)
        path = self._incoming / f"{generation}-{epoch}.part"
        self._staged = StagedEpoch(header, path, self.handlers, self._commit_staged)
        return self._staged

    def apply_pending(self) -> int:
        """Apply every committed redo log in order; the applied epoch."""
        self._require_recovered()
        with self._apply_lock:
            return self._apply_all()

    def _apply_all(self) -> int:
        # One log at a time, looking again before each: a full epoch committed
        # meanwhile (a new primary's first) makes the rest of a backlog moot.
        while True:
            logs = self._redo_logs()
            # A full epoch replaces the image set: the epochs before it need not be
            # applied first. Not with disk records, whose earlier deltas must land.
            last_full = 0 if self.handlers else max(
                (i for i, (h, _) in enumerate(logs) if h.full and h.position > self._applied),
                default=0)
            todo = []
            for i, (header, path) in enumerate(logs):
                if header.position <= self._applied or i < last_full:
                    path.unlink()  # applied before a crash, or superseded by a later full epoch
                    continue
                todo = logs[i:]
                break
            if not todo:
                return self._applied[1]
            redos: list[RedoLog] = []
            try:
                for redo in self._run(todo):
                    redos.append(redo)
                self._apply(redos)
            finally:
                for redo in redos:
                    redo.close()
            for redo in redos:
                redo.path.unlink()
            self._fsync_dir(self._redo)

    def _run(self, logs: list[tuple[LogHeader, Path]]) -> Iterator[RedoLog]:
        """The redo logs to apply as one, from the first of ``logs``: the delta
        epochs that follow it one on another, up to MERGE_MAX_PAGES pages in
        their records, or exactly up to the epoch an interrupted apply ended at."""
        first = logs[0][0]
        run = logs[:1]
        if first.full or self.handlers:  # a full epoch wipes; disk deltas: one at a time
            yield RedoLog(logs[0][1])
            return
        for (prev, _), (h, path) in itertools.pairwise(logs):
            if h.full or h.generation != first.generation or h.base != prev.epoch:
                break
            run.append((h, path))
        # Traces of an interrupted run lie in (applied, its end]; the epochs after
        # the applied one are this run's first, so a trace names a run of them.
        end = self._pages_dir.interrupted(first.generation, self._applied[1], run[-1][0].epoch)
        if end is not None and end >= first.epoch:
            run = [(h, p) for h, p in run if h.epoch <= end]
        else:
            end = None
        pages = 0
        for i, (_, path) in enumerate(run):
            if end is None and i >= MERGE_MAX_EPOCHS:
                return
            redo = RedoLog(path)
            n = sum(len(r.meta) // 8 for r in redo.records if r.kind in PAGE_KINDS)
            if pages and pages + n > MERGE_MAX_PAGES and end is None:
                redo.close()
                return
            pages += n
            yield redo

    # ---- staging ----------------------------------------------------

    def _commit_staged(self, writer: RedoWriter, header: LogHeader) -> None:
        name = f"{header.generation:010d}-{header.epoch:012d}.redo"
        writer.close(fsync=self.fsync)
        os.rename(writer.path, self._redo / name)  # THE commit point
        self._fsync_dir(self._redo)
        self._committed = header.position
        self._staged = None

    def _redo_logs(self) -> list[tuple[LogHeader, Path]]:
        logs = [(RedoLog.read_header(p), p) for p in self._redo.glob("*.redo")]
        return sorted(logs, key=lambda hp: hp[0].position)

    # ---- applying ---------------------------------------------------

    def _apply(self, redos: list[RedoLog]) -> None:
        """Apply a run of epochs (one, or deltas each based on the one before) as
        one: the last one's manifest, the newest version of every file and page."""
        t0 = time.perf_counter()
        first, redo = redos[0].header, redos[-1]
        h = redo.header
        if not first.full and (first.generation, first.base) != self._applied:
            raise CheckpointError(
                f"redo {first.generation}/{first.epoch} is based on {first.base}, "
                f"applied is {self._applied}"
            )
        self.applying = h
        manifest = redo.manifest()
        if first.full:
            self._wipe()
        # The newest version of each file of the manifest (a file the run sent and
        # a later epoch of it dropped is not written).
        files = {r.name: (lg, r) for lg in redos for r in lg.records
                 if r.kind == KIND_FILE and (lg is redo or r.name in manifest.files)}
        for name, info in manifest.pagemaps.items():
            src = files.get(name)
            if src is None and not (self._images / name).exists():
                raise CheckpointError(f"epoch {h.epoch}: {name} neither sent nor kept")
            raw = src[0].data(src[1]) if src else (self._images / name).read_bytes()
            pm = pagemap.parse_pagemap(raw, name)
            if pm.pages_name != info.pages:
                raise CheckpointError(f"{name}: pages file {pm.pages_name}, manifest {info.pages}")
            if len(redos) == 1:
                pages_recs = [r for r in redo.records if r.name == name and r.kind in PAGE_KINDS]
                self._pages_dir.apply_pagemap(redo, name, pm.layout(), pages_recs,
                                              (h.generation, h.epoch))
            else:
                sources = [(lg, r) for lg in redos for r in lg.records
                           if r.name == name and r.kind in PAGE_KINDS]
                self._pages_dir.apply_run(name, pm.layout(), sources, (h.generation, h.epoch))
        faults.point("backup-apply")  # pages written, files not yet: a half-applied epoch
        for name, (lg, rec) in files.items():
            data = lg.data(rec)
            _check_file(name, data, manifest)
            self._write_file(self._images / name, data)
        self._pages_dir.link(self._images, manifest)
        self._remove_stale(manifest)
        for lg in redos:
            self.applying = lg.header
            self._apply_handlers(lg)
        self.applying = h
        self._verify(manifest, written=set(files))
        self._fsync_dir(self._images)
        self._fsync_dir(self._pages)
        self._write_state((h.generation, h.epoch))
        self._pages_dir.forget_resolved()  # a redo of this epoch no longer happens
        self.applying = None
        self.stats.epochs_applied += len(redos)
        self.stats.runs_applied += 1
        self.stats.seconds = time.perf_counter() - t0
        log.debug("applied epoch %d/%d in %.1f ms", h.generation, h.epoch, self.stats.seconds * 1e3)

    def _remove_stale(self, manifest: Manifest) -> None:
        for p in self._images.iterdir():
            if p.name not in manifest.files:
                self._hook(f"unlink {p.name}")
                p.unlink()
        self._pages_dir.remove_stale(manifest)

    def _apply_handlers(self, redo: RedoLog) -> None:
        by_kind: dict[int, list[Record]] = {}
        for r in redo.records:
            if r.kind not in (KIND_FILE, *PAGE_KINDS, KIND_MANIFEST):
                by_kind.setdefault(r.kind, []).append(redo.load(r))
        for kind, recs in by_kind.items():
            handler = self.handlers.get(kind)
            if handler is None:
                raise CheckpointError(f"no handler registered for record kind {kind}")
            handler.apply(self, recs)

    def _verify(self, manifest: Manifest, written: set[str]) -> None:
        """Every file of the manifest is there; pages files have their size (and,
        with verify_pages, their digest). Files written by this epoch were checked
        against the manifest before they were written (_check_file); the others
        were checked when they were, and nothing but this store touches them."""
        present = set(os.listdir(self._images))
        missing = [n for n in manifest.files if n not in present]
        if missing:
            raise CheckpointError(f"images/ lacks {len(missing)} files of the manifest, "
                                  f"e.g. {sorted(missing)[:3]}")
        for info in manifest.pagemaps.values():
            name, want = info.pages, manifest.files[info.pages]
            p = os.path.join(self._images, name)
            size = os.stat(p).st_size
            if size != want.size:
                raise CheckpointError(f"images/{name}: {size} bytes, manifest says {want.size}")
            if self.verify_pages and want.xxh3:  # a tracked dump's pages carry no digest
                with open(p, "rb") as f:
                    digest = xxhash.xxh3_64_hexdigest(f.read()) if size else _EMPTY_XXH3
                if digest != want.xxh3:
                    raise CheckpointError(f"images/{name}: digest mismatch after apply")

    def _wipe(self) -> None:
        for p in list(self._images.iterdir()) + self._pages_dir.entries():
            self._hook(f"wipe {p.name}")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        self._pages_dir.clear()

    # ---- small persistent pieces ------------------------------------

    def _write_file(self, path: Path, data: bytes) -> None:
        """Overwrite an image file in place.

        No temporary file and rename: an apply interrupted half-way is applied
        again from its redo log (STATE still names the epoch before), so a torn
        file never outlives a recovery. Renaming over the old file cost ~0.5 ms
        per file on ext4 (auto_da_alloc flushes the replaced data), and a server
        with a thousand connections has a thousand socket images per epoch.
        Never truncated to zero first, for the same reason.
        """
        self._hook(f"write {path.name}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            view, off = memoryview(data), 0
            while off < len(data):
                off += os.pwrite(fd, view[off:], off)
            if os.fstat(fd).st_size != len(data):
                os.ftruncate(fd, len(data))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.stats.bytes_applied += len(data)

    def _write_state(self, pos: Position) -> None:
        tmp = self.workdir / ".STATE.tmp"
        with open(tmp, "w") as f:
            json.dump({"generation": pos[0], "epoch": pos[1]}, f)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, self._state_path)
        self._fsync_dir(self.workdir)
        self._applied = pos

    def _read_state(self) -> Position:
        try:
            doc = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return EMPTY
        except ValueError as e:
            raise CheckpointError(f"{self._state_path}: unreadable ({e})") from e
        return int(doc["generation"]), int(doc["epoch"])

    def _fsync_dir(self, d: Path) -> None:
        if self.fsync:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _hook(self, what: str) -> None:
        if self.on_write is not None:
            self.on_write(what)

    def _require_recovered(self) -> None:
        if not self._recovered:
            raise CheckpointError("CheckpointStore.recover() must run first")


_EMPTY_XXH3 = xxhash.xxh3_64_hexdigest(b"")


def _check_file(name: str, data: bytes, manifest: Manifest) -> None:
    """CheckpointError unless ``data`` is what the manifest says ``name`` holds."""
    want = manifest.files.get(name)
    if want is None:
        raise CheckpointError(f"{name} was sent but is not in the manifest")
    if len(data) != want.size or xxhash.xxh3_64_hexdigest(data) != want.xxh3:
        raise CheckpointError(f"images/{name}: {len(data)} bytes that do not match the manifest "
                              f"({want.size} bytes, xxh3 {want.xxh3})")
