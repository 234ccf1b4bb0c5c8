"""High availability that lasts: after a failover, protection comes back by itself.

A protected redis on `pri`, its backup on `bak`, one loadgen client writing
over ONE TCP connection to the VIP for the whole test.

- Repeated failovers, alternating hosts: a power cut of the host running the
  unit, the other host takes over and runs the unit solo (unprotected, output
  flowing) while it looks for a backup at the old host's address; the old
  host reboots and starts `remus backup`; protection resumes by itself (full
  checkpoint, then deltas); then the next power cut, the other way. Asserted:
  every round ends protected again, the client's connection survives every
  failover, and every acknowledged write is there at the end.
- A stale primary: the primary agent is stopped (SIGSTOP) for longer than the
  takeover timeout, the backup takes over; when the old agent runs again it
  learns it was replaced, kills its copy of the unit (never serving from it),
  and becomes the backup of the new primary, which is then protected again.
- With a 1 GiB unit, while the new primary's first full checkpoint is on the
  wire to the returning backup: that backup killed (the new primary goes back
  to solo and retries; nothing half-copied is kept), or the new primary's host
  losing power (the returning backup holds no checkpoint and never takes over).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from typing import Any

import pytest

from remus.paths import REPO
from remus.scenario import Scenario
from tests.support.ha import active_on, logs, protected_from, wait
from tests.support.procs import alive

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROUNDS = 5
# Hang bounds (not speeds): how long a takeover, or a re-protection, may take
# before the test says it did not happen.
TAKEOVER_BOUND_S = 20.0
REPROTECT_BOUND_S = 60.0


def test_repeated_failovers_alternating_hosts_lose_nothing(scenario: Any) -> None:
    sc = scenario(server="redis")
    sc.start_backup("bak")
    wait("backup up", lambda: sc.status("bak"), 30, sc)
    sc.start_primary()
    sc.wait_protected(timeout=30)
    client = sc.start_client(600, "client.json", stall_timeout=30)
    time.sleep(1.5)
    running, other = "pri", "bak"
    took: list[dict[str, float]] = []
    for rnd in range(ROUNDS):
        cut = time.monotonic()
        sc.lab.crash(running)
        st = wait(f"round {rnd}: takeover on {other}", lambda o=other: active_on(sc, o),
                  TAKEOVER_BOUND_S, sc)
        taken = time.monotonic()
        prot = st.get("protection") or {}
        assert prot.get("state") in ("solo", "syncing", "connecting"), st
        assert prot.get("backup", "").startswith(sc.lab.addr(running)), st
        sc.lab.up()  # the crashed host reboots ...
        started = time.monotonic()
        sc.start_backup(running)  # ... and its operator (or systemd) starts a backup
        wait(f"round {rnd}: {other} protected again by {running}",
             lambda o=other: protected_from(sc, o), REPROTECT_BOUND_S, sc)
        took.append({"takeover_s": round(taken - cut, 3),
                     "backup_start_to_protected_s": round(time.monotonic() - started, 3)})
        assert client.poll() is None, f"client ended in round {rnd}\n{logs(sc)}"
        time.sleep(1.0)  # the client keeps writing under protection
        running, other = other, running
    os.kill(client.pid, signal.SIGINT)  # ends its write phase; it then reads back
    res = sc.wait_client(client, "client.json", timeout=120)
    assert res["connection_survived"], f"{res['error']}\n{logs(sc)}"
    assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0, res
    print(f"\n{ROUNDS} failovers alternating hosts: {res['acked']} writes acked, 0 lost, one "
          f"connection; max gap {res['max_gap_s']:.3f} s; rounds {took}")


def test_stale_primary_after_sigstop_becomes_the_backup(scenario: Any) -> None:
    sc = scenario(server="redis")
    sc.start_backup("bak")
    wait("backup up", lambda: sc.status("bak"), 30, sc)
    sc.start_primary()
    st = sc.wait_protected(timeout=30)
    agent, unit = int(st["pid"]), int(st["unit_pid"])
    client = sc.start_client(600, "client.json", stall_timeout=30)
    time.sleep(1.0)
    os.kill(agent, signal.SIGSTOP)
    try:
        wait("takeover on bak", lambda: active_on(sc, "bak"), TAKEOVER_BOUND_S, sc)
        time.sleep(1.0)
    finally:
        os.kill(agent, signal.SIGCONT)
    # The old agent learns it was replaced: it kills its unit and becomes the backup.
    wait("old primary's unit killed", lambda: not alive(unit), 30, sc)
    wait("pri rejoined as the backup",
         lambda: (sc.status("pri") or {}).get("state") == "replicating", REPROTECT_BOUND_S, sc)
    wait("bak protected again by pri", lambda: protected_from(sc, "bak"), REPROTECT_BOUND_S, sc)
    pri = sc.status("pri") or {}
    assert pri.get("role") == "backup" and pri.get("pid") == agent, pri
    plog = (sc.workdir / "primary.log").read_text(errors="replace")
    assert "fencing" in plog and "now its backup" in plog, plog[-3000:]
    time.sleep(1.0)
    os.kill(client.pid, signal.SIGINT)
    res = sc.wait_client(client, "client.json", timeout=120)
    assert res["connection_survived"], f"{res['error']}\n{logs(sc)}"
    assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0, res


# A unit whose first full checkpoint takes a while (about a second or more to
# dump and stream here), so the tests below can act while it is on the wire.
BIG = [sys.executable, str(REPO / "bench" / "filler.py"), "1024", "0", "0.05"]


def failed_over_to_bak(sc: Scenario) -> dict[str, Any]:
    """pri protected by bak, then a power cut of pri: bak runs the unit solo.
    pri's disk holds no store (an earlier test may have left one there)."""
    shutil.rmtree(sc.lab.host_dir("pri") / "var-lib" / "remus", ignore_errors=True)
    sc.start_backup("bak")
    wait("backup up", lambda: sc.status("bak"), 30, sc)
    sc.start_primary()
    sc.wait_protected(timeout=300, min_acked=2)
    sc.lab.crash("pri")
    st = wait("takeover on bak", lambda: active_on(sc, "bak"), 120, sc)
    sc.lab.up()
    return st


