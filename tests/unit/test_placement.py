"""Fleet placement (remus.placement): pure rules, no coordinator."""

from __future__ import annotations

import pytest

from remus.coordinator import UnitRecord
from remus.placement import DEFAULT_NEED, Host, Placement, place

pytestmark = pytest.mark.unit

GIB = 1 << 30
A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"


def hosts(*addrs: str, mem: int = 8 * GIB) -> dict[str, Host]:
    return {a: Host(a, mem) for a in addrs}


def test_new_services_spread_and_backups_never_share_the_primary_host() -> None:
    out = place(["s1", "s2"], hosts(A, B, C), {}, {})
    assert set(out) == {"s1", "s2"}
    for p in out.values():
        assert p.backup is not None and p.backup != p.primary
    carried = [h for p in out.values() for h in (p.primary, p.backup)]
    assert max(carried.count(h) for h in (A, B, C)) <= 2  # 4 roles on 3 hosts


def test_a_running_unit_stays_where_its_record_says() -> None:
    recs = {"s1": UnitRecord(3, C, A, "protected")}
    out = place(["s1"], hosts(A, B, C), recs, {"s1": Placement(A, B)})
    assert out == {"s1": Placement(C, B)}  # primary follows the record; backup kept (alive)


def test_after_a_failover_the_backup_moves_to_a_spare() -> None:
    # A died: B took over (the record says so); A is gone from the live hosts
    recs = {"s1": UnitRecord(2, B, A, "solo")}
    out = place(["s1"], hosts(B, C), recs, {"s1": Placement(A, B)})
    assert out == {"s1": Placement(B, C)}


def test_no_spare_means_degraded_then_protected_when_a_host_appears() -> None:
    recs = {"s1": UnitRecord(2, B, None, "solo")}
    out = place(["s1"], hosts(B), recs, {"s1": Placement(A, B)})
    assert out == {"s1": Placement(B, None)}
    out = place(["s1"], hosts(B, C), recs, {"s1": Placement(B, None)})
    assert out == {"s1": Placement(B, C)}


def test_nothing_changes_nothing_written() -> None:
    cur = {"s1": Placement(A, B)}
    assert place(["s1"], hosts(A, B, C), {"s1": UnitRecord(1, A, B, "protected")}, cur) == {}


def test_memory_decides() -> None:
    hs = {A: Host(A, 8 * GIB), B: Host(B, DEFAULT_NEED - 1), C: Host(C, 2 * GIB)}
    out = place(["s1"], hs, {"s1": UnitRecord(1, A, None, "solo")}, {}, sizes={"s1": GIB})
    assert out == {"s1": Placement(A, C)}  # B lacks memory
    out = place(["s1"], hs, {"s1": UnitRecord(1, A, None, "solo")}, {}, sizes={"s1": 4 * GIB})
    assert out == {"s1": Placement(A, None)}  # nobody has 4 GiB free: degraded


def test_a_host_carrying_five_primaries_dies() -> None:
    names = [f"s{i}" for i in range(5)]
    recs = {n: UnitRecord(2, B, A, "solo") for n in names}  # all taken over by B
    cur = {n: Placement(A, B) for n in names}
    out = place(names, hosts(B, C), recs, cur)
    assert all(out[n] == Placement(B, C) for n in names)


def test_preferred_host_for_new_services_only() -> None:
    out = place(["s1", "s2"], hosts(A, B, C), {}, {}, prefer={"s1": C, "s2": "10.9.9.9"})
    assert out["s1"].primary == C  # alive: there
    assert out["s2"].primary in (A, B, C)  # not alive: anywhere
    recs = {"s1": UnitRecord(2, A, B, "protected")}
    assert place(["s1"], hosts(A, B, C), recs, {}, prefer={"s1": C})["s1"].primary == A


def test_a_coordinator_that_lost_its_placements_keeps_the_recorded_backup() -> None:
    recs = {"s1": UnitRecord(2, A, C, "protected")}  # written back by the primary
    assert place(["s1"], hosts(A, B, C), recs, {}) == {"s1": Placement(A, C)}


def test_what_an_agent_runs_for_a_service() -> None:
    from remus.fleet import wants

    a, b, c = "10.0.0.1", "10.0.0.2", "10.0.0.3"
    rec = UnitRecord(3, a, b, "protected")
    assert wants(a, rec, Placement(a, b)) == "running"       # the unit runs here
    assert wants(b, rec, Placement(a, b)) == "backup"
    assert wants(c, rec, Placement(a, b)) is None            # nothing here: stop what runs
    assert wants(a, None, Placement(a, b)) == "primary"      # new service, placed here
    assert wants(a, None, Placement(a, None)) is None        # no backup yet: not started
    assert wants(c, rec, None) is None                       # a record names others
    # A coordinator that restarted empty: no record, no placement yet. Unknown is
    # not "not here": whatever runs is kept (the test that found it:
    # tests/reliability/test_fleet.py::test_coordinator_restarted_empty).
    assert wants(a, None, None) == "keep"


def test_switchover_to_a_third_host_moves_the_backup_there_first() -> None:
    recs = {"s1": UnitRecord(2, A, B, "protected")}
    cur = {"s1": Placement(A, B)}
    assert place(["s1"], hosts(A, B, C), recs, cur, backup_to={"s1": C}) == \
        {"s1": Placement(A, C)}
    # already there: nothing to write; the target is the primary or gone: ignored
    assert place(["s1"], hosts(A, B, C), recs, {"s1": Placement(A, C)},
                 backup_to={"s1": C}) == {}
    assert place(["s1"], hosts(A, B, C), recs, cur, backup_to={"s1": A}) == {}
    assert place(["s1"], hosts(A, B), recs, cur, backup_to={"s1": C}) == {}
