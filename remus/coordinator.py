"""A coordinator that decides who runs a unit: one record per unit, changed only
by compare-and-set (ZooKeeper, through kazoo).

Without a coordinator a pair decides alone: a primary that lost its backup can
only stall or run on unprotected, and a backup that lost its primary cannot
tell a dead primary from a cut link. With one (a single ZooKeeper on a third
host is enough for a pair), every change of who runs the unit is a CAS on the
unit's record, so of two agents racing (the primary going solo, the backup
taking over) exactly one wins and the other fences itself. With the
coordinator unreachable nobody changes anything: a primary whose backup
keeps acknowledging goes on; one that lost both holds its output.

The record (JSON in the znode PATH/units/UNIT):

    term     increases with every change of who runs the unit or how (the
             fencing token: a primary whose term is not the record's stops;
             the primary's HELLO carries it, and a backup refuses a primary
             older than a term it has seen: "taken over", it fences itself;
             a record re-created after the coordinator lost it keeps the
             primary's term)
    lineage  random, set when a record is made from nothing: terms compare
             only within one lineage (a wiped coordinator or a unit name used
             again starts afresh, a running primary keeps its own)
    primary  the address of the host that runs the unit
    backup   the address of its backup, or null
    state    protected (primary + backup acking) | solo (primary alone)

The rules are pure functions here (`decide_takeover`, `decide_solo`,
`protected_by`) with unit tests; `Coordinator` is the store (a contract,
one ZooKeeper implementation); `Cas` runs a rule against the store with
re-reads, so agents call one method per decision.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from remus.errors import ConfigError, RemusError

log = logging.getLogger(__name__)

STATES = ("protected", "solo")


class CoordinatorUnavailable(RemusError):
    """The coordinator did not answer in time (nothing was changed by us)."""


@dataclass(frozen=True)
class UnitRecord:
    term: int
    primary: str
    backup: str | None
    state: str
    # Random, chosen when a record is made from nothing: terms are compared only
    # within one lineage (a coordinator that lost everything, or a unit name used
    # again, starts a new one; a running primary re-creating its record keeps its own).
    lineage: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> UnitRecord:
        try:
            d = json.loads(raw)
            rec = cls(term=int(d["term"]), primary=str(d["primary"]),
                      backup=None if d.get("backup") is None else str(d["backup"]),
                      state=str(d["state"]), lineage=str(d.get("lineage") or ""))
        except (ValueError, KeyError, TypeError) as e:
            raise RemusError(f"unreadable unit record in the coordinator: {e}") from e
        if rec.state not in STATES:
            raise RemusError(f"unit record with unknown state {rec.state!r}")
        return rec


@dataclass(frozen=True)
class Decision:
    """What a rule says: the record to write (None: nothing to write), whether the
    caller won, and why (for logs and status)."""

    won: bool
    write: UnitRecord | None
    why: str


# ---- the rules (pure) --------------------------------------------------------------


def _anew(me: str, backup: str | None, state: str, term: int, lineage: str) -> UnitRecord:
    """A record made where there is none. `term`, `lineage`: what the writing
    primary already holds (0, "": nothing), so a record it re-creates after the
    coordinator lost it keeps them and its term never goes back; otherwise term 1
    of a new lineage."""
    return UnitRecord(max(1, term), me, backup, state, lineage or secrets.token_hex(8))


def decide_claim(rec: UnitRecord | None, me: str, backup: str | None) -> Decision:
    """A primary starting (or reconnected, or re-asserting its record)."""
    if rec is None:
        return Decision(True, _anew(me, backup, "solo" if backup is None else "protected", 0, ""),
                        "no record yet: this host runs the unit")
    if rec.primary != me:
        return Decision(False, None, f"the coordinator says {rec.primary} runs the unit "
                                     f"(term {rec.term}, {rec.state})")
    return Decision(True, None, f"this host runs the unit (term {rec.term}, {rec.state})")


def decide_takeover(rec: UnitRecord | None, me: str) -> Decision:
    """The backup found its primary silent (or was handed the unit): may it run it?

    Only from a record that names it as the backup of a protected unit: a
    primary that went solo first (it won the race: it is alive and serving),
    or a record naming another backup, means no."""
    if rec is None:
        return Decision(False, None, "no record of the unit in the coordinator")
    if rec.primary == me:
        return Decision(False, None, f"the coordinator already says this host runs the unit "
                                     f"(term {rec.term})")
    if rec.state != "protected" or rec.backup != me:
        return Decision(False, None, f"the coordinator says {rec.primary} runs the unit "
                                     f"{rec.state} (term {rec.term}, backup {rec.backup}): "
                                     "not taking over")
    return Decision(True, UnitRecord(rec.term + 1, me, rec.primary, "solo", rec.lineage),
                    f"took over from {rec.primary} (term {rec.term + 1})")


def decide_solo(rec: UnitRecord | None, me: str, term: int = 0, lineage: str = "") -> Decision:
    """The primary lost its backup: may it run on alone? (If not, it fences itself.)"""
    if rec is None:
        return Decision(True, _anew(me, None, "solo", term, lineage), "no record: running solo")
    if rec.primary != me:
        return Decision(False, None, f"the coordinator says {rec.primary} runs the unit now "
                                     f"(term {rec.term})")
    if rec.state == "solo":
        return Decision(True, None, f"solo (term {rec.term})")
    return Decision(True, UnitRecord(rec.term + 1, me, None, "solo", rec.lineage),
                    f"running solo (term {rec.term + 1}): the backup {rec.backup} is gone")


def protected_by(rec: UnitRecord | None, me: str, backup: str, term: int = 0,
                 lineage: str = "") -> Decision:
    """A backup acknowledged our first checkpoint: the record says so (the backup
    may take over from now on). `term`: ours, for a record that has to be
    re-created (a coordinator restarted empty): the term never goes back."""
    if rec is not None and rec.primary != me:
        return Decision(False, None, f"the coordinator says {rec.primary} runs the unit "
                                     f"(term {rec.term})")
    if rec is not None and rec.state == "protected" and rec.backup == backup:
        return Decision(True, None, "already recorded")
    if rec is None:
        rec = _anew(me, backup, "protected", term, lineage)
    return Decision(True, UnitRecord(rec.term, me, backup, "protected", rec.lineage),
                    f"protected by {backup} (term {rec.term})")


# ---- fencing by term in the replication protocol ---------------------------------


def fence_of(doc: dict[str, Any] | None) -> tuple[str, int]:
    """(lineage, term) in a unit.json or a HELLO's spec ("", 0: none)."""
    d = doc or {}
    t, lineage = d.get("term"), d.get("lineage")
    return (lineage if isinstance(lineage, str) else "",
            t if isinstance(t, int) and not isinstance(t, bool) and t > 0 else 0)


