"""The primary's side of the coordinator (remus.primary_coord), on an in-memory store."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from remus.coordinator import CoordinatorUnavailable, UnitRecord, protected_by
from remus.primary_coord import Coordinated
from remus.roles import P, PrimaryRole
from remus.saying import Once
from tests.support.fakes import MemoryStore

pytestmark = pytest.mark.unit

ME, BAK = "10.0.0.1", "10.0.0.2"


class Down(MemoryStore):
    def read(self, unit: str) -> tuple[UnitRecord | None, int]:
        raise CoordinatorUnavailable("coordinator zk://x unreachable")


class Agent(Coordinated):
    def __init__(self, store: Any) -> None:
        self.cfg = SimpleNamespace(coordinator=store, coord_me=ME,  # type: ignore[assignment]
                                   unit_id="kv", backup=(BAK, 7788))
        self.now = 10.0
        self.clock = lambda: self.now
        self.role = PrimaryRole("stall", 0.0)
        for ev in ("connected", "acked", "link-lost"):
            self.role.require(ev, 1.0)
        assert self.role.lease_lapsed(2.0) is P.STALLED
        self.link = None
        self.stop_event = threading.Event()
        self.last_sentence = ""
        self._coord_asked, self._recorded_backup = -1e9, BAK
        self._coord_once = Once(logging.getLogger("remus.primary"))
        self.fenced: list[str] = []
        self.opened = 0
        self.term, self.lineage = 0, ""

    def _sync_output(self) -> None:
        self.opened += 1

    def _fence(self, why: str) -> None:
        self.fenced.append(why)


def test_stalled_primary_goes_solo_when_it_wins() -> None:
    store = MemoryStore()
    store.create("kv", UnitRecord(3, ME, BAK, "protected"))
    a = Agent(store)
    a._coord_lease_lapsed()
    assert a.role.state is P.SOLO and a.opened == 1 and not a.fenced
    assert store.read("kv")[0] == UnitRecord(4, ME, None, "solo")
    assert "coordinator agreed" in a.last_sentence


def test_stalled_primary_fences_when_the_backup_won() -> None:
    store = MemoryStore()
    store.create("kv", UnitRecord(4, BAK, ME, "solo"))  # the backup took over
    a = Agent(store)
    a._coord_lease_lapsed()
    assert a.fenced and BAK in a.fenced[0] and a.opened == 0


def test_unreachable_coordinator_keeps_output_held_and_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    a = Agent(Down())
    with caplog.at_level(logging.WARNING, logger="remus.primary"):
        for _ in range(20):
            a.now += 0.6  # past ASK_EVERY: it asks every time
            a._coord_lease_lapsed()
    assert a.role.state is P.STALLED and a.role.output_held and a.opened == 0
    assert len(caplog.records) == 1 and "output held" in caplog.records[0].getMessage()


def test_asks_at_most_every_half_second() -> None:
    store = MemoryStore()
    store.create("kv", UnitRecord(3, ME, BAK, "protected"))
    calls = []
    real = store.read
    store.read = lambda u: (calls.append(u), real(u))[1]  # type: ignore[method-assign]
    a = Agent(Down())
    a.cfg.coordinator = store
    a._coord_asked = a.now - 0.1  # asked a moment ago
    a._coord_lease_lapsed()
    assert not calls and a.role.state is P.STALLED


def test_the_term_goes_into_hello_and_never_back() -> None:
    store = MemoryStore()
    store.create("kv", UnitRecord(3, ME, BAK, "protected", "L"))
    a = Agent(store)
    assert a.coord_term() == (3, "L")  # read from the record that names us
    a._coord_lease_lapsed()  # solo: term 4
    assert (a.term, a.lineage) == (4, "L") and a.coord_term() == (4, "L")
    # the coordinator restarted empty: the record comes back at our term, not at 1
    store.recs.clear()
    d = store.apply("kv", lambda r: protected_by(r, ME, BAK, a.term, a.lineage))
    assert d.write == UnitRecord(4, ME, BAK, "protected", "L")
    assert Agent(Down()).coord_term() == (0, "")  # unreachable, nothing known: no term
    # a record naming another host (we were taken over) does not lend us its term
    other = MemoryStore()
    other.create("kv", UnitRecord(9, BAK, None, "solo", "L"))
    assert Agent(other).coord_term() == (0, "")