def syncing(sc: Scenario, host: str) -> bool:
    return (sc.primary_status(host) or {}).get("state") == "syncing"


def test_returning_backup_dies_mid_full_copy(scenario: Any) -> None:
    """The new primary stays safe (solo again, serving), and retries."""
    sc = scenario(server="filler", command=BIG, status_timeout=20.0)
    unit = int(failed_over_to_bak(sc)["unit_pid"])
    sc.start_backup("pri")
    wait("bak's first full checkpoint to pri under way", lambda: syncing(sc, "bak"), 60, sc)
    st = sc.status("pri") or {}
    os.kill(int(st["pid"]), signal.SIGKILL)  # mid full copy
    wait("bak back to solo", lambda: (sc.primary_status("bak") or {}).get("state") == "solo",
         30, sc)
    assert alive(unit), "the unit on bak died with its backup"
    sc.start_backup("pri")  # it comes back: protection resumes by itself
    wait("bak protected by pri", lambda: protected_from(sc, "bak"), REPROTECT_BOUND_S, sc)
    assert alive(unit)
    blog = (sc.workdir / "backup-pri.log").read_text(errors="replace")
    # the restarted backup found no committed epoch of that cut-off copy
    assert blog.count("empty: no checkpoint yet") >= 2, blog[-2000:]


def test_new_primary_dies_before_its_first_checkpoint_reached_the_backup(scenario: Any) -> None:
    """No takeover from a partial checkpoint: the rejoined backup holds none."""
    sc = scenario(server="filler", command=BIG, status_timeout=20.0)
    failed_over_to_bak(sc)
    sc.start_backup("pri")
    wait("bak's first full checkpoint to pri under way", lambda: syncing(sc, "bak"), 60, sc)
    sc.lab.crash("bak")
    deadline = time.monotonic() + 5.0  # 15x the takeover timeout
    while time.monotonic() < deadline:
        st = sc.status("pri") or {}
        assert st.get("state") in ("replicating", "waiting", "primary-lost"), (st, logs(sc))
        time.sleep(0.2)
    assert st.get("epoch", -1) < 0, st  # nothing committed
    blog = (sc.workdir / "backup-pri.log").read_text(errors="replace")
    assert "taking over" not in blog, blog[-2000:]
