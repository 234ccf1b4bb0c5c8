"""CRIU through its RPC interface (`criu swrk`), with action notifications.

We speak the swrk protocol ourselves (pycriu's generated `rpc_pb2` messages
over a SOCK_SEQPACKET socketpair) instead of using `pycriu.criu`, because we
need three things it does not offer: starting CRIU inside the unit's network
namespace (via `nsenter --net`), in a chosen cgroup (restore), and answering
CRIU's action notifications ("pre-dump", "post-dump", ...) with our own
callbacks. "post-dump" arrives while the unit is still frozen: that is where
the primary marks the output-buffer boundary and captures disk state.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remus.checkpoint import images
from remus.errors import CheckpointError, HostError
from remus.paths import criu_binary

# Shared memory, not /run: hosts that share a directory (the lab's hosts all
# see one /tmp, each its own /run) must share the lock of that directory too.
LOCK_DIR = Path("/dev/shm/remus-parasite-locks")
log = logging.getLogger(__name__)

Notify = Callable[[str], None]
MAX_MSG = 1 << 20

# Options of our CRIU build for every dump (bin/criu-patches): units that run as
# an unprivileged user even where root lacks CAP_SYS_RESOURCE (0002); no TCP
# window probe per connection when the dump leaves the unit running (0003); socket
# fd parameters without /proc and epoll targets checked without kcmp (0004); where
# the frozen time goes, in stats-dump (0005, DumpResult.split); one splice per
# page-pipe buffer into the pages image, not one per segment (0010); socket
# options read ahead by a second thread while a batch of descriptors is dumped (0013).
DUMP_ENV = {"CRIU_REMUS_UNPRIVILEGED": "1", "CRIU_REMUS_NO_WINDOW_PROBE": "1",
            "CRIU_REMUS_FAST_FDS": "1", "CRIU_REMUS_STATS": "1",
            "CRIU_REMUS_BATCH_SPLICE": "1", "CRIU_REMUS_SOCKOPT_AHEAD": "1"}

# Where a primary's dumps keep CRIU's VmFlags cache (patch 0007), next to its
# epoch directories; never sent.
VMFLAGS_DIR = "vmflags"
# ... and the pages files CRIU writes new dumps' pages into (PagesSpare, patch 0011).
SPARE_DIR = "spare"

# criu_network_lock_method / criu_cg_mode values from images/rpc.proto
NETWORK_LOCK_SKIP = 3
CG_MODE_IGNORE = 0


def remove_dump_dir(d: Path, spare: Path | None = None) -> None:
    """Delete a dump directory (flat: images and the parent link).

    Unlinks relative to the directory's fd: about half the CPU of
    shutil.rmtree, which resolves and stats each of a busy server's thousand
    images (9 % of the primary's samples under load). Anything that is not a
    flat file falls back to rmtree. With ``spare`` (a directory on the same
    file system), its pages files go there for a later dump to write into
    (PagesSpare) instead of being deleted."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    except OSError:
        shutil.rmtree(d, ignore_errors=True)
        return
    keep = PagesSpare(spare) if spare is not None else None
    try:
        for name in os.listdir(fd):
            if keep is not None and images.is_pages(name) and keep.take(fd, name, d.name):
                continue
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:  # a directory: not a CRIU image
                shutil.rmtree(d / name, ignore_errors=True)
    finally:
        os.close(fd)
    try:
        os.rmdir(d)
    except OSError:
        shutil.rmtree(d, ignore_errors=True)


class PagesSpare:
    """Pages files that CRIU writes a later dump's pages into (patch 0011).

    CRIU splices a dump's pages into a new tmpfs file, and a new file gets a
    page-cache folio allocated and charged per page, while the unit is frozen:
    1.6-1.9 us a page on this machine, against 0.4-0.6 us into a file that
    still has its folios (measured). So the reaper moves the pages files of
    dumps nobody reads any more (two epochs old: the encoder compares with the
    last one only) into the spare directory, and CRIU, given it as
    CRIU_REMUS_PAGES_SPARE, renames one into each new dump as a task's pages
    file, writes over it and cuts it to what it wrote. At most MAX_FILES
    files of at most MAX_BYTES each wait there; bigger ones are deleted (a
    full dump of a big unit is rare and would hold that much memory)."""

    MAX_FILES = 4
    MAX_BYTES = 64 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self._free: int | None = None  # places left, counted once per directory reaped

    def take(self, dir_fd: int, name: str, tag: str) -> bool:
        """Move ``name`` (in ``dir_fd``) into the spare directory; False if it
        is too big, the directory full or gone: the caller deletes it."""
        try:
            if self._free is None:
                self._free = self.MAX_FILES - len(os.listdir(self.path))
            if self._free <= 0 or os.stat(name, dir_fd=dir_fd).st_size > self.MAX_BYTES:
                return False
            os.rename(name, self.path / f"{tag}-{name}", src_dir_fd=dir_fd)
        except OSError:
            return False
        self._free -= 1
        return True


def _rpc() -> Any:
    try:
        import pycriu.rpc_pb2 as rpc
    except ImportError as e:  # pragma: no cover - set-up problem
        raise HostError("pycriu is not importable: run `make setup` (bin/setup)") from e
    return rpc


@dataclass
class DumpResult:
    """What one dump cost. Times in milliseconds."""

    wall_ms: float
    frozen_ms: float  # CRIU's own measure: tasks frozen -> thawed
    freezing_ms: float
    memdump_ms: float
    pages_written: int
    stats: dict[str, int] = field(default_factory=dict)

    def split(self) -> dict[str, float]:
        """Where the pause (freezing + frozen) went, in ms, from CRIU's stats-dump
        with our patch 0005: freezing the tasks; memory (pages scanned and
        copied); sockets (each socket's whole fd dump: parameters, options,
        TCP repair state, image); other fds; the post-dump callback (ours: the
        output cut, uffd re-arm); thaw (TCP repair off per socket, resume); the
        rest (cores, mm, pstree, ...). Empty without the patch's fields."""
        st = self.stats
        if "remus_fds_time" not in st:
            return {}
        ms = {k: st.get(f"{k}_time", 0) / 1000 for k in
              ("freezing", "frozen", "memdump", "remus_fds", "remus_sockets",
               "remus_post_dump", "remus_thaw")}
        accounted = ms["memdump"] + ms["remus_fds"] + ms["remus_post_dump"] + ms["remus_thaw"]
        sockets = st.get("remus_sockets", 0)
        return {
            "freezing_ms": ms["freezing"], "memory_ms": ms["memdump"],
            "sockets_ms": ms["remus_sockets"],
            "other_fds_ms": max(0.0, ms["remus_fds"] - ms["remus_sockets"]),
            "post_dump_ms": ms["remus_post_dump"], "thaw_ms": ms["remus_thaw"],
            "rest_ms": max(0.0, ms["frozen"] - accounted),
            "sockets": float(sockets),
            "us_per_socket": ms["remus_sockets"] * 1000 / sockets if sockets else 0.0,
        }


class Criu:
    """One CRIU binary, run per request as `criu swrk` in a given netns.

    Contract: `dump` and `restore` either succeed or raise CheckpointError
    with CRIU's reason (the tail of its log). A notify callback that raises
    makes CRIU fail the request (for dump, the unit is thawed and left
    running; no partial image set must be used by the caller).
    """

    def __init__(self, binary: str | None = None, netns: str | None = None) -> None:
        self.binary = binary or criu_binary()
        if not self.binary or not os.path.exists(self.binary):
            raise HostError(f"CRIU not found ({self.binary or 'not on PATH'}): run `make setup`")
        self.netns = netns  # path of the network namespace to run CRIU in

    def warm_up(self) -> None:
        """Load the RPC modules and let CRIU cache its kernel probe (/run/criu.kdat).

        Both would otherwise land on the first request: on a backup, that is the
        failover (measured: ~120 ms of a 180 ms restore call).
        """
        _rpc()
        subprocess.run([self.binary or "criu", "check"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)

    # -- requests ---------------------------------------------------------
    def dump(
        self,
        pid: int,
        images_dir: Path,
        *,
        notify: Notify | None = None,
        freeze_cgroup: str | None = None,
        track_mem: bool = False,
        parent: Path | None = None,
        log_level: int | None = None,
        env: dict[str, str] | None = None,
    ) -> DumpResult:
        """Dump pid's tree into images_dir and leave it running.

        track_mem: CRIU clears the soft-dirty bits after the dump, so the next
        tracked dump can tell which pages were written since. parent: the
        previous tracked dump's directory; pages not written since then are
        recorded as PE_PARENT holes (no data) instead of being copied, which is
        what makes the freeze proportional to the pages dirtied. Needs a kernel
        with soft-dirty (CONFIG_MEM_SOFT_DIRTY), or our patched CRIU with
        uffd-wp tracking (env from remus.checkpoint.uffd.CRIU_ENV).
        env: added to CRIU's environment.
        """
        if log_level is None:  # REMUS_CRIU_DUMP_LOG_LEVEL=4 to debug dumps (logs stay in the dump dir)
            log_level = int(os.environ.get("REMUS_CRIU_DUMP_LOG_LEVEL", "1"))
        req = _request("DUMP", "dump.log", log_level, notify)
        o = req.opts
        o.pid = pid
        o.leave_running = True
        o.tcp_skip_in_flight = True
        # The output buffer holds the unit's inbound packets during the dump
        # instead of CRIU's lock (which drops them and costs 35-70 ms).
        o.network_lock = NETWORK_LOCK_SKIP
        if freeze_cgroup:
            o.freeze_cgroup = freeze_cgroup
        if track_mem:
            o.track_mem = True
        if parent is not None:
            o.parent_img = link_parent(parent, images_dir)
        t0 = time.perf_counter()
        self._call(req, images_dir, notify, cgroup_procs=None, env={**DUMP_ENV, **(env or {})})
        wall = (time.perf_counter() - t0) * 1000
        return _dump_result(images_dir, wall)

    def restore(
        self,
        images_dir: Path,
        *,
        notify: Notify | None = None,
        cgroup_procs: str | None = None,
        log_level: int = 4,
    ) -> int:
        """Restore the image set; the root task becomes our child. Returns its pid."""
        req = _request("RESTORE", "restore.log", log_level, notify)
        req.opts.rst_sibling = True
        resp = self._call(req, images_dir, notify, cgroup_procs=cgroup_procs)
        return int(resp.restore.pid)

    # -- plumbing ---------------------------------------------------------
    def _argv(self, fd: int) -> list[str]:
        argv = [self.binary or "criu", "swrk", str(fd)]
        if self.netns:
            argv = ["nsenter", f"--net={self.netns}", "--", *argv]
        return argv

    def _call(self, req: Any, images_dir: Path, notify: Notify | None,
              cgroup_procs: str | None, env: dict[str, str] | None = None) -> Any:
        rpc = _rpc()
        images_dir.mkdir(parents=True, exist_ok=True)
        dfd = os.open(images_dir, os.O_DIRECTORY)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            req.opts.images_dir_fd = dfd
            t0 = time.perf_counter()
            proc = self._spawn(theirs, dfd, cgroup_procs, env)
            _raise_priority(proc.pid)
            theirs.close()
            t1 = time.perf_counter()
            try:
                ours.send(req.SerializeToString())
                return self._serve(ours, req.type, notify, images_dir, rpc)
            finally:
                t2 = time.perf_counter()
                ours.close()
                proc.wait()
                log.debug("criu %s: spawn %.1f ms, request %.1f ms, exit %.1f ms", req.type,
                          (t1 - t0) * 1000, (t2 - t1) * 1000, (time.perf_counter() - t2) * 1000)
        finally:
            os.close(dfd)
            theirs.close()

    def _spawn(self, sk: socket.socket, dfd: int, cgroup_procs: str | None,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        argv = self._argv(sk.fileno())
        if cgroup_procs:
            # A shell joins the cgroup and execs CRIU: no preexec_fn, so Python can
            # vfork (a fork of a big agent costs ~20 ms on the failover path).
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup_procs, *argv]
        try:
            return subprocess.Popen(
                argv,
                pass_fds=(sk.fileno(), dfd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, **env} if env else None,
            )
        except OSError as e:
            raise HostError(f"cannot start CRIU {self.binary}: {e}") from e

    def _serve(self, sk: socket.socket, req_type: int, notify: Notify | None,
               images_dir: Path, rpc: Any) -> Any:
        while True:
            data = sk.recv(MAX_MSG)
            if not data:
                raise CheckpointError(f"CRIU exited without an answer; {_log_tail(images_dir)}")
            resp = rpc.criu_resp()
            resp.ParseFromString(data)
            if resp.type == rpc.NOTIFY:
                ok = True
                if notify is not None:
                    try:
                        notify(resp.notify.script)
                    except Exception:
                        log.exception("notify callback %r failed", resp.notify.script)
                        ok = False
                ans = rpc.criu_req()
                ans.type = rpc.NOTIFY
                ans.notify_success = ok
                sk.send(ans.SerializeToString())
                continue
            if resp.type != req_type or not resp.success:
                msg = resp.cr_errmsg or f"errno {resp.cr_errno}"
                what = _REQ_NAMES.get(req_type, req_type)
                raise CheckpointError(f"CRIU {what} failed: {msg}; {_log_tail(images_dir)}")
            return resp


_REQ_NAMES = {1: "dump", 2: "restore"}

#: CRIU's nice value. While CRIU dumps, the unit is frozen (and while it
#: restores, the service is down): every millisecond CRIU waits for a CPU is a
#: millisecond of stall. The agent's own threads (the sender of the previous
#: epoch, the backup's apply) can wait. Measured at 1000 busy connections on 2
#: cores: pause p50 56 -> 46 ms, throughput +15 %.
CRIU_NICE = -10


def _raise_priority(pid: int) -> None:
    """CRIU_NICE for CRIU; without CAP_SYS_NICE it runs at the default priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, CRIU_NICE)
    except OSError as e:  # e.g. EPERM without CAP_SYS_NICE, ESRCH if it exited already
        log.debug("CRIU (pid %d) keeps its priority: %s", pid, e)


def _request(kind: str, log_file: str, log_level: int, notify: Notify | None) -> Any:
    """A criu_req with the options dump and restore share."""
    rpc = _rpc()
    req = rpc.criu_req()
    req.type = getattr(rpc, kind)
    o = req.opts
    o.tcp_established = True
    o.ext_unix_sk = True
    o.file_locks = True
    # cgroup paths differ between hosts: restored tasks join the cgroup CRIU runs in.
    o.manage_cgroups = True
    o.manage_cgroups_mode = CG_MODE_IGNORE
    o.log_level = log_level
    o.log_file = log_file
    o.notify_scripts = notify is not None
    return req


def _log_tail(images_dir: Path) -> str:
    for name in ("dump.log", "restore.log"):
        p = images_dir / name
        if p.exists():
            lines = [ln for ln in p.read_text(errors="replace").splitlines() if "Error" in ln]
            tail = lines[-3:] if lines else p.read_text(errors="replace").splitlines()[-3:]
            return f"log {p}: " + " | ".join(s.strip() for s in tail)
    return "no CRIU log"


def _dump_result(images_dir: Path, wall_ms: float) -> DumpResult:
    stats = read_dump_stats(images_dir)
    return DumpResult(
        wall_ms=wall_ms,
        frozen_ms=stats.get("frozen_time", 0) / 1000,
        freezing_ms=stats.get("freezing_time", 0) / 1000,
        memdump_ms=stats.get("memdump_time", 0) / 1000,
        pages_written=stats.get("pages_written", 0),
        stats=stats,
    )


#: the subdirectory of a tracked dump that holds its parent's files
PARENT_DIR = "parent-images"


def link_parent(parent: Path, images_dir: Path) -> str:
    """Hard-link the parent dump's files CRIU reads into images_dir/PARENT_DIR.

    CRIU opens the parent while it dumps memory, after it has moved into other
    namespaces: from a lab host (own mount namespace) a sibling directory was
    not found there, by relative or by absolute path (ENOENT, and CRIU then
    silently copies every page). A subdirectory always resolves, and the
    primary may delete the parent directory meanwhile. Links are free on
    tmpfs. CRIU reads the inventory (pid-reuse check) and the pagemaps and
    pages files.
    """
    sub = images_dir / PARENT_DIR
    sub.mkdir(parents=True, exist_ok=True)
    for f in parent.iterdir():
        if f.name == "inventory.img" or f.name.startswith(("pagemap-", "pages-")):
            os.link(f, sub / f.name)
    return PARENT_DIR


@contextlib.contextmanager
def parasite_dir_lock(pid: int) -> Iterator[None]:
    """Hold while dumping `pid` (and while clearing its stale parasite dir).

    CRIU's parasite mounts its private /proc at the fixed name `proc.crtools`
    in the dumped task's working directory. Two units with the same working
    directory (two redis with --dir /tmp) dumped at once collide there: one
    dump fails ("Can't create a directory"), and its clean-up may remove the
    other's. Measured: 5 units on one host failed most of their dumps. Dumps
    of units that share a working directory take turns (a lock per directory,
    in /dev/shm); the common case, one unit per directory, never waits."""
    try:
        st = os.stat(f"/proc/{pid}/cwd")
    except OSError:
        yield
        return
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_DIR / f"cwd-{st.st_dev}-{st.st_ino}.lock",
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def clear_stale_parasite_dir(pid: int) -> bool:
    """Remove `proc.crtools` left in the unit's cwd by a dump that was killed.

    CRIU's parasite mounts a private /proc at the fixed name `proc.crtools` in
    the dumped task's working directory when the task is in its own PID
    namespace. A dump killed half-way (power cut, kill -9) leaves the empty
    directory behind, and every later dump then fails ("Can't get proc fd").
    rmdir only removes an empty directory that is not a mount point.
    """
    try:
        os.rmdir(f"/proc/{pid}/cwd/proc.crtools")
    except OSError:
        return False
    log.warning("removed a stale proc.crtools directory in the cwd of pid %d "
                "(left by an interrupted dump)", pid)
    return True


def read_dump_stats(images_dir: Path) -> dict[str, int]:
    """CRIU's `stats-dump` image as a dict (times in microseconds)."""
    p = images_dir / "stats-dump"
    if not p.exists():
        return {}
    from pycriu import images

    with open(p, "rb") as f:
        img = images.load(f)
    entry = img["entries"][0].get("dump", {})
    return {k: int(v) for k, v in entry.items() if isinstance(v, int | str) and str(v).isdigit()}
