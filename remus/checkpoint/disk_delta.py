"""One capture's disk delta: tree records and changed byte ranges spooled until sent as chunks."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from remus.checkpoint.delta import Chunk
from remus.checkpoint.disk_wire import DataRecord, Extents, TreeRecord

#: at most this much file data per "data" chunk
MAX_RECORD = 1024 * 1024


@dataclass
class DataRef:
    """A changed range of a file; its bytes wait in the delta's spool."""

    path: str
    off: int
    span: int
    ext: Extents
    pos: int  # in the spool
    length: int


@dataclass
class RootDelta:
    tree: TreeRecord
    data: list[DataRef] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)  # paths kept as they were (rescans)


class DiskDelta:
    """One epoch's disk changes, captured; chunks() may run in another thread, once."""

    def __init__(self, full: bool, spool_dir: Path | None, spool_limit: int) -> None:
        self.full = full
        self.roots: list[RootDelta] = []
        self._spool = tempfile.SpooledTemporaryFile(
            max_size=spool_limit, dir=str(spool_dir) if spool_dir else None)  # noqa: SIM115
        self._size = 0

    @property
    def data_bytes(self) -> int:
        return self._size

    def put(self, data: bytes | memoryview) -> int:
        pos = self._size
        self._spool.write(data)
        self._size += len(data)
        return pos

    def chunks(self) -> Iterator[Chunk]:
        """TREE then DATA chunks of every root; closes the delta at the end."""
        try:
            for rd in self.roots:
                yield rd.tree.encode()
                for refs in _records(rd.data):
                    yield self._data_chunk(rd.tree.root, refs)
        finally:
            self.close()

    def _data_chunk(self, root: Path, refs: list[DataRef]) -> Chunk:
        first = refs[0]
        ext: Extents = []
        parts = []
        for r in refs:
            ext += [(r.off - first.off + o, n) for o, n in r.ext]
            self._spool.seek(r.pos)
            parts.append(self._spool.read(r.length))
        span = refs[-1].off + refs[-1].span - first.off
        return DataRecord(root, first.path, first.off, span, ext, b"".join(parts)).encode()

    def close(self) -> None:
        self._spool.close()


def _records(refs: list[DataRef]) -> Iterator[list[DataRef]]:
    """Adjacent ranges of one file, merged up to MAX_RECORD bytes per chunk."""
    run: list[DataRef] = []
    size = 0
    for r in refs:
        if run and (r.path != run[-1].path or r.off != run[-1].off + run[-1].span
                    or size + r.length > MAX_RECORD):
            yield run
            run, size = [], 0
        run.append(r)
        size += r.length
    if run:
        yield run
