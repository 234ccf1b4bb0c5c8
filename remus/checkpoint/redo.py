"""The redo log: a delta at rest, written by the backup's store.

The store (remus.checkpoint.store) appends every received chunk of an epoch
(a KIND_FILES bundle as its files) to one redo log (header, records, END
trailer; RedoWriter) and commits the epoch by renaming the finished log. A
log without its END trailer is torn: RedoLog refuses it. A committed log is
indexed when opened; a record's data is read only when asked for.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from remus.checkpoint.delta import KIND_MANIFEST, Manifest
from remus.errors import CheckpointError

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
        """Throw the log away. Never raises for a full or failing disk: closing
        flushes buffered records, which is what may fail, and the file goes anyway."""
        try:
            self._f.close()
        except OSError:
            pass
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
