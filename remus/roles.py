"""The HA roles as state machines, without I/O: one transition table each.

An agent owns one role object and is a thin loop around it: it feeds events
in (a HELLO answered, an ACK, a link lost, a clock tick) and carries out
the decisions that come back (take over, stall, open the output, fence).
Times are passed in (`now`), never read here, so tests drive a fake clock
through every transition in milliseconds. Each object is shared by the
agent's threads: every method takes the object's lock, and a transition
that is not in the table changes nothing and returns False (a HELLO that
lost the race against a takeover learns it here, atomically).

Backup (docs/roles.md has the diagram):

    waiting ──welcome──> replicating ──bye──> idle
        ^                 │   ^  │                   (welcome from idle or
        │                 │   │  └─lost──> primary-lost      primary-lost too)
        └─────────────────┘   └──welcome──┘
    waiting | replicating | idle | primary-lost ──takeover──> taking-over
    taking-over ──restored──> active        taking-over ──restore-failed──> failed

Primary (the unit's side; output commit is on in every state but `solo`):

    connecting ──connected──> syncing ──acked──> protected
    syncing ──link-lost──> the state it connected from (nothing acked on that link)
    protected ──link-lost──> reconnecting ──connected──> syncing
    reconnecting ──lease-lapsed/stall──> stalled ──connected──> syncing
    reconnecting ──lease-lapsed/continue──> solo ──connected──> syncing
    solo (after a takeover: no backup yet, output flows) ──connected──> syncing
    protected ──switchover──> handing-over ──handed-over──> handed-over
    any ──fenced──> fenced
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from remus.errors import RemusError


class RoleError(RemusError):
    """A role was asked for something its state forbids (a local misuse)."""


# ---- backup -----------------------------------------------------------------------


class B(enum.Enum):
    WAITING = "waiting"            # no primary yet (or none since we started)
    REPLICATING = "replicating"    # a primary streams checkpoints to us
    IDLE = "idle"                  # the primary ended protection (BYE)
    PRIMARY_LOST = "primary-lost"  # silent, but we may not take over (see detail)
    TAKING_OVER = "taking-over"    # restoring the committed checkpoint
    ACTIVE = "active"              # the unit runs here now
    FAILED = "failed"              # a takeover failed; an operator must look


_ACCEPTING = (B.WAITING, B.REPLICATING, B.IDLE, B.PRIMARY_LOST)

BACKUP_TABLE: dict[tuple[B, str], B] = {
    **{(s, "welcome"): B.REPLICATING for s in _ACCEPTING},
    (B.REPLICATING, "bye"): B.IDLE,
    (B.REPLICATING, "lost"): B.PRIMARY_LOST,
    **{(s, "takeover"): B.TAKING_OVER for s in _ACCEPTING},
    (B.TAKING_OVER, "restored"): B.ACTIVE,
    (B.TAKING_OVER, "restore-failed"): B.FAILED,
}


class Verdict(enum.Enum):
    WAIT = "wait"
    TAKE_OVER = "take-over"
    LOST = "lost"              # silent, but no takeover allowed: say why


@dataclass(frozen=True)
class Silence:
    """What the detector knows at a tick besides the clock."""

    has_checkpoint: bool     # a committed epoch exists
    current: bool            # ... from the agent run that last connected
    auto_failover: bool
    policy: str              # the primary's --on-peer-loss
    preparing: bool          # a HELLO is being answered: the primary is alive
    unread: bool             # the primary's bytes wait in our socket
    # The primary's kernel acknowledged our data (our heartbeats) within the
    # takeover timeout: its host and the path are up, its agent may only be
    # stalled (a long GIL hold, a starved core). Grants agent_grace() more.
    host_acks: bool = False


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    sentence: str = ""


def agent_grace(takeover_timeout: float) -> float:
    """How much longer than the takeover timeout a primary agent may be silent
    while its host still acknowledges our data (Silence.host_acks).

    A host that died, or a cut path, acknowledges nothing: the takeover comes
    after the timeout as before. A primary agent that does not run for a
    while (measured: 131-359 ms, every thread of it, on a 2-core machine
    busy with 100 MiB epochs of a 1 GiB unit) holds its unit's output too
    (only the agent releases it), so waiting for it costs no consistency,
    only a later takeover when the agent is stuck for good (SIGSTOP, a hang).
    """
    return max(1.0, 3 * takeover_timeout)


class BackupRole:
    """The backup's HA state and its failure detector (see module doc)."""

    def __init__(self, takeover_timeout: float, tick: float, now: float) -> None:
        self.takeover_timeout = takeover_timeout
        self.agent_grace = agent_grace(takeover_timeout)
        self._grace_said = False
        self.tick_period = tick
        self._state = B.WAITING
        self._lock = threading.Lock()
        self.last_heard = now
        self._last_tick = now
        self.since = now

    @property
    def state(self) -> B:
        return self._state

    def fire(self, event: str, now: float) -> bool:
        """Take the transition for `event`; False (nothing changes) if the table has none."""
        with self._lock:
            nxt = BACKUP_TABLE.get((self._state, event))
            if nxt is None:
                return False
            if nxt is not self._state:
                self._state, self.since = nxt, now
            if event == "welcome":
                self.last_heard = now
            return True

    def require(self, event: str, now: float) -> None:
        """fire(), raising RoleError with the state when the table says no."""
        if not self.fire(event, now):
            raise RoleError(f"cannot {event} while {self._state.value}")

    def heard(self, now: float) -> None:
        """The primary showed life (bytes, a heartbeat, a finished HELLO)."""
        with self._lock:
            self.last_heard = max(self.last_heard, now)
            self._grace_said = False

    def resync(self, now: float) -> None:
        """The caller was busy on purpose (a takeover attempt that asked the
        coordinator): that time is not a scheduling gap."""
        with self._lock:
            self._last_tick = now

    def silence(self, now: float) -> float:
        with self._lock:
            return now - self.last_heard

    def tick(self, now: float, s: Silence) -> Decision:
        """The failure detector, once per tick: wait, take over, or give up saying why.

        Silence we did not observe (this agent not scheduled: SIGSTOP, VM pause,
        overload) is no evidence that the primary died: the count restarts.
        """
        with self._lock:
            gap = now - self._last_tick
            self._last_tick = now
            if gap > max(4 * self.tick_period, self.takeover_timeout / 3):
                self.last_heard = max(self.last_heard, now)
                return Decision(Verdict.WAIT, f"backup agent was not scheduled for "
                                              f"{gap * 1000:.0f} ms; restarting the count")
            if self._state is not B.REPLICATING or s.preparing:
                return Decision(Verdict.WAIT)
            silent = now - self.last_heard
            if silent <= self.takeover_timeout or not s.has_checkpoint:
                return Decision(Verdict.WAIT)
            if s.unread:  # our reader is behind, not the primary silent
                self.last_heard = now
                return Decision(Verdict.WAIT)
            why = f"primary silent for {silent * 1000:.0f} ms"
            if s.host_acks and silent <= self.takeover_timeout + self.agent_grace:
                said, self._grace_said = self._grace_said, True
                return Decision(Verdict.WAIT, "" if said else (
                    f"{why}, but its host acknowledges our data: its agent may be stalled; "
                    f"waiting up to {(self.takeover_timeout + self.agent_grace) * 1000:.0f} "
                    "ms in all"))
            if s.host_acks:
                why += " (its host still acknowledges our data: its agent is stuck)"
            if not s.current:
                return self._lost("primary silent before its first checkpoint; the checkpoint "
                                  "held is from an earlier run: not restoring it", now)
            if not s.auto_failover or s.policy == "continue":
                how = ("--no-auto-failover" if not s.auto_failover else
                       "the primary runs with --on-peer-loss continue and may still serve")
                return self._lost(f"{why}; not taking over ({how}); fence it, then "
                                  "`remus failover`", now)
            return Decision(Verdict.TAKE_OVER, why)

    def _lost(self, sentence: str, now: float) -> Decision:
        self._state, self.since = B.PRIMARY_LOST, now
        return Decision(Verdict.LOST, sentence)


