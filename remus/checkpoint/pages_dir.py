"""The pages/ directory of the backup's checkpoint store: one pages file per pagemap.

Layout::

    pages/<pagemap>.<epoch>.img     page data of one pagemap, in its layout
    pages/<pagemap>.<epoch>.vaddrs  that layout (u64 vaddr of each page)

Pages files are named after their pagemap, not after CRIU's pages id,
because ids renumber between dumps (only the images/pages-<id>.img symlinks
into pages/ move); the current file of a pagemap is the one with the highest
epoch.

Invariant between applies: for every pagemap P of the manifest, the pages
file ``pages/P.<E>.img`` with the highest E holds P's pages in the layout of
``pages/P.<E>.vaddrs``, which equals the layout of ``images/P``.

Applying an epoch's pages to a pagemap either patches its current file in
place (same layout: the same bytes at the same offsets, so redoing it after
a crash is harmless) or builds ``pages/P.<epoch>.img`` in the new layout,
its ``.vaddrs`` first, and renames it in: its existence means "done" when
the epoch is applied again.

XOR pages (KIND_PAGES_XOR) are the words in which the new page differs
from the one the store holds. Building a new file XORs them into the copy
of the old pages there; the old file stays untouched until the rename.
Patching in place would not survive a redo (the second XOR undoes the
first), so the resolved pages are written first to
``pages/.P.<generation>-<epoch>.resolved`` and a redo takes them from
there; forget_resolved() removes these once the store has recorded the
epoch as applied.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from remus.checkpoint import images
from remus.checkpoint.delta import KIND_PAGES_XOR, VADDR_DTYPE, Manifest, decode_pages, decode_xor
from remus.checkpoint.images import PAGE_SIZE, PAGE_WORDS, Vaddrs
from remus.checkpoint.redo import LogRecord, RedoLog
from remus.errors import CheckpointError

if TYPE_CHECKING:
    from remus.checkpoint.store import StoreStats


@dataclass
class _PagesFile:
    epoch: int
    path: Path
    layout: Vaddrs
    index: tuple[Vaddrs, np.ndarray]


class PagesDir:
    """The current pages file of each pagemap, kept under ``path``.

    ``stats`` (the store's) counts the pages and bytes written; ``hook`` is
    called with a description before every mutation (see
    CheckpointStore.on_write); ``write_file`` overwrites a small file in
    place (the store's, with its hook and counters).
    """

    def __init__(
        self,
        path: Path,
        stats: StoreStats,
        fsync: bool,
        hook: Callable[[str], None],
        write_file: Callable[[Path, bytes], None],
    ) -> None:
        self.path = path
        self.stats = stats
        self.fsync = fsync
        self._hook = hook
        self._write_file = write_file
        self._files: dict[str, _PagesFile] = {}

    def load(self) -> None:
        """Find the current pages file of each pagemap (on recovery)."""
        newest: dict[str, int] = {}
        for p in self.path.glob("*.img"):
            name, _, epoch = p.name[: -len(".img")].rpartition(".")
            if images.is_pagemap(name) and epoch.isdigit():
                newest[name] = max(newest.get(name, -1), int(epoch))
        self._files = {name: self._load_pages_file(name, e) for name, e in newest.items()}

    def apply_pagemap(
        self, redo: RedoLog, name: str, layout: Vaddrs, recs: list[LogRecord],
        position: tuple[int, int],
    ) -> None:
        """Bring the pages of ``name`` to ``layout`` with the page records ``recs``
        of the epoch at ``position`` (generation, epoch)."""
        generation, epoch = position
        target = self.path / f"{name}.{epoch}.img"
        cur = self._files.get(name)
        if target.exists():  # built before a crash
            self._files[name] = self._load_pages_file(name, epoch)
        elif cur is not None and np.array_equal(cur.layout, layout):
            sidecar = self.path / f".{name}.{generation}-{epoch}.resolved"
            self._patch_in_place(redo, cur, recs, sidecar)
        else:
            self._build(redo, name, layout, recs, cur, target, epoch)

    def forget_resolved(self) -> None:
        """Remove the resolved XOR pages of applied epochs (call once the store
        has recorded the epoch as applied: a redo before that needs them)."""
        for p in self.path.glob(".*.resolved"):
            p.unlink(missing_ok=True)

    def link(self, images_dir: Path, manifest: Manifest) -> None:
        """Point images_dir/pages-N.img of each pagemap at its current pages file."""
        for name, info in manifest.pagemaps.items():
            target = os.path.join("..", "pages", self._files[name].path.name)
            link = images_dir / info.pages
            if link.is_symlink() and os.readlink(link) == target:
                continue
            tmp = images_dir / f".{info.pages}.tmp"
            self._hook(f"link {info.pages}")
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.rename(tmp, link)

    def remove_stale(self, manifest: Manifest) -> None:
        """Remove the files of pagemaps not in ``manifest`` and superseded files."""
        self._files = {n: f for n, f in self._files.items() if n in manifest.pagemaps}
        keep = {f.path.name for f in self._files.values()}
        keep |= {f.path.with_suffix(".vaddrs").name for f in self._files.values()}
        for p in _pages_first(self.path):
            if p.name not in keep and not p.name.endswith(".resolved"):
                self._hook(f"unlink pages/{p.name}")
                p.unlink()

    def entries(self) -> list[Path]:
        """Everything in pages/, in an order safe for removal (see _pages_first)."""
        return _pages_first(self.path)

    def clear(self) -> None:
        """Forget every pages file (the store has wiped pages/)."""
        self._files = {}

    def _patch_in_place(self, redo: RedoLog, cur: _PagesFile, recs: list[LogRecord],
                        sidecar: Path) -> None:
        # Same bytes at the same offsets: redoing this after a crash is harmless,
        # XOR pages included, since they come resolved from the sidecar.
        xor = [r for r in recs if r.kind == KIND_PAGES_XOR]
        resolved = self._resolve(redo, cur, xor, sidecar) if xor else []
        fd = os.open(cur.path, os.O_WRONLY)
        try:
            plain = [decode_pages(r.kind, r.meta, redo.data(r))
                     for r in recs if r.kind != KIND_PAGES_XOR]
            for vaddrs, data in plain + resolved:
                self._write_pages(fd, images.lookup(cur.index, vaddrs), data, cur.path.name)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _resolve(self, redo: RedoLog, cur: _PagesFile, recs: list[LogRecord],
                 sidecar: Path) -> list[tuple[Vaddrs, bytes]]:
        """The full pages of XOR records against ``cur``, kept in ``sidecar``
        (written once, before ``cur`` changes; read back on a redo)."""
        if sidecar.exists():
            raw = sidecar.read_bytes()
            (n,) = np.frombuffer(raw[:8], dtype=VADDR_DTYPE)
            vaddrs = np.frombuffer(raw[8 : 8 + 8 * int(n)], dtype=VADDR_DTYPE).astype(np.uint64)
            data = raw[8 + 8 * int(n):]
            if len(data) != vaddrs.size * PAGE_SIZE:
                raise CheckpointError(f"{sidecar.name}: {len(data)} bytes for {vaddrs.size} pages")
            return [(vaddrs, data)]
        out = []
        fd = os.open(cur.path, os.O_RDONLY)
        try:
            for rec in recs:
                vaddrs, pos, words = decode_xor(rec.meta, redo.data(rec))
                idx = images.lookup(cur.index, vaddrs)
                if bool((idx < 0).any()):
                    raise CheckpointError(f"{cur.path.name}: an XOR page at a vaddr the store "
                                          "does not hold")
                pages = _pread_pages(fd, idx)
                pages.reshape(-1)[pos] ^= words
                out.append((vaddrs, pages.tobytes()))
        finally:
            os.close(fd)
        vaddrs = np.concatenate([v for v, _ in out]) if out else np.empty(0, np.uint64)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        self._hook(f"resolve {sidecar.name}")
        with open(tmp, "wb") as f:
            f.write(np.array([vaddrs.size], dtype=VADDR_DTYPE).tobytes())
            f.write(vaddrs.astype(VADDR_DTYPE).tobytes())
            for _, data in out:
                f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, sidecar)
        return out

    def _build(
        self,
        redo: RedoLog,
        name: str,
        layout: Vaddrs,
        recs: list[LogRecord],
        cur: _PagesFile | None,
        target: Path,
        epoch: int,
    ) -> None:
        """Write pages/<name>.<epoch>.img in a new layout, then rename it in."""
        index = images.sorted_index(layout)
        self._write_file(target.with_suffix(".vaddrs"), layout.astype("<u8").tobytes())
        tmp = target.with_name(f".{target.name}.tmp")
        self._hook(f"build {target.name}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, layout.size * PAGE_SIZE)
            covered = np.zeros(layout.size, dtype=bool)
            from_old = covered.copy()
            if cur is not None:
                old_idx = images.lookup(cur.index, layout)
                from_old = old_idx >= 0
                covered |= from_old
                self._copy_runs(cur.path, fd, old_idx)
            xor = []
            for rec in recs:
                if rec.kind == KIND_PAGES_XOR:
                    vaddrs, pos, words = decode_xor(rec.meta, redo.data(rec))
                    idx = images.lookup(index, vaddrs)
                    # The old version is already in place (copied above): XOR it there.
                    if bool((idx < 0).any()) or not bool(from_old[idx].all()):
                        raise CheckpointError(f"epoch {epoch}: XOR pages of {name} at vaddrs "
                                              "the store does not hold")
                    xor.append((idx[pos // PAGE_WORDS] * PAGE_WORDS + pos % PAGE_WORDS, words))
                    self.stats.pages_written += idx.size
                    continue
                vaddrs, data = decode_pages(rec.kind, rec.meta, redo.data(rec))
                idx = images.lookup(index, vaddrs)
                self._write_pages(fd, idx, data, target.name)
                covered[idx] = True
            if xor:
                self._hook(f"xor {target.name}")
                _xor_in_place(fd, layout.size, xor)
            if not covered.all():
                raise CheckpointError(
                    f"epoch {epoch} lacks {int((~covered).sum())} pages of {name}"
                )
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
        self._files[name] = _PagesFile(epoch, target, layout, index)

    def _copy_runs(self, src_path: Path, dst_fd: int, old_idx: np.ndarray) -> None:
        """Copy old pages into their new places, one copy_file_range per run."""
        src_fd = os.open(src_path, os.O_RDONLY)
        try:
            for new_start, old_start, n in images.page_runs(old_idx):
                images.copy_pages(src_fd, dst_fd, old_start * PAGE_SIZE, new_start * PAGE_SIZE, n)
                self.stats.pages_copied += n
                self.stats.bytes_applied += n * PAGE_SIZE
        finally:
            os.close(src_fd)

    def _write_pages(self, fd: int, idx: np.ndarray, data: bytes, what: str) -> None:
        if bool((idx < 0).any()):
            raise CheckpointError(f"{what}: page at a vaddr outside the pagemap")
        view = memoryview(data)
        for start, first, n in images.page_runs(idx):
            self._hook(f"pwrite {what} @{first}+{n}")
            os.pwrite(fd, view[start * PAGE_SIZE : (start + n) * PAGE_SIZE], first * PAGE_SIZE)
        self.stats.pages_written += idx.size
        self.stats.bytes_applied += len(data)

    def _load_pages_file(self, name: str, epoch: int) -> _PagesFile:
        path = self.path / f"{name}.{epoch}.img"
        raw = path.with_suffix(".vaddrs").read_bytes()
        layout = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
        return _PagesFile(epoch, path, layout, images.sorted_index(layout))


def _pages_first(pages_dir: Path) -> list[Path]:
    """Entries of pages/ with every .img before any .vaddrs.

    Removing in this order keeps the invariant that a pages file never
    exists without its layout, whatever point a crash interrupts.
    """
    return sorted(pages_dir.iterdir(), key=lambda p: p.suffix != ".img")


def _pread_pages(fd: int, idx: np.ndarray) -> np.ndarray:
    """The pages at page indices ``idx`` of the file, in that order (pages x 512 u64):
    a preadv per run of consecutive pages. The GIL is released in every read, so
    the backup's receiver and detector run between them even on a large epoch
    (a gather through a mapping of the file faulted page by page holding it)."""
    buf = np.empty((idx.size, PAGE_WORDS), dtype=np.uint64)
    view = memoryview(buf.data).cast("B")
    for start, first, n in images.page_runs(idx):
        got = os.preadv(fd, [view[start * PAGE_SIZE : (start + n) * PAGE_SIZE]],
                        first * PAGE_SIZE)
        if got != n * PAGE_SIZE:
            raise CheckpointError("pages file shorter than its layout")
    return buf


def _xor_in_place(fd: int, nr_pages: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """XOR words into the file: each part is (u64 word positions in the file, words).
    The pages they fall in are read (_pread_pages), XORed in memory and written
    back; no shared mapping (whose faults and unmap cost more, measured)."""
    if not parts:
        return
    pos = np.concatenate([p for p, _ in parts])
    words = np.concatenate([w for _, w in parts])
    pages, where = np.unique(pos // PAGE_WORDS, return_inverse=True)
    if pages.size and int(pages[-1]) >= nr_pages:
        raise CheckpointError("XOR words beyond the pages file")
    pages = pages.astype(np.intp)
    buf = _pread_pages(fd, pages)
    buf.reshape(-1)[where * PAGE_WORDS + pos % PAGE_WORDS] ^= words
    view = memoryview(buf.data).cast("B")
    for start, first, n in images.page_runs(pages):
        os.pwrite(fd, view[start * PAGE_SIZE : (start + n) * PAGE_SIZE], first * PAGE_SIZE)
