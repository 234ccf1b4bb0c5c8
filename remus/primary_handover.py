"""The primary's planned switchover (`remus switchover`).

A mixin of remus.primary.Primary (which owns the state declared below):
the control thread asks (`switchover`), the epoch loop does it between two
epochs (`_hand_over`): a final checkpoint, its ACK, our copy off the network
and killed, its later output dropped, a HANDOVER frame; the backup resumes
exactly that checkpoint. Anything failing before the final ACK changes
nothing: the role goes back to protected and the caller learns why.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from remus.errors import RemusError
from remus.link import Link
from remus.netbuf import NullBuffer
from remus.primary_config import PrimaryConfig
from remus.protocol import messages as m
from remus.roles import PrimaryRole
from remus.stats import Series

log = logging.getLogger("remus.primary")


class HandoverRequest:
    """A switchover asked for by the control thread, done by the epoch loop."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.done = threading.Event()
        self.report: dict[str, Any] = {}
        self.error = ""


class Handover:
    """Planned switchover (see module doc)."""

    # Owned and initialised by Primary.__init__:
    cfg: PrimaryConfig
    clock: Callable[[], float]
    role: PrimaryRole
    link: Link | None
    buffer: Any
    _buffer_live: bool
    generation: int
    epoch: int
    acked: int
    inflight: dict[int, float]
    sendq: queue.Queue[Any]
    cond: threading.Condition
    wake: threading.Event
    stop_event: threading.Event
    marks: dict[int, dict[str, Any]]
    pause: Series
    last_sentence: str
    _handover: HandoverRequest | None

    def _checkpoint_once(self) -> float:
        raise NotImplementedError

    def _backup_name(self) -> str:
        raise NotImplementedError

    def switchover(self, timeout: float = 30.0) -> dict[str, Any]:
        """Planned switchover (from the control thread): the backup takes over from a
        final checkpoint of ours, then this copy is gone. Blocks until done."""
        self.role.require("switchover", self.clock())  # only while protected
        req = HandoverRequest(timeout)
        self._handover = req
        self.wake.set()
        with self.cond:
            self.cond.notify_all()
        if not req.done.wait(timeout + 5):
            raise RemusError("switchover did not finish in time; see the agent's log")
        if req.error:
            raise RemusError(req.error)
        return req.report

    # -- planned switchover ----------------------------------------------------
    def _hand_over(self, req: HandoverRequest) -> None:
        self._handover = None
        try:
            req.report = self._final_checkpoint(req.timeout)
        except RemusError as e:
            self.role.fire("abort-switchover", self.clock())
            req.error = f"switchover aborted, nothing changed: {e}"
            log.error("%s", req.error)
        finally:
            req.done.set()

    def _final_checkpoint(self, timeout: float) -> dict[str, Any]:
        """Checkpoint once more, wait for its ACK, stop our copy for good, hand over.

        Output of the final epoch is released by its ACK as usual; whatever the
        unit does after that checkpoint stays held and is dropped with our copy
        (clients retransmit it to the new primary: its TCP state is the
        checkpoint's). Our copy leaves the network before the backup is told,
        so the address moves with one owner at a time."""
        t0, deadline = time.time(), self.clock() + timeout
        self._wait_acked(None, deadline, "the epochs before the final one")
        e = self.epoch
        self._checkpoint_once()
        if self.epoch == e or e not in self.marks:
            raise RemusError(f"the final checkpoint (epoch {e}) failed; see the log")
        frozen = self.marks[e].get("boundary", time.time())
        self._wait_acked(e, deadline, f"the final checkpoint (epoch {e})")
        acked = time.time()
        link = self.link
        if self.cfg.fence is not None:
            self.cfg.fence()
        old, self.buffer, self._buffer_live = self.buffer, NullBuffer(), False
        old.close(release_all=False)  # the unit's output after the final epoch: never
        how = "handover"
        # Handed over from here on, whatever happens to the frame: the new primary
        # connecting back must not be told "taken over" by this agent (see
        # Backup._refusal) and fence the only copy.
        self.role.fire("handed-over", self.clock())
        try:
            assert link is not None
            link.send(m.Handover(generation=self.generation, epoch=e))
        except (RemusError, AssertionError) as err:
            # The backup holds epoch e and will find us silent: it takes over anyway.
            how = f"silence (the handover could not be sent: {err})"
        if link is not None:
            link.close()
        self.last_sentence = self.role.sentence(self._backup_name())
        self.stop_event.set()
        report = {"final_epoch": e, "generation": self.generation,
                  "pause_ms": self.pause.last, "waited_ms": round((frozen - t0) * 1000, 1),
                  "frozen_to_acked_ms": round((acked - frozen) * 1000, 1),
                  "acked_to_handed_over_ms": round((time.time() - acked) * 1000, 1),
                  "new_primary": self._backup_name(), "handed_over_by": how}
        log.warning("switchover: epoch %d acked, our copy stopped, %s runs the unit (%s)",
                    e, self._backup_name(), how)
        return report

    def _wait_acked(self, epoch: int | None, deadline: float, what: str) -> None:
        """Until `epoch` is acked (None: every epoch dumped so far was sent and acked)."""
        with self.cond:
            while (self.acked < epoch if epoch is not None
                   else bool(self.inflight) or bool(self.sendq.qsize())):
                if self.link is None or self.link.closed:
                    raise RemusError(f"the backup link broke while waiting for {what}")
                if self.clock() > deadline:
                    raise RemusError(f"{what} not acknowledged in time")
                self.cond.wait(0.05)

