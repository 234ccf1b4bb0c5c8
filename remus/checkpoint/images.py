"""CRIU image sets and pages files, read without CRIU.

Facts checked against CRIU 4.2.1 (criu/pagemap.c, criu/page-xfer.c,
criu/image.c, criu/include/magic.h):

- An image set is a directory of image files; CRIU's own logs (``*.log``)
  are not part of it. Pagemaps are parsed and written by
  remus.checkpoint.pagemap.
- The data of every pagemap entry with PE_PRESENT lies in
  ``pages-<pages_id>.img`` (a raw file, no magic), in entry order, 4096
  bytes per page. Entries without PE_PRESENT (PE_PARENT holes, lazy-only
  entries) have no data.

A pagemap's *layout* is the array of vaddrs of its present pages, in pages
file order: page ``i`` of the pages file holds the page at ``layout[i]``.
sorted_index() and lookup() find pages by vaddr in a layout; page_runs() and
copy_pages() move runs of consecutive pages with one syscall per run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt

from remus.errors import CheckpointError

PAGE_SIZE = 4096
#: u64 words per page, the row width when a pages file is viewed as uint64
PAGE_WORDS = PAGE_SIZE // 8

# criu/include/magic.h
IMG_COMMON_MAGIC = 0x54564319

_PAGEMAP_RE = re.compile(r"^pagemap-(?:shmem-)?\d+\.img$")
_PAGES_RE = re.compile(r"^pages-\d+\.img$")

Vaddrs = npt.NDArray[np.uint64]


def is_pagemap(name: str) -> bool:
    """True for ``pagemap-<id>.img`` and ``pagemap-shmem-<id>.img``."""
    return _PAGEMAP_RE.match(name) is not None


def is_pages(name: str) -> bool:
    """True for ``pages-<id>.img`` (a raw page data file)."""
    return _PAGES_RE.match(name) is not None


def pages_file_name(pages_id: int) -> str:
    """Name of the pages file of ``pages_id`` (CR_FD_PAGES, "pages-%u")."""
    return f"pages-{pages_id}.img"


NOT_STATE = "stats-dump"  # CRIU's timings of the dump (remus.checkpoint.criu)


def list_images(dump_dir: Path) -> list[str]:
    """Sorted names of the image files of a dump directory.

    Regular files (or symlinks to them) only; CRIU's own logs (``*.log``)
    and its measures (``stats-dump``, written after the images, once the unit
    is thawed) are not part of a checkpoint and are left out.
    """
    # scandir: the file type comes with the name (no stat per file; a dump of a
    # server with a thousand connections has a thousand files every epoch)
    with os.scandir(dump_dir) as it:
        return sorted(e.name for e in it
                      if not e.name.endswith(".log") and e.name != NOT_STATE and e.is_file())


def read_image(path: Path | str) -> bytes:
    """The bytes of an image file, with as few syscalls and objects as it takes
    (open, one read for the usual small image, close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, _SMALL)
        if len(data) < _SMALL:
            return data
        parts = [data]
        while part := os.read(fd, 1 << 20):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


_SMALL = 1 << 16


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
