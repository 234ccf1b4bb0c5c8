"""State-directory deltas on the wire: the records DiskTracker sends and DiskApplier applies.

A delta is a sequence of chunks ``(kind, name, meta, data)`` (the same
shape as memory deltas, remus.checkpoint.delta).

All records have kind KIND_DISK (the store hands one kind's records to its
handler in one call, in arrival order, and the backup needs that order);
``name`` says which record it is. Per root, in this order:

- "tree", once per root and first: ``meta`` is JSON
  ``{"v": 1, "root", "full", "moves": [[old, new]], "deletes": [old],
  "creates": [[path, kind, symlink target or null]], "sizes": [[path, size]],
  "attrs": [[path, mode, uid, gid, mtime_ns]]}``. Paths are relative to the
  root (``os.fsdecode`` form; "" is the root itself in ``attrs``). ``full``
  means "make the root exactly this": the backup wipes it first. Moves are
  net renames of entries that survive from the previous capture (the
  backup holds them at ``old``); kinds are d(irectory), f(ile), l(ink),
  p(fifo).
- "data": ``meta`` is JSON ``{"root", "path", "off", "span",
  "ext": [[rel, len]]}``; the byte range ``[off, off+span)`` of the file
  becomes exactly: the extents' bytes (``data`` is them, concatenated) and
  holes everywhere else. That keeps sparse files sparse.

TreeRecord and DataRecord are the one implementation of this format:
encode() makes the chunk, decode() parses and checks one (ProtocolError if
it is malformed or names a path outside its root).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from remus.checkpoint.delta import KIND_DISK_FIRST, Chunk
from remus.errors import ProtocolError

KIND_DISK = KIND_DISK_FIRST
TREE, DATA = "tree", "data"
#: reserved name at the top of every root: the backup's rename staging area
STASH = ".remus-stash"
FORMAT_VERSION = 1

_KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFIFO: "p"}

Attrs = tuple[int, int, int, int]  # mode, uid, gid, mtime_ns
Extents = list[tuple[int, int]]  # (offset relative to the block/span, length)
#: maps a record's root (the primary's path) to the local one; may raise ProtocolError
RootMap = Callable[[Path], Path]


def kind_of(mode: int) -> str | None:
    """d/f/l/p for what state dirs may hold; None for sockets and devices (not tracked)."""
    return _KINDS.get(stat.S_IFMT(mode))


def attrs_of(st: os.stat_result) -> Attrs:
    return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)


def check_relpath(p: str, allow_root: bool = False) -> str:
    """``p`` if it is a clean path inside a root (not the stash); ProtocolError otherwise."""
    if p == "" and allow_root:
        return p
    parts = p.split("/")
    if (not p or "\0" in p or p.startswith("/") or parts[0] == STASH
            or any(c in ("", ".", "..") for c in parts)):
        raise ProtocolError(f"bad path in disk delta: {p!r}")
    return p


def _same(root: Path) -> Path:
    return root


@dataclass
class TreeRecord:
    """A "tree" record: one root's entries as they change from the last capture."""

    root: Path
    full: bool
    moves: list[tuple[str, str]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    creates: list[tuple[str, str, str | None]] = field(default_factory=list)
    sizes: list[tuple[str, int]] = field(default_factory=list)
    attrs: list[tuple[str, int, int, int, int]] = field(default_factory=list)

    def encode(self) -> Chunk:
        doc = {"v": FORMAT_VERSION, "root": str(self.root), "full": self.full,
               "moves": self.moves, "deletes": self.deletes, "creates": self.creates,
               "sizes": self.sizes, "attrs": self.attrs}
        return (KIND_DISK, TREE, json.dumps(doc).encode(), b"")

    @classmethod
    def decode(cls, meta: bytes, local: RootMap = _same) -> Self:
        try:
            doc = json.loads(meta)
            if doc.get("v") != FORMAT_VERSION:
                raise ProtocolError(f"unknown disk tree version {doc.get('v')!r}")
            t = cls(
                root=local(Path(str(doc["root"]))), full=bool(doc["full"]),
                moves=[(check_relpath(a), check_relpath(b)) for a, b in doc["moves"]],
                deletes=[check_relpath(p) for p in doc["deletes"]],
                creates=[(check_relpath(p), str(k), None if x is None else str(x))
                         for p, k, x in doc["creates"]],
                sizes=[(check_relpath(p), int(n)) for p, n in doc["sizes"]],
                attrs=[(check_relpath(p, allow_root=True), int(m), int(u), int(g), int(t))
                       for p, m, u, g, t in doc["attrs"]],
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"malformed disk tree record: {e}") from e
        for _, k, target in t.creates:
            if k not in _KINDS.values() or (k == "l") != (target is not None):
                raise ProtocolError(f"bad create of kind {k!r} in disk tree record")
        return t


@dataclass(frozen=True)
class DataRecord:
    """A "data" record: ``[off, off+span)`` of a file becomes ``ext`` (bytes in ``data``), holes elsewhere."""

    root: Path
    path: str
    off: int
    span: int
    ext: Extents
    data: bytes

    def encode(self) -> Chunk:
        meta = {"root": str(self.root), "path": self.path, "off": self.off, "span": self.span,
                "ext": self.ext}
        return (KIND_DISK, DATA, json.dumps(meta).encode(), self.data)

    @classmethod
    def decode(cls, meta: bytes, data: bytes, local: RootMap = _same) -> Self:
        try:
            doc = json.loads(meta)
            op = cls(local(Path(str(doc["root"]))), check_relpath(doc["path"]), int(doc["off"]),
                     int(doc["span"]), [(int(o), int(n)) for o, n in doc["ext"]], data)
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"malformed disk data record: {e}") from e
        if op.off < 0 or op.span < 0 or sum(n for _, n in op.ext) != len(data) or any(
                o < 0 or n < 0 or o + n > op.span for o, n in op.ext):
            raise ProtocolError(f"disk data record for {op.path}: extents do not fit")
        return op
