"""Memory deltas: what changed between two CRIU dumps of the same unit.

Each epoch's dump is compared by content with the previous epoch's dump,
page by page, keyed by virtual address (VMAs come and go between epochs, so
page offsets in pages-*.img shift). Without soft-dirty the dumps are full.
With soft-dirty, the primary dumps with CRIU memory tracking and the previous
dump as parent: only pages written since are in the pages file, the others
are PE_PARENT holes. The encoder then sends the present pages (still diffed,
which drops pages rewritten with the same bytes) and the *flattened*
pagemap (every page present), so the backup's image set never needs a
parent; the holes' content is what the backup already has from the base.

A delta is a sequence of chunks ``(kind, name, meta, data)``:

- KIND_FILE: ``name`` is an image file name, ``data`` its whole content.
  Sent for every non-pages file whose content differs from the previous
  dump's file of the same name (always, for a full checkpoint).
- KIND_PAGES: ``name`` is a pagemap file name ("pagemap-42.img",
  "pagemap-shmem-1234.img"); ``meta`` is a little-endian u64 array of the
  vaddrs of the pages in ``data``; ``data`` is those pages, 4096 bytes
  each. At most MAX_CHUNK_PAGES pages per chunk.
- KIND_PAGES_LZ4: the same with ``data`` lz4-frame compressed.
- KIND_FILES: several small KIND_FILE chunks in one (a dump of a server with
  a thousand connections has a thousand small socket images every epoch, and
  each chunk costs a frame, a MAC and a redo record). ``meta`` is, per file,
  u16 name length + u32 data length + the name; ``data`` is the files'
  contents, concatenated in the same order. The store unpacks it into
  KIND_FILE records (``unbundle``), so the redo log never holds one.
- KIND_MANIFEST: the last chunk of every epoch; ``meta`` is JSON describing
  the complete image set (see Manifest). Files absent from it are gone.
- Kinds from KIND_DISK_FIRST (16) on are reserved for disk deltas; the
  checkpoint store routes them to handlers registered for them.

Pages sent: those whose content differs from the page at the same vaddr in
the previous dump's same-named pagemap, plus pages at new vaddrs. Pages at
vaddrs that disappeared are dropped implicitly: the new pagemap file (sent
as KIND_FILE when it changed) gives the backup the new layout.

The end of the module holds the redo log, the same chunks at rest: the
backup's store appends every received chunk of an epoch to one and commits
the epoch by renaming it (see remus.checkpoint.store).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lz4.frame
import numpy as np
import numpy.typing as npt
import xxhash

from remus.checkpoint import images, tcp_stream
from remus.checkpoint.images import PAGE_SIZE, PAGE_WORDS, Vaddrs
from remus.checkpoint.tcp_stream import Span
from remus.errors import CheckpointError, ProtocolError

log = logging.getLogger(__name__)

KIND_FILE = 1
KIND_PAGES = 2
KIND_PAGES_LZ4 = 3
KIND_MANIFEST = 4
KIND_FILES = 5
#: first kind reserved for disk deltas (16 and up)
KIND_DISK_FIRST = 16

#: at most 4 MiB of page data per chunk
MAX_CHUNK_PAGES = 1024
#: pages compared per numpy operation; bounds temporaries to a few MiB
BLOCK_PAGES = 1024
#: files up to this size travel in KIND_FILES bundles of at most BUNDLE_BYTES
BUNDLE_FILE_MAX = 64 << 10
BUNDLE_BYTES = 1 << 20
_BUNDLE_ENTRY = struct.Struct("<HI")

Chunk = tuple[int, str, bytes, bytes]
Rows = npt.NDArray[np.uint64]

_VADDR_DTYPE = np.dtype("<u8")


@dataclass(frozen=True)
class FileInfo:
    size: int
    xxh3: str


@dataclass(frozen=True)
class PagemapInfo:
    pages: str
    nr_pages: int


@dataclass(frozen=True)
class Manifest:
    """The complete image set of one checkpoint.

    ``files`` lists every image file (pagemaps and pages files included)
    with its size and xxh3_64 hex digest; ``pagemaps`` maps each pagemap
    file to the name of its pages file and its number of present pages.
    """

    full: bool
    files: dict[str, FileInfo]
    pagemaps: dict[str, PagemapInfo]

    def to_json(self) -> bytes:
        doc = {
            "version": 1,
            "full": self.full,
            "files": {n: {"size": f.size, "xxh3": f.xxh3} for n, f in self.files.items()},
            "pagemaps": {
                n: {"pages": p.pages, "nr_pages": p.nr_pages} for n, p in self.pagemaps.items()
            },
        }
        return json.dumps(doc, sort_keys=True).encode()

    def validated(self) -> Manifest:
        """Self, after checking names (a manifest comes from the network)."""
        for name in self.files:
            if not images.is_pages(name):
                check_file_name(name)
        for name, info in self.pagemaps.items():
            if not images.is_pagemap(name) or not images.is_pages(info.pages):
                raise ProtocolError(f"bad pagemap entry {name!r} -> {info.pages!r}")
            if name not in self.files or info.pages not in self.files:
                raise ProtocolError(f"manifest lacks the files of {name}")
        return self

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("version") != 1:
                raise ProtocolError(f"unknown manifest version {doc.get('version')!r}")
            return cls(
                full=bool(doc["full"]),
                files={
                    n: FileInfo(int(f["size"]), str(f["xxh3"])) for n, f in doc["files"].items()
                },
                pagemaps={
                    n: PagemapInfo(str(p["pages"]), int(p["nr_pages"]))
                    for n, p in doc["pagemaps"].items()
                },
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProtocolError(f"malformed manifest: {e}") from e


@dataclass
class DeltaStats:
    """What the last encode() produced."""

    full: bool = False
    image_bytes: int = 0  # total bytes of all pages files (what a full dump would send)
    pages_total: int = 0
    pages_changed: int = 0
    page_bytes: int = 0  # raw page data sent
    wire_page_bytes: int = 0  # page data as sent (after compression)
    file_bytes: int = 0
    files_sent: int = 0
    files_total: int = 0
    streams_carried: int = 0  # TCP stream images left at the backup (only the clock moved)
    seconds: float = 0.0
    per_pagemap: dict[str, int] = field(default_factory=dict)  # changed pages


def decode_pages(kind: int, meta: bytes, data: bytes) -> tuple[Vaddrs, bytes]:
    """(vaddrs, raw page bytes) of a KIND_PAGES / KIND_PAGES_LZ4 chunk."""
    if kind == KIND_PAGES_LZ4:
        try:
            data = lz4.frame.decompress(data)
        except RuntimeError as e:
            raise ProtocolError(f"bad lz4 page chunk: {e}") from e
    elif kind != KIND_PAGES:
        raise ProtocolError(f"not a page chunk: kind {kind}")
    if len(meta) % 8:
        raise ProtocolError("page chunk meta is not a u64 array")
    vaddrs = np.frombuffer(meta, dtype=_VADDR_DTYPE).astype(np.uint64)
    if len(data) != vaddrs.size * PAGE_SIZE:
        raise ProtocolError(f"page chunk has {len(data)} bytes for {vaddrs.size} pages")
    return vaddrs, data


def map_rows(path: Path) -> Rows:
    """A read-only (pages, 512) uint64 view of a pages file, via mmap.

    MAP_POPULATE pre-faults the whole file in one syscall, which is ~30%
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
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint64).reshape(-1, PAGE_WORDS)


