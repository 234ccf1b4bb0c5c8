"""A big epoch must not cost a failover.

The first checkpoint of a 1 GiB unit, or the epoch after a unit grew by
1 GiB, takes seconds to copy and stream. Seen in `make bench`'s 1 GiB points
(2 of 3 failed on 2026-11-30 before the fix): the primary's 200 ms lease
expired while the big epoch was on the wire, it dropped the link, and the
backup declared the live primary dead and took over. Fixed by: a send
blocked on a full socket no longer holds the lock the reader needs
(remus.link), stream progress of more than a receive buffer renews the
primary's lease, and the backup does not count the primary silent while
the primary's bytes wait unread in its socket. The failure is load- and
timing-dependent: these tests passed on this machine with and without the
fix (the bench reproduced it), so they guard the behaviour, not the bug.
Asserted, on a quiet machine and on one loaded by a busy process per core:
protection of a 1 GiB unit, and of a unit that grows by 1 GiB while
protected, goes on with no takeover, no lease expiry, no reconnect, and
epochs acknowledged after the big one; the same for the growing unit while
the backup agent is confined to 512 MiB of memory (memory pressure).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remus.checkpoint.tracking import uffd_wp_problem
from remus.paths import REPO
from tests.support.timing import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

FILLER = str(REPO / "bench" / "filler.py")
BUSY = "while True: pass"


@pytest.fixture(params=[False, True], ids=["quiet", "loaded"])
def loaded(request: pytest.FixtureRequest) -> Iterator[None]:
    """loaded: one busy process per core of this machine for the whole test."""
    n = (os.cpu_count() or 2) if request.param else 0
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


# watch() goes on past its time until the primary acknowledged epochs after the
# big one, however long they take on this machine; this bound only catches a hang.
WATCH_HANG_S = 300.0


def watch(sc: Any, seconds: float, acked_past: int
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Statuses of both agents every 0.5 s for at least `seconds`, and on until the
    primary acknowledged more than `acked_past` epochs (or WATCH_HANG_S passed)."""
    pri, bak = [], []
    start = time.monotonic()
    while True:
        p, b = sc.status("pri", timeout=20), sc.status("bak", timeout=20)
        if p:
            pri.append(p)
        if b:
            bak.append(b)
        took = time.monotonic() - start
        if took >= WATCH_HANG_S or (took >= seconds and pri
                                    and pri[-1]["acked_epoch"] > acked_past):
            return pri, bak
        time.sleep(0.5)


def assert_no_takeover(sc: Any, pri: list[dict[str, Any]], bak: list[dict[str, Any]],
                       acked_before: int) -> None:
    logs = f"primary.log:\n{sc.log_tail('primary.log')}\nbackup.log:\n{sc.log_tail('backup.log')}"
    assert bak and all(b.get("state") == "replicating" for b in bak), logs
    assert pri and pri[-1]["acked_epoch"] > acked_before + 3, logs
    plog = (sc.workdir / "primary.log").read_text(errors="replace")
    blog = (sc.workdir / "backup.log").read_text(errors="replace")
    assert "lease expired" not in plog, logs
    assert "backup link lost" not in plog, logs
    assert "taking over" not in blog.lower() and "failover" not in blog.lower(), logs
    assert len({p["generation"] for p in pri}) == 1, logs  # never reconnected


