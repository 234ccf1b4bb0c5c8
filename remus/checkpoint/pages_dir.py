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

Several committed epochs in a row can be applied as one (apply_run): the
records of each, in order, give the newest version of every page they
write (an XOR against the version the epoch before left, in the store or
in an earlier epoch of the run); those pages go to the last epoch's layout
once. A page written in each of four epochs is then written once, and a
layout that changed in each is rebuilt once. The resolved pages of a run
with XOR records that patches in place are kept in the sidecar of its last
epoch first, as for one epoch; a crash leaves the run's last epoch in its
traces (``interrupted``), and the store re-applies exactly that run.
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


#: (redo log, one of its page records): where a record of a run of epochs comes from.
Source = tuple[RedoLog, LogRecord]


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

    def apply_run(self, name: str, layout: Vaddrs, sources: list[Source],
                  position: tuple[int, int]) -> None:
        """Bring the pages of ``name`` to ``layout`` with the page records of a run
        of epochs (``sources``, in epoch order) ending at ``position``."""
        generation, epoch = position
        target = self.path / f"{name}.{epoch}.img"
        cur = self._files.get(name)
        if target.exists():  # built before a crash
            self._files[name] = self._load_pages_file(name, epoch)
            return
        sidecar = self.path / f".{name}.{generation}-{epoch}.resolved"
        same = cur is not None and np.array_equal(cur.layout, layout)
        if same and sidecar.exists():
            vaddrs, pages = _read_sidecar(sidecar)
        else:
            vaddrs, pages = self._newest_pages(cur, sources)
            if same and any(r.kind == KIND_PAGES_XOR for _, r in sources):
                # Resolved against the file we are about to patch: keep them first.
                self._write_sidecar(sidecar, vaddrs, [pages])
        if same:
            assert cur is not None
            idx = images.lookup(cur.index, vaddrs)
            keep = idx >= 0  # pages written in the run and gone by its end are dropped
            if not keep.any():
                return
            fd = os.open(cur.path, os.O_WRONLY)
            try:
                self._write_pages(fd, idx[keep], pages[keep], cur.path.name)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return
        index = images.sorted_index(layout)
        idx = images.lookup(index, vaddrs)
        keep = idx >= 0  # pages written in the run and gone by its end are dropped
        idx, pages = idx[keep], pages[keep]

        def fill(fd: int, _index: tuple[Vaddrs, np.ndarray], covered: np.ndarray,
                 _from_old: np.ndarray) -> None:
            self._write_pages(fd, idx, pages, target.name)
            covered[idx] = True

        self._build_file(name, layout, cur, target, epoch, fill, index, fresh=idx)

    def interrupted(self, generation: int, after: int, upto: int) -> int | None:
        """The last epoch of a run of (after, upto] whose apply was interrupted, by
        the files it left (a pages file built for it, or its resolved pages)."""
        found = []
        for p in self.path.iterdir():
            n = p.name
            if n.endswith(".img") and not n.startswith("."):
                e = n[: -len(".img")].rpartition(".")[2]
            elif n.endswith(".resolved") and n.startswith("."):
                g, _, e = n[: -len(".resolved")].rpartition(".")[2].partition("-")
                if g != str(generation):
                    continue
            else:
                continue
            if e.isdigit() and after < int(e) <= upto:
                found.append(int(e))
        return max(found) if found else None

    def _newest_pages(self, cur: _PagesFile | None,
                      sources: list[Source]) -> tuple[Vaddrs, np.ndarray]:
        """The newest version of each page the records write: (sorted vaddrs, pages)."""
        layers: list[tuple[Vaddrs, np.ndarray]] = []  # one per record, vaddrs sorted
        fd = -1
        try:
            for redo, rec in sources:
                if rec.kind == KIND_PAGES_XOR:
                    vaddrs, pos, words = decode_xor(rec.meta, redo.data(rec))
                    base, missing = _from_layers(layers, vaddrs)
                    if missing.size:
                        idx = (images.lookup(cur.index, vaddrs[missing]) if cur is not None
                               else np.full(missing.size, -1, dtype=np.intp))
                        if bool((idx < 0).any()):
                            raise CheckpointError(f"{rec.name}: XOR pages at vaddrs the store "
                                                  "does not hold")
                        if fd < 0:
                            assert cur is not None
                            fd = os.open(cur.path, os.O_RDONLY)
                        base[missing] = _pread_pages(fd, idx)
                    base.reshape(-1)[pos] ^= words
                    pages = base
                else:
                    vaddrs, data = decode_pages(rec.kind, rec.meta, redo.data(rec))
                    pages = np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE_WORDS)
                if vaddrs.size > 1 and not bool((vaddrs[1:] > vaddrs[:-1]).all()):
                    order = np.argsort(vaddrs, kind="stable")
                    vaddrs, pages = vaddrs[order], pages[order]
                layers.append((vaddrs, pages))
        finally:
            if fd >= 0:
                os.close(fd)
        if not layers:
            return np.empty(0, dtype=np.uint64), np.empty((0, PAGE_WORDS), dtype=np.uint64)
        allv = np.concatenate([v for v, _ in layers])
        allp = np.concatenate([p for _, p in layers])
        # The last version of each vaddr: np.unique keeps the first of the reversed.
        uniq, first = np.unique(allv[::-1], return_index=True)
        last = allv.size - 1 - first
        return uniq, allp[last]

    def _write_sidecar(self, sidecar: Path, vaddrs: Vaddrs,
                       pages: list[bytes] | list[np.ndarray]) -> None:
        """Keep resolved pages (``pages``: their data, in parts, in vaddrs order)."""
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        self._hook(f"resolve {sidecar.name}")
        with open(tmp, "wb") as f:
            f.write(np.array([vaddrs.size], dtype=VADDR_DTYPE).tobytes())
            f.write(vaddrs.astype(VADDR_DTYPE).tobytes())
            for part in pages:
                f.write(np.ascontiguousarray(part).data if isinstance(part, np.ndarray) else part)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, sidecar)

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
            vaddrs, pages = _read_sidecar(sidecar)
            return [(vaddrs, pages.tobytes())]
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
        self._write_sidecar(sidecar, vaddrs, [d for _, d in out])
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

        def fill(fd: int, index: tuple[Vaddrs, np.ndarray], covered: np.ndarray,
                 from_old: np.ndarray) -> None:
            xor = []
            for rec in recs:
                if rec.kind == KIND_PAGES_XOR:
                    vaddrs, pos, words = decode_xor(rec.meta, redo.data(rec))
                    idx = images.lookup(index, vaddrs)
                    # The old version is already in place (copied): XOR it there.
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

        self._build_file(name, layout, cur, target, epoch, fill)

    def _build_file(self, name: str, layout: Vaddrs, cur: _PagesFile | None, target: Path,
                    epoch: int, fill: Callable[..., None],
                    index: tuple[Vaddrs, np.ndarray] | None = None,
                    fresh: np.ndarray | None = None) -> None:
        """Create the pages file of a new layout: its .vaddrs, the old pages copied
        into their new places (but those at page indices ``fresh``, which fill
        writes whole), then ``fill(fd, index, covered, from_old)``; every page must
        be covered. Written under a temporary name, then renamed in."""
        index = images.sorted_index(layout) if index is None else index
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
                if fresh is not None:
                    old_idx[fresh] = -1
                self._copy_runs(cur.path, fd, old_idx)
            fill(fd, index, covered, from_old)
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

    def _write_pages(self, fd: int, idx: np.ndarray, data: bytes | np.ndarray,
                     what: str) -> None:
        """Write pages (bytes, or rows of PAGE_WORDS words) at page indices idx."""
        if bool((idx < 0).any()):
            raise CheckpointError(f"{what}: page at a vaddr outside the pagemap")
        if not idx.size:
            return
        view = (memoryview(np.ascontiguousarray(data).data).cast("B")
                if isinstance(data, np.ndarray) else memoryview(data))
        for start, first, n in images.page_runs(idx):
            self._hook(f"pwrite {what} @{first}+{n}")
            os.pwrite(fd, view[start * PAGE_SIZE : (start + n) * PAGE_SIZE], first * PAGE_SIZE)
        self.stats.pages_written += idx.size
        self.stats.bytes_applied += view.nbytes

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


