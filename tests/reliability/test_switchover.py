"""Planned switchover (`remus switchover`), there and back, under load.

A protected redis on `pri`, its backup on `bak`, two loadgen clients writing
with 16 requests in flight each, each over ONE TCP connection to the VIP.
`remus switchover` on pri: the final checkpoint is acked, pri's copy stops,
bak resumes it, and pri's agent becomes bak's backup, so the pair is
protected again without a command. Then the same from bak back to pri
(bak's agent, a backup that took over, hands the unit back and becomes a
plain backup again). Asserted: both switchovers succeed, protection resumes
each time, both clients' connections survive, every acknowledged write is
there. The service gap (longest pause between replies) is printed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from remus.scenario import REMUS, Scenario
from tests.support.ha import active_on, logs, protected_from, wait

pytestmark = [pytest.mark.root, pytest.mark.slow]

BOUND_S = 60.0  # a hang bound, not a speed


def switchover(sc: Scenario, host: str) -> dict[str, Any]:
    p = sc.lab.run(host, [*REMUS, "switchover", "--json"], capture_output=True, text=True,
                   timeout=90)
    if p.returncode != 0:
        st = sc.status(host) or {}
        if st.get("pid"):
            os.kill(int(st["pid"]), signal.SIGUSR1)  # the agent's thread stacks, to its log
            time.sleep(0.5)
    assert p.returncode == 0, (f"switchover on {host}: {p.stderr}\nstatus: "
                               f"{sc.status(host)}\n{logs(sc)}")
    doc: dict[str, Any] = json.loads(p.stdout)
    return doc


def keeps_protecting(sc: Scenario, host: str, epochs: int = 20) -> None:
    """Protection from `host` goes on: `epochs` more acknowledged."""
    st = sc.primary_status(host) or {}
    start = st.get("acked_epoch", -1)
    wait(f"{host} acks {epochs} more epochs after {start}",
         lambda: (sc.primary_status(host) or {}).get("acked_epoch", -1) >= start + epochs,
         BOUND_S, sc)


def test_switchover_there_and_back_under_load(scenario: Any) -> None:
    sc = scenario(server="redis")
    sc.start_backup("bak")
    wait("backup up", lambda: sc.status("bak"), 30, sc)
    agent = sc.start_primary()
    sc.wait_protected(timeout=30)
    clients = [sc.start_client(600, f"client{i}.json", inflight=16, stall_timeout=30)
               for i in range(2)]
    time.sleep(2.0)

    there = switchover(sc, "pri")
    assert there["new_primary"].startswith(sc.lab.addr("bak")), there
    wait("bak runs the unit", lambda: active_on(sc, "bak"), BOUND_S, sc)
    wait("bak protected by pri", lambda: protected_from(sc, "bak"), BOUND_S, sc)
    pri = sc.status("pri") or {}
    # the same agent (seen twice in ~20 runs, not understood yet: a status with
    # role "primary", the old agent's pid and unit pid, after pri's agent had
    # become the backup; the full answer and the logs say more next time)
    if pri.get("role") != "backup":
        socks = sc.lab.run("pri", ["ls", "-l", "/run/remus"], capture_output=True, text=True)
        raise AssertionError(f"{json.dumps(pri)}\n/run/remus on pri: {socks.stdout}{logs(sc)}")
    assert agent.poll() is None
    keeps_protecting(sc, "bak")

    back = switchover(sc, "bak")
    assert back["new_primary"].startswith(sc.lab.addr("pri")), back
    wait("pri runs the unit", lambda: active_on(sc, "pri"), BOUND_S, sc)
    wait("pri protected by bak", lambda: protected_from(sc, "pri"), BOUND_S, sc)
    wait("bak a plain backup again",
         lambda: (sc.status("bak") or {}).get("state") == "replicating", BOUND_S, sc)
    time.sleep(2.0)

    results = []
    for i, c in enumerate(clients):
        os.kill(c.pid, signal.SIGINT)
        results.append(sc.wait_client(c, f"client{i}.json", timeout=120))
    for r in results:
        assert r["connection_survived"], f"{r['error']}\n{logs(sc)}"
        assert r["verified"] and r["missing"] == 0 and r["wrong_values"] == 0, r
    gaps = [round(r["max_gap_s"], 3) for r in results]
    print(f"\nswitchover there and back under load: {sum(r['acked'] for r in results)} writes "
          f"acked, 0 lost, connections kept; max reply gap per client {gaps} s; "
          f"there {there}; back {back}")
