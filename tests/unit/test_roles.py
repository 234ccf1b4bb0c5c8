"""The HA role state machines (remus.roles), driven by a fake clock: every transition."""

from __future__ import annotations

import threading

import pytest

from remus.roles import (
    BACKUP_TABLE,
    PRIMARY_TABLE,
    B,
    BackupRole,
    P,
    PrimaryRole,
    RoleError,
    Silence,
    Verdict,
    agent_grace,
)

pytestmark = pytest.mark.unit

TIMEOUT = 0.3
TICK = 0.02


def alive(**kw: bool | str) -> Silence:
    base: dict[str, bool | str] = dict(has_checkpoint=True, current=True, auto_failover=True,
                                       policy="stall", preparing=False, unread=False)
    base.update(kw)
    return Silence(**base)  # type: ignore[arg-type]


def ticking(role: BackupRole, start: float, until: float, s: Silence) -> list[Verdict]:
    """Tick every TICK from start to until; the verdicts."""
    out, t = [], start
    while t <= until + 1e-9:
        out.append(role.tick(t, s).verdict)
        t += TICK
    return out


def replicating(now: float = 0.0) -> BackupRole:
    r = BackupRole(TIMEOUT, TICK, now)
    assert r.fire("welcome", now)
    return r


# ---- backup ---------------------------------------------------------------------


def test_backup_table_covers_each_state() -> None:
    sources = {s for s, _ in BACKUP_TABLE}
    assert sources == {B.WAITING, B.REPLICATING, B.IDLE, B.PRIMARY_LOST, B.TAKING_OVER}
    # active and failed are ends: nothing leaves them but a restart of the agent
    assert not any(s in (B.ACTIVE, B.FAILED) for s, _ in BACKUP_TABLE)


@pytest.mark.parametrize("start", [B.WAITING, B.IDLE, B.PRIMARY_LOST, B.REPLICATING])
def test_welcome_from_every_accepting_state(start: B) -> None:
    r = BackupRole(TIMEOUT, TICK, 0.0)
    r._state = start
    assert r.fire("welcome", 1.0)
    assert r.state is B.REPLICATING and r.last_heard == 1.0


@pytest.mark.parametrize("start", [B.TAKING_OVER, B.ACTIVE, B.FAILED])
def test_welcome_refused_once_a_takeover_started(start: B) -> None:
    r = BackupRole(TIMEOUT, TICK, 0.0)
    r._state = start
    assert not r.fire("welcome", 1.0)
    assert r.state is start
    with pytest.raises(RoleError, match=start.value):
        r.require("welcome", 1.0)


def test_bye_makes_idle_and_idle_never_takes_over() -> None:
    r = replicating()
    assert r.fire("bye", 0.1)
    assert r.state is B.IDLE
    assert set(ticking(r, 0.12, 5.0, alive())) == {Verdict.WAIT}


def test_silence_longer_than_the_timeout_takes_over() -> None:
    r = replicating()
    verdicts = ticking(r, TICK, 1.0, alive())
    first = verdicts.index(Verdict.TAKE_OVER)
    assert (first + 1) * TICK > TIMEOUT  # not before the timeout
    assert (first + 1) * TICK <= TIMEOUT + 2 * TICK  # and within a tick or two of it


def test_heard_restarts_the_count() -> None:
    r = replicating()
    for i in range(1, 200):  # 4 s of ticks, the primary heard every 0.1 s
        now = i * TICK
        if i % 5 == 0:
            r.heard(now)
        assert r.tick(now, alive()).verdict is Verdict.WAIT


def test_no_takeover_without_a_checkpoint_or_while_preparing_or_bytes_unread() -> None:
    for s in (alive(has_checkpoint=False), alive(preparing=True), alive(unread=True)):
        r = replicating()
        assert set(ticking(r, TICK, 2.0, s)) == {Verdict.WAIT}, s
        assert r.state is B.REPLICATING


def test_a_host_that_acknowledges_gets_its_agent_a_grace_then_a_takeover() -> None:
    """Silence of the primary's agent while its kernel acknowledges our
    heartbeats: waited out up to agent_grace longer, said once, then taken
    over all the same (an agent stuck for good); heard again, the count and
    the saying restart."""
    grace = agent_grace(TIMEOUT)
    assert grace >= 1.0
    r = replicating()
    t, sentences = 0.0, []
    while True:
        t += TICK
        d = r.tick(t, alive(host_acks=True))
        if d.verdict is not Verdict.WAIT:
            break
        sentences += [d.sentence] if d.sentence else []
    assert d.verdict is Verdict.TAKE_OVER and "stuck" in d.sentence
    assert TIMEOUT + grace < t <= TIMEOUT + grace + 2 * TICK
    assert len(sentences) == 1 and "acknowledges" in sentences[0]
    r = replicating()
    said = []
    for i in range(1, int(3.0 / TICK) + 1):  # stalls of 1 s (< timeout + grace)
        t = i * TICK
        if i % int(1.0 / TICK) == 0:
            r.heard(t)
        d = r.tick(t, alive(host_acks=True))
        assert d.verdict is Verdict.WAIT
        said += [d.sentence] if d.sentence else []
    assert len(said) == 3  # once for each stall
    assert r.state is B.REPLICATING