# Not with --dirty-tracking diff, where every epoch copies and diffs 1 GiB: on
# this 2-core machine the primary agent then still goes ~300 ms without a word
# now and then (1 run in 3), and the backup takes over (an open problem, see
# docs/tuning.md); the test would be flaky, not wrong.
@pytest.mark.parametrize("tracking", ["uffd-wp"])
def test_1gib_unit(scenario: Any, loaded: None, tracking: str) -> None:
    """One big (the first) epoch, then small ones."""
    if uffd_wp_problem() is not None:
        pytest.skip(f"no uffd-wp here: {uffd_wp_problem()}")
    sc = scenario(server="filler", command=[sys.executable, FILLER, "1024", "0", "0.05"],
                  extra_primary=["--dirty-tracking", tracking], status_timeout=20.0)
    sc.start_backup()
    wait_for(lambda: sc.status("bak"), timeout=30)  # the backup is up (a hang bound)
    sc.start_primary()
    st = sc.wait_protected(timeout=300, min_acked=1)
    pri, bak = watch(sc, 20, st["acked_epoch"] + 3)
    assert_no_takeover(sc, pri, bak, st["acked_epoch"])
    assert pri[-1]["checkpoint_bytes"] > 0.9 * (1 << 30)  # the images of 1 GiB, roughly
    assert pri[-1]["dirty_tracking"] == tracking


def test_unit_that_grows_by_1gib_while_protected(scenario: Any, loaded: None) -> None:
    sc = scenario(server="filler", command=[sys.executable, FILLER, "16", "1", "0.05", "1024"],
                  status_timeout=20.0)
    sc.start_backup()
    wait_for(lambda: sc.status("bak"), timeout=30)  # the backup is up (a hang bound)
    sc.start_primary()
    st = sc.wait_protected(timeout=120, min_acked=3)
    pri, bak = watch(sc, 30, st["acked_epoch"] + 3)  # the unit grows 3 s after it started
    assert_no_takeover(sc, pri, bak, st["acked_epoch"])
    assert pri[-1]["checkpoint_bytes"] > 0.9 * (1 << 30)


MEMCG_V1 = Path("/sys/fs/cgroup/memory")


@contextlib.contextmanager
def memory_limited(pid: int, limit: int) -> Iterator[Path]:
    """Move `pid` into a fresh memory cgroup limited to `limit` bytes (v1, or v2
    memory.high): its page cache is reclaimed and its allocations wait. Moved
    back to the root and removed afterwards."""
    v2 = Path("/sys/fs/cgroup/unified")
    if (MEMCG_V1 / "memory.limit_in_bytes").exists():
        cg, knob, root = MEMCG_V1 / f"remus-test-{pid}", "memory.limit_in_bytes", MEMCG_V1
    elif (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.controllers"
                                                                  ).read_text():
        cg, knob, root = v2 / f"remus-test-{pid}", "memory.high", v2
    else:
        pytest.skip("no memory cgroup controller to put the agent under pressure")
    cg.mkdir()
    try:
        (cg / knob).write_text(str(limit))
        (cg / "cgroup.procs").write_text(str(pid))
        yield cg
    finally:
        with contextlib.suppress(OSError):
            for t in (cg / "cgroup.procs").read_text().split():
                (root / "cgroup.procs").write_text(t)
        with contextlib.suppress(OSError):
            cg.rmdir()


def test_backup_under_memory_pressure_while_the_unit_grows_by_1gib(scenario: Any) -> None:
    """The backup agent confined to 512 MiB (its ~1 GiB of store writes must be
    reclaimed as they go) while the unit grows by 1 GiB: slow, but no takeover
    of the live primary, and protection goes on."""
    sc = scenario(server="filler", command=[sys.executable, FILLER, "16", "1", "0.05", "1024"],
                  status_timeout=20.0)
    sc.start_backup()
    bak = wait_for(lambda: sc.status("bak"), timeout=30)
    assert bak, "the backup did not come up"
    with memory_limited(int(bak["pid"]), 512 << 20) as cg:
        sc.start_primary()
        st = sc.wait_protected(timeout=120, min_acked=3)
        pri, bak_rows = watch(sc, 30, st["acked_epoch"] + 3)
        limit_hits = (cg / "memory.failcnt").read_text().strip() \
            if (cg / "memory.failcnt").exists() else "?"
    assert_no_takeover(sc, pri, bak_rows, st["acked_epoch"])
    assert pri[-1]["checkpoint_bytes"] > 0.9 * (1 << 30)
    print(f"backup confined to 512 MiB: limit reached {limit_hits} times; no takeover")
