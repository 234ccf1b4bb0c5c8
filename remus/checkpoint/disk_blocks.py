"""A file's content as DiskTracker reads it: data extents (holes skipped), blocks, block hashes."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator

import xxhash

from remus.checkpoint.disk_wire import Extents


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


def blocks(fd: int, size: int, bs: int) -> Iterator[tuple[int, Extents, memoryview]]:
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
