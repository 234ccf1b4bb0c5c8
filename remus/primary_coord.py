"""The primary's dealings with the coordinator (`--coordinator`, remus.coordinator).

A mixin of remus.primary.Primary (which owns the state declared below).

- Backup lost and lease lapsed: instead of --on-peer-loss, a CAS decides.
  Won: the unit runs solo (output released, serving); lost (the backup took
  over first): our copy is fenced; coordinator unreachable: output stays
  held (stalled) and we ask again, so nothing serves twice.
- Once a backup acknowledged our first checkpoint, the record says
  `protected` with that backup (only then may it take over), and a record
  that vanished (a coordinator restarted empty) is written again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from remus.coordinator import (
    CoordinatorUnavailable,
    Decision,
    UnitRecord,
    decide_solo,
    protected_by,
)
from remus.primary_config import PrimaryConfig
from remus.roles import P, PrimaryRole
from remus.saying import Once

log = logging.getLogger("remus.primary")

ASK_EVERY = 0.5  # seconds between questions to an unreachable coordinator
REASSERT_EVERY = 2.0  # seconds between checks that the record is still there


class Coordinated:
    """See module doc."""

    # Owned and initialised by Primary.__init__:
    cfg: PrimaryConfig
    clock: Callable[[], float]
    role: PrimaryRole
    link: Any
    stop_event: threading.Event
    last_sentence: str
    _coord_asked: float
    _coord_once: Once
    _recorded_backup: str | None
    term: int  # the coordinator's term for our run (0: none known; sent in HELLO)
    lineage: str  # and the lineage of the record it belongs to

    def _sync_output(self) -> None:
        raise NotImplementedError

    def _fence(self, why: str) -> None:
        raise NotImplementedError

    def _coord_say(self, sentence: str, level: int = logging.WARNING) -> None:
        """Log once per change (the coordinator is asked every ASK_EVERY s)."""
        self.last_sentence = sentence
        self._coord_once.say(sentence, level)

    def _learn_term(self, d: Decision) -> None:
        if d.write is not None:
            self._learn(d.write)

    def _learn(self, rec: UnitRecord) -> None:
        if rec.lineage != self.lineage:  # a record made anew: its terms start again
            self.lineage, self.term = rec.lineage, rec.term
        else:
            self.term = max(self.term, rec.term)

    def coord_term(self) -> tuple[int, str]:
        """Our (term, lineage) for a HELLO, read from the record when it names us
        ((0, ""): no coordinator; unreachable: the last ones known)."""
        coord = self.cfg.coordinator
        if coord is None:
            return 0, ""
        try:
            rec, _ = coord.read(self.cfg.unit_id)
        except CoordinatorUnavailable:
            return self.term, self.lineage
        if rec is not None and rec.primary == self.cfg.coord_me:
            self._learn(rec)
        return self.term, self.lineage

    def _coord_lease_lapsed(self) -> None:
        """Stalled after losing the backup: ask the coordinator whether to run solo."""
        coord = self.cfg.coordinator
        now = self.clock()
        if coord is None or self.role.state is not P.STALLED or now - self._coord_asked < ASK_EVERY:
            return
        self._coord_asked = now
        me = self.cfg.coord_me
        try:
            d = coord.apply(self.cfg.unit_id, lambda r: decide_solo(r, me, self.term, self.lineage))
        except CoordinatorUnavailable as e:
            self._coord_say(f"STALLED: backup lost and {e}; output held until one of them "
                            "answers")
            return
        if not d.won:
            self._fence(d.why)
            return
        self._learn_term(d)
        self.role.fire("continue", now)
        self._recorded_backup = None
        self._sync_output()
        self._coord_say(f"SOLO (UNPROTECTED): the coordinator agreed ({d.why}); serving, "
                        f"looking for a backup at {self.cfg.backup[0]}", logging.ERROR)

    def _coord_loop(self) -> None:
        """Record who protects us; write the record again if it vanished."""
        coord = self.cfg.coordinator
        if coord is None:
            return
        last_check = 0.0
        while not self.stop_event.wait(ASK_EVERY):
            backup = self.link.peer.rsplit(":", 1)[0] if self.link is not None else None
            due = self.clock() - last_check > REASSERT_EVERY
            if self.role.state is not P.PROTECTED or backup is None:
                continue
            if backup == self._recorded_backup and not due:
                continue
            last_check = self.clock()
            try:
                d = coord.apply(self.cfg.unit_id, lambda r, b=backup, me=self.cfg.coord_me:
                                protected_by(r, me, b, self.term, self.lineage))
            except CoordinatorUnavailable as e:
                if backup != self._recorded_backup:
                    self._coord_say(f"protected by {backup}, but {e}: the backup cannot take "
                                    "over until the coordinator records it")
                else:  # recorded before: only the periodic check failed
                    log.debug("coordinator check: %s", e)
                continue
            if not d.won:
                self._fence(d.why)
                return
            self._learn_term(d)
            if d.write is not None:
                log.info("coordinator: %s", d.why)
            self._recorded_backup = backup
            self._coord_once.forget()
