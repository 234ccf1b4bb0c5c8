"""Dirty-page tracking without soft-dirty: userfaultfd write-protection.

remus's CRIU patch (bin/criu-patches/0001-uffd-wp-tracking.patch, enabled by
CRIU_REMUS_UFFD_WP=1) makes `--track-mem` read the kernel's answer
(remus.checkpoint.uffd_kernel: a userfaultfd in async write-protect mode and
PAGEMAP_SCAN, Linux >= 6.7), so a dump with a parent copies only the pages
written since the previous dump.

`UffdTracker` keeps the unit's processes registered and armed:

- `attach()`, before each dump while the unit runs: every process of the
  unit's tree that has no tracker yet gets one. A userfaultfd is bound to the
  mm of the process that creates it, so it is made *inside* the process by
  ptrace syscall injection (remus.checkpoint.inject), taken into the agent
  with pidfd_getfd, and the process's own copy is closed (CRIU refuses to
  dump a task holding a userfaultfd).
- `rearm()`, from CRIU's post-dump notification while the unit is still
  frozen: writable private mappings not registered yet are registered, and
  every registered mapping is re-armed. Arming anywhere else would be wrong:
  pages written between the dump and the arm would look clean.

Correctness never rests on the tracker's bookkeeping. A page counts as clean
only in a registered mapping (PAGE_IS_WPALLOWED) whose protection the tracker
set right after the previous dump; pages of unregistered mappings (new
mappings, forked children, exec'd processes, anything the tracker missed or
could not register) are dumped in full. A failed re-arm leaves pages marked
written, which only costs copying them again. Kernel facts relied on: a fork
child's mappings and an mremap'd mapping lose the registration (no
UFFD_FEATURE_EVENT_FORK/REMAP); any newly faulted-in page (after
MADV_DONTNEED, or first touch) is marked written; a page gone from the
pagemap is simply absent from the dump (zero on restore).

What it cannot see: writes through pages pinned before arming (RDMA,
io_uring fixed buffers, vmsplice), the same blind spot soft-dirty has.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from remus.checkpoint.inject import (
    SYS_CLOSE,
    SYS_USERFAULTFD,
    InjectError,
    RemoteTask,
    pidfd_getfd,
)
from remus.checkpoint.uffd_kernel import (
    O_CLOEXEC,
    O_NONBLOCK,
    UFFD_USER_MODE_ONLY,
    arm,
    uffd_api,
    uffd_register_wp,
)

log = logging.getLogger(__name__)

#: in CRIU's binary when it carries remus's uffd-wp patch
CRIU_MARKER = b"CRIU_REMUS_UFFD_WP"
CRIU_ENV = {"CRIU_REMUS_UFFD_WP": "1"}

#: mappings never registered (kernel-provided, not writable user memory)
_SPECIAL = ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]")

Range = tuple[int, int]


# -- what this CRIU offers -------------------------------------------------------

def criu_supports(binary: str | None) -> bool:
    """Does this CRIU binary carry remus's uffd-wp patch?"""
    if not binary:
        return False
    try:
        with open(binary, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            return m.find(CRIU_MARKER) >= 0
    except (OSError, ValueError):
        return False


# -- the tracker -------------------------------------------------------------------

def tree_pids(root: int) -> list[int]:
    """root and its descendants (processes, not threads), parents first."""
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(k) for k in kids)
    return out


