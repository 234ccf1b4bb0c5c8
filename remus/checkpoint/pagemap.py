"""Pagemap images: parsed and encoded with numpy, without CRIU.

Facts checked against CRIU 4.2.1 (criu/pagemap.c, criu/page-xfer.c,
criu/image.c, images/pagemap.proto, criu/include/magic.h):

- ``pagemap-<id>.img`` (process memory) and ``pagemap-shmem-<id>.img``
  (shared memory) start with two little-endian u32 magics (IMG_COMMON,
  PAGEMAP), then size-prefixed protobuf entries: u32 length + message.
  The first message is ``pagemap_head{pages_id}``, every following one a
  ``pagemap_entry{vaddr, compat_nr_pages, in_parent, flags, nr_pages}``.
  Old images carry only ``compat_nr_pages`` and ``in_parent``
  (``init_compat_pagemap_entry``); we apply the same defaulting.
- The pages of the entries with PE_PRESENT are in the pagemap's pages file
  (see remus.checkpoint.images).
- For shared memory the "vaddr" is an offset in the shmem object; it is a
  key all the same.

A dump made with memory tracking against a parent (``--track-mem
--prev-images-dir``) also has PE_PARENT entries: pages the task still has
but did not write since the parent dump, whose data is in the parent.
``flattened()`` turns such a pagemap into the one of a full dump (every page
present), which is what the backup keeps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from remus.checkpoint.images import (
    IMG_COMMON_MAGIC,
    PAGE_SIZE,
    Vaddrs,
    is_pagemap,
    list_images,
    pages_file_name,
    read_image,
)
from remus.errors import CheckpointError

# criu/include/pagemap.h
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# criu/include/magic.h
PAGEMAP_MAGIC = 0x56084025

_MAGIC = struct.Struct("<II")
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class PagemapEntry:
    """One ``pagemap_entry``: ``nr_pages`` pages starting at ``vaddr``."""

    vaddr: int
    nr_pages: int
    flags: int

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)


@dataclass(frozen=True, eq=False)
class Pagemap:
    """A parsed pagemap image: one row per ``pagemap_entry``, as arrays.

    ``vaddrs`` (u64), ``counts`` (pages, i64) and ``flags`` (i64), in file
    order. Arrays rather than objects: a tracked dump of a busy process has
    thousands of entries every epoch, and the primary parses, lays out and
    flattens each one on its critical path.
    """

    pages_id: int
    vaddrs: Vaddrs
    counts: npt.NDArray[np.int64]
    flags: npt.NDArray[np.int64]

    @property
    def entries(self) -> tuple[PagemapEntry, ...]:
        """The entries as objects (for tests and tools; slow for big maps)."""
        return tuple(
            PagemapEntry(int(v), int(n), int(f))
            for v, n, f in zip(self.vaddrs, self.counts, self.flags, strict=True)
        )

    @property
    def pages_name(self) -> str:
        return pages_file_name(self.pages_id)

    def _present(self) -> npt.NDArray[np.bool_]:
        present: npt.NDArray[np.bool_] = (self.flags & PE_PRESENT) != 0
        return present

    def layout(self) -> Vaddrs:
        """Vaddrs of the present pages, in pages file order."""
        keep = self._present()
        return _expand(self.vaddrs[keep], self.counts[keep])

    @property
    def nr_present(self) -> int:
        return int(self.counts[self._present()].sum())

    @property
    def has_parent(self) -> bool:
        """True when some pages are PE_PARENT holes (data in the parent dump)."""
        return bool((((self.flags & PE_PARENT) != 0) & ~self._present()).any())

    def _full(self) -> tuple[Vaddrs, npt.NDArray[np.int64]]:
        keep = self._present() | ((self.flags & PE_PARENT) != 0)
        return self.vaddrs[keep], self.counts[keep]

    def full_layout(self) -> Vaddrs:
        """Vaddrs of every page the task has (present or in the parent), in order."""
        return _expand(*self._full())

    @property
    def nr_full(self) -> int:
        """Pages the task has, present or in the parent (full_layout().size)."""
        return int(self._full()[1].sum())

    def flattened(self) -> bytes:
        """Bytes of this pagemap as a full dump would have it: all pages present.

        Adjacent ranges are merged (as entries_of(full_layout()) would), at the
        cost of the entries rather than of the pages.
        """
        starts, counts = _merge_runs(*self._full())
        return encode_pagemap_arrays(self.pages_id, starts, counts,
                                     np.full(counts.size, PE_PRESENT, dtype=np.int64))


def _expand(starts: Vaddrs, counts: npt.NDArray[np.int64]) -> Vaddrs:
    """Page vaddrs of ranges (start, count): one np.repeat plus per-page offsets,
    so a 1 GiB pagemap (262,144 pages) costs a few milliseconds."""
    keep = counts > 0
    starts, counts = starts[keep], counts[keep]
    if counts.size == 0:
        return np.empty(0, dtype=np.uint64)
    total = int(counts.sum())
    # index of each page inside its range: arange minus the range's first index
    first = np.repeat(np.cumsum(counts) - counts, counts)
    within = (np.arange(total, dtype=np.int64) - first).astype(np.uint64)
    return np.repeat(starts.astype(np.uint64), counts) + within * np.uint64(PAGE_SIZE)


def _merge_runs(
    starts: Vaddrs, counts: npt.NDArray[np.int64]
) -> tuple[Vaddrs, npt.NDArray[np.int64]]:
    """Ranges with each one that ends where the next begins merged into it."""
    keep = counts > 0
    starts, counts = starts[keep].astype(np.uint64), counts[keep]
    if counts.size == 0:
        return starts, counts
    ends = starts + counts.astype(np.uint64) * np.uint64(PAGE_SIZE)
    first = np.concatenate(([0], np.flatnonzero(ends[:-1] != starts[1:]) + 1))
    return starts[first], np.add.reduceat(counts, first)


def parse_pagemap(data: bytes, name: str = "pagemap") -> Pagemap:
    """Parse the bytes of a pagemap image; CheckpointError when malformed.

    pagemap_head and pagemap_entry have only varint fields (uint32, uint64,
    bool). The messages are found one by one (u32 length prefixes), then all
    their varints are decoded at once with numpy: a tracked dump's pagemap
    has thousands of entries every epoch.
    """
    if len(data) < _MAGIC.size + _LEN.size:
        raise CheckpointError(f"{name}: too short for a pagemap image")
    common, magic = _MAGIC.unpack_from(data, 0)
    if common != IMG_COMMON_MAGIC or magic != PAGEMAP_MAGIC:
        raise CheckpointError(f"{name}: not a pagemap image (magic {common:#x} {magic:#x})")
    starts: list[int] = []
    sizes: list[int] = []
    pos, end = _MAGIC.size, len(data)
    unpack, add_start, add_size = _LEN.unpack_from, starts.append, sizes.append
    try:
        while pos < end:  # the hot loop of this module: kept minimal
            (size,) = unpack(data, pos)
            pos += 4
            add_start(pos)
            add_size(size)
            pos += size
    except struct.error as e:
        raise CheckpointError(f"{name}: truncated pagemap image") from e
    if pos > end:
        raise CheckpointError(f"{name}: truncated entry")
    if not starts:
        raise CheckpointError(f"{name}: no pagemap_head")
    fields, has = _decode_messages(np.frombuffer(data, dtype=np.uint8),
                                   np.array(starts, dtype=np.int64),
                                   np.array(sizes, dtype=np.int64), name)
    # Same defaulting as init_compat_pagemap_entry() in criu/pagemap.c: in_parent
    # (3) adds PE_PARENT to flags (4); no flags at all means present; nr_pages (5)
    # falls back to compat_nr_pages (2).
    f = fields[1:]
    h = has[1:]
    flags = np.where(f[:, 3] != 0, f[:, 4] | PE_PARENT,
                     np.where(h[:, 4], f[:, 4], PE_PRESENT)).astype(np.int64)
    counts = np.where(h[:, 5], f[:, 5], f[:, 2]).astype(np.int64)
    return Pagemap(pages_id=int(fields[0, 1]), vaddrs=f[:, 1].copy(), counts=counts, flags=flags)


_FIELDS = 6  # pagemap_entry's fields are 1..5; others are ignored


def _decode_messages(
    buf: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64],
    name: str,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
    """(values, present) arrays of shape (messages, _FIELDS): varint field n of
    message i (the last one wins, as protobuf has it) and whether it was there."""
    nmsg = starts.size
    values = np.zeros((nmsg, _FIELDS), dtype=np.uint64)
    present = np.zeros((nmsg, _FIELDS), dtype=bool)
    total = int(sizes.sum())
    if total == 0:
        return values, present
    msg = np.repeat(np.arange(nmsg), sizes)  # message of each byte
    offset = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    b = buf[np.repeat(starts, sizes) + offset]
    last = (b & 0x80) == 0  # the last byte of a varint
    msg_end = np.cumsum(sizes)[sizes > 0] - 1
    if not bool(last[msg_end].all()):
        raise CheckpointError(f"{name}: truncated varint in pagemap image")
    first = np.concatenate(([0], np.flatnonzero(last[:-1]) + 1))  # first byte of each varint
    width = np.diff(np.append(first, total))
    if bool((width > 10).any()):
        raise CheckpointError(f"{name}: pagemap image: varint too long")
    shift = (np.arange(total) - np.repeat(first, width)) * 7
    bits = (b & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    v = np.bitwise_or.reduceat(bits, first)
    vmsg = msg[first]
    per_msg = np.bincount(vmsg, minlength=nmsg)
    if bool((per_msg % 2).any()):
        raise CheckpointError(f"{name}: pagemap image: a key without a value")
    # varints alternate key, value inside each message
    idx = np.arange(v.size) - np.repeat(np.cumsum(per_msg) - per_msg, per_msg)
    keys = idx % 2 == 0
    kmsg = vmsg[keys]
    key = v[keys]
    if bool((key & np.uint64(7)).any()):
        wt = int(key[(key & np.uint64(7)) != 0][0] & np.uint64(7))
        raise CheckpointError(f"{name}: pagemap image: unexpected wire type {wt}")
    field = key >> np.uint64(3)
    val = v[~keys]
    known = field < _FIELDS
    rows, cols = kmsg[known], field[known].astype(np.intp)
    # fancy assignment keeps the last write for repeated (row, col): protobuf's rule
    values[rows, cols] = val[known]
    present[rows, cols] = True
    return values, present


def read_pagemap(path: Path) -> Pagemap:
    """Read and parse a pagemap image file."""
    return parse_pagemap(read_image(path), path.name)


def layout_of(entries: tuple[PagemapEntry, ...] | list[PagemapEntry]) -> Vaddrs:
    """Vaddrs of the present pages of ``entries``, in pages file order."""
    present = [e for e in entries if e.present]
    return _expand(np.array([e.vaddr for e in present], dtype=np.uint64),
                   np.array([e.nr_pages for e in present], dtype=np.int64))


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
    return encode_pagemap_arrays(
        pages_id,
        np.array([e.vaddr for e in entries], dtype=np.uint64),
        np.array([e.nr_pages for e in entries], dtype=np.int64),
        np.array([e.flags for e in entries], dtype=np.int64),
    )


def encode_pagemap_arrays(
    pages_id: int, vaddrs: Vaddrs, counts: npt.NDArray[np.int64], flags: npt.NDArray[np.int64]
) -> bytes:
    """encode_pagemap from arrays, every entry encoded at once with numpy.

    Each entry is ``u32 length`` + the fields {1: vaddr, 2: 0, 4: flags,
    5: nr_pages} as protobuf varints, in that order (what CRIU writes).
    """
    head = _message({1: pages_id})
    out = _MAGIC.pack(IMG_COMMON_MAGIC, PAGEMAP_MAGIC) + _LEN.pack(len(head)) + head
    n = vaddrs.size
    if n == 0:
        return out
    v, nv = _varints(vaddrs)
    f, nf = _varints(flags)
    c, nc = _varints(counts)
    size = 1 + nv + 3 + nf + 1 + nc  # key 1, vaddr, key 2 + 0 + key 4, flags, key 5, nr
    length = (size.astype("<u4")[:, None].view(np.uint8)).reshape(n, 4)

    def const(*b: int) -> npt.NDArray[np.uint8]:
        return np.broadcast_to(np.array(b, dtype=np.uint8), (n, len(b)))

    cols = [length, const(1 << 3), v, const(2 << 3, 0, 4 << 3), f, const(5 << 3), c]
    keep = [np.ones((n, 4), bool), np.ones((n, 1), bool), _used(nv), np.ones((n, 3), bool),
            _used(nf), np.ones((n, 1), bool), _used(nc)]
    body: bytes = np.concatenate(cols, axis=1)[np.concatenate(keep, axis=1)].tobytes()
    return out + body


_GROUPS = np.arange(10, dtype=np.uint64)


def _varints(values: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """(n, 10) varint bytes of each value (only the first `width` are used), widths."""
    v = values.astype(np.uint64)[:, None]
    groups = (v >> (np.uint64(7) * _GROUPS)) & np.uint64(0x7F)
    width = np.maximum(1, 10 - np.argmax(groups[:, ::-1] != 0, axis=1))
    width = np.where((groups != 0).any(axis=1), width, 1)
    cont = _GROUPS[None, :] < (width - 1)[:, None].astype(np.uint64)
    return (groups | (cont.astype(np.uint64) << np.uint64(7))).astype(np.uint8), width.astype(np.int64)


def _used(width: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    return np.arange(10)[None, :] < width[:, None]


def _message(fields: dict[int, int]) -> bytes:
    out = bytearray()
    for num, value in fields.items():
        for v in (num << 3, value):
            while v >= 0x80:
                out.append((v & 0x7F) | 0x80)
                v >>= 7
            out.append(v)
    return bytes(out)


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

