"""The backup's failure detector and takeover.

A mixin of remus.backup.Backup (which owns the state declared below). The
detector counts the primary silent only while it replicates, never while
the backup agent itself was not scheduled, nor while the primary's bytes
wait unread; it takes over only from a checkpoint of the run that last
connected, and only with auto-failover and --on-peer-loss stall.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from remus.coordinator import CoordinatorUnavailable, decide_takeover, fence_of, kept_fence
from remus.errors import RemusError
from remus.link import Link
from remus.roles import BackupRole, Silence, Verdict
from remus.saying import Once

if TYPE_CHECKING:
    from remus.backup import Backup, BackupConfig

log = logging.getLogger("remus.backup")

TakeoverFn = Callable[["Backup", str], None]


class Takeover:
    """Failure detection and failover (see module doc)."""

    # Owned and initialised by Backup.__init__:
    cfg: BackupConfig
    clock: Callable[[], float]
    stop_event: threading.Event
    lock: threading.Lock
    standby_lock: threading.Lock
    role: BackupRole
    preparing: int
    epoch: int
    link: Link | None
    takeover_fn: TakeoverFn | None
    timeline: dict[str, float]
    last_sentence: str
    unit: dict[str, Any] | None
    local_ip: str
    _coord_retry_at: float
    _coord_once: Once

    def checkpoint_is_current(self) -> bool:
        raise NotImplementedError

    def _spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def _save_unit(self) -> None:
        raise NotImplementedError

    # -- failure detection -----------------------------------------------------------
    def _detector_loop(self) -> None:
        while not self.stop_event.wait(self.role.tick_period):
            link = self.link
            coordinated = self.cfg.coordinator is not None
            if coordinated and self.clock() < self._coord_retry_at:
                continue  # asked it a moment ago: it was unreachable
            d = self.role.tick(self.clock(), Silence(
                has_checkpoint=self.epoch >= 0,
                current=self.checkpoint_is_current(),
                auto_failover=self.cfg.auto_failover,
                # with a coordinator its CAS decides, whatever the primary's policy
                policy="stall" if coordinated else self._spec().get("on_peer_loss", "stall"),
                preparing=self.preparing > 0,
                unread=link is not None and not link.closed and link.unread() > 0,
                host_acks=self._host_acks(link)))
            if d.verdict is Verdict.LOST:
                self.last_sentence = d.sentence
                log.error("%s", d.sentence)
            elif d.verdict is Verdict.TAKE_OVER:
                try:
                    self.failover(d.sentence)
                except CoordinatorUnavailable as e:
                    self._coord_retry_at = self.clock() + 0.5
                    self._say(f"primary silent, but {e}: not taking over until it answers")
                except Exception:
                    pass  # logged by failover(); the state says failed
                self.role.resync(self.clock())
            elif d.sentence:
                log.warning("%s", d.sentence)

    def _host_acks(self, link: Link | None) -> bool:
        """Did the primary's kernel acknowledge our heartbeats within the takeover
        timeout (roles.Silence.host_acks)?"""
        if link is None or link.closed:
            return False
        age = link.ack_age()
        return age is not None and age <= self.cfg.timing.takeover_timeout

    def _say(self, sentence: str) -> None:
        self.last_sentence = sentence
        self._coord_once.say(sentence)

    def _win_coordinator(self) -> None:
        """A takeover only after winning the coordinator's CAS. Lost (the primary
        went solo: it is alive and serving, or the record names another backup):
        primary-lost, saying why; unreachable: CoordinatorUnavailable, nothing
        changed (the caller asks again)."""
        unit = (self.unit or {}).get("unit_id") or ""
        me = self.local_ip
        d = self.cfg.coordinator.apply(unit, lambda r: decide_takeover(r, me))
        if not d.won:
            self.role.fire("lost", self.clock())
            self._say(f"not taking over: {d.why}")
            raise RemusError(d.why)
        log.warning("coordinator: %s", d.why)
        if d.write is not None and self.unit is not None:
            # Our term now: a primary of an older one is refused from here on.
            lineage, term = kept_fence(fence_of(self.unit), (d.write.lineage, d.write.term))
            self.unit.update(term=term, lineage=lineage)
            with contextlib.suppress(OSError):
                self._save_unit()

    def failover(self, why: str) -> None:
        """Take over: finish applying, restore, bring the address up."""
        if self.epoch < 0:
            raise RemusError("no committed checkpoint to restore")
        if self.cfg.coordinator is not None:
            self._win_coordinator()
        self.role.require("takeover", self.clock())  # at most one, and no WELCOME after it
        self.timeline = {"detected": time.time()}
        log.warning("%s: taking over from epoch %d", why, self.epoch)
        if self.link is not None:
            self.link.close()
        try:
            if self.takeover_fn is None:
                raise RemusError("no takeover action configured")
            with self.standby_lock:
                self.takeover_fn(self, why)  # type: ignore[arg-type]  # self is a Backup
        except Exception as e:
            self.role.fire("restore-failed", self.clock())
            self.last_sentence = f"takeover failed: {e}"
            log.exception("takeover failed")
            raise
        self.role.fire("restored", self.clock())
        self.last_sentence = f"{why}; took over at epoch {self.epoch}"
