"""An epoch being received by the backup's checkpoint store.

CheckpointStore.begin() returns a StagedEpoch: its records are checked as
they arrive and appended to a redo log in the store's incoming/ directory
(remus.checkpoint.redo); commit() hands the finished log back to the store,
whose rename of it into redo/ is the commit point. An epoch that is aborted,
or never committed, leaves nothing behind that a recovery keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from remus.checkpoint import images
from remus.checkpoint.delta import (
    KIND_FILE,
    KIND_FILE_LZ4,
    KIND_FILES,
    KIND_MANIFEST,
    MAX_FILE_BYTES,
    PAGE_KINDS,
    Manifest,
    check_file_name,
    decompress,
    unbundle,
)
from remus.checkpoint.redo import LogHeader, Record, RedoWriter
from remus.errors import ProtocolError

if TYPE_CHECKING:
    from remus.checkpoint.store import KindHandler


class StagedEpoch:
    """An epoch being received; see CheckpointStore.begin().

    ``handlers`` stage the records of kinds the store does not know (the
    store's registry, looked up as records arrive); ``commit`` makes the
    closed redo log the committed epoch.
    """

    def __init__(
        self,
        header: LogHeader,
        path: Path,
        handlers: Mapping[int, KindHandler],
        commit: Callable[[RedoWriter, LogHeader], None],
    ) -> None:
        self.header = header
        self._handlers = handlers
        self._commit = commit
        self._writer: RedoWriter | None = RedoWriter(path, header)
        self._manifest: Manifest | None = None
        self._names: list[tuple[int, str]] = []

    def add(self, kind: int, name: str, meta: bytes, data: bytes) -> None:
        """Append one record; ProtocolError if it is malformed or out of place."""
        if self._writer is None:
            raise ProtocolError("epoch already committed or aborted")
        if self._manifest is not None:
            raise ProtocolError("record after the manifest")
        if kind == KIND_FILES:
            # Unpacked here: the redo log and everything after it see plain files.
            for fname, fdata in unbundle(meta, data):
                self._names.append((KIND_FILE, fname))
                self._writer.append(Record(KIND_FILE, fname, b"", fdata))
            return
        if kind == KIND_FILE_LZ4:
            check_file_name(name)
            kind, data = KIND_FILE, decompress(data, MAX_FILE_BYTES, f"file {name}")
        record = Record(kind, name, meta, data)
        if kind == KIND_MANIFEST:
            self._manifest = Manifest.from_json(meta).validated()
        elif kind == KIND_FILE:
            check_file_name(name)
        elif kind in PAGE_KINDS:
            if not images.is_pagemap(name):
                raise ProtocolError(f"page record for {name!r}, not a pagemap")
        elif kind in self._handlers:
            self._handlers[kind].stage(record)
        else:
            raise ProtocolError(f"unknown record kind {kind}")
        self._names.append((kind, name))
        self._writer.append(record)

    def commit(self) -> None:
        """Commit the epoch (survives a crash of the agent; fsync only with the store's
        fsync option); call after verification."""
        if self._writer is None:
            raise ProtocolError("epoch already committed or aborted")
        m = self._manifest
        if m is None:
            raise ProtocolError(f"epoch {self.header.epoch} has no manifest")
        for kind, name in self._names:
            if (kind == KIND_FILE and name not in m.files) or (
                kind in PAGE_KINDS and name not in m.pagemaps
            ):
                raise ProtocolError(f"{name} was sent but is not in the manifest")
        writer, self._writer = self._writer, None
        self._commit(writer, self.header)

    @property
    def open(self) -> bool:
        """Neither committed nor aborted yet."""
        return self._writer is not None

    def abort(self) -> None:
        """Throw the epoch away (idempotent)."""
        if self._writer is not None:
            self._writer.discard()
            self._writer = None

    def __enter__(self) -> StagedEpoch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