def kept_fence(seen: tuple[str, int], theirs: tuple[str, int]) -> tuple[str, int]:
    """What a backup remembers after accepting a HELLO: a term of another lineage
    replaces what it had (that record was made anew: terms start again); within
    one lineage the highest term stays."""
    if theirs[1] == 0:
        return seen
    if theirs[0] != seen[0]:
        return theirs
    return seen[0], max(seen[1], theirs[1])


# ---- the store -------------------------------------------------------------------


class Coordinator(ABC):
    """One record per unit, read and compare-and-set.

    Contract: `read` returns the record and its version (None, -1 if there is
    none); `create` succeeds only if no record exists; `cas` only if the
    record's version is still `version`. Both return False when they lost,
    never half-write. Every call either completes within the coordinator's
    timeout or raises CoordinatorUnavailable having changed nothing it could
    know of (a write whose answer was lost is seen by the next read).
    """

    @abstractmethod
    def read(self, unit: str) -> tuple[UnitRecord | None, int]: ...

    @abstractmethod
    def create(self, unit: str, rec: UnitRecord) -> bool: ...

    @abstractmethod
    def cas(self, unit: str, rec: UnitRecord, version: int) -> bool: ...

    def close(self) -> None:
        return None

    def apply(self, unit: str, rule: Callable[[UnitRecord | None], Decision],
              attempts: int = 5) -> Decision:
        """Run `rule` on the current record and write what it says, atomically:
        if the record changed meanwhile, read again and decide again."""
        for _ in range(attempts):
            rec, version = self.read(unit)
            d = rule(rec)
            if d.write is None:
                return d
            ok = self.create(unit, d.write) if rec is None else self.cas(unit, d.write, version)
            if ok:
                return d
        raise CoordinatorUnavailable(f"the record of {unit} kept changing under us")