def test_unread_bytes_count_as_heard() -> None:
    r = replicating()
    r.tick(TIMEOUT + TICK, alive(unread=True))
    assert r.silence(TIMEOUT + TICK) == 0.0


@pytest.mark.parametrize("s,why", [
    (alive(current=False), "earlier run"),
    (alive(auto_failover=False), "--no-auto-failover"),
    (alive(policy="continue"), "--on-peer-loss continue"),
])
def test_silent_primary_that_may_not_be_replaced_is_lost(s: Silence, why: str) -> None:
    r = replicating()
    t, d = TICK, r.tick(TICK, s)
    while d.verdict is Verdict.WAIT and t < 2:
        t += TICK
        d = r.tick(t, s)
    assert d.verdict is Verdict.LOST and why in d.sentence
    assert r.state is B.PRIMARY_LOST
    assert set(ticking(r, t + TICK, t + 2, s)) == {Verdict.WAIT}  # said once
    assert r.fire("welcome", t + 3)  # a primary may come back
    assert r.state is B.REPLICATING


def test_not_scheduled_is_not_silence() -> None:
    r = replicating()
    assert r.tick(TICK, alive()).verdict is Verdict.WAIT
    # the agent was stopped for 5 s: the first tick after it must not take over
    d = r.tick(5.0, alive())
    assert d.verdict is Verdict.WAIT and "not scheduled" in d.sentence
    assert r.tick(5.0 + TICK, alive()).verdict is Verdict.WAIT
    # but real silence after it still counts
    assert Verdict.TAKE_OVER in ticking(r, 5.0 + 2 * TICK, 6.0, alive())


def test_takeover_then_restored_or_failed() -> None:
    r = replicating()
    r.require("takeover", 1.0)
    assert r.state is B.TAKING_OVER
    assert not r.fire("takeover", 1.1)  # a second takeover (manual + detector) loses
    assert not r.fire("welcome", 1.1)  # a primary answered meanwhile is refused
    assert r.fire("restored", 1.5) and r.state is B.ACTIVE and r.since == 1.5
    r2 = replicating()
    r2.require("takeover", 1.0)
    assert r2.fire("restore-failed", 1.2) and r2.state is B.FAILED
    assert not r2.fire("takeover", 2.0)


def test_manual_takeover_from_waiting_and_primary_lost() -> None:
    for st in (B.WAITING, B.PRIMARY_LOST, B.IDLE):
        r = BackupRole(TIMEOUT, TICK, 0.0)
        r._state = st
        assert r.fire("takeover", 1.0) and r.state is B.TAKING_OVER


def test_welcome_and_takeover_race_has_one_winner() -> None:
    """A HELLO being answered and the detector's takeover, from two threads."""
    for _ in range(200):
        r = replicating()
        r.fire("lost", 0.5)
        results: dict[str, bool] = {}
        go = threading.Barrier(2)

        def do(ev: str, r: BackupRole = r, results: dict[str, bool] = results,
               go: threading.Barrier = go) -> None:
            go.wait()
            results[ev] = r.fire(ev, 1.0)

        ts = [threading.Thread(target=do, args=(ev,)) for ev in ("welcome", "takeover")]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        # either the welcome came first (then the takeover still wins: it is allowed
        # from replicating) or the takeover did and the welcome was refused
        assert results["takeover"]
        assert r.state is B.TAKING_OVER
        if results["welcome"]:
            continue
        assert not r.fire("welcome", 1.1)


# ---- primary --------------------------------------------------------------------


def test_primary_first_protection() -> None:
    r = PrimaryRole("stall", 0.0)
    assert r.state is P.CONNECTING and r.output_held
    assert not r.fire("acked", 0.1)  # no ACK without a link
    r.require("connected", 0.2)
    assert r.state is P.SYNCING and r.output_held
    r.require("acked", 0.3)
    assert r.state is P.PROTECTED and r.ever_protected and r.since == 0.3


