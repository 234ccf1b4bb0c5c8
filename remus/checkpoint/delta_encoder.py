"""The memory delta encoder: what changed between two CRIU dumps of the same unit.

Each epoch's dump is compared by content with the previous epoch's dump,
page by page, keyed by virtual address (VMAs come and go between epochs, so
page offsets in pages-*.img shift). Without soft-dirty the dumps are full.
With soft-dirty, the primary dumps with CRIU memory tracking and the previous
dump as parent: only pages written since are in the pages file, the others
are PE_PARENT holes. The encoder then sends the present pages (still diffed,
which drops pages rewritten with the same bytes) and the *flattened*
pagemap (every page present), so the backup's image set never needs a
parent; the holes' content is what the backup already has from the base.

The chunks it yields are described in remus.checkpoint.delta.

Pages sent: those whose content differs from the page at the same vaddr in
the previous dump's same-named pagemap, plus pages at new vaddrs. Pages at
vaddrs that disappeared are dropped implicitly: the new pagemap file (sent
as KIND_FILE when it changed) gives the backup the new layout.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lz4.frame
import numpy as np
import numpy.typing as npt
import xxhash

from remus.checkpoint import images, pagemap, tcp_stream
from remus.checkpoint.delta import (
    BUNDLE_ENTRY,
    KIND_FILE,
    KIND_FILE_LZ4,
    KIND_FILES,
    KIND_MANIFEST,
    KIND_PAGES,
    KIND_PAGES_LZ4,
    KIND_PAGES_XOR,
    VADDR_DTYPE,
    XOR_DENSE_WORDS,
    Chunk,
    FileInfo,
    Manifest,
    PagemapInfo,
    encode_xor,
)
from remus.checkpoint.images import PAGE_SIZE, PAGE_WORDS, Vaddrs
from remus.checkpoint.tcp_stream import Span
from remus.errors import CheckpointError

try:  # the page loops in C (built by bin/setup; _pagexor.c says why)
    from remus.checkpoint import _pagexor
except ImportError:  # not built: the numpy loops below, same output
    _pagexor = None

log = logging.getLogger(__name__)

#: at most 4 MiB of page data per chunk
MAX_CHUNK_PAGES = 1024
#: pages compared per numpy operation; bounds temporaries to a few MiB
BLOCK_PAGES = 1024
#: files up to this size travel in KIND_FILES bundles of at most BUNDLE_BYTES
BUNDLE_FILE_MAX = 64 << 10
BUNDLE_BYTES = 1 << 20
#: pre_encode keeps pagemaps whose pages file is at most this big (the chunks
#: wait in memory until the dump completes)
EARLY_MAX_BYTES = 64 << 20

Rows = npt.NDArray[np.uint64]


@dataclass
class DeltaStats:
    """What the last encode() produced."""

    full: bool = False
    image_bytes: int = 0  # total bytes of all pages files (what a full dump would send)
    pages_total: int = 0
    pages_changed: int = 0
    page_bytes: int = 0  # raw page data sent
    pages_xor: int = 0  # of pages_changed, sent as XOR with the backup's version
    wire_page_bytes: int = 0  # page data as sent (after compression)
    file_bytes: int = 0
    files_sent: int = 0
    files_total: int = 0
    streams_carried: int = 0  # TCP stream images left at the backup (only the clock moved)
    seconds: float = 0.0
    per_pagemap: dict[str, int] = field(default_factory=dict)  # changed pages

    def absorb(self, other: DeltaStats) -> None:
        """Add the page counts of ``other`` (a pagemap encoded early) to these."""
        for k in ("image_bytes", "pages_total", "pages_changed", "page_bytes", "pages_xor",
                  "wire_page_bytes"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.per_pagemap.update(other.per_pagemap)


def map_rows(path: Path) -> Rows:
    """A read-only (pages, 512) uint64 view of a pages file, via mmap.

    Pre-faulting the whole file first (_populate) is ~30%
    faster than faulting 4 KiB at a time while comparing. The mapping lives
    as long as the returned array (or any view of it).
    """
    size = path.stat().st_size
    if size % PAGE_SIZE:
        raise CheckpointError(f"{path}: size {size} is not a multiple of {PAGE_SIZE}")
    if size == 0:
        return np.empty((0, PAGE_WORDS), dtype=np.uint64)
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    rows = np.frombuffer(mm, dtype=np.uint64).reshape(-1, PAGE_WORDS)
    _populate(rows.ctypes.data, size)
    return rows


MADV_POPULATE_READ = 22  # Linux >= 5.14
POPULATE_STEP = 16 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def _populate(addr: int, size: int) -> None:
    """Pre-fault a mapping without holding the GIL.

    One MAP_POPULATE of a 1 GiB pages file held the GIL for 80-150 ms (the
    mmap call does not release it), and so does mmap.madvise: a 16 MiB step
    of MADV_POPULATE_READ held it up to 41 ms on an idle machine, and 359 ms
    once while CRIU dumped 100 MiB and the reaper freed a 1 GiB file, long
    enough for the backup to find the primary silent and take over (the
    pause series' 1 GiB / 10 % point). libc's madvise through ctypes runs
    with the GIL released (another thread's wake-up was late by at most
    5 ms). Kernels without MADV_POPULATE_READ fault lazily while the pages
    are compared instead.
    """
    for off in range(0, size, POPULATE_STEP):
        if _libc.madvise(addr + off, min(POPULATE_STEP, size - off), MADV_POPULATE_READ):
            return


@dataclass
class _Prev:
    """What the encoder remembers of a pagemap of the previous dump."""

    layout: Vaddrs
    index: tuple[Vaddrs, npt.NDArray[np.intp]]
    pages_path: Path


@dataclass
class _Early:
    """A pagemap encoded while CRIU was still writing the rest of its dump."""

    parsed: pagemap.Pagemap
    flat: bytes | None  # the flattened pagemap of a tracked dump
    chunks: list[Chunk]
    info: FileInfo  # of its pages file
    prev: _Prev
    stats: DeltaStats


class DeltaEncoder:
    """Turns successive dumps of one unit into deltas (primary side).

    Contract:
    - encode(dir, full) yields the chunks of one epoch, KIND_MANIFEST last.
      The dump becomes the base of the next delta only once the iterator is
      exhausted; an abandoned iterator leaves the previous base in place.
    - The caller keeps the previous dump directory alive (unchanged) until
      the next encode() has returned its last chunk: page contents are
      compared against its pages files. After that it may be deleted.
    - The first encode after construction or reset() must be full
      (CheckpointError otherwise): there is nothing to diff against.
    - pre_encode(dir, pagemap) may encode one pagemap of a dump that CRIU is
      still writing, once that pagemap and its pages file are complete; the
      next encode(dir, full=False) against the same base sends the result
      instead of encoding it again. Anything else drops it.
    - Not thread-safe; one encoder per unit.
    """

    def __init__(self, compress: bool = False, block_pages: int = BLOCK_PAGES) -> None:
        self.compress = compress
        self.block_pages = block_pages
        self.stats = DeltaStats()
        self._prev_dir: Path | None = None
        self._prev_files: dict[str, FileInfo] = {}
        # TCP stream images of the previous dump: bytes, timestamp span (see tcp_stream)
        self._prev_streams: dict[str, tuple[bytes, Span | None]] = {}
        self._prev_maps: dict[str, _Prev] = {}
        # Bundled streams (CRIU patch 0008), by inode: the previous dump's image
        # and timestamp span, and what the backup holds (see _held_bundle).
        self._prev_records: dict[int, tuple[bytes, Span | None]] = {}
        self._prev_held: dict[int, tcp_stream.HeldStream] = {}
        # pre_encode's results, for (dump dir, base dir)
        self._early: dict[str, _Early] = {}
        self._early_key: tuple[Path, Path] | None = None

    @property
    def base_dir(self) -> Path | None:
        """The dump the next delta is computed against (None after reset)."""
        return self._prev_dir

    def reset(self) -> None:
        """Forget the previous dump; the next encode() must be full."""
        self._prev_dir = None
        self._prev_files = {}
        self._prev_maps = {}
        self._prev_streams = {}
        self._prev_records, self._prev_held = {}, {}
        self.drop_early()

    def drop_early(self) -> None:
        """Forget what pre_encode kept (its dump failed or will not be sent)."""
        self._early, self._early_key = {}, None

    def pre_encode(self, dump_dir: Path, name: str, max_bytes: int = EARLY_MAX_BYTES) -> bool:
        """Encode pagemap ``name`` of ``dump_dir`` now: CRIU has closed it (and its
        pages file, which it closes first) but is still dumping the rest, with
        the unit frozen. The chunks wait in memory for encode(). False (nothing
        kept) when there is no base, the pages file is over ``max_bytes``, or
        the pagemap cannot be encoded early for any reason: encode() then does
        the work (and reports the error, if there is one).
        """
        base = self._prev_dir
        if base is None:
            return False
        if self._early_key != (dump_dir, base):
            self._early, self._early_key = {}, (dump_dir, base)
        saved, self.stats = self.stats, DeltaStats()
        try:
            pm = pagemap.read_pagemap(dump_dir / name)
            if os.stat(dump_dir / pm.pages_name).st_size > max_bytes:
                return False
            gen = self._pagemap_result(name, pm, dump_dir, full=False)
            chunks: list[Chunk] = []
            while True:
                try:
                    chunks.append(next(gen))
                except StopIteration as done:
                    info, prev = done.value
                    break
            flat = pm.flattened() if pm.has_parent else None
            self._early[name] = _Early(pm, flat, chunks, info, prev, self.stats)
            return True
        except (CheckpointError, OSError, ValueError) as e:
            log.debug("%s/%s not encoded early: %s", dump_dir, name, e)
            return False
        finally:
            self.stats = saved

    def _take_early(self, dump_dir: Path, full: bool) -> dict[str, _Early]:
        early, key = self._early, self._early_key
        self.drop_early()
        return early if not full and key == (dump_dir, self._prev_dir) else {}

    def check_base(self, dump_dir: Path, full: bool, parent: Path | None) -> None:
        """CheckpointError unless encode(dump_dir, full, parent) can produce a delta.

        ``parent``: the dump that ``dump_dir`` was tracked against (CRIU
        --track-mem with parent images), None for an untracked dump. A
        tracked dump's PE_PARENT holes are only known to the backup if the
        parent is exactly the delta base, and never in a full checkpoint.
        Cheap; call it before announcing the epoch.
        """
        if parent is None:
            return
        if full:
            raise CheckpointError(f"{dump_dir}: a tracked dump (with parent holes) cannot be "
                                  "sent as a full checkpoint; dump again without a parent")
        base = self._prev_dir
        if base is None or os.path.normpath(parent) != os.path.normpath(base):
            raise CheckpointError(f"{dump_dir}: tracked against {parent}, but the delta base is "
                                  f"{base}; dump again without a parent")

    def encode(self, dump_dir: Path, full: bool, parent: Path | None = None) -> Iterator[Chunk]:
        """Yield the chunks of the checkpoint in ``dump_dir`` (see module doc)."""
        if not full and self._prev_dir is None:
            raise CheckpointError("no previous dump to diff against: encode a full checkpoint")
        t0 = time.perf_counter()
        stats = DeltaStats(full=full)
        self.stats = stats
        names = images.list_images(dump_dir)
        files: dict[str, FileInfo] = {}
        maps: dict[str, _Prev] = {}
        early = self._take_early(dump_dir, full)
        parsed = {n: early[n].parsed if n in early else pagemap.read_pagemap(dump_dir / n)
                  for n in names if images.is_pagemap(n)}
        tracked = {n for n, pm in parsed.items() if pm.has_parent}
        if tracked and parent is None:
            raise CheckpointError(f"{dump_dir}: has parent holes, but no parent was given")
        self.check_base(dump_dir, full, parent)
        pagemaps = {
            n: PagemapInfo(pm.pages_name, pm.nr_full if n in tracked else pm.nr_present)
            for n, pm in parsed.items()
        }
        pages_names = {info.pages for info in pagemaps.values()}
        bundle = _Bundle()
        streams: dict[str, tuple[bytes, Span | None]] = {}
        records: dict[int, tuple[bytes, Span | None]] = {}  # bundled, as _prev_records
        held_streams: dict[int, tcp_stream.HeldStream] = {}  # as _prev_held
        for name in names:
            if name in pages_names:
                continue
            # A tracked dump's pagemap goes out flattened (see module doc).
            flat = early[name].flat if name in early else None
            if flat is not None:
                data = flat
            else:
                data = (parsed[name].flattened() if name in tracked
                        else images.read_image(os.path.join(dump_dir, name)))
            if name == tcp_stream.RAW_BUNDLE:
                held = self._held_bundle(data, full, os.stat(dump_dir / name).st_mtime_ns,
                                         records, held_streams)
                if held is None:  # every stream carried: the backup's copy stands
                    files[tcp_stream.HELD_BUNDLE] = self._prev_files[tcp_stream.HELD_BUNDLE]
                    continue
                name, data = tcp_stream.HELD_BUNDLE, held
            elif tcp_stream.is_tcp_stream(name):
                kept = None if full else self._carry_stream(name, data)
                streams[name] = (data, kept)
                if kept is not None:
                    # Only the clock moved: the backup keeps its copy, the takeover
                    # moves the clock on (tcp_stream.advance_timestamps).
                    files[name] = self._prev_files[name]
                    stats.streams_carried += 1
                    continue
            info = FileInfo(len(data), xxhash.xxh3_64_hexdigest(data))
            files[name] = info
            if full or self._prev_files.get(name) != info:
                stats.files_sent += 1
                stats.file_bytes += len(data)
                if len(data) > BUNDLE_FILE_MAX and self.compress:
                    # e.g. the TCP streams: the requests and replies in socket queues
                    yield (KIND_FILE_LZ4, name, b"",
                           lz4.frame.compress(data, block_linked=False, content_checksum=False))
                elif len(data) > BUNDLE_FILE_MAX:
                    yield (KIND_FILE, name, b"", data)
                elif bundle.add(name, data) >= BUNDLE_BYTES:
                    yield bundle.take()
        if bundle:
            yield bundle.take()
        stats.files_total = len(files)
        for name, pinfo in pagemaps.items():
            if name in early:
                yield from early[name].chunks
                stats.absorb(early[name].stats)
                files[pinfo.pages], maps[name] = early[name].info, early[name].prev
                continue
            files[pinfo.pages], maps[name] = yield from self._pagemap_result(
                name, parsed[name], dump_dir, full)
        for name in names:
            if images.is_pages(name) and name not in files:
                log.warning("%s: pages file %s belongs to no pagemap; ignored", dump_dir, name)
        stats.seconds = time.perf_counter() - t0
        yield (KIND_MANIFEST, "manifest", Manifest(full, files, pagemaps).to_json(), b"")
        self._prev_dir, self._prev_files, self._prev_maps = dump_dir, files, maps
        self._prev_streams = streams
        self._prev_held, self._prev_records = held_streams, records
        log.debug(
            "encoded %s: %d/%d pages, %d files, %.1f ms",
            dump_dir, stats.pages_changed, stats.pages_total, stats.files_sent,
            stats.seconds * 1e3,
        )

    def _held_bundle(self, raw: bytes, full: bool, dumped_ns: int,
                     records: dict[int, tuple[bytes, Span | None]],
                     held_streams: dict[int, tcp_stream.HeldStream]) -> bytes | None:
        """The held bundle for the backup from a dump's raw one; None when the
        backup's copy stands as it is (every stream in it only had its clock move,
        and no stream came or went). Fills ``records`` and ``held_streams``, which
        become _prev_records and _prev_held once the encode completes.

        Per stream the same rule as _carry_stream: an image that differs from the
        previous dump's only in its timestamp is carried (the backup keeps its copy
        and its dump time), anything else is held anew with this dump's time.
        """
        changed = full or tcp_stream.HELD_BUNDLE not in self._prev_files
        dumped_ms = dumped_ns // 1_000_000
        for ino, image in tcp_stream.parse_raw_bundle(raw):
            if ino in records:
                raise CheckpointError(f"{tcp_stream.RAW_BUNDLE}: inode {ino} twice")
            prev, held = self._prev_records.get(ino), self._prev_held.get(ino)
            span = None
            if not full and prev is not None and held is not None and len(held.image) == len(image):
                span = tcp_stream.timestamp_only_change(prev[0], image, prev[1])
            records[ino] = (image, span)
            if span is not None and held is not None:
                held_streams[ino] = held
                self.stats.streams_carried += 1
            else:
                held_streams[ino] = tcp_stream.HeldStream(ino, image, dumped_ms)
                changed = True
        # dicts keep the dump order: the same streams in the same order, or a new file
        if not changed and list(held_streams) == list(self._prev_held):
            return None
        return tcp_stream.build_held(list(held_streams.values()), time.time_ns() // 1_000_000)

    def _carry_stream(self, name: str, data: bytes) -> Span | None:
        """The timestamp span if ``data`` differs from the backup's copy of this TCP
        stream image only in its timestamp (see tcp_stream), else None.

        The previous dump's image is either what the backup has, or was itself
        carried (so it differs from the backup's only in the timestamp): by
        induction the same holds for this one when it differs from the previous
        only there. The sizes must match the backup's copy too.
        """
        prev = self._prev_streams.get(name)
        held = self._prev_files.get(name)
        if prev is None or held is None or held.size != len(data):
            return None
        return tcp_stream.timestamp_only_change(prev[0], data, prev[1])

    def _pagemap_result(self, name: str, pm: pagemap.Pagemap, dump_dir: Path,
                        full: bool) -> Generator[Chunk, None, tuple[FileInfo, _Prev]]:
        """Yield the page chunks of pagemap ``name``; return its pages file's
        FileInfo and what the next encode compares against."""
        layout = pm.layout()
        pages_path = dump_dir / pm.pages_name
        if not pm.has_parent:
            info = yield from self._encode_pagemap(name, layout, pages_path, full)
        else:
            # The holes' data is in older dumps: size known, digest not.
            yield from self._encode_pagemap(name, layout, pages_path, full, digest=False)
            whole = pm.nr_full
            holes = whole - layout.size
            self.stats.pages_total += holes
            self.stats.image_bytes += holes * PAGE_SIZE
            info = FileInfo(whole * PAGE_SIZE, "")
        return info, _Prev(layout, images.sorted_index(layout), pages_path)

    def _encode_pagemap(
        self, name: str, layout: Vaddrs, pages_path: Path, full: bool, digest: bool = True
    ) -> Generator[Chunk, None, FileInfo]:
        """Yield the page chunks of one pagemap; return its pages file's FileInfo
        (without a digest when ``digest`` is False)."""
        rows = map_rows(pages_path)
        if rows.shape[0] != layout.size:
            raise CheckpointError(
                f"{pages_path}: {rows.shape[0]} pages for {layout.size} in {name}"
            )
        prev = None if full else self._prev_maps.get(name)
        old_rows = map_rows(prev.pages_path) if prev is not None else None
        same_layout = prev is not None and np.array_equal(prev.layout, layout)
        hasher = xxhash.xxh3_64() if digest else None
        # Changed pages wait here until a chunk is full: those the backup holds a
        # version of (their row in old_rows) go out as XOR, new ones as they are.
        xor_sel: list[npt.NDArray[np.intp]] = []
        xor_base: list[npt.NDArray[np.intp]] = []
        new_sel: list[npt.NDArray[np.intp]] = []
        changed_total = 0
        use_xor = self.compress and old_rows is not None
        for start in range(0, layout.size, self.block_pages):
            stop = min(start + self.block_pages, layout.size)
            block = rows[start:stop]
            if hasher is not None:
                hasher.update(block.data)
            if prev is None or old_rows is None:
                changed = np.arange(start, stop, dtype=np.intp)
                new_sel.append(changed)
            else:
                rel, base = _changed_rows(block, layout[start:stop], prev, old_rows, same_layout,
                                          start)
                changed = start + rel
                held = base >= 0 if use_xor else np.zeros(changed.size, dtype=bool)
                xor_sel.append(changed[held])
                xor_base.append(base[held])
                new_sel.append(changed[~held])
            changed_total += changed.size
            while _count(xor_sel) >= MAX_CHUNK_PAGES:
                sel, xor_sel = _split(xor_sel)
                bases, xor_base = _split(xor_base)
                yield from self._xor_chunks(name, layout, rows, old_rows, sel, bases)
            while _count(new_sel) >= MAX_CHUNK_PAGES:
                sel, new_sel = _split(new_sel)
                yield self._chunk(name, layout, rows, sel)
        if _count(xor_sel):
            yield from self._xor_chunks(name, layout, rows, old_rows,
                                        np.concatenate(xor_sel), np.concatenate(xor_base))
        if _count(new_sel):
            yield self._chunk(name, layout, rows, np.concatenate(new_sel))
        self.stats.pages_total += layout.size
        self.stats.image_bytes += layout.size * PAGE_SIZE
        self.stats.pages_changed += changed_total
        self.stats.per_pagemap[name] = changed_total
        return FileInfo(layout.size * PAGE_SIZE, hasher.hexdigest() if hasher else "")

    def _chunk(self, name: str, layout: Vaddrs, rows: Rows, sel: npt.NDArray[np.intp]) -> Chunk:
        meta = layout[sel].astype(VADDR_DTYPE).tobytes()
        data = rows[sel].tobytes()
        self.stats.page_bytes += len(data)
        if self.compress:
            # Independent blocks, no content checksum (the frames carry MACs): ~15 % faster.
            data = lz4.frame.compress(data, block_linked=False, content_checksum=False)
            self.stats.wire_page_bytes += len(data)
            return (KIND_PAGES_LZ4, name, meta, data)
        self.stats.wire_page_bytes += len(data)
        return (KIND_PAGES, name, meta, data)

    def _xor_chunks(self, name: str, layout: Vaddrs, rows: Rows, old_rows: Rows | None,
                    sel: npt.NDArray[np.intp], base: npt.NDArray[np.intp]) -> list[Chunk]:
        """Pages the backup holds a version of (the page at the same vaddr in the
        base dump): as sparse XOR with that version (delta.KIND_PAGES_XOR), those
        that changed in most of their words as they are."""
        assert old_rows is not None  # XOR pages only where there is a base
        dense, data = _xor_pages(rows, old_rows, sel, base)
        out = []
        if bool(dense.any()):
            out.append(self._chunk(name, layout, rows, sel[dense]))
            sel = sel[~dense]
        if sel.size:
            self.stats.page_bytes += sel.size * PAGE_SIZE
            self.stats.wire_page_bytes += len(data)
            self.stats.pages_xor += sel.size
            out.append((KIND_PAGES_XOR, name, layout[sel].astype(VADDR_DTYPE).tobytes(), data))
        return out


def _xor_pages(rows: Rows, old_rows: Rows, sel: npt.NDArray[np.intp],
               base: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.bool_], bytes]:
    """For each page rows[sel[k]], whether it changed in more than XOR_DENSE_WORDS
    words since old_rows[base[k]]; and the XOR of the others with their old
    version, as a KIND_PAGES_XOR body."""
    if _pagexor is not None:
        dense_raw, data, _ = _pagexor.xor_sparse(rows, old_rows, _i64(sel), _i64(base),
                                                 XOR_DENSE_WORDS)
        return np.frombuffer(dense_raw, dtype=np.bool_), data
    x = np.bitwise_xor(rows[sel], old_rows[base])
    dense = np.count_nonzero(x, axis=1) > XOR_DENSE_WORDS
    return dense, encode_xor(x[~dense])


def _i64(a: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
    return np.ascontiguousarray(a, dtype=np.int64)


def _differing(new: Rows, old: Rows) -> npt.NDArray[np.intp]:
    """Rows of new that differ from the same row of old."""
    if _pagexor is not None:
        return np.frombuffer(_pagexor.changed_rows(new, old), dtype=np.intp)
    return np.flatnonzero((new != old).any(axis=1))


def _count(parts: list[npt.NDArray[np.intp]]) -> int:
    return sum(p.size for p in parts)


def _split(parts: list[npt.NDArray[np.intp]]) -> tuple[npt.NDArray[np.intp],
                                                       list[npt.NDArray[np.intp]]]:
    """The first MAX_CHUNK_PAGES entries, and the rest as a one-part list."""
    whole = np.concatenate(parts)
    return whole[:MAX_CHUNK_PAGES], [whole[MAX_CHUNK_PAGES:]]


class _Bundle:
    """Small files collected into one KIND_FILES chunk (see remus.checkpoint.delta)."""

    def __init__(self) -> None:
        self._meta: list[bytes] = []
        self._data: list[bytes] = []
        self._size = 0

    def __bool__(self) -> bool:
        return bool(self._meta)

    def add(self, name: str, data: bytes) -> int:
        """Add a file; returns the bundle's data size so far."""
        raw = name.encode()
        self._meta.append(BUNDLE_ENTRY.pack(len(raw), len(data)) + raw)
        self._data.append(data)
        self._size += len(data)
        return self._size

    def take(self) -> Chunk:
        chunk = (KIND_FILES, "", b"".join(self._meta), b"".join(self._data))
        self._meta, self._data, self._size = [], [], 0
        return chunk


def _changed_rows(
    block: Rows, vaddrs: Vaddrs, prev: _Prev, old_rows: Rows, same_layout: bool, start: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Indices (relative to the block) of pages that are new or differ, and for
    each its row in old_rows (the previous version, which the backup holds), -1
    for a new page."""
    if same_layout:
        rel = _differing(block, old_rows[start : start + block.shape[0]])
        return rel, start + rel
    idx = images.lookup(prev.index, vaddrs)
    matched = idx >= 0
    if bool(matched.all()) and _contiguous(idx):
        # a shifted but unbroken run of the old file: slice, don't gather
        rel = _differing(block, old_rows[int(idx[0]) : int(idx[-1]) + 1])
        return rel, int(idx[0]) + rel
    if _pagexor is not None:
        rel = np.frombuffer(_pagexor.changed_rows(block, old_rows, _i64(idx)), dtype=np.intp)
        return rel, idx[rel]
    differs = ~matched
    if bool(matched.any()):
        differs[matched] = (block[matched] != old_rows[idx[matched]]).any(axis=1)
    rel = np.flatnonzero(differs)
    return rel, idx[rel]


def _contiguous(idx: npt.NDArray[np.intp]) -> bool:
    return idx.size == 0 or (
        int(idx[-1]) - int(idx[0]) == idx.size - 1 and bool((np.diff(idx) == 1).all())
    )

