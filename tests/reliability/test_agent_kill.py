"""kill -9 of either agent at each step of an epoch, of a resync and of a takeover.

The agent SIGKILLs itself at an exact point (REMUS_FAULT, remus.faults): a
real kill -9, at moments no outside timing hits reliably (between a commit
and its ACK is microseconds). One client writes over one TCP connection to
the VIP throughout; each case asserts that no acknowledged write is lost and
that the connection survives, and (the primary's cases) that nothing the
dead agent's copy of the unit sent reaches the client after the backup took
over: a reply of a lost epoch.

- Primary agent killed (its host lives): the backup finds it silent and takes
  over; the old copy of the unit on pri stays mute (its output queue has no
  reader: fail closed).
- Backup agent killed: the primary holds output until a backup returns; the
  restarted agent recovers its store (a committed epoch, applied or not, is
  kept), the primary resyncs, and a later power cut of the primary loses
  nothing.
- Backup agent killed during a full resync, and during a takeover (applied
  and prepared, CRIU not started): restarted, it recovers; after the
  half-done takeover an operator's `remus failover` finishes the job.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

from remus.faults import POINTS
from tests.support.ha import logs, wait
from tests.support.wire import macs

pytestmark = [pytest.mark.root, pytest.mark.slow]

REMUS = [sys.executable, "-m", "remus.cli"]
# The fault fires at this occurrence of its point: a few seconds into the run,
# with the client's writes flowing.
NTH = 40


def _dead(proc: Any, sc: Any, what: str) -> float:
    wait(f"{what} killed itself", lambda: proc.poll() is not None, 60, sc)
    assert proc.returncode == -9 or proc.returncode == 137, (proc.returncode, logs(sc))
    return time.time()


def _check_client(res: dict[str, Any], sc: Any) -> None:
    assert res["connection_survived"], f"{res['error']}{logs(sc)}"
    assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0, res


@pytest.mark.parametrize("point", [p for p in POINTS if p.startswith("primary-")])
def test_primary_agent_killed(scenario: Any, wire: Any, point: str) -> None:
    _, cap = wire
    sc = scenario(server="redis", env_primary={"REMUS_FAULT": f"{point}:{NTH}"})
    pri_mac, bak_mac = macs(sc.lab)
    sc.start_backup()
    wait("backup up", lambda: sc.status("bak"), 30, sc)
    agent = sc.start_primary()
    cap.start()
    client = sc.start_client(10, "c.json", pace=0.002, stall_timeout=30)
    died = _dead(agent, sc, f"the primary agent at {point}")
    wait("takeover on bak", lambda: (sc.status("bak") or {}).get("state") == "active", 30, sc)
    res = sc.wait_client(client, "c.json", timeout=90)
    time.sleep(0.5)
    cap.stop()
    _check_client(res, sc)
    assert "REMUS_FAULT" in (sc.workdir / "primary.log").read_text()
    frames = cap.frames()
    from_bak = [f for f in frames if f.src_mac == bak_mac]
    assert from_bak, "bak never served the client"
    late = [f for f in frames if f.src_mac == pri_mac and f.time >= from_bak[0].time]
    assert not late, [f.text for f in late[:5]]
    assert all(f.time < died + 1.0 for f in frames if f.src_mac == pri_mac)


def _restart_and_protect(sc: Any, fault: str | None = None) -> Any:
    sc.env_backup = {"REMUS_FAULT": fault} if fault else {}
    acked = (sc.status("pri") or {}).get("acked_epoch", -1)
    gen = (sc.status("pri") or {}).get("generation")
    proc = sc.start_backup()
    if fault is None:
        wait("protected again", lambda: (s := sc.status("pri")) is not None
             and s["generation"] != gen and s["acked_epoch"] > acked + 5, 60, sc)
    return proc


@pytest.mark.parametrize("point", ["backup-transfer", "backup-received", "backup-committed",
                                   "backup-apply"])
def test_backup_agent_killed(scenario: Any, point: str) -> None:
    sc = scenario(server="redis", env_backup={"REMUS_FAULT": f"{point}:{NTH}"})
    bak = sc.start_backup()
    sc.start_primary()
    client = sc.start_client(25, "c.json", pace=0.002, stall_timeout=60)
    _dead(bak, sc, f"the backup agent at {point}")
    time.sleep(1)
    pri = sc.status("pri")
    assert pri is not None and pri["role"] == "primary", pri  # holds output, waits
    _restart_and_protect(sc)
    log = (sc.workdir / "backup.log").read_text()
    assert "recovered generation" in log, log[-3000:]
    time.sleep(1)
    sc.lab.crash("pri")
    wait("takeover on bak", lambda: (sc.status("bak") or {}).get("state") == "active", 30, sc)
    _check_client(sc.wait_client(client, "c.json", timeout=120), sc)


def test_backup_agent_killed_during_a_full_resync(scenario: Any) -> None:
    sc = scenario(server="redis", env_backup={"REMUS_FAULT": f"backup-committed:{NTH}"})
    bak = sc.start_backup()
    sc.start_primary()
    client = sc.start_client(30, "c.json", pace=0.002, stall_timeout=60)
    _dead(bak, sc, "the backup agent")
    # Back, and killed again by the resync's full checkpoint (its 3rd chunk).
    bak = _restart_and_protect(sc, fault="backup-transfer:3")
    _dead(bak, sc, "the backup agent during the resync")
    _restart_and_protect(sc)
    time.sleep(1)
    sc.lab.crash("pri")
    wait("takeover on bak", lambda: (sc.status("bak") or {}).get("state") == "active", 30, sc)
    _check_client(sc.wait_client(client, "c.json", timeout=120), sc)


def test_backup_agent_killed_half_way_through_a_takeover(scenario: Any) -> None:
    sc = scenario(server="redis", env_backup={"REMUS_FAULT": "backup-restore"})
    bak = sc.start_backup()
    sc.start_primary()
    sc.wait_protected()
    client = sc.start_client(30, "c.json", pace=0.002, stall_timeout=60)
    time.sleep(2)
    sc.lab.crash("pri")
    _dead(bak, sc, "the backup agent mid-takeover")
    sc.env_backup = {}
    sc.start_backup()
    wait("backup up again", lambda: sc.status("bak"), 30, sc)
    out = sc.lab.run("bak", [*REMUS, "failover"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr + logs(sc)
    assert (sc.status("bak") or {}).get("state") == "active"
    _check_client(sc.wait_client(client, "c.json", timeout=120), sc)


def test_backup_agent_stopped_longer_than_the_lease(scenario: Any) -> None:
    """SIGSTOP of the backup agent (a stall, not a death), then SIGCONT: the
    primary holds output meanwhile; the backup, woken, does not mistake its own
    sleep for the primary's silence (no takeover); protection resumes."""
    import os
    import signal

    sc = scenario(server="redis")
    sc.start_backup()
    sc.start_primary()
    st = sc.wait_protected()
    bak_pid = int((sc.status("bak") or {})["pid"])
    client = sc.start_client(20, "c.json", pace=0.002, stall_timeout=60)
    time.sleep(2)
    os.kill(bak_pid, signal.SIGSTOP)
    stopped = time.time()
    try:
        time.sleep(3)  # >> the lease (200 ms) and the takeover timeout
        pri = sc.status("pri")
        assert pri is not None and pri["state"] in ("reconnecting", "stalled"), pri
    finally:
        os.kill(bak_pid, signal.SIGCONT)
    wait("protected again", lambda: (s := sc.status("pri")) is not None
         and s["state"] == "protected" and s["acked_epoch"] > st["acked_epoch"] + 5, 60, sc)
    bak = sc.status("bak")
    assert bak is not None and bak["state"] == "replicating", bak  # never took over
    res = sc.wait_client(client, "c.json", timeout=120)
    _check_client(res, sc)
    held = [t for t in res["reply_times"] if stopped + 1.0 < t < stopped + 3.0]
    assert not held, f"{len(held)} replies while the backup was stopped"