def _read_sidecar(sidecar: Path) -> tuple[Vaddrs, np.ndarray]:
    """(vaddrs, pages) kept by _write_sidecar."""
    raw = sidecar.read_bytes()
    (n,) = np.frombuffer(raw[:8], dtype=VADDR_DTYPE)
    vaddrs = np.frombuffer(raw[8 : 8 + 8 * int(n)], dtype=VADDR_DTYPE).astype(np.uint64)
    data = raw[8 + 8 * int(n):]
    if len(data) != vaddrs.size * PAGE_SIZE:
        raise CheckpointError(f"{sidecar.name}: {len(data)} bytes for {vaddrs.size} pages")
    return vaddrs, np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE_WORDS)


def _from_layers(layers: list[tuple[Vaddrs, np.ndarray]],
                 vaddrs: Vaddrs) -> tuple[np.ndarray, np.ndarray]:
    """The newest version of ``vaddrs`` in ``layers`` (each sorted, newest last):
    (pages, positions in vaddrs that no layer holds; their rows are garbage)."""
    base = np.empty((vaddrs.size, PAGE_WORDS), dtype=np.uint64)
    need = np.ones(vaddrs.size, dtype=bool)
    for lv, lp in reversed(layers):
        want = np.flatnonzero(need)
        if not want.size:
            break
        if not lv.size:
            continue
        j = np.minimum(np.searchsorted(lv, vaddrs[want]), lv.size - 1)
        hit = lv[j] == vaddrs[want]
        base[want[hit]] = lp[j[hit]]
        need[want[hit]] = False
    return base, np.flatnonzero(need)


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
