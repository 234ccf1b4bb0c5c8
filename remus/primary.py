"""The primary agent: the epoch loop that ties unit, CRIU, output buffer and link.

Three small loops (litestream-style), each a thread:
  epoch loop   every interval: pause+dump the unit (CRIU), mark the output
               boundary while it is frozen, hand the image set to the sender
  sender       diff the image set against the previous one, stream the delta
  receiver     read ACKs: release the output of the acked epoch
plus heartbeats. At most `max_inflight` epochs are sent but unacknowledged and
one waits to be sent; beyond that the epoch loop waits (epochs stretch) so
memory stays bounded when the backup falls behind.

Output of epoch e (packets tagged e by the buffer) leaves only after ACK(e).
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remus import faults
from remus.checkpoint.criu import (
    SPARE_DIR,
    VMFLAGS_DIR,
    Criu,
    clear_stale_parasite_dir,
    parasite_dir_lock,
    remove_dump_dir,
)
from remus.checkpoint.delta_encoder import DeltaEncoder
from remus.checkpoint.disk_delta import DiskDelta
from remus.checkpoint.disk_track import DiskTracker
from remus.checkpoint.early import EarlyPages, Prelude
from remus.checkpoint.tracking import DumpChain, resolve
from remus.checkpoint.uffd import CRIU_ENV, UffdTracker
from remus.cpu_idle import IdleMeter
from remus.errors import CheckpointError, FatalError, RemusError
from remus.link import Link, LinkClosed
from remus.primary_config import (
    MAX_FAILED_DUMPS,
    MAX_FAILED_FIRST_DUMPS,
    MAX_FAILING_S,
    PrimaryConfig,
)
from remus.primary_coord import Coordinated
from remus.primary_handover import Handover, HandoverRequest
from remus.primary_session import BackupSession
from remus.primary_status import primary_status
from remus.progress import Progress
from remus.protocol import messages as m
from remus.roles import PrimaryRole
from remus.saying import Once
from remus.stats import MS_BUCKETS, Series

log = logging.getLogger(__name__)

#: A pause above this means the unit is busy (at 1000 busy connections pauses
#: are 40-70 ms; an idle redis's ~10 ms). From the next epoch on, a busy unit
#: gets (A/B at 1000x100, 50 ms, 6 pairs, all together: 230k -> 276k SET/s):
#: - the GIL switch interval BUSY_SWITCH_INTERVAL_S, not SWITCH_INTERVAL_S;
#: - a run of twice its last freeze (at most two intervals) before the next
#:   one (next_epoch_at);
#: - on a saturated machine (less than BUSY_IDLE_MIN of the CPU idle over the
#:   last epoch) no early encoding (Primary._prelude) and no handover at
#:   post-dump: the sender starts once CRIU has thawed the unit and exited.
#:   There, encoding during the freeze only took CPU from the unit (4 pairs:
#:   212k -> 276k SET/s without it). With a core left idle by the frozen unit
#:   (CRIU dumps on one), it is the other way round (4 pairs: 418k -> 453k;
#:   with CRIU patch 0009's pages first, 475k -> 502k on 5 pairs).
#: At light load the early encoding and the handover save ~2.8 ms of commit,
#: the short switch interval ~1 ms of pause.
BUSY_PAUSE_MS = 20.0
#: Under load, the idle share of all CPUs over the last epoch from which the
#: sender still encodes early (see BUSY_PAUSE_MS) ...
BUSY_IDLE_MIN = 0.10
#: ... and the most pages the last dump wrote. The early path pays where the
#: freeze is long because of sockets (1000 busy connections: ~5,000 pages an
#: epoch); a freeze that is long because the unit wrote hundreds of MiB is no
#: time to encode alongside CRIU: a unit growing by 1 GiB while protected then
#: starved the backup agent on this 2-core machine (lease lost in 2 of 12
#: runs of test_big_epochs' growth tests; 0 of 9 without the early path).
BUSY_EARLY_MAX_PAGES = 8192
#: sys.setswitchinterval of the primary agent at light load. CRIU's post-dump
#: is answered with the unit frozen, while the sender may be encoding pages;
#: at Python's default 5 ms the answer waited for the GIL (pause +1-2 ms).
SWITCH_INTERVAL_S = 0.001
#: ... and under load (Python's default): fewer GIL hand-overs between the
#: sender, the output buffer and the epoch loop.
BUSY_SWITCH_INTERVAL_S = 0.005
#: Under load the unit runs at least this many times as long as its last freeze.
BUSY_RUN_PER_FREEZE = 2.0
#: On a clean stop, how long the backup has to read our Bye and close its end.
BYE_WAIT_S = 2.0

Clock = Callable[[], float]
class Primary(BackupSession, Handover, Coordinated):
    """Runs protection for one unit until stop() or a fatal error.

    The session with the backup (connect, receiver, lease, heartbeats, peer
    loss, fencing) is remus.primary_session's; the status snapshot
    remus.primary_status's."""

    def __init__(self, cfg: PrimaryConfig, buffer: Any, criu: Criu | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.cfg = cfg
        self.buffer = buffer
        self.criu = criu or Criu(netns=cfg.netns_path)
        self.clock = clock
        self.encoder = DeltaEncoder(compress=cfg.compress)
        self.chain = DumpChain(resolve(cfg.dirty_tracking))
        # uffd-wp: the tracker registers and re-arms the unit's memory (checkpoint.uffd)
        self.tracker = UffdTracker(cfg.pid) if self.chain.mode == "uffd-wp" else None
        self.disk = (DiskTracker(cfg.state_dirs, pids=cfg.unit_pids) if cfg.state_dirs
                     else None)
        self.link: Link | None = None
        self.generation = -1
        self.epoch = 0  # the epoch the unit is running in now
        self.acked = -1
        self.last_sent = -1
        self.need_full = True
        self.inflight: dict[int, float] = {}  # epoch -> time its END was sent
        self.cond = threading.Condition()
        # Dumps to send, each maybe after its Prelude (remus.checkpoint.early): a
        # prelude is only queued for an idle sender, so post-dump never waits here.
        self.sendq: queue.Queue[tuple[int, Path, Path | None, DiskDelta | None] | Prelude
                                | None] = queue.Queue(maxsize=2)
        self.early = EarlyPages()
        self.idle_meter = IdleMeter()  # CPU idle per epoch: encode early under load?
        self._sender_idle = False
        self.reapq: queue.Queue[Path | None] = queue.Queue()  # dump dirs to delete
        self.stop_event = threading.Event()
        # Heartbeats outlive stop_event: they end in close(), right before the Bye. A stop
        # asked for during a long freeze (a huge unit's epoch) waits for that dump;
        # a backup that heard nothing meanwhile would take over (seen at 1 GiB).
        self.heartbeats_end = threading.Event()
        self.force_release = False  # remus stop --force (see release_on_stop)
        self._heartbeat_thread: threading.Thread | None = None
        self.receiver: threading.Thread | None = None  # of the current link
        self.wake = threading.Event()
        self.fatal: BaseException | None = None
        self.prev_dir: Path | None = None
        self.started = clock()
        self.pause = Series(bounds=MS_BUCKETS)
        self.dump_wall = Series()
        self.ack_latency = Series(bounds=MS_BUCKETS)
        self.commit_latency = Series(bounds=MS_BUCKETS)  # boundary -> output released
        self.progress: Progress | None = None  # a full checkpoint on the wire
        self.delta_bytes = Series()
        self.full_bytes = Series()
        self.encode_ms = Series()
        self.dirty_pages = Series()
        self.dumped_pages = Series()  # pages CRIU copied while the unit was frozen
        self.frozen_split: dict[str, Series] = {}  # DumpResult.split() per epoch
        self.epoch_times: list[float] = []
        self.epochs_done = 0
        self.bytes_total = 0
        self.lease_until = 0.0
        self._progress_link: Link | None = None  # the link _bytes_acked belongs to
        self._bytes_acked = 0
        self._lease_seen = 0.0
        self._grace_lease = 0.0
        self.failed_dumps = 0
        self.dumped_once = False
        self.failing_since = 0.0
        self.last_sentence = "starting"
        # epoch -> what --trace says of it: wall-clock marks start (dump asked),
        # hold (pre-dump: inbound held), boundary (post-dump, output cut), dumped
        # (CRIU returned), send_start (the sender took it), sent (END sent); its
        # pause and the pause's split (DumpResult.split)
        self.marks: dict[int, dict[str, Any]] = {}
        self.trace_f = open(cfg.trace, "a") if cfg.trace else None  # noqa: SIM115
        # The HA state (remus.roles): connecting, syncing, protected, stalled, solo...
        # With a coordinator a lost backup stalls us until its CAS says solo or fence.
        self.role = PrimaryRole("stall" if cfg.coordinator is not None else cfg.on_peer_loss,
                                clock(), solo=cfg.start_solo)
        self._coord_asked = -1e9
        self.term = 0  # the coordinator's term of our run (remus.primary_coord)
        self.lineage = ""  # the lineage of the record that term belongs to
        self._coord_once = Once(logging.getLogger("remus.primary"))  # coordinator sentences
        self._recorded_backup: str | None = None
        # Is self.buffer the real one? Not while solo (a NullBuffer: output flows).
        self._buffer_live = not cfg.start_solo
        self._failures = 0  # connection attempts failed in a row
        self._once = Once(logging.getLogger("remus.primary"))  # connection failures, refusals
        self._nacks = 0  # generations the backup refused in a row (reset by an ACK)
        self._nacked_gen = -1  # the last generation it refused
        self._new_generation = False  # the next full checkpoint opens a new generation
        self._retry_at = 0.0  # after a refusal: no checkpoint before this (back-off)
        self._handover: HandoverRequest | None = None  # a switchover asked for
        self.local_ip: str | None = None  # our end of the last link (where we'd be a backup)
        self.instance = secrets.token_hex(8)

    # -- public -------------------------------------------------------------
    def run(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # until the first pause says otherwise
        self.cfg.dump_root.mkdir(parents=True, exist_ok=True)
        (self.cfg.dump_root / VMFLAGS_DIR).mkdir(exist_ok=True)
        (self.cfg.dump_root / SPARE_DIR).mkdir(exist_ok=True)
        with parasite_dir_lock(self.cfg.pid):
            clear_stale_parasite_dir(self.cfg.pid)
        if self.disk is not None:
            self.disk.start()
        threads = [threading.Thread(target=self._guard(self._send_loop), name="sender", daemon=True),
                   threading.Thread(target=self._reap_loop, name="reaper", daemon=True),
                   threading.Thread(target=self._guard(self._coord_loop), name="coordinator",
                                    daemon=True)]
        self._heartbeat_thread = threading.Thread(target=self._guard(self._heartbeat_loop),
                                                  name="heartbeat", daemon=True)
        for t in (*threads, self._heartbeat_thread):
            t.start()
        try:
            self._epoch_loop()
        finally:
            self.stop_event.set()
            self.sendq.put(None)
            self.reapq.put(None)
            for t in threads:
                t.join(timeout=5)
        if self.fatal is not None:
            raise self.fatal

    def stop(self, reason: str = "protection stopped by operator", force: bool = False) -> None:
        """End protection (a signal, or request_stop). `force`: release the unit's
        output at the end even if the backup may have taken over meanwhile."""
        self._stop_reason = reason
        self.force_release = self.force_release or force
        log.info("stopping: %s%s", reason, " (forced)" if force else "")
        self.stop_event.set()
        self.wake.set()
        with self.cond:
            self.cond.notify_all()

    def request_stop(self, force: bool = False) -> None:
        """`remus stop`: refused (RemusError) while a lost backup may take over,
        unless `force`."""
        if not force and self.role.backup_may_take_over():
            raise RemusError(
                f"not stopping: {self.role.sentence(self._backup_name())}. The backup may "
                "take over, or may have done so already: releasing this copy's output now "
                "could serve the unit twice. Look at the backup first (`remus status` "
                "there). If it has not taken over and cannot (its agent or host is down), "
                "`remus stop --force` releases the output and the unit runs unprotected")
        self.stop(force=force)

    def release_on_stop(self) -> bool:
        """After a clean stop: may the unit's output be released? Not while a lost
        backup may have taken over (the stop's Bye never reached it), unless the
        stop was forced: the output then stays held (fail closed)."""
        if self.force_release or not self.role.backup_may_take_over():
            return True
        log.error("stopped while the backup is lost (%s): it may take over, or has, so the "
                  "unit's output stays held; `remus stop --force` releases it",
                  self.role.state.value)
        return False

    def set_interval(self, seconds: float) -> None:
        self.cfg.timing.interval = seconds
        self.wake.set()
        log.info("epoch interval set to %.1f ms", seconds * 1000)

    # -- epoch loop -----------------------------------------------------------
    def _epoch_loop(self) -> None:
        last_start = thawed = -1e9
        frozen_s = 0.0
        while not self.stop_event.is_set() and self.fatal is None:
            if self._handover is not None:
                self._hand_over(self._handover)
                continue
            if self.link is None or self.link.closed:
                self._peer_lost()
                self._connect()
                continue
            if (wait := self._retry_at - self.clock()) > 0:
                # The backup refused the last checkpoint (e.g. its disk is full): the
                # link and heartbeats stay, the next full checkpoint waits.
                self.wake.wait(wait)
                self.wake.clear()
                continue
            # Recomputed every pass so that set-interval takes effect at once.
            delay = next_epoch_at(last_start, self.cfg.timing.interval, thawed,
                                  frozen_s) - self.clock()
            if delay > 0:
                self.wake.wait(delay)
                self.wake.clear()
                continue
            if not self._wait_window():
                continue
            last_start = self.clock()
            frozen_s = self._checkpoint_once() / 1000
            thawed = self.clock()
            self.epoch_times.append(last_start)
            if len(self.epoch_times) > 200:
                del self.epoch_times[:100]

    def _wait_window(self) -> bool:
        """Block while too many epochs are unacknowledged, or while the last dump
        still waits for the sender (the epoch stretches).

        A dump taken while its predecessor waits would only wait behind it: its
        output would be held for the queueing as well. Dumping once the sender
        has taken the previous epoch instead folds that time into this epoch, and
        the sender's per-epoch cost is paid once for both (measured at 1000
        connections: commit latency p50 from ~620 ms to ... ms).
        """
        with self.cond:
            while ((len(self.inflight) >= self.cfg.max_inflight or self.sendq.qsize())
                   and not self.stop_event.is_set()):
                if self.link is None or self.link.closed:
                    return False
                self.cond.wait(0.05)
        # A link dropped while we waited empties the window too: reconnect, no
        # dump that nobody can receive.
        return not self.stop_event.is_set() and self.link is not None and not self.link.closed

    def _checkpoint_once(self) -> float:
        """One dump; the unit's pause in ms (0 when the dump failed)."""
        e = self.epoch
        d = self.cfg.dump_root / f"e{e}"
        shutil.rmtree(d, ignore_errors=True)
        boundary = False
        disk: DiskDelta | None = None
        started_at, held_at = time.time(), 0.0
        handed = False  # the dump is the sender's
        complete = False  # post-dump ran through: every image is written
        busy = (self.pause.last or 0.0) > BUSY_PAUSE_MS
        idle = self.idle_meter.share()  # over the last epoch
        early = not busy or (idle is not None and idle >= BUSY_IDLE_MIN
                             and (self.dumped_pages.last or 0.0) <= BUSY_EARLY_MAX_PAGES)
        sys.setswitchinterval(BUSY_SWITCH_INTERVAL_S if busy else SWITCH_INTERVAL_S)
        prelude = self._prelude(d) if early else None

        def hand_over() -> None:
            nonlocal handed
            self.sendq.put((e, d, parent, disk))
            handed = True

        def notify(script: str) -> None:
            nonlocal boundary, disk, held_at, complete
            if script == "pre-dump":
                self.buffer.hold_inbound(True)
                held_at = time.time()
            elif script == "post-dump":
                # The unit is frozen: everything it has sent so far is tagged <= e,
                # and its state directories are as its memory image says.
                self.buffer.begin_epoch(e + 1)
                boundary = True
                faults.point("primary-dump")
                self.marks[e] = {"boundary": time.time(), "start": started_at, "hold": held_at}
                if self.disk is not None:
                    disk = self.disk.capture(full=self.need_full)
                if tracker is not None:
                    # Still frozen: what CRIU just saw is what the re-armed pages hold.
                    tracker.rearm()
                # Every image is written and flushed before CRIU calls post-dump
                # (only its stats-dump comes later, and is not state).
                complete = True
                if early:
                    # The sender encodes while CRIU thaws the unit and exits, ~1.5 ms
                    # sooner (on a saturated machine: once CRIU has exited, below).
                    hand_over()
                if prelude is not None:
                    self.early.finish(prelude, handed=True)

        tracker = self._uffd_tracker()
        if tracker is not None:
            tracker.attach()  # new processes of the unit (ptrace: not during the dump)
        parent = self.chain.parent(self.need_full)
        try:
            with parasite_dir_lock(self.cfg.pid):
                res = self.criu.dump(self.cfg.pid, d, notify=notify,
                                     freeze_cgroup=self.cfg.freeze_cgroup,
                                     track_mem=self.chain.track, parent=parent,
                                     env=self._dump_env(tracker is not None))
            if not handed:
                hand_over()
        except CheckpointError as err:
            self.chain.failed(str(err))
            if complete and not handed:
                hand_over()
            if not handed:
                # Once post-dump ran through, the images are complete and are sent
                # (a switchover waits for this epoch's ACK): CRIU failed in its
                # clean-up (thaw, unlock), not in the checkpoint.
                shutil.rmtree(d, ignore_errors=True)
                self._drop_disk(disk)
            with parasite_dir_lock(self.cfg.pid):
                clear_stale_parasite_dir(self.cfg.pid)
            if not _alive(self.cfg.pid):
                raise FatalError(f"the unit (pid {self.cfg.pid}) has exited") from err
            log.error("checkpoint of epoch %d failed: %s", e, err)
            if boundary:
                self.epoch = e + 1
            self.failed_dumps += 1
            if self.failed_dumps == 1:
                self.failing_since = self.clock()
            if not self.dumped_once and self.failed_dumps >= MAX_FAILED_FIRST_DUMPS:
                # Never checkpointed at all: say so now, not after minutes of retries.
                raise FatalError(f"the unit (pid {self.cfg.pid}) cannot be checkpointed: "
                                 f"{self.failed_dumps} dumps failed in a row; the last: {err}"
                                 ) from err
            if (self.failed_dumps >= MAX_FAILED_DUMPS
                    and self.clock() - self.failing_since > MAX_FAILING_S):
                raise FatalError(f"checkpoints failed for {MAX_FAILING_S:.0f} s "
                                 f"({self.failed_dumps} in a row); the last: {err}") from err
            return 0.0
        finally:
            self.buffer.hold_inbound(False)
            if prelude is not None:
                self.early.finish(prelude, handed=handed)
        self.chain.dumped(d)
        split = res.split()
        pause_ms = res.freezing_ms + res.frozen_ms  # seize to thaw
        self.marks.setdefault(e, {}).update(dumped=time.time(), split=split,
                                            pause_ms=round(pause_ms, 3))
        self.epoch = e + 1
        self.failed_dumps = 0
        self.dumped_once = True
        self.pause.add(pause_ms)
        self.dump_wall.add(res.wall_ms)
        self.dumped_pages.add(float(res.pages_written))
        for k, v in split.items():
            self.frozen_split.setdefault(k, Series(500)).add(v)
        return pause_ms

    def _prelude(self, d: Path) -> Prelude | None:
        """Let an idle sender encode this dump's pages while CRIU still dumps the
        rest (remus.checkpoint.early). Not for a full checkpoint (nothing to
        compare with, and its pages can be the whole memory)."""
        if self.need_full or not self._sender_idle or self.sendq.qsize():
            return None
        d.mkdir(parents=True)
        prelude = self.early.watch(d)
        if prelude is not None:
            self.sendq.put(prelude)
        return prelude

    # -- sender ---------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            self._sender_idle = True
            item = self.sendq.get()
            self._sender_idle = False
            if isinstance(item, Prelude):
                self.early.run(item, self.encoder.pre_encode, self.stop_event)
                if not item.handed:
                    self.encoder.drop_early()  # the dump failed: its dir is reused
                continue
            with self.cond:
                self.cond.notify_all()  # the epoch loop may dump again (_wait_window)
            if item is None:
                return
            e, d, parent, disk = item
            try:
                self._send_epoch(e, d, parent, disk)
            except (RemusError, OSError) as err:  # link gone or closed under us
                log.warning("epoch %d not sent: %s", e, err)
                self.need_full = True
                self.chain.broken()  # dumps tracked against this one are no deltas now
                self.encoder.reset()
                self._drop_disk(disk)
                shutil.rmtree(d, ignore_errors=True)
                continue
            if self.prev_dir is not None:
                # Off the sender's path: a dump of a server with many connections
                # is a thousand files.
                self.reapq.put(self.prev_dir)
            self.prev_dir = d

    def _dump_env(self, tracked: bool) -> dict[str, str]:
        # CRIU patch 0007: each mapping's VmFlags from a cache kept here while the
        # mappings are unchanged, instead of /proc/PID/smaps, whose page walk grew
        # with the unit's memory (~10 ms per GiB of every freeze).
        env = {"CRIU_REMUS_VMFLAGS_DIR": str(self.cfg.dump_root / VMFLAGS_DIR),
               # CRIU patch 0008: all TCP streams in one file (tcp_stream.RAW_BUNDLE),
               # not a file per connection; only the encoder reads it.
               "CRIU_REMUS_TCP_BUNDLE": "1",
               # CRIU patch 0009: memory before the sockets, so the early encoding
               # (remus.checkpoint.early) has the pages while CRIU dumps the rest.
               "CRIU_REMUS_PAGES_FIRST": "1",
               # CRIU patch 0011: pages into the files of dumps already sent
               # (PagesSpare), whose page cache is already allocated.
               "CRIU_REMUS_PAGES_SPARE": str(self.cfg.dump_root / SPARE_DIR)}
        return {**env, **CRIU_ENV} if tracked else env

    def _reap_loop(self) -> None:
        while (d := self.reapq.get()) is not None:
            remove_dump_dir(d, spare=self.cfg.dump_root / SPARE_DIR)

    def _drop_disk(self, disk: DiskDelta | None) -> None:
        """A disk delta that will not be sent: the next capture must be full."""
        if disk is not None:
            disk.close()
        if self.disk is not None:
            self.disk.reset()

    def _send_epoch(self, e: int, d: Path, parent: Path | None, disk: DiskDelta | None) -> None:
        link = self.link
        if link is None or link.closed:
            raise LinkClosed("no backup connection")
        full = self.need_full
        if full and disk is not None and not disk.full:
            # A new generation needs a full disk copy; this delta was captured before
            # we knew. Skip the epoch (its output goes out with the next one).
            raise LinkClosed("disk delta captured before the generation changed; retrying full")
        self.marks.setdefault(e, {})["send_start"] = time.time()
        if full:
            self.encoder.reset()
            self.progress = Progress(f"full checkpoint to {self._backup_name()}",
                                     sum(f.stat().st_size for f in d.glob("pages-*.img")),
                                     self.clock)
        if full and self._new_generation:
            # After a refusal, on the same link: a higher generation, full (the
            # protocol's rule for a broken generation).
            self.generation = max(time.time_ns() // 1_000_000, self.generation + 1)
            self._new_generation = False
        # A dump tracked against another parent than our base is no delta: skip it
        # before announcing anything (the chain restarts with an untracked dump).
        self.encoder.check_base(d, full, parent)
        base = -1 if full else self.last_sent
        link.send(m.EpochBegin(generation=self.generation, epoch=e, base_epoch=base, full=full))
        try:
            n = 0
            disk_chunks = disk.chunks() if disk is not None else iter(())
            # Disk records first: the store refuses anything after the memory manifest.
            for kind, name, meta, data in itertools.chain(
                    disk_chunks, self.encoder.encode(d, full=full, parent=parent)):
                link.send(m.Chunk(epoch=e, kind=kind, name=name, meta=meta, data=data))
                if not n:
                    faults.point("primary-transfer")
                n += len(meta) + len(data)
                if self.progress is not None:
                    self.progress.update(self.encoder.stats.page_bytes)
            # In flight before its END leaves: an ACK that overtakes our bookkeeping
            # would find nothing to remove and leave e in flight for good (seen:
            # a switchover waiting 30 s for an epoch acked long before).
            with self.cond:
                self.inflight[e] = self.clock()
            link.send_frames(lambda conn: conn.end_epoch())
            faults.point("primary-sent")
        except BaseException:
            # The protocol has no way to abandon an announced epoch: drop the link
            # (the backup discards the partial epoch; the reconnect sends a full one).
            link.close()
            self.progress = None
            raise
        if self.progress is not None:
            self.progress.finish()
            self.progress = None
        self.marks.setdefault(e, {})["sent"] = time.time()
        self.need_full = False
        self.last_sent = e
        self.delta_bytes.add(n)
        st = self.encoder.stats
        self.full_bytes.add(float(st.image_bytes))
        self.encode_ms.add(st.seconds * 1000)
        self.dirty_pages.add(float(st.pages_changed))
        self.bytes_total += n

    def _uffd_tracker(self) -> UffdTracker | None:
        """The uffd-wp tracker, unless the chain fell back to the page diff."""
        return self.tracker if self.chain.mode == "uffd-wp" else None

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # a dead helper thread is fatal
                log.exception("%s failed", threading.current_thread().name)
                self.fatal = e
                self.stop_event.set()
                self.wake.set()
        return run

    # -- shutdown and status -----------------------------------------------------
    def close(self, release_output: bool) -> None:
        """Clean stop (release_output): Bye, release held output, remove the buffer.

        Otherwise (fatal error, fence) the buffer's rules stay in place with no
        one reading the queue, so the kernel drops the unit's packets: fail closed.
        The backup is told nothing and takes over if it must.
        """
        link = self.link
        self.heartbeats_end.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=2)
        if release_output and link is not None and not link.closed:
            try:
                link.send(m.Bye(reason=getattr(self, "_stop_reason", "primary stopping")))
                # FIN, then let our receiver read on until the backup closes: a
                # reset (unread data at close) could overtake the Bye.
                link.finish_sending()
                if self.receiver is not None:
                    self.receiver.join(timeout=BYE_WAIT_S)
            except LinkClosed:
                pass
        if link is not None:
            link.close()
        if release_output:
            self.buffer.close(release_all=True)
        else:
            log.error("protection ended abnormally: the unit's output stays blocked (fail "
                      "closed); `remus lab`/operator must remove the REMUS iptables chain")
        if self.disk is not None:
            self.disk.close()
        if self.tracker is not None:
            self.tracker.close()
        self.early.close()
        shutil.rmtree(self.cfg.dump_root, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        return primary_status(self)


def next_epoch_at(last_start: float, interval: float, thawed: float, frozen_s: float) -> float:
    """When the next epoch may start: an interval after the last one started, and
    not before the unit has run, since it thawed, as long as it was frozen (at
    most an interval); twice that after a busy pause (BUSY_PAUSE_MS).

    Under overload (thousands of busy connections) back-to-back epochs froze
    the unit most of the time, and the sender took the CPU it had left. Each
    epoch costs CPU that does not grow with its length (CRIU, the encoder, the
    backup's apply) on the cores the unit needs: longer runs under load leave
    it more. With short pauses nothing changes.
    """
    k = BUSY_RUN_PER_FREEZE if frozen_s * 1000 > BUSY_PAUSE_MS else 1.0
    return max(last_start + interval, thawed + k * min(frozen_s, interval))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
