"""The backup fails over only to a checkpoint of the agent run that last connected."""

from __future__ import annotations

from pathlib import Path

from remus.backup import Backup, BackupConfig
from remus.config import Timing
from remus.protocol import messages as m
from tests.support.fakes import FakeLink, commit, hello


def backup(workdir: Path) -> Backup:
    timing = Timing(interval=0.05, heartbeat=0.05, lease=0.2, takeover_timeout=0.3)
    return Backup(BackupConfig(listen=("127.0.0.1", 0), psk=b"k" * 32, workdir=workdir, timing=timing))


def test_checkpoint_of_an_earlier_run_is_not_current(tmp_path: Path) -> None:
    b = backup(tmp_path)
    b._on_hello(FakeLink(), hello("run-a", 1))  # type: ignore[arg-type]
    assert not b.checkpoint_is_current()  # nothing committed yet
    commit(b, 1, 0)
    assert b.checkpoint_is_current()
    # the same run reconnecting (a stale link): its checkpoint is still the one to restore
    b._on_hello(FakeLink(), hello("run-a", 2))  # type: ignore[arg-type]
    assert b.checkpoint_is_current()
    # a new run of the unit (after `remus stop`): the old checkpoint must not be restored ...
    b._on_hello(FakeLink(), hello("run-b", 3))  # type: ignore[arg-type]
    assert not b.checkpoint_is_current()
    # ... also after a backup restart, before the new run's first commit
    b = backup(tmp_path)
    b.epoch = 0
    assert not b.checkpoint_is_current()
    commit(b, 3, 1)
    assert b.checkpoint_is_current()
    b = backup(tmp_path)  # and its commit is remembered across a restart
    b.epoch = 1
    assert b.checkpoint_is_current()


def test_agents_without_instance_are_trusted(tmp_path: Path) -> None:
    b = backup(tmp_path)
    b._on_hello(FakeLink(), hello(None, 1))  # type: ignore[arg-type]
    commit(b, 1, 0)
    assert b.checkpoint_is_current()


def hello_term(term: int | None, generation: int, unit: str = "kv",
               lineage: str = "L") -> m.Hello:
    h = hello("run-a", generation)
    spec = {**h.spec, **({"term": term, "lineage": lineage} if term is not None else {})}
    return m.Hello(version=h.version, unit_id=unit, generation=generation, nonce=h.nonce,
                   spec=spec)


def test_a_primary_of_an_older_term_is_refused_and_told_to_fence(tmp_path: Path) -> None:
    b = backup(tmp_path)
    b._on_hello(FakeLink(), hello_term(3, 1))  # type: ignore[arg-type]
    assert b._older_term(hello_term(3, 2)) == ""  # the same term: our primary
    assert b._older_term(hello_term(4, 2)) == ""  # newer (it went solo, came back)
    assert b._older_term(hello_term(None, 2)) == ""  # no coordinator: no term to compare
    why = b._older_term(hello_term(2, 9))
    assert "taken over" in why and "term 2" in why and "term 3" in why  # the primary fences
    assert b._older_term(hello_term(1, 9, unit="other")) == ""  # another unit: not ours to judge
    b = backup(tmp_path)  # remembered across a restart of the backup
    assert b._older_term(hello_term(2, 9))
    b._on_hello(FakeLink(), hello_term(None, 3))  # type: ignore[arg-type]  # keeps what it saw
    assert b._older_term(hello_term(2, 9))


def test_a_record_made_anew_starts_a_new_lineage(tmp_path: Path) -> None:
    # The coordinator lost everything (or the unit's name is used again) and a new
    # primary made a new record at term 1: not "older" than the old lineage's 5.
    b = backup(tmp_path)
    b._on_hello(FakeLink(), hello_term(5, 1, lineage="old"))  # type: ignore[arg-type]
    assert b._older_term(hello_term(1, 2, lineage="new")) == ""
    b._on_hello(FakeLink(), hello_term(1, 2, lineage="new"))  # type: ignore[arg-type]
    assert b._older_term(hello_term(1, 3, lineage="new")) == ""
    b._on_hello(FakeLink(), hello_term(2, 4, lineage="new"))  # type: ignore[arg-type]
    assert b._older_term(hello_term(1, 5, lineage="new"))  # within it: fenced by term
