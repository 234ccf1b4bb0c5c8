"""The backup agent: receive, stage, verify, ACK, commit; detect failure; take over.

Crash-only: everything it must not lose is in the checkpoint store on disk;
starting == recovering (the store re-applies committed but unapplied epochs
and drops partial ones). Loops, each a thread: accept, one receiver per
primary connection (only one primary at a time), apply, failure detector.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remus import faults, sdnotify
from remus.backup_status import backup_status
from remus.backup_takeover import Takeover, TakeoverFn
from remus.checkpoint.disk_apply import DiskApplier
from remus.checkpoint.store import CheckpointStore
from remus.config import Timing
from remus.coordinator import fence_of, kept_fence
from remus.errors import RemusError
from remus.link import Link, LinkClosed
from remus.progress import Progress
from remus.protocol import BackupConnection, EpochComplete
from remus.protocol import messages as m
from remus.protocol.connection import Keys
from remus.protocol.keys import fingerprint
from remus.roles import B, BackupRole
from remus.saying import Once
from remus.stats import MS_BUCKETS, Series
from remus.unit_desc import state_dirs_of

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: How long committed epochs gather before they are applied as one run. Under
#: load (1000 busy connections, ~8 epochs/s) each epoch rewrote ~13 MiB of
#: pages and rebuilt a ~14 MiB pages file whose layout changed; applied in
#: runs of ~4, the same pages are written once. The images lag by up to this
#: plus an apply; what is acknowledged is committed in redo/ at once.
APPLY_GATHER_S = 0.5


def detector_tick(timing: Timing) -> float:
    """How often the failure detector looks (remus.backup_takeover)."""
    return min(timing.heartbeat / 2, 0.02)


@dataclass
class BackupConfig:
    listen: tuple[str, int]
    psk: Keys  # one key, or the key file's ring (read again when it changes)
    workdir: Path
    timing: Timing
    auto_failover: bool = True
    # After a takeover, protect the unit in turn: "auto" (a backup at the old
    # primary's address), "off", or HOST[:PORT] (remus.reprotect).
    reprotect: str = "auto"
    # remus.coordinator.Coordinator: a takeover must win its CAS first (None: the
    # pair decides alone).
    coordinator: Any = None
    state_dirs: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Backup(Takeover):
    """Receives, stages, verifies, ACKs and commits checkpoints; the failure
    detector and the takeover are remus.backup_takeover's, the status snapshot
    remus.backup_status's."""

    def __init__(self, cfg: BackupConfig,
                 prepare: Callable[[dict[str, Any], bool], None] | None = None,
                 takeover: TakeoverFn | None = None, clock: Clock = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.prepare = prepare  # (spec, rebuild) builds the standby container from the unit spec
        self.takeover_fn = takeover
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(cfg.workdir / "store")
        if cfg.state_dirs:
            # Before recover(): a committed epoch may carry disk records to redo.
            DiskApplier(cfg.state_dirs).register(self.store)
        # Committed epochs not applied yet are applied by the apply thread once we
        # listen (a takeover applies whatever is left first).
        self.generation, self.epoch = self.store.recover(apply=False)
        if backlog := self.store.pending():
            log.info("backup store: %d committed epoch(s) to apply in the background", backlog)
        self.unit_file = cfg.workdir / "unit.json"
        self.unit: dict[str, Any] | None = (json.loads(self.unit_file.read_text())
                                            if self.unit_file.exists() else None)
        # The HA state and the failure detector's count (remus.roles): one owner,
        # one lock, one transition table.
        self.role = BackupRole(cfg.timing.takeover_timeout, detector_tick(cfg.timing), clock())
        self.link: Link | None = None
        self.peer = ""
        self.apply_event = threading.Event()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        # Standby container: one builder at a time (a primary that reconnects while
        # we still build for its previous link must not race it), and a takeover
        # waits for a build in progress. `standby_ready` is true only after a build
        # finished; a takeover rebuilds a standby that is not.
        self.standby_lock = threading.Lock()
        self._unit_lock = threading.Lock()
        self.standby_ready = False
        self.preparing = 0  # HELLOs being answered: the primary is alive
        self.staged: Any = None
        self.ack_time = Series(bounds=MS_BUCKETS)
        self.epoch_bytes = Series()
        self._cur_bytes = 0
        self._began = 0.0
        self.epochs_received = 0
        self.rejected = 0
        # Why this backup cannot hold checkpoints now (its store cannot be written,
        # or a committed epoch cannot be applied), None when it can. While set,
        # epochs are refused (NACK, with this reason) instead of acknowledged: an
        # ACK promises a checkpoint a takeover can restore.
        self.store_problem: str | None = None
        self._epoch_failed: str | None = None  # the open epoch could not be staged
        self.progress: Progress | None = None  # a full checkpoint being received
        self.timeline: dict[str, float] = {}
        self.last_sentence = (f"recovered generation {self.generation} epoch {self.epoch}"
                              if self.epoch >= 0 else "empty: no checkpoint yet")
        self.started = clock()
        self._sk: socket.socket | None = None
        self.reprotector: Any = None  # the Primary protecting the unit after a takeover
        self.reprotect_thread: Any = None
        self.next_life = False  # serve again as a plain backup (remus.agents.serve_backup)
        self._coord_retry_at = 0.0
        self._coord_once = Once(logging.getLogger("remus.backup"))  # coordinator sentences
        self.local_ip = ""  # our address on the last primary's link (our name for the coordinator)
        self._threads: list[threading.Thread] = []
        log.info("backup store at %s: %s", cfg.workdir, self.last_sentence)

    # -- loops ------------------------------------------------------------------
    def run(self) -> None:
        host, port = self.cfg.listen
        sk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sk.bind((host, port))
        except OSError as e:
            raise RemusError(f"cannot listen on {host}:{port}: {e.strerror}") from e
        sk.listen(4)
        sk.settimeout(0.2)
        self._sk = sk
        self.apply_event.set()  # the backlog recover() left, if any
        for fn, name in ((self._apply_loop, "apply"), (self._detector_loop, "detector")):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("listening on %s:%d", host, port)
        sdnotify.notify("READY=1", f"STATUS=listening on {host}:{port}; {self.last_sentence}")
        while not self.stop_event.is_set():
            try:
                conn, addr = sk.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._serve, args=(conn, f"{addr[0]}:{addr[1]}"),
                             name="receiver", daemon=True).start()
        sk.close()

    def _save_unit(self) -> None:
        with self._unit_lock:  # two links' handlers may save at once
            tmp = self.unit_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.unit))
            os.replace(tmp, self.unit_file)

    def checkpoint_is_current(self) -> bool:
        """Is the committed checkpoint from the agent run that last connected?

        A checkpoint left by an earlier run (stopped, or replaced by a new `remus
        run` of the same unit) must not be restored: that run may have released
        output after it. Runs without an instance id (older agents) are trusted."""
        instance = self._spec().get("instance")
        return self.epoch >= 0 and (instance is None
                                    or (self.unit or {}).get("checkpoint_instance") == instance)

    def _spec(self) -> dict[str, Any]:
        """The spec the connected (or last) primary sent in its HELLO."""
        return (self.unit or {}).get("spec") or {}

    @property
    def state(self) -> str:
        """The HA state's name (remus.roles.B): waiting, replicating, idle,
        primary-lost, taking-over, active, failed."""
        return self.role.state.value

    @property
    def last_heard(self) -> float:
        return self.role.last_heard

    def _heard(self) -> None:
        self.role.heard(self.clock())

    def stop(self) -> None:
        self.stop_event.set()
        if self.link is not None:
            self.link.close()

    def join(self, timeout: float = 30.0) -> None:
        """After stop(): wait for the apply and detector loops (an apply in progress
        finishes first; the store must have one owner)."""
        for t in self._threads:
            t.join(timeout)

    def _serve(self, sk: socket.socket, peer: str) -> None:
        conn = BackupConnection(self.cfg.psk, committed_generation=self.generation,
                                committed_epoch=self.epoch)
        link = Link(sk, conn, peer)
        # Authenticate first: an unauthenticated peer learns nothing, not even "busy".
        sk.settimeout(5.0)
        try:
            first = next(link.events())
        except (StopIteration, LinkClosed, RemusError, OSError) as err:
            log.warning("rejected connection from %s: %s", peer, err)
            link.close()
            return
        sk.settimeout(None)
        if not isinstance(first, m.Hello):
            log.warning("rejected connection from %s: expected HELLO, got %s", peer,
                        type(first).__name__)
            link.close()
            return
        stale: Link | None = None
        local_ip = sk.getsockname()[0]
        with self.lock:
            current = self.link if self.link is not None and not self.link.closed else None
            if self.role.state in (B.TAKING_OVER, B.ACTIVE, B.FAILED):
                busy = self._refusal()
            elif older := self._older_term(first):
                busy = older
            elif current is not None and not self._supersedes(first):
                busy = f"another primary ({self.peer}) is connected"
            else:
                # The same unit reconnecting with a newer generation (it dropped a link
                # we still think is alive, e.g. after we were stalled): the old one is stale.
                busy, stale = "", current
                self.link, self.peer, self.local_ip = link, peer, local_ip
        if stale is not None:
            log.warning("primary of unit %s reconnected (generation %d): dropping the stale "
                        "link from %s", first.unit_id, first.generation, stale.peer)
            stale.close()
        if busy:
            log.warning("rejected connection from %s (unit %s): %s", peer, first.unit_id, busy)
            try:
                link.send(m.Error(reason=busy))
            except (LinkClosed, RemusError):
                pass
            link.close()
            return
        threading.Thread(target=self._heartbeat_loop, args=(link,), name="heartbeat",
                         daemon=True).start()
        link.on_rx = self._heard  # authenticated and current: its bytes mean it is alive
        try:
            self._heard()
            self._on_event(link, first)
            for ev in link.events():
                self._heard()
                self._on_event(link, ev)
        except (LinkClosed, RemusError, OSError) as err:
            log.warning("primary %s: %s", peer, err)
        finally:
            if self.link is link:  # a superseded link must not touch its successor's epoch
                self._abort_staged()
            link.close()

    def _heartbeat_loop(self, link: Link) -> None:
        """Our own heartbeats, on a timer: they renew the primary's lease even while
        its heartbeats wait in the stream behind a large epoch (the reverse direction
        is free), so a busy link is never mistaken for a dead backup."""
        period = self.cfg.timing.heartbeat
        while not link.closed and not self.stop_event.wait(period):
            if self.role.state is not B.REPLICATING or self.generation < 0:
                continue
            try:
                link.send(m.Heartbeat(generation=self.generation, epoch=self.epoch,
                                      acked=self.epoch, sent_ns=time.time_ns(),
                                      lease_ms=int(self.cfg.timing.lease * 1000)))
            except (LinkClosed, RemusError):
                return

    def _refusal(self) -> str:
        """Why a primary cannot have us as its backup now that we took over.

        "taken over" makes the asking primary fence itself: said only while the
        unit runs here. After our re-protection handed the unit over (or was
        fenced) the asker is the unit's new primary, not a stale one: it is told
        to retry, and finds this agent's next life as a plain backup."""
        from remus.roles import P

        p = self.reprotector
        if p is not None and p.role.state in (P.HANDED_OVER, P.FENCED):
            return "this agent is becoming a backup again after a handover; retry"
        return f"this backup has taken over (state {self.state})"

    def _older_term(self, hello: m.Hello) -> str:
        """Why a primary of our unit is refused for its term ("" if it is not): its
        HELLO carries the coordinator's term of its run, and this backup has seen
        a newer one since (the unit was taken over, or went solo under a newer
        primary). "taken over" in the reason makes that primary fence itself."""
        (lineage, theirs), (seen_lineage, seen) = fence_of(hello.spec), fence_of(self.unit)
        if (self.unit or {}).get("unit_id") != hello.unit_id or not theirs or \
                lineage != seen_lineage or theirs >= seen:
            return ""
        return (f"the unit was taken over since: this primary's term {theirs} is older than "
                f"term {seen}, which this backup has seen (fenced by term)")

    def _supersedes(self, hello: m.Hello) -> bool:
        """An authenticated HELLO from our unit's primary with a newer generation."""
        unit = (self.unit or {}).get("unit_id")
        return unit == hello.unit_id and hello.generation > self.generation

    # -- events ------------------------------------------------------------------
    def _on_event(self, link: Link, ev: Any) -> None:
        if isinstance(ev, m.Hello):
            self._on_hello(link, ev)
        elif isinstance(ev, m.EpochBegin):
            self._abort_staged()
            self._cur_bytes, self._began, self._epoch_failed = 0, self.clock(), None
            self.progress = (Progress(f"full checkpoint from {link.peer}", None, self.clock)
                             if ev.full else None)
            with self._storing():
                self.staged = self.store.begin(ev.generation, ev.epoch, ev.base_epoch, ev.full)
        elif isinstance(ev, m.Chunk):
            faults.point("backup-transfer")
            self._cur_bytes += len(ev.meta) + len(ev.data)
            if self.progress is not None:
                self.progress.update(self._cur_bytes)
            if self.staged is not None:
                with self._storing():
                    self.staged.add(ev.kind, ev.name, ev.meta, ev.data)
        elif isinstance(ev, EpochComplete):
            self._on_complete(link, ev)
        elif isinstance(ev, m.Heartbeat):
            link.send(m.Heartbeat(generation=ev.generation, epoch=self.epoch, acked=self.epoch,
                                  sent_ns=time.time_ns(), lease_ms=ev.lease_ms))
        elif isinstance(ev, m.Handover):
            self._on_handover(link, ev)
        elif isinstance(ev, m.Bye):
            log.info("primary ended protection: %s", ev.reason)
            self.role.fire("bye", self.clock())
            self.last_sentence = f"primary said bye: {ev.reason}"
        elif isinstance(ev, m.Error):
            log.error("primary reports an error: %s", ev.reason)

    def _on_hello(self, link: Link, ev: m.Hello) -> None:
        try:
            theirs = sorted(state_dirs_of(ev.spec))
        except RemusError as e:
            link.send(m.Error(reason=str(e)))
            raise
        ours = sorted(str(x) for x in self.cfg.state_dirs)
        if theirs != ours:
            reason = (f"state directories differ: the primary replicates {theirs or 'none'}, this "
                      f"backup accepts {ours or 'none'} (start it with the same --state-dir)")
            link.send(m.Error(reason=reason))
            raise RemusError(reason)
        if self.unit is not None and self.unit.get("unit_id") != ev.unit_id and self.epoch >= 0:
            reason = (f"this backup holds unit {self.unit.get('unit_id')!r}, not {ev.unit_id!r};"
                      " use another --workdir")
            link.send(m.Error(reason=reason))
            raise RemusError(reason)
        # The checkpoint we hold belongs to the agent run that produced it; a new run
        # (after `remus stop` or a restart) has not vouched for it yet.
        held = (self.unit or {}).get("checkpoint_instance") if self.epoch >= 0 else None
        seen = fence_of(self.unit) if (self.unit or {}).get("unit_id") == ev.unit_id else ("", 0)
        lineage, term = kept_fence(seen, fence_of(ev.spec))
        self.unit = {"unit_id": ev.unit_id, "spec": ev.spec, "checkpoint_instance": held,
                     **({"term": term, "lineage": lineage} if term else {})}
        try:
            self._save_unit()
        except OSError as e:
            # Kept in memory; epochs are refused until the store can be written.
            self._store_failed(e)
        if self.prepare is not None:
            with self.lock:
                self.preparing += 1
            try:
                with self.standby_lock:
                    rebuild, self.standby_ready = not self.standby_ready, False
                    self.prepare(ev.spec, rebuild)
                    self.standby_ready = True
            finally:
                with self.lock:
                    self.preparing -= 1
        # Atomic against a takeover (remus.roles): one that started while we built
        # the standby wins, and this primary is too late. Also counts as heard
        # (building took our time, not the primary's).
        if not self.role.fire("welcome", self.clock()):
            reason = self._refusal()
            link.send(m.Error(reason=reason))
            raise RemusError(reason)
        link.send(m.Welcome(nonce=link.conn.our_nonce, generation=self.generation,
                            committed_epoch=self.epoch))
        self.last_sentence = (f"primary {link.peer} connected (unit {ev.unit_id}, generation "
                              f"{ev.generation}, key {fingerprint(link.conn.sealed_with)})")
        log.info("%s", self.last_sentence)

    def _on_handover(self, link: Link, ev: m.Handover) -> None:
        """Planned switchover: the primary stopped its copy after we acked `ev.epoch`
        (the protocol checked it is the epoch we completed and answered)."""
        if (ev.generation, ev.epoch) != (self.generation, self.epoch):
            log.error("handover of epoch (%d, %d), but the store holds (%d, %d): not taking "
                      "over", ev.generation, ev.epoch, self.generation, self.epoch)
            return
        log.warning("planned switchover: primary %s handed over epoch %d", link.peer, ev.epoch)
        # Not on this (the link's receiver) thread: the takeover closes the link.
        threading.Thread(target=self._planned_takeover, args=(f"planned switchover from "
                         f"{link.peer}",), name="takeover", daemon=True).start()

    def _planned_takeover(self, why: str) -> None:
        try:
            self.failover(why)
        except Exception:
            pass  # logged by failover(); the state says failed

    @contextlib.contextmanager
    def _storing(self) -> Iterator[None]:
        """Writing the open epoch to the store. A store that cannot be written (a
        full or failing disk) fails this epoch only: the link stays up, the rest of
        the epoch is read and dropped, and its end is NACKed with the reason."""
        try:
            yield
        except OSError as e:
            self._store_failed(e)
            self._epoch_failed = self.store_problem
            self._abort_staged()

    def _on_complete(self, link: Link, ev: EpochComplete) -> None:
        staged, self.staged = self.staged, None
        if self.progress is not None:
            self.progress.finish()
            self.progress = None
        reason = ev.reason if not ev.ok else self._epoch_failed
        if reason is None and staged is None:
            reason = "no epoch staged"
        if reason is None and staged is not None:
            # The commit point, before the ACK leaves: the epoch survives a kill -9 of
            # this agent. Not a power cut of this host: the store runs without fsync
            # (CheckpointStore(fsync=False)); the primary still holds the state then.
            faults.point("backup-received")
            reason = self._commit(staged)
        if reason is not None:
            if staged is not None:
                staged.abort()
            self._refuse(link, ev, reason)
            return
        faults.point("backup-committed")
        self.generation, self.epoch = ev.generation, ev.epoch
        instance = self._spec().get("instance")
        if self.unit is not None and self.unit.get("checkpoint_instance") != instance:
            self.unit["checkpoint_instance"] = instance  # once per agent run
            try:
                self._save_unit()
            except OSError as e:  # the checkpoint would not count after a restart here
                self._store_failed(e)
                self._refuse(link, ev, self.store_problem or str(e))
                return
        link.send(m.Ack(generation=ev.generation, epoch=ev.epoch))
        self.ack_time.add((self.clock() - self._began) * 1000)
        self.epoch_bytes.add(self._cur_bytes)
        self.epochs_received += 1
        self.apply_event.set()
        self.last_sentence = f"acked epoch {ev.epoch}"

    def _commit(self, staged: Any) -> str | None:
        """Commit the epoch; None if it may be acknowledged, else why not.

        Normally the epoch is applied in the background after the ACK. While the
        store has a problem (an epoch that could not be applied) it is applied
        here first: only an epoch that reached the images is acknowledged, and
        the problem clears when one does (a full checkpoint replaces the rest)."""
        try:
            staged.commit()
            if self.store_problem is not None:
                self.store.apply_pending()
        except (OSError, RemusError) as e:
            self._store_failed(e)
            return self.store_problem
        if self.store_problem is not None:
            log.warning("backup store works again: %s is over", self.store_problem)
            self.store_problem = None
        return None

    def _store_failed(self, e: BaseException) -> None:
        err = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        problem = f"backup store {self.store.workdir} cannot hold checkpoints: {err}"
        if problem != self.store_problem:
            log.error("%s; refusing epochs until a checkpoint is applied again", problem)
        self.store_problem = problem

    def _refuse(self, link: Link, ev: EpochComplete, reason: str) -> None:
        self.rejected += 1
        log.error("epoch %d rejected: %s", ev.epoch, reason)
        self.last_sentence = f"refused epoch {ev.epoch}: {reason}"
        link.send(m.Nack(generation=ev.generation, epoch=ev.epoch, reason=reason))

    def _abort_staged(self) -> None:
        if self.staged is not None:
            self.staged.abort()
            self.staged = None

    def _apply_loop(self) -> None:
        while not self.stop_event.is_set():
            if not self.apply_event.wait(0.2):
                continue
            # Let a few more epochs commit first: they are applied as one run
            # (CheckpointStore), each page and layout written once for all of
            # them. A takeover applies whatever is still pending itself.
            self.stop_event.wait(APPLY_GATHER_S)
            self.apply_event.clear()
            try:
                self.store.apply_pending()
            except Exception as e:
                # The epoch was acknowledged but cannot be restored: say so in status
                # and refuse further epochs until one applies.
                log.exception("applying committed epochs failed")
                self._store_failed(e)

    def status(self) -> dict[str, Any]:
        return backup_status(self)