def _stop_briefly(pid: int, seconds: float, times: int = 3) -> None:
    """SIGSTOP an agent of ours for `seconds`, `times` times, 1 s apart."""
    import os
    import signal

    for _ in range(times):
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(1.0)


def test_primary_agent_stalled_shorter_than_the_grace_is_no_takeover(scenario: Any) -> None:
    """SIGSTOP of the primary agent for 0.8 s: longer than the takeover timeout
    (300 ms) but its host's kernel still acknowledges the backup's heartbeats,
    so the backup waits (roles.agent_grace) and protection goes on; nothing
    the client saw acknowledged is lost. Measured cause: every thread of the
    primary agent not running for 131-359 ms on a 2-core machine busy with a
    1 GiB unit's 100 MiB epochs cost a needless takeover. (A stop for good is
    test_rejoin's SIGSTOP case: taken over after the grace.)"""

    sc = scenario(server="redis")
    sc.start_backup()
    sc.start_primary()
    st = sc.wait_protected()
    agent = int(st["pid"])
    client = sc.start_client(15, "c.json", pace=0.002, stall_timeout=60)
    time.sleep(2)
    _stop_briefly(agent, 0.8)
    wait("protected on", lambda: (s := sc.status("pri")) is not None
         and s["state"] == "protected" and s["acked_epoch"] > st["acked_epoch"] + 5, 60, sc)
    bak = sc.status("bak")
    assert bak is not None and bak["state"] == "replicating", (bak, logs(sc))
    blog = (sc.workdir / "backup.log").read_text()
    assert "its host acknowledges our data" in blog and "taking over" not in blog, logs(sc)
    _check_client(sc.wait_client(client, "c.json", timeout=120), sc)


def test_backup_agent_stalled_shorter_than_the_grace_keeps_the_link(scenario: Any) -> None:
    """SIGSTOP of the backup agent for 0.6 s: past the primary's 200 ms lease,
    but the backup's kernel acknowledges the primary's heartbeats, so the
    primary keeps the link (no reconnect, no full resync) and protection goes
    on in the same generation. Seen before: a backup not scheduled for 146 ms
    while it applied a 1 GiB checkpoint lapsed the lease (test_big_epochs)."""

    sc = scenario(server="redis")
    sc.start_backup()
    sc.start_primary()
    st = sc.wait_protected()
    bak_pid = int((sc.status("bak") or {})["pid"])
    client = sc.start_client(10, "c.json", pace=0.002, stall_timeout=60)
    time.sleep(1.5)
    _stop_briefly(bak_pid, 0.6)
    wait("acked on", lambda: (s := sc.status("pri")) is not None
         and s["acked_epoch"] > st["acked_epoch"] + 5, 60, sc)
    pri = sc.status("pri")
    assert pri is not None and pri["generation"] == st["generation"], (pri, logs(sc))
    plog = (sc.workdir / "primary.log").read_text()
    assert "lease expired" not in plog and "its host acknowledges" in plog, logs(sc)
    assert (sc.status("bak") or {}).get("state") == "replicating"
    _check_client(sc.wait_client(client, "c.json", timeout=120), sc)
