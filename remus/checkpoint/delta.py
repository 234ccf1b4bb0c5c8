"""Memory deltas on the wire: the chunks of one epoch, and how to read them.

A delta (made by remus.checkpoint.delta_encoder) is a sequence of chunks
``(kind, name, meta, data)``:

- KIND_FILE: ``name`` is an image file name, ``data`` its whole content.
  Sent for every non-pages file whose content differs from the previous
  dump's file of the same name (always, for a full checkpoint).
- KIND_PAGES: ``name`` is a pagemap file name ("pagemap-42.img",
  "pagemap-shmem-1234.img"); ``meta`` is a little-endian u64 array of the
  vaddrs of the pages in ``data``; ``data`` is those pages, 4096 bytes
  each. The encoder puts at most MAX_CHUNK_PAGES pages in one chunk.
- KIND_PAGES_LZ4: the same with ``data`` lz4-frame compressed.
- KIND_PAGES_XOR: the same vaddrs; ``data`` is each page XOR the page at
  the same vaddr in the delta's base (which the backup holds), sparse: a u32
  count n, n u32 word positions (page i, word w: i * 512 + w; strictly
  increasing), then the n u64 words that are not zero. A changed page of a
  busy server differs from its last version in a few bytes (redis at 1000
  clients: 7 bytes p50 of 4096): 2,200 changed pages (8.8 MB) were 2.7 MB
  as lz4 and ~60 KB this way, and the backup touches only those words. A
  page with more than XOR_DENSE_WORDS changed words goes as lz4 instead.
  Only with compression on.
- KIND_FILE_LZ4: a KIND_FILE whose ``data`` is lz4-frame compressed (the
  TCP streams bundle: request and reply bytes in socket queues). The store
  decompresses it as it arrives: the redo log holds a plain KIND_FILE.
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

The backup's store keeps the received chunks of an epoch in a redo log
(remus.checkpoint.redo), the same chunks at rest.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import lz4.frame
import numpy as np

from remus.checkpoint import images
from remus.checkpoint.images import PAGE_SIZE, Vaddrs
from remus.errors import ProtocolError

KIND_FILE = 1
KIND_PAGES = 2
KIND_PAGES_LZ4 = 3
KIND_MANIFEST = 4
KIND_FILES = 5
KIND_PAGES_XOR = 6
KIND_FILE_LZ4 = 7
#: a page whose XOR with its old version has more non-zero u64 words than this
#: travels whole (lz4): 12 bytes per sparse word would cost more
XOR_DENSE_WORDS = 128
_U32 = np.dtype("<u4")
#: the kinds that carry pages of a pagemap
PAGE_KINDS = (KIND_PAGES, KIND_PAGES_LZ4, KIND_PAGES_XOR)
#: a compressed image file may not grow beyond this when decompressed
MAX_FILE_BYTES = 1 << 30
#: first kind reserved for disk deltas (16 and up)
KIND_DISK_FIRST = 16

#: one file of a KIND_FILES chunk's meta: name length, data length (then the name)
BUNDLE_ENTRY = struct.Struct("<HI")
#: the vaddrs of a page chunk's meta
VADDR_DTYPE = np.dtype("<u8")

Chunk = tuple[int, str, bytes, bytes]


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


def decompress(data: bytes, limit: int, what: str) -> bytes:
    """An lz4 frame's content, refused (ProtocolError) if damaged or longer than
    ``limit`` bytes: a peer's frame claiming gigabytes is not unpacked first."""
    try:
        d = lz4.frame.LZ4FrameDecompressor()
        out: bytes = d.decompress(data, max_length=limit + 1)
    except RuntimeError as e:
        raise ProtocolError(f"bad lz4 {what}: {e}") from e
    if len(out) > limit or not d.eof:
        raise ProtocolError(f"lz4 {what} is longer than {limit} bytes, or truncated")
    return out


def encode_xor(x: np.ndarray) -> bytes:
    """The sparse data of a KIND_PAGES_XOR chunk for XOR rows ``x`` (pages x 512 u64)."""
    flat = x.reshape(-1)
    pos = np.flatnonzero(flat)
    return (np.array([pos.size], dtype=_U32).tobytes() + pos.astype(_U32).tobytes()
            + flat[pos].astype(VADDR_DTYPE).tobytes())


def decode_xor(meta: bytes, data: bytes) -> tuple[Vaddrs, np.ndarray, np.ndarray]:
    """(vaddrs, word positions, words) of a KIND_PAGES_XOR chunk; ProtocolError if
    malformed (positions outside its pages, unsorted or repeated)."""
    if len(meta) % 8:
        raise ProtocolError("page chunk meta is not a u64 array")
    vaddrs = np.frombuffer(meta, dtype=VADDR_DTYPE).astype(np.uint64)
    if len(data) < 4:
        raise ProtocolError("XOR page chunk without a count")
    n = int(np.frombuffer(data[:4], dtype=_U32)[0])
    if len(data) != 4 + 12 * n:
        raise ProtocolError(f"XOR page chunk has {len(data)} bytes for {n} words")
    pos = np.frombuffer(data[4 : 4 + 4 * n], dtype=_U32).astype(np.intp)
    words = np.frombuffer(data[4 + 4 * n :], dtype=VADDR_DTYPE).astype(np.uint64)
    if n and (int(pos[-1]) >= vaddrs.size * images.PAGE_WORDS
              or not bool((np.diff(pos) > 0).all())):
        raise ProtocolError("XOR page chunk has word positions outside its pages or unsorted")
    return vaddrs, pos, words


def decode_pages(kind: int, meta: bytes, data: bytes) -> tuple[Vaddrs, bytes]:
    """(vaddrs, page bytes) of a page chunk (PAGE_KINDS). For KIND_PAGES_XOR the
    bytes are the XOR with the base's pages, made dense (see decode_xor)."""
    if kind not in PAGE_KINDS:
        raise ProtocolError(f"not a page chunk: kind {kind}")
    if kind == KIND_PAGES_XOR:
        vaddrs, pos, words = decode_xor(meta, data)
        dense = np.zeros(vaddrs.size * images.PAGE_WORDS, dtype=np.uint64)
        dense[pos] = words
        return vaddrs, dense.tobytes()
    if len(meta) % 8:
        raise ProtocolError("page chunk meta is not a u64 array")
    vaddrs = np.frombuffer(meta, dtype=VADDR_DTYPE).astype(np.uint64)
    if kind != KIND_PAGES:
        data = decompress(data, vaddrs.size * PAGE_SIZE, "page chunk")
    if len(data) != vaddrs.size * PAGE_SIZE:
        raise ProtocolError(f"page chunk has {len(data)} bytes for {vaddrs.size} pages")
    return vaddrs, data


def unbundle(meta: bytes, data: bytes) -> list[tuple[str, bytes]]:
    """(name, data) of each file of a KIND_FILES chunk; ProtocolError if malformed
    (names are checked as check_file_name does)."""
    out: list[tuple[str, bytes]] = []
    pos = off = 0
    view = memoryview(data)
    try:
        while pos < len(meta):
            nlen, dlen = BUNDLE_ENTRY.unpack_from(meta, pos)
            pos += BUNDLE_ENTRY.size
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
    """(name, data) of the image files a KIND_FILE, KIND_FILE_LZ4 or KIND_FILES chunk
    carries."""
    kind, name, meta, data = chunk
    if kind == KIND_FILE:
        return [(name, data)]
    if kind == KIND_FILE_LZ4:
        return [(name, decompress(data, MAX_FILE_BYTES, f"file {name}"))]
    if kind == KIND_FILES:
        return unbundle(meta, data)
    return []


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
