"""A fleet on a real ZooKeeper: two services on three hosts, a power cut of one.

`remus agent` on pri, bak and spare; ZooKeeper on coord; `remus ctl add`
two redis services (their own addresses). The elected agent places them
(never a backup on its primary's host); both are protected. A client writes
to each over one TCP connection. Then the host running the first service
loses power: that service fails over, every service that had its backup
there goes solo, the leader places new backups on the hosts left, and
protection comes back by itself. Asserted: `remus ctl list` says protected
for both, on live hosts only, before and after; both clients' connections
survive; no acknowledged write is lost. The time from the cut to "both
protected again" is printed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import pytest

from remus.scenario import ZK_JAR, Scenario
from tests.support.ha import logs, wait

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(not ZK_JAR.exists(), reason=f"{ZK_JAR} missing: install "
                                 "Debian's zookeeper package (bin/setup does)")]

FLEET = ("pri", "bak", "spare")
VIPS = {"kv": "10.77.0.100/24", "kv2": "10.77.0.101/24"}
BOUND_S = 120.0  # a hang bound, not a speed


def ctl(sc: Scenario, *args: str) -> str:
    p = sc.lab.run("client", [sys.executable, "-m", "remus.cli", "ctl", "--coordinator",
                              sc.coordinator or "", *args], capture_output=True, text=True,
                   timeout=60)
    assert p.returncode == 0, f"remus ctl {' '.join(args)}: {p.stderr}\n{logs(sc)}"
    return p.stdout


def rows(sc: Scenario) -> dict[str, dict[str, Any]]:
    return {r["service"]: r for r in json.loads(ctl(sc, "list", "--json"))}


def all_protected(sc: Scenario, alive: set[str]) -> dict[str, dict[str, Any]] | None:
    addrs = {sc.lab.addr(h) for h in alive}
    rs = rows(sc)
    ok = len(rs) == len(VIPS) and all(
        r["state"] == "protected" and r["primary"] in addrs and r["backup"] in addrs
        and r["primary"] != r["backup"] for r in rs.values())
    return rs if ok else None


def client(sc: Scenario, name: str) -> Any:
    vip = VIPS[name].split("/")[0]
    return sc._spawn("client", [sys.executable, "-m", "remus.loadgen", "redis", "--host", vip,
                                "--port", "6379", "--duration", "600", "--stall-timeout", "30",
                                "--out", str(sc.workdir / f"{name}.json")], f"client-{name}.log")


def test_fleet_two_services_three_hosts_power_cut(scenario: Any) -> None:
    sc = scenario(server="redis")
    sc.start_coordinator(empty=True)
    for host in FLEET:
        sc.start_agent(host)
    redis = ["redis-server", "--port", "6379", "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--daemonize", "no", "--dir", "/tmp"]
    for name, vip in VIPS.items():
        ctl(sc, "add", name, "--vip", vip, "--", *redis)
    before = wait("both services protected", lambda: all_protected(sc, set(FLEET)), BOUND_S, sc)
    table_before = ctl(sc, "list")
    clients = {name: client(sc, name) for name in VIPS}
    time.sleep(2.0)
    victim = next(h for h in FLEET if sc.lab.addr(h) == before["kv"]["primary"])
    cut = time.monotonic()
    sc.lab.crash(victim)
    after = wait(f"both protected again without {victim}",
                 lambda: all_protected(sc, set(FLEET) - {victim}), BOUND_S, sc)
    healed = time.monotonic() - cut
    table_after = ctl(sc, "list")
    assert after["kv"]["term"] > before["kv"]["term"], (before, after)
    time.sleep(1.0)
    for name, proc in clients.items():
        os.kill(proc.pid, signal.SIGINT)
        res = sc.wait_client(proc, f"{name}.json", timeout=120)
        assert res["connection_survived"], f"{name}: {res['error']}\n{logs(sc)}"
        assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0, res
    print(f"\nfleet: power cut of {victim}; both services protected again after "
          f"{healed:.2f} s\nbefore:\n{table_before}after:\n{table_after}")
