"""Services that run as their own user, and units CRIU cannot dump.

Most daemons drop privileges. Root on this machine lacks CAP_SYS_RESOURCE
(as in many containers), so stock CRIU cannot read such a process's rlimits
(`Can't get rlimit 0: Operation not permitted`) and never dumped it; our
CRIU reads them from /proc/PID/limits (bin/criu-patches/0002). Asserted: an
unprivileged redis, a unit of several unprivileged processes, and memcached
dropping to `nobody` by itself are protected and survive a power cut of the
primary with every acknowledged write and the client's connection; a unit
that cannot be checkpointed at all makes `remus run` stop at once, saying
why.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from remus.checkpoint.uffd import tree_pids
from remus.powercut import SEED, crash_once
from tests.support.timing import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
REDIS = ["redis-server", "--port", "6379", "--save", "", "--appendonly", "no",
         "--protected-mode", "no", "--daemonize", "no", "--dir", "/tmp"]
CASES = {
    "redis-as-nobody": ("redis", [*NOBODY, *REDIS]),
    # several processes, all unprivileged (a helper child next to the server)
    "processes-as-nobody": ("redis", [*NOBODY, "sh", "-c",
                                      "sleep 100000 & exec " + " ".join(REDIS)]),
    # the daemon drops to nobody by itself after it started as root
    "memcached-u-nobody": ("memcached", ["memcached", "-u", "nobody", "-p", "11211", "-U", "0",
                                         "-t", "1"]),
}


def uids(pid: int) -> set[int]:
    out = set()
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("Uid:"):
                    out.add(int(line.split()[1]))
        except OSError:
            continue
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_unprivileged_unit_survives_a_power_cut(scenario: Any, tmp_path: Path, case: str) -> None:
    server, command = CASES[case]
    trace = tmp_path / "trace.jsonl"
    sc = scenario(server=server, command=command, extra_primary=["--trace", str(trace)])
    rng = random.Random(f"{SEED}-{case}")

    checked: dict[str, Any] = {}
    original = sc.wait_protected

    def wait_and_check(*a: Any, **kw: Any) -> dict[str, Any]:
        st = original(*a, **kw)
        checked["uids"] = uids(int(st["unit_pid"]))
        checked["status"] = st
        return st

    sc.wait_protected = wait_and_check  # type: ignore[method-assign]
    rec = crash_once(sc, rng, "random", trace)
    why = f"{rec}\nbackup.log:\n{sc.log_tail('backup.log')}\nprimary.log:\n{sc.log_tail('primary.log')}"
    assert 65534 in checked["uids"], checked  # the server really ran as nobody
    assert checked["status"]["acked_epoch"] >= 3
    assert rec["backup_state"] == "active", why
    assert rec["connection_survived"], why
    assert rec["verified"] and rec["missing"] == 0 and rec["wrong_values"] == 0, why


# A process that holds a userfaultfd of its own: CRIU cannot checkpoint it.
UNDUMPABLE = ("import ctypes, time\n"
              "fd = ctypes.CDLL(None).syscall(323, 0o2000000)  # userfaultfd(O_CLOEXEC)\n"
              "assert fd >= 0\n"
              "time.sleep(1000)\n")


def test_unit_that_cannot_be_dumped_is_refused_at_once(scenario: Any) -> None:
    sc = scenario(command=[sys.executable, "-c", UNDUMPABLE])
    sc.start_backup()
    wait_for(lambda: sc.status("bak"), timeout=30)  # the backup is up (a hang bound)
    start = time.monotonic()
    p = sc.start_primary()
    try:
        rc = p.wait(timeout=120)  # a hang bound; without the fix it retried for 10 s and more
    except subprocess.TimeoutExpired:
        pytest.fail(f"remus run still running; log:\n{sc.log_tail('primary.log')}")
    took = time.monotonic() - start
    log = sc.log_tail("primary.log", 40)
    assert rc != 0, log
    assert "cannot be checkpointed" in log, log
    assert "3 dumps failed in a row" in log, log
    print(f"refused after {took:.1f} s")
