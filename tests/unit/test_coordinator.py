"""The coordinator's rules (remus.coordinator), and `apply` against an in-memory
store with the same contract: who may run a unit, decided by compare-and-set."""

from __future__ import annotations

import threading

import pytest

from remus.coordinator import (
    UnitRecord,
    decide_claim,
    decide_solo,
    decide_takeover,
    parse_url,
    protected_by,
)
from remus.errors import ConfigError, RemusError
from tests.support.fakes import MemoryStore

pytestmark = pytest.mark.unit

PRI, BAK, OTHER = "10.0.0.1", "10.0.0.2", "10.0.0.9"
PROTECTED = UnitRecord(4, PRI, BAK, "protected")


def test_record_round_trip_and_bad_records() -> None:
    assert UnitRecord.from_json(PROTECTED.to_json()) == PROTECTED
    for raw in (b"{", b"{}", b'{"term": 1, "primary": "a", "backup": null, "state": "odd"}'):
        with pytest.raises(RemusError):
            UnitRecord.from_json(raw)


def test_claim() -> None:
    d = decide_claim(None, PRI, None)
    assert d.won and d.write is not None and d.write.lineage  # a new lineage
    assert d.write == UnitRecord(1, PRI, None, "solo", d.write.lineage)
    assert decide_claim(PROTECTED, PRI, BAK).won and decide_claim(PROTECTED, PRI, BAK).write is None
    d = decide_claim(PROTECTED, OTHER, None)
    assert not d.won and PRI in d.why  # another host runs it: do not start a second copy


def test_takeover_only_as_the_recorded_backup_of_a_protected_unit() -> None:
    d = decide_takeover(PROTECTED, BAK)
    assert d.won and d.write == UnitRecord(5, BAK, PRI, "solo")
    for rec, me in ((PROTECTED, OTHER),                               # not its backup
                    (UnitRecord(5, PRI, None, "solo"), BAK),          # the primary went solo
                    (UnitRecord(5, BAK, PRI, "solo"), BAK),           # already taken over
                    (None, BAK)):                                     # no record
        d = decide_takeover(rec, me)
        assert not d.won and d.write is None, (rec, me)


def test_solo() -> None:
    d = decide_solo(PROTECTED, PRI)
    assert d.won and d.write == UnitRecord(5, PRI, None, "solo")
    assert decide_solo(UnitRecord(5, PRI, None, "solo"), PRI).write is None  # already
    d = decide_solo(UnitRecord(5, BAK, PRI, "solo"), PRI)
    assert not d.won and BAK in d.why  # taken over: fence


def test_protected_by() -> None:
    d = protected_by(UnitRecord(5, BAK, PRI, "solo"), BAK, PRI)
    assert d.won and d.write == UnitRecord(5, BAK, PRI, "protected")
    assert protected_by(d.write, BAK, PRI).write is None
    assert not protected_by(UnitRecord(6, PRI, None, "solo"), BAK, PRI).won
    d = protected_by(None, PRI, BAK)  # the coordinator came back empty
    assert d.won and d.write == UnitRecord(1, PRI, BAK, "protected", d.write.lineage)


def test_apply_rereads_when_it_loses_a_race() -> None:
    store = MemoryStore()
    store.create("u", PROTECTED)
    real_read = store.read
    raced = []

    def read(unit: str) -> tuple[UnitRecord | None, int]:
        rec, v = real_read(unit)
        if not raced:  # the backup takes over between our read and our write
            raced.append(True)
            store.cas(unit, UnitRecord(5, BAK, PRI, "solo"), v)
        return rec, v

    store.read = read  # type: ignore[method-assign]
    d = store.apply("u", lambda r: decide_solo(r, PRI))
    assert not d.won and BAK in d.why  # decided again on what is there now


@pytest.mark.parametrize("round_", range(100))
def test_solo_and_takeover_race_has_exactly_one_winner(round_: int) -> None:
    store = MemoryStore()
    store.create("u", PROTECTED)
    go = threading.Barrier(2)
    won: dict[str, bool] = {}

    def race(who: str) -> None:
        go.wait()
        rule = (lambda r: decide_solo(r, PRI)) if who == "pri" else (
            lambda r: decide_takeover(r, BAK))
        won[who] = store.apply("u", rule).won

    ts = [threading.Thread(target=race, args=(w,)) for w in ("pri", "bak")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert won["pri"] != won["bak"], won
    rec = store.read("u")[0]
    assert rec is not None and rec.primary == ("10.0.0.1" if won["pri"] else "10.0.0.2")


def test_url() -> None:
    assert parse_url("zk://10.0.0.4:2181/remus/pair") == ("10.0.0.4:2181", "/remus/pair")
    assert parse_url("zk://a:1,b:2") == ("a:1,b:2", "/remus")
    for bad in ("http://a:1/x", "zk:///x", "10.0.0.4:2181"):
        with pytest.raises(ConfigError):
            parse_url(bad)


def test_a_record_recreated_keeps_the_primarys_term_and_lineage() -> None:
    # a coordinator restarted empty: the running primary writes its record again
    assert decide_solo(None, PRI, term=7, lineage="L").write == UnitRecord(7, PRI, None, "solo", "L")
    assert protected_by(None, PRI, BAK, term=7, lineage="L").write == \
        UnitRecord(7, PRI, BAK, "protected", "L")
    # every change of who runs it keeps the lineage
    rec = UnitRecord(3, PRI, BAK, "protected", "L")
    assert decide_takeover(rec, BAK).write == UnitRecord(4, BAK, PRI, "solo", "L")
    assert decide_solo(rec, PRI).write == UnitRecord(4, PRI, None, "solo", "L")
    assert UnitRecord.from_json(rec.to_json()) == rec
    # a fresh record (no primary to remember one): a lineage of its own each time
    a, b = (decide_claim(None, PRI, None).write for _ in range(2))
    assert a is not None and b is not None and a.lineage != b.lineage
