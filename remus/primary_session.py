"""The primary's session with its backup: connecting, the receiver, the lease.

A mixin of remus.primary.Primary (which owns the state declared below):
  connect      HELLO/WELCOME with a new generation; a backup that has taken
               over fences us
  receiver     ACKs release the output of the acked epoch and renew the lease;
               a NACK or an error drops the link (the next epoch is full)
  heartbeats   every heartbeat interval; a lease without ACK, heartbeat or
               stream progress for `lease` drops the link (partition guard)
  peer loss    --on-peer-loss once the lease has lapsed: stall (output held)
               or continue unprotected
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from remus.errors import FatalError, RemusError
from remus.link import Link, LinkClosed
from remus.primary_config import BULK_PROOF, PrimaryConfig
from remus.protocol import PrimaryConnection
from remus.protocol import messages as m
from remus.stats import Series

log = logging.getLogger("remus.primary")


class BackupSession:
    """Connection, receiver and liveness of the primary (see module doc)."""

    # Owned and initialised by Primary.__init__:
    cfg: PrimaryConfig
    buffer: Any
    clock: Callable[[], float]
    link: Link | None
    generation: int
    epoch: int
    acked: int
    need_full: bool
    inflight: dict[int, float]
    cond: threading.Condition
    stop_event: threading.Event
    wake: threading.Event
    fatal: BaseException | None
    lease_until: float
    epochs_done: int
    ack_latency: Series
    pause: Series
    delta_bytes: Series
    last_sentence: str
    marks: dict[int, dict[str, Any]]
    trace_f: IO[str] | None
    protected: bool
    instance: str
    _progress_link: Link | None
    _bytes_acked: int
    _lease_seen: float

    # -- receiver -------------------------------------------------------------
    def _receive_loop(self, link: Link) -> None:
        try:
            for ev in link.events():
                self._on_event(ev)
        except (LinkClosed, RemusError) as err:
            if not self.stop_event.is_set():
                log.warning("backup link lost: %s", err)
        finally:
            link.close()
            with self.cond:
                self.inflight.clear()
                self.cond.notify_all()
            self.wake.set()

    def _on_event(self, ev: Any) -> None:
        now = self.clock()
        if isinstance(ev, m.Ack):
            if ev.generation != self.generation:
                return
            with self.cond:
                done = [k for k in self.inflight if k <= ev.epoch]
                sent = self.inflight.get(ev.epoch)
                for k in done:
                    del self.inflight[k]
                self.cond.notify_all()
            self.lease_until = now + self.cfg.timing.lease
            self.buffer.release(ev.epoch)
            released = time.time()
            self.acked = max(self.acked, ev.epoch)
            self._trace(ev.epoch, released)
            self.epochs_done += 1
            if sent is not None:
                self.ack_latency.add((now - sent) * 1000)
            self.last_sentence = f"acked epoch {ev.epoch}"
        elif isinstance(ev, m.Nack):
            log.error("backup rejected epoch %d: %s; starting a new generation", ev.epoch, ev.reason)
            self.need_full = True
            if self.link is not None:
                self.link.close()
        elif isinstance(ev, m.Heartbeat):
            self.lease_until = now + self.cfg.timing.lease
        elif isinstance(ev, m.Error):
            log.error("backup reports an error: %s", ev.reason)
            if self.link is not None:
                self.link.close()

    # -- connection -----------------------------------------------------------
    def _trace(self, epoch: int, released: float) -> None:
        marks = self.marks.pop(epoch, {})
        for k in [k for k in list(self.marks) if k < epoch]:  # list(): other threads add
            self.marks.pop(k, None)
        if self.trace_f is not None:
            self.trace_f.write(json.dumps({
                "epoch": epoch, "generation": self.generation,
                "boundary": marks.get("boundary"), "dumped": marks.get("dumped"),
                "send_start": marks.get("send_start"), "sent": marks.get("sent"),
                "released": released, "pause_ms": marks.get("pause_ms", self.pause.last),
                "split": marks.get("split"), "bytes": self.delta_bytes.last}) + "\n")
            self.trace_f.flush()

    def _peer_lost(self) -> None:
        """No backup link: apply --on-peer-loss once the lease has lapsed."""
        if not self.protected or self.clock() < self.lease_until or self.acked < 0:
            return
        if self.cfg.on_peer_loss == "continue":
            log.error("backup lost and lease expired: policy 'continue' -> running UNPROTECTED; "
                      "output is released at once, a failure of this host now loses state")
            self.buffer.close(release_all=True)
            from remus.netbuf import NullBuffer

            self.buffer = NullBuffer()
            self.protected = False
            self.last_sentence = "UNPROTECTED: backup lost (on-peer-loss continue)"
        elif "stalled" not in self.last_sentence:
            self.last_sentence = ("stalled: backup lost and lease expired; output held "
                                  "(on-peer-loss stall), reconnecting")
            log.warning("%s", self.last_sentence)

    def _fence(self, why: str) -> None:
        log.error("fencing: %s; killing this copy of the unit", why)
        self.last_sentence = f"fenced: {why}"
        if self.cfg.fence is not None:
            self.cfg.fence()
        self.fatal = FatalError(f"fenced: {why}")
        self.stop_event.set()

    def _connect(self) -> None:
        host, port = self.cfg.backup
        try:
            sk = socket.create_connection((host, port), timeout=self.cfg.connect_timeout)
        except OSError as e:
            self.last_sentence = f"backup {host}:{port} unreachable: {e.strerror or e}"
            log.warning("%s; retrying", self.last_sentence)
            self.stop_event.wait(self._retry_delay())
            return
        gen = max(time.time_ns() // 1_000_000, self.generation + 1)
        # "instance": this agent run. A backup may fail over only to a checkpoint of
        # the instance that last connected (not to one a stopped run left behind).
        spec = {**self.cfg.spec, "on_peer_loss": self.cfg.on_peer_loss, "instance": self.instance}
        conn = PrimaryConnection(self.cfg.psk, self.cfg.unit_id, gen, spec,
                                 nonce=secrets.token_bytes(16))
        link = Link(sk, conn, f"{host}:{port}")
        try:
            link.send_raw(conn.start())
            sk.settimeout(self.cfg.handshake_timeout)
            ev = next(link.events())
        except (LinkClosed, RemusError, StopIteration, OSError) as e:
            link.close()
            self.last_sentence = f"handshake with {host}:{port} failed: {e}"
            log.error("%s", self.last_sentence)
            self.stop_event.wait(self._retry_delay())
            return
        if not isinstance(ev, m.Welcome):
            link.close()
            reason = getattr(ev, "reason", type(ev).__name__)
            if "taken over" in reason:
                self._fence(f"backup {host}:{port} has taken over")
                return
            self.last_sentence = f"backup {host}:{port} refused: {reason}"
            log.error("%s", self.last_sentence)
            self.stop_event.wait(self._retry_delay())
            return
        sk.settimeout(None)
        link.set_user_timeout(max(1.0, 5 * self.cfg.timing.lease))
        self.generation = gen
        self.need_full = True
        self.link = link
        self.lease_until = self.clock() + self.cfg.timing.lease
        log.info("connected to backup %s:%d, generation %d (backup holds generation %d epoch %d)",
                 host, port, gen, ev.generation, ev.committed_epoch)
        threading.Thread(target=self._receive_loop, args=(link,), name="receiver",
                         daemon=True).start()

    def _retry_delay(self) -> float:
        """Reconnect well within the backup's takeover timeout (it may be our last chance)."""
        return min(0.5, max(0.02, self.cfg.timing.heartbeat))

    def _stream_progress(self, link: Link) -> None:
        """A big epoch on the wire that the backup keeps reading renews the lease.

        Its ACKs and heartbeats may wait behind the transfer in its agent, or
        behind our sender here (measured: a 1 GiB first checkpoint expired the
        200 ms lease and cost a needless takeover). The backup's kernel holds at
        most one receive buffer of unread data, so more than BULK_PROOF bytes of
        ours acknowledged since the last renewal means its agent reads: life in
        the agent, not only in its kernel (a stopped agent renews nothing).
        """
        acked = link.bytes_acked()
        if link is not self._progress_link or self.lease_until != self._lease_seen:
            # a new link, or an ACK/heartbeat renewed the lease: count from here
            self._progress_link, self._bytes_acked = link, acked
        elif acked - self._bytes_acked >= BULK_PROOF:
            self.lease_until = self.clock() + self.cfg.timing.lease
            self._bytes_acked = acked
        self._lease_seen = self.lease_until

    def _heartbeat_loop(self) -> None:
        while not self.stop_event.wait(self.cfg.timing.heartbeat):
            link = self.link
            if link is None or link.closed:
                continue
            self._stream_progress(link)
            if self.acked >= 0 and self.clock() > self.lease_until:
                # A partition leaves TCP open but silent: the lease is the truth.
                log.warning("lease expired (no ACK or heartbeat from the backup for %.0f ms); "
                            "dropping the link", self.cfg.timing.lease * 1000)
                link.close()
                continue
            try:
                link.send(m.Heartbeat(generation=self.generation, epoch=self.epoch,
                                      acked=self.acked, sent_ns=time.time_ns(),
                                      lease_ms=int(self.cfg.timing.lease * 1000)))
            except LinkClosed:
                pass