# ---- primary ----------------------------------------------------------------------


class P(enum.Enum):
    CONNECTING = "connecting"      # output held; no backup has answered yet
    SYNCING = "syncing"            # connected; no checkpoint of this link acked yet
    PROTECTED = "protected"        # checkpoints acked; output follows the ACKs
    RECONNECTING = "reconnecting"  # link lost, lease running: output held
    STALLED = "stalled"            # lease lapsed, --on-peer-loss stall: output held
    SOLO = "solo"                  # no backup, output flows (after a takeover, or
                                   # --on-peer-loss continue): unprotected
    HANDING_OVER = "handing-over"  # planned switchover: final checkpoint
    HANDED_OVER = "handed-over"    # the backup runs the unit now
    FENCED = "fenced"              # a newer primary exists: our copy is killed


_HELD = (P.CONNECTING, P.SYNCING, P.PROTECTED, P.RECONNECTING, P.STALLED, P.HANDING_OVER)
_DOWN = (P.CONNECTING, P.RECONNECTING, P.STALLED, P.SOLO)
_LINKED = (P.SYNCING, P.PROTECTED, P.HANDING_OVER)

PRIMARY_TABLE: dict[tuple[P, str], P] = {
    **{(s, "connected"): P.SYNCING for s in _DOWN},
    (P.SYNCING, "acked"): P.PROTECTED,
    (P.PROTECTED, "acked"): P.PROTECTED,
    (P.HANDING_OVER, "acked"): P.HANDING_OVER,
    # (P.SYNCING, "link-lost"): back to the state it was connected from (fire)
    (P.PROTECTED, "link-lost"): P.RECONNECTING,
    (P.RECONNECTING, "stall"): P.STALLED,
    (P.RECONNECTING, "continue"): P.SOLO,
    (P.STALLED, "continue"): P.SOLO,
    (P.PROTECTED, "switchover"): P.HANDING_OVER,
    (P.HANDING_OVER, "handed-over"): P.HANDED_OVER,
    (P.HANDING_OVER, "link-lost"): P.RECONNECTING,
    (P.HANDING_OVER, "abort-switchover"): P.PROTECTED,
    **{(s, "fenced"): P.FENCED for s in P if s is not P.FENCED},
}