def parse_url(url: str) -> tuple[str, str]:
    """zk://HOST:PORT[,HOST:PORT...]/PATH -> (hosts, path)."""
    u = urlparse(url)
    if u.scheme != "zk" or not u.netloc:
        raise ConfigError(f"--coordinator {url!r}: expected zk://HOST:PORT[,HOST:PORT]/PATH")
    path = u.path.rstrip("/") or "/remus"
    return u.netloc, path


class ZkCoordinator(Coordinator):
    """The store on ZooKeeper (kazoo). Records live at PATH/units/UNIT."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        from kazoo.client import KazooClient
        from kazoo.retry import KazooRetry

        hosts, self.path = parse_url(url)
        self.url = url
        # kazoo says "connection dropped" on every retry while the server is down;
        # we say it once per change where it matters.
        logging.getLogger("kazoo").setLevel(logging.ERROR)
        self.timeout = timeout
        # Quiet, bounded retries: an unreachable coordinator must answer "no" fast.
        self.zk = KazooClient(hosts=hosts, timeout=max(4.0, 2 * timeout),
                              connection_retry=KazooRetry(max_tries=-1, max_delay=1.0),
                              command_retry=KazooRetry(max_tries=0))
        self._started = False
        self._lock = threading.Lock()

    def _client(self) -> Any:
        from kazoo.handlers.threading import KazooTimeoutError

        with self._lock:
            if not self._started:
                try:
                    self.zk.start(timeout=self.timeout)
                except KazooTimeoutError as e:
                    self.zk.stop()
                    raise CoordinatorUnavailable(f"coordinator {self.url} unreachable") from e
                self._started = True
        if not self.zk.connected:
            raise CoordinatorUnavailable(f"coordinator {self.url}: not connected")
        return self.zk

    def _node(self, unit: str) -> str:
        return f"{self.path}/units/{unit}"

    def _call(self, fn: Callable[[], Any]) -> Any:
        from kazoo.exceptions import ConnectionLoss, OperationTimeoutError, SessionExpiredError
        from kazoo.handlers.threading import KazooTimeoutError

        try:
            return fn()
        except (ConnectionLoss, SessionExpiredError, OperationTimeoutError,
                KazooTimeoutError) as e:
            raise CoordinatorUnavailable(f"coordinator {self.url}: {type(e).__name__}") from e

    def read(self, unit: str) -> tuple[UnitRecord | None, int]:
        from kazoo.exceptions import NoNodeError

        zk = self._client()

        def get() -> tuple[UnitRecord | None, int]:
            try:
                raw, stat = zk.get(self._node(unit))
            except NoNodeError:
                return None, -1
            return UnitRecord.from_json(raw), int(stat.version)

        result: tuple[UnitRecord | None, int] = self._call(get)
        return result

    def create(self, unit: str, rec: UnitRecord) -> bool:
        from kazoo.exceptions import NodeExistsError

        zk = self._client()

        def make() -> bool:
            try:
                zk.create(self._node(unit), rec.to_json(), makepath=True)
            except NodeExistsError:
                return False
            return True

        return bool(self._call(make))

    def cas(self, unit: str, rec: UnitRecord, version: int) -> bool:
        from kazoo.exceptions import BadVersionError, NoNodeError

        zk = self._client()

        def put() -> bool:
            try:
                zk.set(self._node(unit), rec.to_json(), version=version)
            except (BadVersionError, NoNodeError):
                return False
            return True

        return bool(self._call(put))

    def close(self) -> None:
        with self._lock:
            if self._started:
                self.zk.stop()
                self.zk.close()
                self._started = False


def connect(url: str | None) -> Coordinator | None:
    return ZkCoordinator(url) if url else None