@dataclass
class _Prev:
    """What the encoder remembers of a pagemap of the previous dump."""

    layout: Vaddrs
    index: tuple[Vaddrs, npt.NDArray[np.intp]]
    pages_path: Path


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
        parsed = {n: images.read_pagemap(dump_dir / n) for n in names if images.is_pagemap(n)}
        full_layouts = {n: pm.full_layout() for n, pm in parsed.items() if pm.has_parent}
        if full_layouts and parent is None:
            raise CheckpointError(f"{dump_dir}: has parent holes, but no parent was given")
        self.check_base(dump_dir, full, parent)
        pagemaps = {
            n: PagemapInfo(pm.pages_name, full_layouts[n].size if n in full_layouts else pm.nr_present)
            for n, pm in parsed.items()
        }
        pages_names = {info.pages for info in pagemaps.values()}
        bundle = _Bundle()
        streams: dict[str, tuple[bytes, Span | None]] = {}
        for name in names:
            if name in pages_names:
                continue
            # A tracked dump's pagemap goes out flattened (see module doc).
            data = (parsed[name].flattened() if name in full_layouts
                    else images.read_image(os.path.join(dump_dir, name)))
            if tcp_stream.is_tcp_stream(name):
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
                if len(data) > BUNDLE_FILE_MAX:
                    yield (KIND_FILE, name, b"", data)
                elif bundle.add(name, data) >= BUNDLE_BYTES:
                    yield bundle.take()
        if bundle:
            yield bundle.take()
        stats.files_total = len(files)
        for name, pinfo in pagemaps.items():
            layout = parsed[name].layout()
            pages_path = dump_dir / pinfo.pages
            files[pinfo.pages] = yield from self._encode_pagemap(name, layout, pages_path, full)
            if name in full_layouts:
                # The holes' data is in older dumps: size known, digest not.
                holes = full_layouts[name].size - layout.size
                stats.pages_total += holes
                stats.image_bytes += holes * PAGE_SIZE
                files[pinfo.pages] = FileInfo(full_layouts[name].size * PAGE_SIZE, "")
            maps[name] = _Prev(layout, images.sorted_index(layout), pages_path)
        for name in names:
            if images.is_pages(name) and name not in files:
                log.warning("%s: pages file %s belongs to no pagemap; ignored", dump_dir, name)
        stats.seconds = time.perf_counter() - t0
        yield (KIND_MANIFEST, "manifest", Manifest(full, files, pagemaps).to_json(), b"")
        self._prev_dir, self._prev_files, self._prev_maps = dump_dir, files, maps
        self._prev_streams = streams
        log.debug(
            "encoded %s: %d/%d pages, %d files, %.1f ms",
            dump_dir, stats.pages_changed, stats.pages_total, stats.files_sent,
            stats.seconds * 1e3,
        )

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

    def _encode_pagemap(
        self, name: str, layout: Vaddrs, pages_path: Path, full: bool
    ) -> Generator[Chunk, None, FileInfo]:
        """Yield the page chunks of one pagemap; return its pages file's FileInfo."""
        rows = map_rows(pages_path)
        if rows.shape[0] != layout.size:
            raise CheckpointError(
                f"{pages_path}: {rows.shape[0]} pages for {layout.size} in {name}"
            )
        prev = None if full else self._prev_maps.get(name)
        old_rows = map_rows(prev.pages_path) if prev is not None else None
        same_layout = prev is not None and np.array_equal(prev.layout, layout)
        digest = xxhash.xxh3_64()
        pending: list[npt.NDArray[np.intp]] = []
        npending = 0
        changed_total = 0
        for start in range(0, layout.size, self.block_pages):
            stop = min(start + self.block_pages, layout.size)
            block = rows[start:stop]
            digest.update(block.data)
            if prev is None or old_rows is None:
                changed = np.arange(start, stop, dtype=np.intp)
            else:
                changed = start + _changed_rows(
                    block, layout[start:stop], prev, old_rows, same_layout, start
                )
            if changed.size:
                pending.append(changed)
                npending += changed.size
                changed_total += changed.size
            while npending >= MAX_CHUNK_PAGES:
                sel = np.concatenate(pending)
                yield self._chunk(name, layout, rows, sel[:MAX_CHUNK_PAGES])
                pending = [sel[MAX_CHUNK_PAGES:]]
                npending = pending[0].size
        if npending:
            yield self._chunk(name, layout, rows, np.concatenate(pending))
        self.stats.pages_total += layout.size
        self.stats.image_bytes += layout.size * PAGE_SIZE
        self.stats.pages_changed += changed_total
        self.stats.per_pagemap[name] = changed_total
        return FileInfo(layout.size * PAGE_SIZE, digest.hexdigest())

    def _chunk(self, name: str, layout: Vaddrs, rows: Rows, sel: npt.NDArray[np.intp]) -> Chunk:
        meta = layout[sel].astype(_VADDR_DTYPE).tobytes()
        data = rows[sel].tobytes()
        self.stats.page_bytes += len(data)
        if self.compress:
            # Independent blocks, no content checksum (the frames carry MACs): ~15 % faster.
            data = lz4.frame.compress(data, block_linked=False, content_checksum=False)
            self.stats.wire_page_bytes += len(data)
            return (KIND_PAGES_LZ4, name, meta, data)
        self.stats.wire_page_bytes += len(data)
        return (KIND_PAGES, name, meta, data)


