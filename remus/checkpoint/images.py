"""CRIU image sets and page images, read without CRIU.

Facts checked against CRIU 4.2.1 (criu/pagemap.c, criu/page-xfer.c,
criu/image.c, images/pagemap.proto, criu/include/magic.h):

- ``pagemap-<id>.img`` (process memory) and ``pagemap-shmem-<id>.img``
  (shared memory) start with two little-endian u32 magics (IMG_COMMON,
  PAGEMAP), then size-prefixed protobuf entries: u32 length + message.
  The first message is ``pagemap_head{pages_id}``, every following one a
  ``pagemap_entry{vaddr, compat_nr_pages, in_parent, flags, nr_pages}``.
  Old images carry only ``compat_nr_pages`` and ``in_parent``
  (``init_compat_pagemap_entry``); we apply the same defaulting.
- The data of every entry with PE_PRESENT lies in ``pages-<pages_id>.img``
  (a raw file, no magic), in entry order, 4096 bytes per page. Entries
  without PE_PRESENT (PE_PARENT holes, lazy-only entries) have no data.
- For shared memory the "vaddr" is an offset in the shmem object; it is a
  key all the same.

A pagemap's *layout* is the array of vaddrs of its present pages, in pages
file order: page ``i`` of the pages file holds the page at ``layout[i]``.
A dump made with memory tracking against a parent (``--track-mem
--prev-images-dir``) also has PE_PARENT entries: pages the task still has
but did not write since the parent dump, whose data is in the parent.
``flattened()`` turns such a pagemap into the one of a full dump (every page
present), which is what the backup keeps.
Everything here is pure (files in, arrays out) and never writes.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from remus.errors import CheckpointError

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
#: u64 words per page, the row width when a pages file is viewed as uint64
PAGE_WORDS = PAGE_SIZE // 8

# criu/include/pagemap.h
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# criu/include/magic.h
IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025

_PAGEMAP_RE = re.compile(r"^pagemap-(?:shmem-)?\d+\.img$")
_PAGES_RE = re.compile(r"^pages-\d+\.img$")
_MAGIC = struct.Struct("<II")
_LEN = struct.Struct("<I")

Vaddrs = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class PagemapEntry:
    """One ``pagemap_entry``: ``nr_pages`` pages starting at ``vaddr``."""

    vaddr: int
    nr_pages: int
    flags: int

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)


@dataclass(frozen=True)
class Pagemap:
    """A parsed pagemap image."""

    pages_id: int
    entries: tuple[PagemapEntry, ...]

    @property
    def pages_name(self) -> str:
        return pages_file_name(self.pages_id)

    def layout(self) -> Vaddrs:
        """Vaddrs of the present pages, in pages file order."""
        return layout_of(self.entries)

    @property
    def nr_present(self) -> int:
        return sum(e.nr_pages for e in self.entries if e.present)

    @property
    def has_parent(self) -> bool:
        """True when some pages are PE_PARENT holes (data in the parent dump)."""
        return any(e.flags & PE_PARENT and not e.present for e in self.entries)

    def full_layout(self) -> Vaddrs:
        """Vaddrs of every page the task has (present or in the parent), in order."""
        return layout_of(tuple(
            PagemapEntry(e.vaddr, e.nr_pages, PE_PRESENT) for e in self.entries
            if e.present or e.flags & PE_PARENT
        ))

    def flattened(self) -> bytes:
        """Bytes of this pagemap as a full dump would have it: all pages present."""
        return encode_pagemap(self.pages_id, entries_of(self.full_layout()))


def is_pagemap(name: str) -> bool:
    """True for ``pagemap-<id>.img`` and ``pagemap-shmem-<id>.img``."""
    return _PAGEMAP_RE.match(name) is not None


def is_pages(name: str) -> bool:
    """True for ``pages-<id>.img`` (a raw page data file)."""
    return _PAGES_RE.match(name) is not None


def pages_file_name(pages_id: int) -> str:
    """Name of the pages file of ``pages_id`` (CR_FD_PAGES, "pages-%u")."""
    return f"pages-{pages_id}.img"


def list_images(dump_dir: Path) -> list[str]:
    """Sorted names of the image files of a dump directory.

    Regular files (or symlinks to them) only; CRIU's own logs (``*.log``)
    are not part of a checkpoint and are left out.
    """
    return sorted(
        p.name for p in dump_dir.iterdir() if p.is_file() and not p.name.endswith(".log")
    )


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError("pagemap image: varint too long")


def _fields(msg: bytes) -> dict[int, int]:
    """Decode a protobuf message whose fields are all varints.

    pagemap_head and pagemap_entry only have varint fields (uint32, uint64,
    bool); a hand decoder is ~10x faster than the pure-python protobuf
    runtime installed here, which matters for fragmented address spaces.
    """
    out: dict[int, int] = {}
    pos = 0
    end = len(msg)
    while pos < end:
        key, pos = _varint(msg, pos)
        if key & 7 != 0:
            raise CheckpointError(f"pagemap image: unexpected wire type {key & 7}")
        out[key >> 3], pos = _varint(msg, pos)
    return out


def _entry(f: dict[int, int]) -> PagemapEntry:
    # Same defaulting as init_compat_pagemap_entry() in criu/pagemap.c.
    if f.get(3):
        flags = f.get(4, 0) | PE_PARENT
    elif 4 in f:
        flags = f[4]
    else:
        flags = PE_PRESENT
    nr = f[5] if 5 in f else f.get(2, 0)
    return PagemapEntry(vaddr=f.get(1, 0), nr_pages=nr, flags=flags)


def parse_pagemap(data: bytes, name: str = "pagemap") -> Pagemap:
    """Parse the bytes of a pagemap image; CheckpointError when malformed."""
    if len(data) < _MAGIC.size + _LEN.size:
        raise CheckpointError(f"{name}: too short for a pagemap image")
    common, magic = _MAGIC.unpack_from(data, 0)
    if common != IMG_COMMON_MAGIC or magic != PAGEMAP_MAGIC:
        raise CheckpointError(f"{name}: not a pagemap image (magic {common:#x} {magic:#x})")
    pos = _MAGIC.size
    msgs: list[dict[int, int]] = []
    try:
        while pos < len(data):
            (size,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if pos + size > len(data):
                raise CheckpointError(f"{name}: truncated entry")
            msgs.append(_fields(data[pos : pos + size]))
            pos += size
    except (IndexError, struct.error) as e:
        raise CheckpointError(f"{name}: truncated pagemap image") from e
    if not msgs:
        raise CheckpointError(f"{name}: no pagemap_head")
    return Pagemap(pages_id=msgs[0].get(1, 0), entries=tuple(_entry(m) for m in msgs[1:]))


def read_pagemap(path: Path) -> Pagemap:
    """Read and parse a pagemap image file."""
    return parse_pagemap(path.read_bytes(), path.name)


def layout_of(entries: tuple[PagemapEntry, ...] | list[PagemapEntry]) -> Vaddrs:
    """Vaddrs of the present pages of ``entries``, in pages file order.

    Vectorized: one np.repeat of the entry starts plus per-page offsets, so
    a 1 GiB pagemap (262,144 pages) costs a few milliseconds.
    """
    present = [e for e in entries if e.present and e.nr_pages > 0]
    if not present:
        return np.empty(0, dtype=np.uint64)
    starts = np.fromiter((e.vaddr for e in present), dtype=np.uint64, count=len(present))
    counts = np.fromiter((e.nr_pages for e in present), dtype=np.int64, count=len(present))
    total = int(counts.sum())
    # index of each page inside its entry: arange minus the entry's first index
    first = np.repeat(np.cumsum(counts) - counts, counts)
    within = (np.arange(total, dtype=np.int64) - first).astype(np.uint64)
    return np.repeat(starts, counts) + within * np.uint64(PAGE_SIZE)


def entries_of(layout: Vaddrs, flags: int = PE_PRESENT) -> list[PagemapEntry]:
    """Inverse of layout_of: merge consecutive vaddrs into entries."""
    if layout.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(layout) != np.uint64(PAGE_SIZE)) + 1
    bounds = np.concatenate(([0], breaks, [layout.size]))
    return [
        PagemapEntry(vaddr=int(layout[a]), nr_pages=int(b - a), flags=flags)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def encode_pagemap(pages_id: int, entries: list[PagemapEntry]) -> bytes:
    """Bytes of a pagemap image, as CRIU 4.2.1 writes it (write_pagemap_loc)."""
    out = [_MAGIC.pack(IMG_COMMON_MAGIC, PAGEMAP_MAGIC)]
    for msg in [_message({1: pages_id})] + [
        _message({1: e.vaddr, 2: 0, 4: e.flags, 5: e.nr_pages}) for e in entries
    ]:
        out.append(_LEN.pack(len(msg)) + msg)
    return b"".join(out)


def _message(fields: dict[int, int]) -> bytes:
    out = bytearray()
    for num, value in fields.items():
        for v in (num << 3, value):
            while v >= 0x80:
                out.append((v & 0x7F) | 0x80)
                v >>= 7
            out.append(v)
    return bytes(out)


def sorted_index(layout: Vaddrs) -> tuple[Vaddrs, npt.NDArray[np.intp]]:
    """(sorted vaddrs, page index of each) for np.searchsorted lookups.

    CRIU writes pagemaps in address order, so the sort is usually a no-op,
    but nothing in the format promises it. Duplicate vaddrs would make the
    vaddr -> page mapping ambiguous and are rejected.
    """
    order = np.argsort(layout, kind="stable")
    keys = layout[order]
    if keys.size > 1 and bool((keys[1:] == keys[:-1]).any()):
        raise CheckpointError("pagemap lists the same vaddr twice")
    return keys, order


def lookup(index: tuple[Vaddrs, npt.NDArray[np.intp]], vaddrs: Vaddrs) -> npt.NDArray[np.intp]:
    """Page index of each of ``vaddrs`` in the indexed layout, -1 if absent."""
    keys, order = index
    if keys.size == 0:
        return np.full(vaddrs.shape, -1, dtype=np.intp)
    pos = np.searchsorted(keys, vaddrs)
    pos_c = np.minimum(pos, keys.size - 1)
    found = keys[pos_c] == vaddrs
    return np.where(found, order[pos_c], -1)


def write_pagemap_image(
    dump_dir: Path, name: str, pages_id: int, layout: Vaddrs, data: bytes, flags: int = PE_PRESENT
) -> None:
    """Write ``name`` and its pages file as CRIU would (for tests and benches).

    ``data`` holds the pages of ``layout`` in order; consecutive vaddrs are
    merged into one entry, as CRIU does for a contiguous present range.
    """
    if len(data) != layout.size * PAGE_SIZE:
        raise ValueError(f"{len(data)} bytes for {layout.size} pages")
    (dump_dir / name).write_bytes(encode_pagemap(pages_id, entries_of(layout, flags)))
    (dump_dir / pages_file_name(pages_id)).write_bytes(data)


def pages_by_vaddr(dump_dir: Path) -> dict[str, dict[int, bytes]]:
    """Every present page of an image set: pagemap name -> vaddr -> content.

    The layout-independent view of memory, for checking that two image sets
    (a dump and its copy materialized by the backup) hold the same memory.
    """
    out: dict[str, dict[int, bytes]] = {}
    for name in list_images(dump_dir):
        if not is_pagemap(name):
            continue
        pm = read_pagemap(dump_dir / name)
        raw = (dump_dir / pm.pages_name).read_bytes()
        layout = pm.layout()
        if len(raw) != layout.size * PAGE_SIZE:
            raise CheckpointError(f"{pm.pages_name}: {len(raw)} bytes for {layout.size} pages")
        out[name] = {
            int(v): raw[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i, v in enumerate(layout)
        }
    return out


def page_runs(idx: npt.NDArray[np.intp]) -> list[tuple[int, int, int]]:
    """(position in idx, idx value, length) of each run of consecutive values >= 0.

    Lets callers move pages with one syscall per run instead of one per page.
    """
    if idx.size == 0:
        return []
    valid = idx >= 0
    brk = np.flatnonzero((np.diff(idx) != 1) | ~valid[1:] | ~valid[:-1]) + 1
    starts = np.concatenate(([0], brk))
    ends = np.concatenate((brk, [idx.size]))
    bounds = zip(starts, ends, strict=True)
    return [(int(s), int(idx[s]), int(e - s)) for s, e in bounds if valid[s]]


def copy_pages(src: int, dst: int, src_off: int, dst_off: int, pages: int) -> None:
    """Copy ``pages`` pages between two fds at byte offsets (copy_file_range)."""
    left = pages * PAGE_SIZE
    while left:
        try:
            n = os.copy_file_range(src, dst, left, src_off, dst_off)
        except OSError:
            # e.g. EXDEV on older kernels: fall back to a plain copy
            n = os.pwrite(dst, os.pread(src, min(left, 1 << 24), src_off), dst_off)
        if n == 0:
            raise CheckpointError("pages file shorter than its layout")
        left -= n
        src_off += n
        dst_off += n
