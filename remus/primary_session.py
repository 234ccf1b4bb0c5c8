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
import socket
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from remus import sdnotify
from remus.errors import FatalError, RemusError
from remus.link import Link, LinkClosed
from remus.netbuf import NullBuffer
from remus.primary_config import BULK_PROOF, PrimaryConfig
from remus.protocol import PrimaryConnection
from remus.protocol import messages as m
from remus.protocol.keys import fingerprint
from remus.roles import P, PrimaryRole, agent_grace
from remus.saying import Once
from remus.stats import Series

log = logging.getLogger("remus.primary")


def retry_delay(failures: int, refused: bool, output_held: bool, heartbeat: float) -> float:
    """Seconds before the next connection attempt.

    Refused (the backup will not take us as we are): back-off, 0.2 s doubling to
    5 s. Unreachable while our output is held: soon, well within the backup's
    takeover timeout (it may be our last chance). Unreachable while solo: 1 s."""
    if refused:
        return min(5.0, 0.1 * 2.0 ** min(failures, 6))
    if not output_held:
        return 1.0
    return min(0.5, max(0.02, heartbeat))


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
    heartbeats_end: threading.Event
    _grace_lease: float  # the lapsed lease that _backup_host_acks spoke of
    receiver: threading.Thread | None
    wake: threading.Event
    fatal: BaseException | None
    lease_until: float
    epochs_done: int
    ack_latency: Series
    commit_latency: Series
    pause: Series
    delta_bytes: Series
    last_sentence: str
    marks: dict[int, dict[str, Any]]
    trace_f: IO[str] | None
    role: PrimaryRole
    _buffer_live: bool
    _failures: int
    _once: Once
    _nacks: int
    _nacked_gen: int
    _new_generation: bool
    _retry_at: float
    _coord_lease_lapsed: Callable[[], None]  # remus.primary_coord
    coord_term: Callable[[], tuple[int, str]]  # remus.primary_coord
    local_ip: str | None
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
            else:
                log.info("backup link closed while stopping: %s", err)
        finally:
            link.close()
            with self.cond:
                self.inflight.clear()
                self.cond.notify_all()
            if link is self.link:
                self.role.fire("link-lost", self.clock())
                self._sync_output()
            self.wake.set()

    def _on_event(self, ev: Any) -> None:
        now = self.clock()
        if isinstance(ev, m.Ack):
            acked_at = time.time()  # the trace's mark: only ACKs need it
            if ev.generation != self.generation:
                return
            with self.cond:
                done = [k for k in self.inflight if k <= ev.epoch]
                sent = self.inflight.get(ev.epoch)
                for k in done:
                    del self.inflight[k]
                self.cond.notify_all()
            self.lease_until = now + self.cfg.timing.lease
            self._nacks = 0
            self.buffer.release(ev.epoch)
            released = time.time()
            self.acked = max(self.acked, ev.epoch)
            if self.role.state is P.SYNCING:
                log.info("protected by %s from epoch %d on", self._backup_name(), ev.epoch)
                # systemd (Type=notify): ready once the unit is protected.
                sdnotify.notify("READY=1", f"STATUS=protected by {self._backup_name()} from "
                                f"epoch {ev.epoch}")
            self.role.fire("acked", now)
            self._trace(ev.epoch, released, acked_at)
            self.epochs_done += 1
            if sent is not None:
                self.ack_latency.add((now - sent) * 1000)
            self.last_sentence = f"acked epoch {ev.epoch}"
        elif isinstance(ev, m.Nack):
            self._on_nack(ev, now)
        elif isinstance(ev, m.Heartbeat):
            self.lease_until = now + self.cfg.timing.lease
        elif isinstance(ev, m.Error):
            log.error("backup reports an error: %s", ev.reason)
            if self.link is not None:
                self.link.close()

    def _on_nack(self, ev: m.Nack, now: float) -> None:
        """The backup refused an epoch: its generation is over. The next checkpoint
        is full, in a new generation, on the same link (heartbeats go on: a refusal
        is no reason for the backup to think us dead), after a back-off that grows
        while the backup keeps refusing (a full disk refuses every one). Output
        stays held meanwhile."""
        with self.cond:
            self.inflight.pop(ev.epoch, None)
            self.cond.notify_all()
        if ev.generation != self.generation or ev.generation == self._nacked_gen:
            return  # the rest of a generation already refused
        self._nacked_gen = ev.generation
        self._nacks += 1
        delay = retry_delay(self._nacks, True, True, self.cfg.timing.heartbeat)
        why = f"backup {self._backup_name()} refused epoch {ev.epoch}: {ev.reason}"
        self._once.say(f"{why}; output stays held, a full checkpoint follows (retrying with "
                       "back-off)", logging.ERROR, key=ev.reason)  # the reason, not the epoch
        self.last_sentence = f"{why}; output held, full checkpoint in {delay:.1f} s"
        self.need_full = self._new_generation = True
        self._retry_at = now + delay
        self.wake.set()

    # -- connection -----------------------------------------------------------
    def _trace(self, epoch: int, released: float, acked: float | None = None) -> None:
        marks = self.marks.pop(epoch, {})
        if marks.get("boundary"):
            self.commit_latency.add((released - marks["boundary"]) * 1000)
        for k in [k for k in list(self.marks) if k < epoch]:  # list(): other threads add
            self.marks.pop(k, None)
        if self.trace_f is not None:
            self.trace_f.write(json.dumps({
                "epoch": epoch, "generation": self.generation,
                "start": marks.get("start"), "hold": marks.get("hold"),
                "boundary": marks.get("boundary"), "dumped": marks.get("dumped"),
                "send_start": marks.get("send_start"), "sent": marks.get("sent"),
                "acked": acked, "released": released, "pause_ms": marks.get("pause_ms", self.pause.last),
                "split": marks.get("split"), "bytes": self.delta_bytes.last}) + "\n")
            self.trace_f.flush()

    def _backup_name(self) -> str:
        return f"{self.cfg.backup[0]}:{self.cfg.backup[1]}"

    def _peer_lost(self) -> None:
        """No backup link: apply --on-peer-loss once the lease has lapsed."""
        now = self.clock()
        if now < self.lease_until:
            return
        nxt = self.role.lease_lapsed(now)
        if self.cfg.coordinator is not None:
            self._coord_lease_lapsed()  # the coordinator, not the policy, decides
            return
        if nxt is None:
            return
        self.last_sentence = self.role.sentence(self._backup_name())
        if nxt is P.SOLO:
            log.error("backup lost and lease expired: --on-peer-loss continue -> running "
                      "UNPROTECTED; output is released at once, a failure of this host now "
                      "loses state; protection resumes when a backup answers")
            self._sync_output()
        else:
            log.warning("%s", self.last_sentence)

    def _sync_output(self) -> None:
        """Make the output buffer match the role: held (a real buffer) or open.

        Open (solo): every held packet is released and the buffer removed. Held
        again (a backup attached): a fresh buffer holds everything from now on,
        before the first checkpoint of the link is taken, so nothing the unit
        sends from here leaves before a checkpoint that contains it is acked."""
        held = self.role.output_held
        if held and not self._buffer_live:
            if self.cfg.buffer_factory is None:
                raise FatalError("output commit cannot resume: no output buffer to start "
                                 "(PrimaryConfig.buffer_factory)")
            buf = self.cfg.buffer_factory()
            buf.start()
            self.buffer, self._buffer_live = buf, True
            log.info("output commit on again: the unit's output is held until the backup acks")
        elif not held and self._buffer_live and self.role.state is P.SOLO:
            old, self.buffer, self._buffer_live = self.buffer, NullBuffer(), False
            old.close(release_all=True)

    def _fence(self, why: str) -> None:
        log.error("fencing: %s; killing this copy of the unit", why)
        self.role.fire("fenced", self.clock())
        self.last_sentence = f"fenced: {why}"
        if self.cfg.fence is not None:
            self.cfg.fence()
        self.fatal = FatalError(f"fenced: {why}")
        self.stop_event.set()

    def _connect(self) -> None:
        if self.cfg.backup_resolver is not None:
            try:
                where = self.cfg.backup_resolver()
            except RemusError as e:
                self._not_connected(f"cannot tell where the backup is: {e}")
                return
            if where is None:
                self._not_connected("no backup placed yet (the fleet has no host for it)")
                return
            self.cfg.backup = where
        host, port = self.cfg.backup
        if self.cfg.coord_me and host == self.cfg.coord_me:
            # Our own host's backup agent would answer "taken over" (it is us).
            self._not_connected(f"the backup address {host} is this host")
            return
        try:
            sk = socket.create_connection((host, port), timeout=self.cfg.connect_timeout)
        except OSError as e:
            self._not_connected(f"backup {host}:{port} unreachable: {e.strerror or e}")
            return
        gen = max(time.time_ns() // 1_000_000, self.generation + 1)
        local_ip = sk.getsockname()[0]
        # "instance": this agent run. A backup may fail over only to a checkpoint of
        # the instance that last connected (not to one a stopped run left behind).
        # "rejoin": where a backup on this host would listen (the backup re-protects
        # the unit there after a takeover); "protection": how it should protect.
        # "term": the coordinator's term of our run, the fencing token: a backup that
        # saw a newer one (the unit was taken over since) refuses us, and we fence.
        term, lineage = self.coord_term()
        spec = {**self.cfg.spec, "on_peer_loss": self.cfg.on_peer_loss, "instance": self.instance,
                **({"term": term, "lineage": lineage} if term else {}),
                "rejoin": f"{local_ip}:{port}",
                "protection": {"interval": self.cfg.timing.interval,
                               "dirty_tracking": self.cfg.dirty_tracking,
                               "compress": self.cfg.compress, **self.cfg.protection}}
        conn = PrimaryConnection(self.cfg.psk, self.cfg.unit_id, gen, spec)
        link = Link(sk, conn, f"{host}:{port}")
        try:
            link.send_raw(conn.start())
            sk.settimeout(self.cfg.handshake_timeout)
            ev = next(link.events())
        except (LinkClosed, RemusError, StopIteration, OSError) as e:
            link.close()
            self._not_connected(f"handshake with {host}:{port} failed: {e}")
            return
        if not isinstance(ev, m.Welcome):
            link.close()
            reason = getattr(ev, "reason", type(ev).__name__)
            if "taken over" in reason:
                self._fence(f"backup {host}:{port} has taken over")
                return
            self._not_connected(f"backup {host}:{port} refused: {reason}", refused=True)
            return
        sk.settimeout(None)
        link.set_user_timeout(max(1.0, 5 * self.cfg.timing.lease))
        self.generation = gen
        self.need_full = True
        self.local_ip = local_ip
        self.lease_until = self.clock() + self.cfg.timing.lease
        self.role.fire("connected", self.clock())
        self._sync_output()  # before the first dump of this link
        self.link = link
        self._failures = 0
        if not self._nacks:
            self._once.forget()  # a refusal that repeats is said once, not per link
        self.last_sentence = self.role.sentence(self._backup_name())
        log.info("connected to backup %s:%d, generation %d (backup holds generation %d epoch %d; "
                 "key %s)", host, port, gen, ev.generation, ev.committed_epoch,
                 fingerprint(conn.sealed_with))
        self.receiver = threading.Thread(target=self._receive_loop, args=(link,),
                                         name="receiver", daemon=True)
        self.receiver.start()

    def _not_connected(self, why: str, refused: bool = False) -> None:
        """Say why (once per change, not every retry) and wait before the next try.

        A backup that refuses (a configuration it will not accept) is retried
        with back-off up to 5 s; an unreachable one as fast as the takeover
        timeout needs while our output is held, every second while solo."""
        self._failures += 1
        self._once.say(f"{why}; retrying", logging.ERROR if refused else logging.WARNING, key=why)
        self.last_sentence = f"{why}; {self.role.sentence(self._backup_name())}"
        self.stop_event.wait(retry_delay(self._failures, refused, self.role.output_held,
                                         self.cfg.timing.heartbeat))

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

    def _backup_spoke(self, link: Link) -> bool:
        """Did the backup send us something within the lease that our receiver has
        not turned into a renewal yet? Then the lease is renewed, not expired.

        Our receiver and this thread share one interpreter: a long hold of the
        GIL by another of our threads (a big epoch's copies) or a busy core can
        keep the backup's heartbeats unread for longer than the lease, and the
        lease must not expire because *we* were not running. The kernel stamps
        every data segment as it arrives, and bytes waiting in our socket are
        the backup's too. A partition, a stopped or a dead backup agent sends
        no data, so neither renews anything then.
        """
        lease = self.cfg.timing.lease
        age = link.recv_age()
        if (age is None or age > lease) and link.unread() <= 0:
            return False
        log.debug("lease renewed from the socket: backup data %s ms ago, %d bytes unread",
                  "?" if age is None else f"{age * 1000:.0f}", link.unread())
        self.lease_until = self.clock() + lease
        return True

    def _backup_host_acks(self, link: Link) -> bool:
        """The lease lapsed, but the backup's kernel acknowledged our heartbeats
        within it: its host and the path are up, only its agent is quiet (seen: a
        backup not scheduled for 146 ms while it applied a 1 GiB checkpoint cost
        a reconnect and a full resync). The lease is not renewed: it counts as
        unexpired for roles.agent_grace more, said once. Safe: we release output
        only on the backup's ACKs, and a backup agent that does not run does not
        take over."""
        age = link.ack_age()
        if age is None or age > self.cfg.timing.lease:
            return False
        late = self.clock() - self.lease_until
        grace = agent_grace(self.cfg.timing.takeover_timeout)
        if late > grace:
            return False
        # lease_until identifies the lapse: every renewal and every new link sets it
        if self._grace_lease != self.lease_until:
            self._grace_lease = self.lease_until
            log.info("no ACK or heartbeat from the backup for %.0f ms, but its host "
                     "acknowledges our data: its agent may be stalled; waiting up to %.0f ms "
                     "more", (self.cfg.timing.lease + late) * 1000, grace * 1000)
        return True

    def _heartbeat_loop(self) -> None:
        # Until close(), not until stop_event: a stop waits for the dump in hand,
        # and the backup must go on hearing us until (right before) our Bye.
        while not self.heartbeats_end.wait(self.cfg.timing.heartbeat):
            link = self.link
            if link is None or link.closed:
                continue
            self._stream_progress(link)
            if (self.acked >= 0 and self.clock() > self.lease_until
                    and not self._backup_spoke(link) and not self._backup_host_acks(link)):
                # A partition leaves TCP open but silent: the lease is the truth.
                age = link.recv_age()
                log.warning("lease expired (no ACK or heartbeat from the backup for %.0f ms; its "
                            "last data reached this host %s ms ago); dropping the link",
                            self.cfg.timing.lease * 1000,
                            "?" if age is None else f"{age * 1000:.0f}")
                link.close()
                continue
            try:
                link.send(m.Heartbeat(generation=self.generation, epoch=self.epoch,
                                      acked=self.acked, sent_ns=time.time_ns(),
                                      lease_ms=int(self.cfg.timing.lease * 1000)))
            except LinkClosed:
                pass