def writable_anonymous(pid: int) -> list[Range]:
    """The writable private anonymous mappings of pid (heap, stack, mmap'd memory).

    Not file-backed ones: zapping a write-protected page there (MADV_DONTNEED
    of a copied-on-write page) leaves a marker that reads as a swapped,
    unwritten page although the page now holds the file's content. They stay
    unregistered and are dumped in full (they are small: libraries' data).
    """
    out: list[Range] = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            perms = parts[1]
            if perms[1] != "w" or perms[3] != "p" or parts[4] != "0":
                continue
            if len(parts) > 5 and parts[5].strip() in _SPECIAL:
                continue
            lo, _, hi = parts[0].partition("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


@dataclass
class _Proc:
    pid: int
    uffd: int
    pagemap: int
    known: set[Range] = field(default_factory=set)  # registered, as maps showed them
    refused: set[Range] = field(default_factory=set)  # the kernel would not register

    def close(self) -> None:
        for fd in (self.uffd, self.pagemap):
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class TrackerStats:
    processes: int = 0
    mappings: int = 0
    registered_last: int = 0  # mappings registered in the last re-arm
    rearm_ms: float = 0.0
    attach_ms: float = 0.0
    untracked: int = 0  # processes of the unit the tracker could not attach


class UffdTracker:
    """Keeps every process of one unit tree registered and armed (see module doc).

    Thread contract: `attach` and `close` from one thread (the epoch loop;
    ptrace is per thread); `rearm` from CRIU's post-dump notification, which
    that same thread serves.
    """

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.procs: dict[int, _Proc] = {}
        self.stats = TrackerStats()
        self._failed: dict[int, str] = {}  # pid -> why it is not tracked (logged once)

    def attach(self) -> None:
        t0 = time.perf_counter()
        pids = tree_pids(self.root)
        live = set(pids)
        for pid in [p for p in self.procs if p not in live]:
            self.procs.pop(pid).close()
        for pid in list(self._failed):
            if pid not in live:
                del self._failed[pid]
        for pid in pids:
            if pid in self.procs or pid in self._failed:
                continue
            try:
                self.procs[pid] = self._attach_one(pid)
            except (OSError, InjectError) as e:
                if os.path.exists(f"/proc/{pid}"):
                    self._failed[pid] = str(e)
                    log.warning("uffd-wp: cannot track pid %d (%s): its memory is dumped in "
                                "full every epoch", pid, e)
        self.stats.processes = len(self.procs)
        self.stats.untracked = len(self._failed)
        self.stats.attach_ms = (time.perf_counter() - t0) * 1000

    def rearm(self) -> None:
        t0 = time.perf_counter()
        registered = mappings = 0
        for pid, p in list(self.procs.items()):
            try:
                n, m = self._rearm_one(p)
            except OSError as e:
                # ESRCH: the process exec'd or exited (its mm is gone). Anything
                # else: give up on it. Its mappings are unregistered or stay
                # written, so CRIU dumps them in full: nothing is missed.
                if e.errno != errno.ESRCH:
                    log.warning("uffd-wp: re-arming pid %d failed (%s); tracking it afresh",
                                pid, e)
                self.procs.pop(pid).close()
                continue
            registered += n
            mappings += m
        self.stats.registered_last = registered
        self.stats.mappings = mappings
        self.stats.rearm_ms = (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        for p in self.procs.values():
            p.close()
        self.procs.clear()

    # -- one process ------------------------------------------------------------
    def _attach_one(self, pid: int) -> _Proc:
        with RemoteTask(pid) as task:
            flags = O_CLOEXEC | O_NONBLOCK
            fd = task.call(SYS_USERFAULTFD, flags)
            if fd == -errno.EPERM:  # unprivileged: user-mode faults are all we need
                fd = task.call(SYS_USERFAULTFD, flags | UFFD_USER_MODE_ONLY)
            if fd < 0:
                raise OSError(-fd, f"userfaultfd() in pid {pid}: {os.strerror(-fd)}")
            try:
                ours = pidfd_getfd(pid, fd)
            finally:
                task.call(SYS_CLOSE, fd)
        try:
            uffd_api(ours)
            pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(ours)
            raise
        log.debug("uffd-wp: tracking pid %d", pid)
        return _Proc(pid, ours, pagemap)

    def _rearm_one(self, p: _Proc) -> tuple[int, int]:
        registered = 0
        ranges = writable_anonymous(p.pid)
        for r in ranges:
            if r not in p.known and r not in p.refused and self._register(p, r, ranges):
                registered += 1
        for r in ranges:
            if r in p.refused:
                continue
            try:
                arm(p.pagemap, r[0], r[1], check=True)
            except OSError as e:
                if e.errno != errno.EPERM:
                    raise
                # A mapping replaced at the same address since: it was dumped in
                # full just now (unregistered), so registering it now is exact.
                if self._register(p, r, ranges):
                    registered += 1
                    arm(p.pagemap, r[0], r[1])
        p.known = {r for r in ranges if r not in p.refused}
        return registered, len(p.known)

    def _register(self, p: _Proc, r: Range, ranges: list[Range]) -> bool:
        try:
            uffd_register_wp(p.uffd, r[0], r[1])
            return True
        except OSError as e:
            # ENOMEM: no such mapping in the mm of our userfaultfd
            if e.errno in (errno.EINVAL, errno.ENOMEM) and self._mm_changed(p, ranges):
                raise OSError(errno.ESRCH, f"pid {p.pid} has a new address space (exec)") from e
            if e.errno in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOMEM):
                p.refused.add(r)
                log.debug("uffd-wp: pid %d mapping %x-%x not registered: %s", p.pid, r[0],
                          r[1], e.strerror)
                return False
            raise

    @staticmethod
    def _mm_changed(p: _Proc, ranges: list[Range]) -> bool:
        """Is our userfaultfd bound to an address space pid no longer has (exec)?

        A userfaultfd registers ranges of the mm it was made in. If a range
        registered before still exists and registers again (idempotent), the
        mm is the same; if none of the registered ranges exists any more, or
        one fails, the process has exec'd.
        """
        for r in p.known:
            if r in ranges:
                try:
                    uffd_register_wp(p.uffd, r[0], r[1])
                    return False
                except OSError:
                    return True
        return bool(p.known)