class PrimaryRole:
    """The primary's HA state: whether output is held and what a lost peer costs."""

    def __init__(self, policy: str, now: float, solo: bool = False) -> None:
        if policy not in ("stall", "continue"):
            raise RoleError(f"unknown --on-peer-loss policy {policy!r}")
        self.policy = policy
        self._state = P.SOLO if solo else P.CONNECTING
        self._lock = threading.Lock()
        self.since = now
        self.ever_protected = False
        # Where a link that dies before its first ACK leaves us: where we were
        # when it connected (still stalled, still solo, still connecting).
        self._down = self._state

    @property
    def state(self) -> P:
        return self._state

    @property
    def output_held(self) -> bool:
        """Is output commit on (every state but solo and the ends)?"""
        return self._state in _HELD

    def fire(self, event: str, now: float) -> bool:
        """Take the transition for `event`; False (nothing changes) if the table has none."""
        with self._lock:
            if (self._state, event) == (P.SYNCING, "link-lost"):
                nxt: P | None = self._down
            else:
                nxt = PRIMARY_TABLE.get((self._state, event))
            if nxt is None:
                return False
            if event == "connected":
                self._down = self._state
            if event == "acked":
                self.ever_protected = True
            if nxt is not self._state:
                self._state, self.since = nxt, now
            return True

    def require(self, event: str, now: float) -> None:
        if not self.fire(event, now):
            raise RoleError(f"cannot {event} while {self._state.value}")

    def lease_lapsed(self, now: float) -> P | None:
        """The link is gone and the lease ran out: apply --on-peer-loss once.

        Returns the new state (stalled: output stays held; solo: the caller
        opens the output) or None when there is nothing to decide: still
        connected, never protected (output was never released: nothing to
        stall), or decided already."""
        with self._lock:
            if self._state is not P.RECONNECTING:
                return None
            nxt = P.STALLED if self.policy == "stall" else P.SOLO
            self._state, self.since = nxt, now
            return nxt

    def backup_may_take_over(self) -> bool:
        """Could the backup take over (or have done so) without our word?

        True while the link is lost after a checkpoint was acknowledged and
        the backup may restore by itself: --on-peer-loss stall (a coordinated
        primary's role is always stall: the coordinator's CAS decides then).
        Releasing the unit's output could serve it twice. With continue the
        backup never takes over by itself, and once solo it was settled."""
        return (self.ever_protected and self._state in (P.RECONNECTING, P.STALLED)
                and self.policy == "stall")

    def sentence(self, backup: str) -> str:
        """What this state means for the service, for status and logs."""
        s = self._state
        return {
            P.CONNECTING: f"connecting to backup {backup}; output held until its first ACK",
            P.SYNCING: f"connected to {backup}; first checkpoint on the way, output held",
            P.PROTECTED: f"protected by {backup}",
            P.RECONNECTING: f"backup {backup} lost; output held while the lease runs",
            P.STALLED: (f"STALLED: backup {backup} lost, output held (--on-peer-loss stall); "
                        "waiting for it to return"),
            P.SOLO: (f"SOLO (UNPROTECTED): output flows; a failure of this host loses the "
                     f"unit's state; looking for a backup at {backup}"),
            P.HANDING_OVER: f"switchover: handing the unit to {backup}",
            P.HANDED_OVER: f"switchover done: {backup} runs the unit",
            P.FENCED: "fenced: a newer primary runs the unit; our copy was killed",
        }[s]