def test_link_lost_before_the_first_ack_returns_to_where_it_connected_from() -> None:
    for start in (P.CONNECTING, P.SOLO, P.STALLED):
        r = PrimaryRole("stall", 0.0)
        r._state = start
        r.require("connected", 1.0)
        r.require("link-lost", 1.1)
        assert r.state is start


@pytest.mark.parametrize("policy,end,held", [("stall", P.STALLED, True),
                                              ("continue", P.SOLO, False)])
def test_peer_loss_policy(policy: str, end: P, held: bool) -> None:
    r = PrimaryRole(policy, 0.0)
    r.require("connected", 0.1)
    r.require("acked", 0.2)
    r.require("link-lost", 1.0)
    assert r.state is P.RECONNECTING and r.output_held  # the lease still runs
    assert r.lease_lapsed(1.2) is end
    assert r.output_held is held
    assert r.lease_lapsed(1.3) is None  # decided once
    r.require("connected", 2.0)  # the backup (or another) returns
    assert r.state is P.SYNCING and r.output_held
    r.require("acked", 2.1)
    assert r.state is P.PROTECTED


def test_lease_lapse_means_nothing_unless_reconnecting() -> None:
    for st in (P.CONNECTING, P.SYNCING, P.PROTECTED, P.SOLO, P.STALLED, P.FENCED):
        r = PrimaryRole("stall", 0.0)
        r._state = st
        assert r.lease_lapsed(5.0) is None and r.state is st


@pytest.mark.parametrize("policy", ["stall", "continue"])
def test_backup_may_take_over_only_while_lost_after_an_ack(policy: str) -> None:
    """What `remus stop` (and a clean stop's release) must respect."""
    r = PrimaryRole(policy, 0.0)
    r.require("connected", 0.1)
    assert not r.backup_may_take_over()  # nothing acked: nothing to restore
    r.require("link-lost", 0.2)
    assert not r.backup_may_take_over()  # still never protected
    r.require("connected", 0.3)
    r.require("acked", 0.4)
    assert not r.backup_may_take_over()  # linked: a Bye reaches it
    r.require("link-lost", 1.0)
    assert r.backup_may_take_over() is (policy == "stall")
    r.lease_lapsed(1.2)
    assert r.backup_may_take_over() is (policy == "stall")  # stalled, or solo
    r.require("connected", 2.0)
    assert not r.backup_may_take_over()  # it answers as our backup


def test_solo_after_takeover_until_a_backup_attaches() -> None:
    r = PrimaryRole("stall", 0.0, solo=True)
    assert r.state is P.SOLO and not r.output_held
    assert "SOLO" in r.sentence("10.0.0.1:7788")
    r.require("connected", 1.0)
    assert r.output_held  # output commit from the moment a backup is attached
    r.require("acked", 1.5)
    r.require("link-lost", 3.0)
    assert r.lease_lapsed(3.2) is P.STALLED  # now the policy applies


def test_fenced_from_anywhere_and_final() -> None:
    for st in P:
        if st is P.FENCED:
            continue
        r = PrimaryRole("stall", 0.0)
        r._state = st
        assert r.fire("fenced", 1.0) and r.state is P.FENCED and not r.output_held
    assert not any(s is P.FENCED for s, _ in PRIMARY_TABLE)


def test_switchover_only_when_protected() -> None:
    r = PrimaryRole("stall", 0.0)
    assert not r.fire("switchover", 0.1)
    r.require("connected", 0.2)
    assert not r.fire("switchover", 0.3)  # not before the backup holds a checkpoint
    r.require("acked", 0.4)
    r.require("switchover", 0.5)
    assert r.state is P.HANDING_OVER and r.output_held
    assert r.fire("acked", 0.6) and r.state is P.HANDING_OVER  # the final epoch's ACK
    r.require("handed-over", 0.7)
    assert r.state is P.HANDED_OVER and not r.output_held
    r2 = PrimaryRole("stall", 0.0)
    r2.require("connected", 0.1)
    r2.require("acked", 0.2)
    r2.require("switchover", 0.3)
    r2.require("abort-switchover", 0.4)
    assert r2.state is P.PROTECTED
    r2.require("switchover", 0.5)
    r2.require("link-lost", 0.6)  # the backup died mid-switchover
    assert r2.state is P.RECONNECTING


def test_unknown_policy_refused() -> None:
    with pytest.raises(RoleError):
        PrimaryRole("maybe", 0.0)


def test_every_state_has_a_sentence() -> None:
    for st in P:
        r = PrimaryRole("stall", 0.0)
        r._state = st
        assert r.sentence("b:1")
