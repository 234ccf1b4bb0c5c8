"""The backup's failure detector and takeover.

A mixin of remus.backup.Backup (which owns the state declared below). The
detector counts the primary silent only while it replicates, never while
the backup agent itself was not scheduled, nor while the primary's bytes
wait unread; it takes over only from a checkpoint of the run that last
connected, and only with auto-failover and --on-peer-loss stall.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from remus.errors import RemusError
from remus.link import Link

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
    state: str
    preparing: int
    last_heard: float
    epoch: int
    link: Link | None
    takeover_fn: TakeoverFn | None
    timeline: dict[str, float]
    last_sentence: str

    def checkpoint_is_current(self) -> bool:
        raise NotImplementedError

    def _spec(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- failure detection -----------------------------------------------------------
    def _detector_loop(self) -> None:
        tick = min(self.cfg.timing.heartbeat / 2, 0.02)
        last_tick = self.clock()
        while not self.stop_event.wait(tick):
            now = self.clock()
            if now - last_tick > max(4 * tick, self.cfg.timing.takeover_timeout / 3):
                # We were not running (SIGSTOP, VM pause, overload): silence we did not
                # observe is not evidence that the primary died. Start counting afresh.
                log.warning("backup agent was not scheduled for %.0f ms; restarting the "
                            "failure detector's count", (now - last_tick) * 1000)
                self.last_heard = max(self.last_heard, now)
            last_tick = now
            if self.state != "replicating" or self.preparing:
                continue
            silent = self.clock() - self.last_heard
            if silent <= self.cfg.timing.takeover_timeout or self.epoch < 0:
                continue
            link = self.link
            if link is not None and not link.closed and link.unread() > 0:
                # The primary's bytes are here; our reader is behind, not the
                # primary silent (a big epoch, a busy core).
                self.last_heard = self.clock()
                continue
            if not self.checkpoint_is_current():
                self.state = "primary-lost"
                self.last_sentence = ("primary silent before its first checkpoint; the checkpoint "
                                      "held is from an earlier run: not restoring it")
                log.error("%s", self.last_sentence)
                continue
            policy = self._spec().get("on_peer_loss", "stall")
            if not self.cfg.auto_failover or policy == "continue":
                self.state = "primary-lost"
                why = ("--no-auto-failover" if not self.cfg.auto_failover else
                       "the primary runs with --on-peer-loss continue and may still serve")
                self.last_sentence = (f"primary silent for {silent * 1000:.0f} ms; not taking over "
                                      f"({why}); fence it, then `remus failover`")
                log.error("%s", self.last_sentence)
                continue
            try:
                self.failover(f"primary silent for {silent * 1000:.0f} ms")
            except Exception:
                pass  # logged by failover(); the state says failed

    def failover(self, why: str) -> None:
        """Take over: finish applying, restore, bring the address up."""
        with self.lock:
            if self.state in ("taking-over", "active"):
                raise RemusError(f"already {self.state}")
            if self.state == "failed":
                raise RemusError("a takeover already failed; see the log (restart the agent)")
            if self.epoch < 0:
                raise RemusError("no committed checkpoint to restore")
            self.state = "taking-over"
        self.timeline = {"detected": time.time()}
        log.warning("%s: taking over from epoch %d", why, self.epoch)
        if self.link is not None:
            self.link.close()
        if self.takeover_fn is None:
            self.state = "failed"
            raise RemusError("no takeover action configured")
        try:
            with self.standby_lock:
                self.takeover_fn(self, why)  # type: ignore[arg-type]  # self is a Backup
        except Exception as e:
            self.state = "failed"
            self.last_sentence = f"takeover failed: {e}"
            log.exception("takeover failed")
            raise
        self.state = "active"
        self.last_sentence = f"{why}; took over at epoch {self.epoch}"