class _Bundle:
    """Small files collected into one KIND_FILES chunk (see module doc)."""

    def __init__(self) -> None:
        self._meta: list[bytes] = []
        self._data: list[bytes] = []
        self._size = 0

    def __bool__(self) -> bool:
        return bool(self._meta)

    def add(self, name: str, data: bytes) -> int:
        """Add a file; returns the bundle's data size so far."""
        raw = name.encode()
        self._meta.append(_BUNDLE_ENTRY.pack(len(raw), len(data)) + raw)
        self._data.append(data)
        self._size += len(data)
        return self._size

    def take(self) -> Chunk:
        chunk = (KIND_FILES, "", b"".join(self._meta), b"".join(self._data))
        self._meta, self._data, self._size = [], [], 0
        return chunk


def unbundle(meta: bytes, data: bytes) -> list[tuple[str, bytes]]:
    """(name, data) of each file of a KIND_FILES chunk; ProtocolError if malformed
    (names are checked as check_file_name does)."""
    out: list[tuple[str, bytes]] = []
    pos = off = 0
    view = memoryview(data)
    try:
        while pos < len(meta):
            nlen, dlen = _BUNDLE_ENTRY.unpack_from(meta, pos)
            pos += _BUNDLE_ENTRY.size
            if pos + nlen > len(meta) or off + dlen > len(data):
                raise ProtocolError("truncated file bundle")
            name = meta[pos : pos + nlen].decode()
            pos += nlen
            check_file_name(name)
            out.append((name, bytes(view[off : off + dlen])))
            off += dlen
    except (struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed file bundle: {e}") from e
    if off != len(data):
        raise ProtocolError(f"file bundle has {len(data) - off} bytes that belong to no file")
    return out


def files_of(chunk: Chunk) -> list[tuple[str, bytes]]:
    """(name, data) of the image files a KIND_FILE or KIND_FILES chunk carries."""
    kind, name, meta, data = chunk
    if kind == KIND_FILE:
        return [(name, data)]
    if kind == KIND_FILES:
        return unbundle(meta, data)
    return []


def _changed_rows(
    block: Rows, vaddrs: Vaddrs, prev: _Prev, old_rows: Rows, same_layout: bool, start: int
) -> npt.NDArray[np.intp]:
    """Indices (relative to the block) of pages that are new or differ."""
    if same_layout:
        old = old_rows[start : start + block.shape[0]]
        return np.flatnonzero((block != old).any(axis=1))
    idx = images.lookup(prev.index, vaddrs)
    matched = idx >= 0
    if bool(matched.all()) and _contiguous(idx):
        # a shifted but unbroken run of the old file: slice, don't gather
        old = old_rows[int(idx[0]) : int(idx[-1]) + 1]
        return np.flatnonzero((block != old).any(axis=1))
    differs = ~matched
    if bool(matched.any()):
        differs[matched] = (block[matched] != old_rows[idx[matched]]).any(axis=1)
    return np.flatnonzero(differs)


def _contiguous(idx: npt.NDArray[np.intp]) -> bool:
    return idx.size == 0 or (
        int(idx[-1]) - int(idx[0]) == idx.size - 1 and bool((np.diff(idx) == 1).all())
    )


def check_file_name(name: str) -> None:
    """ProtocolError unless ``name`` is a plain image file name (no path, no pages file)."""
    if (
        not name
        or "/" in name
        or "\0" in name
        or name.startswith(".")
        or images.is_pages(name)
    ):
        raise ProtocolError(f"bad image file name {name!r}")


# ---- the redo log: a delta at rest (written by the backup's store) ----

_LOG_MAGIC = b"RMSREDO1"
_HDR = struct.Struct("<8sqqq?")  # magic, generation, epoch, base epoch, full
_REC = struct.Struct("<HHIQ")  # kind, name length, meta length, data length
_KIND_END = 0  # trailer written by commit: a log without it is torn
_COUNT = struct.Struct("<Q")


@dataclass(frozen=True)
class LogHeader:
    generation: int
    epoch: int
    base: int
    full: bool

    @property
    def position(self) -> tuple[int, int]:
        return (self.generation, self.epoch)


@dataclass(frozen=True)
class Record:
    """One record of an epoch, as received."""

    kind: int
    name: str
    meta: bytes
    data: bytes


@dataclass(frozen=True)
class LogRecord:
    """A record of a redo log whose data stays on disk until asked for."""

    kind: int
    name: str
    meta: bytes
    offset: int
    length: int


class RedoWriter:
    """Appends records to a redo log: header, records, END trailer."""

    def __init__(self, path: Path, header: LogHeader) -> None:
        self.path = path
        self._f = open(path, "wb")  # closed by close() or discard()
        self._f.write(
            _HDR.pack(_LOG_MAGIC, header.generation, header.epoch, header.base, header.full)
        )
        self._count = 0

    def append(self, r: Record) -> None:
        name = r.name.encode()
        self._f.write(_REC.pack(r.kind, len(name), len(r.meta), len(r.data)))
        self._f.write(name)
        self._f.write(r.meta)
        self._f.write(r.data)
        self._count += 1

    def close(self, fsync: bool) -> None:
        self._f.write(_REC.pack(_KIND_END, 0, _COUNT.size, 0) + _COUNT.pack(self._count))
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())
        self._f.close()

    def discard(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


class RedoLog:
    """A committed redo log, indexed; record data is read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = self.read_header(path)
        self.records: list[LogRecord] = []
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._index()
        except BaseException:
            os.close(self._fd)
            raise

    @staticmethod
    def read_header(path: Path) -> LogHeader:
        with open(path, "rb") as f:
            raw = f.read(_HDR.size)
        if len(raw) != _HDR.size or raw[:8] != _LOG_MAGIC:
            raise CheckpointError(f"{path}: not a redo log")
        _, gen, epoch, base, full = _HDR.unpack(raw)
        return LogHeader(gen, epoch, base, full)

    def _index(self) -> None:
        size = os.fstat(self._fd).st_size
        pos = _HDR.size
        while pos + _REC.size <= size:
            kind, nlen, mlen, dlen = _REC.unpack(os.pread(self._fd, _REC.size, pos))
            pos += _REC.size
            head = os.pread(self._fd, nlen + mlen, pos)
            if kind == _KIND_END:
                if len(head) != _COUNT.size or _COUNT.unpack(head)[0] != len(self.records):
                    break
                return
            if pos + nlen + mlen + dlen > size:
                break
            try:
                name = head[:nlen].decode()
            except UnicodeDecodeError:
                break
            rec = LogRecord(kind, name, head[nlen:], pos + nlen + mlen, dlen)
            self.records.append(rec)
            pos += nlen + mlen + dlen
        raise CheckpointError(f"{self.path}: torn redo log (no valid END trailer)")

    def manifest(self) -> Manifest:
        found = [r for r in self.records if r.kind == KIND_MANIFEST]
        if not found:
            raise CheckpointError(f"{self.path}: no manifest")
        return Manifest.from_json(found[-1].meta)

    def data(self, r: LogRecord) -> bytes:
        data = os.pread(self._fd, r.length, r.offset)
        if len(data) != r.length:
            raise CheckpointError(f"{self.path}: short read")
        return data

    def load(self, r: LogRecord) -> Record:
        return Record(r.kind, r.name, r.meta, self.data(r))

    def close(self) -> None:
        os.close(self._fd)
