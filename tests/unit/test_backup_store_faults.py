"""A backup whose store cannot hold checkpoints refuses them instead of acknowledging.

A real Backup with a real CheckpointStore, fed the records of real epochs;
the faults are injected where the disk would fail (ENOSPC on a write) or
where an acknowledged epoch turns out not to apply.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest

from remus.backup import Backup, BackupConfig
from remus.checkpoint.delta_encoder import DeltaEncoder
from remus.checkpoint.redo import RedoWriter
from remus.checkpoint.store import CheckpointStore
from remus.config import Timing
from remus.errors import CheckpointError
from remus.protocol import EpochComplete
from remus.protocol import messages as m
from tests.support.fakes import FakeLink
from tests.support.timing import wait_for
from tests.unit.test_store import evolution


@pytest.fixture
def epochs(tmp_path: Path) -> list[list[Any]]:
    dumps = evolution(tmp_path / "dumps")
    enc = DeltaEncoder()
    chain = [list(enc.encode(d, i == 0)) for i, d in enumerate(dumps[:3])]
    return [*chain, list(DeltaEncoder().encode(dumps[2], True))]  # [3]: dump 2, full


def new_backup(workdir: Path) -> Backup:
    timing = Timing(interval=0.05, heartbeat=0.05, lease=0.2, takeover_timeout=0.3)
    return Backup(BackupConfig(listen=("127.0.0.1", 0), psk=b"k" * 32, workdir=workdir,
                               timing=timing))


def send(b: Backup, link: FakeLink, gen: int, epoch: int, chunks: list[Any],
         full: bool) -> Any:
    """One epoch through the backup's handlers; the answer it sent."""
    b._on_event(link, m.EpochBegin(generation=gen, epoch=epoch,  # type: ignore[arg-type]
                                   base_epoch=-1 if full else epoch - 1, full=full))
    for kind, name, meta, data in chunks:
        b._on_event(link, m.Chunk(epoch=epoch, kind=kind, name=name,  # type: ignore[arg-type]
                                  meta=meta, data=data))
    b._on_event(link, EpochComplete(gen, epoch, ok=True))  # type: ignore[arg-type]
    return link.sent[-1]


def test_a_full_disk_refuses_the_epoch_and_keeps_what_was_committed(
        tmp_path: Path, epochs: list[list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    b, link = new_backup(tmp_path / "bak"), FakeLink()
    assert isinstance(send(b, link, 1, 0, epochs[0], True), m.Ack)
    b.store.apply_pending()
    images = {p.name: p.read_bytes() for p in b.store.images_dir().iterdir()}

    real_append = RedoWriter.append
    calls = 0

    def enospc(self: RedoWriter, record: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, record)

    monkeypatch.setattr(RedoWriter, "append", enospc)
    answer = send(b, link, 1, 1, epochs[1], False)
    assert isinstance(answer, m.Nack) and "No space left on device" in answer.reason
    assert (b.generation, b.epoch) == (1, 0)  # nothing acknowledged
    assert b.store.committed() == (1, 0)
    assert not list((tmp_path / "bak" / "store" / "incoming").iterdir())  # nothing half-kept
    assert {p.name: p.read_bytes() for p in b.store.images_dir().iterdir()} == images
    assert "refused epoch 1" in b.status()["last"]

    # Space again: the primary's next try (a new generation, full) is acknowledged.
    monkeypatch.setattr(RedoWriter, "append", real_append)
    assert isinstance(send(b, link, 2, 2, epochs[3], True), m.Ack)
    assert b.status()["store_problem"] is None


def test_an_epoch_that_does_not_apply_stops_the_acks_until_one_does(
        tmp_path: Path, epochs: list[list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    b, link = new_backup(tmp_path / "bak"), FakeLink()
    assert isinstance(send(b, link, 1, 0, epochs[0], True), m.Ack)
    real_apply = CheckpointStore.apply_pending

    def broken(self: CheckpointStore) -> int:
        raise CheckpointError("epoch 1: pagemap-1.img neither sent nor kept")

    # Epoch 1 was acknowledged (the commit point), then its apply fails in the
    # background: the problem is reported, not only logged...
    assert isinstance(send(b, link, 1, 1, epochs[1], False), m.Ack)
    monkeypatch.setattr(CheckpointStore, "apply_pending", broken)
    loop = threading.Thread(target=b._apply_loop)
    b.apply_event.set()
    loop.start()
    assert wait_for(lambda: b.store_problem is not None, 10)
    b.stop_event.set()
    loop.join()
    b.stop_event.clear()
    st = b.status()
    assert st["store_problem"] and "neither sent nor kept" in st["store_problem"]
    # ...and later epochs are refused, not acknowledged.
    answer = send(b, link, 1, 2, epochs[2], False)
    assert isinstance(answer, m.Nack) and "cannot hold checkpoints" in answer.reason
    # A full checkpoint that applies clears the problem.
    monkeypatch.setattr(CheckpointStore, "apply_pending", real_apply)
    assert isinstance(send(b, link, 2, 3, epochs[3], True), m.Ack)
    assert b.status()["store_problem"] is None
    assert b.store.pending() == 0  # applied before it was acknowledged
