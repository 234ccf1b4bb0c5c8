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

Also: `remus ctl switchover --to` a host that is not the backup, and an agent
killed with kill -9 whose restart adopts the children it left running.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import psutil
import pytest

from remus.errors import RemusError
from remus.fleet_lab import FLEET, REDIS, all_protected, ctl, rows, start_client
from remus.scenario import ZK_JAR
from tests.support.ha import logs, wait

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(not ZK_JAR.exists(), reason=f"{ZK_JAR} missing: install "
                                 "Debian's zookeeper package (bin/setup does)")]

VIPS = {"kv": "10.77.0.100/24", "kv2": "10.77.0.101/24"}
BOUND_S = 120.0  # a hang bound, not a speed


def up(sc: Any, hosts: tuple[str, ...]) -> None:
    """A fresh ZooKeeper on coord and `remus agent` on each of `hosts`, all in the pool."""
    sc.start_coordinator(empty=True)
    for host in hosts:
        sc.start_agent(host)
    want = {sc.lab.addr(h) for h in hosts}
    wait("every agent in the pool",
         lambda: {r["host"] for r in json.loads(ctl(sc, "hosts", "--json"))} >= want, 60, sc)


def test_fleet_two_services_three_hosts_power_cut(scenario: Any) -> None:
    sc = scenario(server="redis")
    up(sc, FLEET)
    for name, vip in VIPS.items():
        ctl(sc, "add", name, "--vip", vip, "--", *REDIS)
    before = wait("both services protected", lambda: all_protected(sc, set(FLEET), 2), BOUND_S,
                  sc)
    table_before = ctl(sc, "list")
    clients = {name: start_client(sc, name, vip) for name, vip in VIPS.items()}
    time.sleep(2.0)
    victim = next(h for h in FLEET if sc.lab.addr(h) == before["kv"]["primary"])
    cut = time.monotonic()
    sc.lab.crash(victim)
    after = wait(f"both protected again without {victim}",
                 lambda: all_protected(sc, set(FLEET) - {victim}, 2), BOUND_S, sc)
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


def test_empty_spare_pool_degraded_then_protected_when_a_host_appears(scenario: Any) -> None:
    sc = scenario(server="redis")
    up(sc, ("pri", "bak"))
    ctl(sc, "add", "kv", "--vip", VIPS["kv"], "--on", sc.lab.addr("pri"), "--", *REDIS)
    wait("kv protected", lambda: all_protected(sc, {"pri", "bak"}, 1), BOUND_S, sc)
    proc = start_client(sc, "kv", VIPS["kv"])
    time.sleep(1.0)
    sc.lab.crash("bak")  # the only other host: no spare left
    wait("kv degraded", lambda: rows(sc)["kv"]["state"] == "degraded", BOUND_S, sc)
    sc.lab.up()
    sc.start_agent("spare")  # a host joins the pool
    wait("kv protected by the new host", lambda: all_protected(sc, {"pri", "spare"}, 1),
         BOUND_S, sc)
    finish(sc, {"kv": proc})


def test_coordinator_restarted_empty(scenario: Any) -> None:
    sc = scenario(server="redis")
    up(sc, FLEET)
    ctl(sc, "add", "kv", "--vip", VIPS["kv"], "--", *REDIS)
    before = wait("kv protected", lambda: all_protected(sc, set(FLEET), 1), BOUND_S, sc)
    proc = start_client(sc, "kv", VIPS["kv"])
    time.sleep(1.0)
    sc.lab.crash("coord")
    sc.lab.up()
    sc.start_coordinator(empty=True)  # it lost everything
    after = wait("kv protected again", lambda: all_protected(sc, set(FLEET), 1), BOUND_S, sc)
    assert after["kv"]["primary"] == before["kv"]["primary"], (before, after)  # did not move
    finish(sc, {"kv": proc})


def test_a_host_carrying_five_primaries_is_cut(scenario: Any) -> None:
    sc = scenario(server="redis")
    up(sc, FLEET)
    names = [f"s{i}" for i in range(1, 6)]
    for i, name in enumerate(names):
        ctl(sc, "add", name, "--vip", f"10.77.0.{110 + i}/24", "--interval", "100ms", "--on",
            sc.lab.addr("pri"), "--", *REDIS)
    before = wait("all five protected", lambda: all_protected(sc, set(FLEET), 5), 120, sc)
    assert all(r["primary"] == sc.lab.addr("pri") for r in before.values()), before
    proc = start_client(sc, "s1", "10.77.0.110/24")
    # Connected, and served a while, before the cut: on 2 cores carrying ten agents
    # the client's own start can take longer than any fixed warm-up.
    wait("the s1 client connected", lambda: sc.lab.run(
        "client", ["ss", "-Htn", "state", "established", "dst", "10.77.0.110"],
        capture_output=True, text=True).stdout.strip(), 60, sc)
    time.sleep(1.0)
    cut = time.monotonic()
    sc.lab.crash("pri")
    wait("all five protected again", lambda: all_protected(sc, {"bak", "spare"}, 5), 120, sc)
    took = time.monotonic() - cut
    finish(sc, {"s1": proc})
    print(f"\nfleet: a host carrying 5 primaries cut; all 5 protected again after {took:.2f} s"
          f"\n{ctl(sc, 'list')}")


def test_switchover_to_a_third_host(scenario: Any) -> None:
    """`ctl switchover` to the backup, then `--to` the host that is neither: the
    backup moves there and catches up first, then it takes over; the client's
    connection survives both and no acknowledged write is lost."""
    sc = scenario(server="redis")
    up(sc, FLEET)
    pri, bak, spare = (sc.lab.addr(h) for h in FLEET)
    ctl(sc, "add", "kv", "--vip", VIPS["kv"], "--on", pri, "--", *REDIS)
    wait("kv protected", lambda: (r := rows(sc).get("kv")) and r["state"] == "protected"
         and r["backup"] is not None, BOUND_S, sc)
    first = rows(sc)["kv"]
    assert first["primary"] == pri, first
    proc = start_client(sc, "kv", VIPS["kv"])
    wait("the client connected", lambda: sc.lab.run(
        "client", ["ss", "-Htn", "state", "established", "dst", VIPS["kv"].split("/")[0]],
        capture_output=True, text=True).stdout.strip(), 60, sc)
    time.sleep(1.0)
    third = next(a for a in (bak, spare) if a != first["backup"])
    with pytest.raises(RemusError, match="runs on"):
        ctl(sc, "switchover", "kv", "--to", pri)
    out = ctl(sc, "switchover", "kv", "--to", third)
    assert "catches up first" in out, out
    t0 = time.monotonic()
    done = wait(f"kv runs on {third}, protected", lambda: (r := rows(sc)["kv"])
                ["primary"] == third and r["state"] == "protected" and r["backup"] and r, BOUND_S,
                sc)
    took = time.monotonic() - t0
    assert done["term"] > first["term"], (first, done)
    finish(sc, {"kv": proc})
    print(f"\nfleet: switchover of kv from {pri} to {third} (not its backup {first['backup']}):"
          f" backup moved, caught up and took over in {took:.2f} s; backup now {done['backup']}")


def test_a_killed_agent_restarts_and_adopts_its_children(scenario: Any) -> None:
    """kill -9 of the agent on the primary's host: its `remus run` child goes on
    protecting (no failover, the same term); the agent started again adopts it
    (no second copy), and controls it: `ctl remove` stops the adopted child."""
    sc = scenario(server="redis")
    up(sc, FLEET)
    pri = sc.lab.addr("pri")
    ctl(sc, "add", "kv", "--vip", VIPS["kv"], "--on", pri, "--", *REDIS)
    wait("kv protected", lambda: (r := rows(sc).get("kv")) and r["state"] == "protected"
         and r["backup"] is not None and r, BOUND_S, sc)
    before = rows(sc)["kv"]
    child = (sc.status("pri") or {}).get("pid")
    assert isinstance(child, int), sc.status("pri")
    proc = start_client(sc, "kv", VIPS["kv"])
    time.sleep(1.0)
    agent = next(p for p in sc.procs if "agent" in p.args and pri in p.args)
    os.kill(agent.pid, signal.SIGKILL)  # the agent only: its children stay
    agent.wait(10)
    acked = (sc.status("pri") or {})["acked_epoch"]
    time.sleep(3.0)
    st = sc.status("pri") or {}
    assert st.get("pid") == child and st["acked_epoch"] > acked + 20, st  # still protecting
    sc.start_agent("pri")
    log = sc.workdir / "agent-pri.log"
    wait("the new agent adopted its child", lambda: f"adopted its primary agent (pid {child})"
         in log.read_text(errors="replace"), BOUND_S, sc)
    time.sleep(3.0)  # a few cycles: nothing started next to it
    after = rows(sc)["kv"]
    assert (after["primary"], after["term"], after["state"]) == \
        (before["primary"], before["term"], "protected"), (before, after)
    assert "kv: started its primary" not in log.read_text(errors="replace").split("adopted")[-1]
    assert (sc.status("pri") or {}).get("pid") == child
    finish(sc, {"kv": proc})
    ctl(sc, "remove", "kv")  # the adopted child is the agent's to stop
    wait("the adopted child stopped", lambda: not psutil.pid_exists(child)
         or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, BOUND_S, sc)
    print(f"\nfleet: the agent on pri killed; its primary (pid {child}) went on protecting; the "
          f"restarted agent adopted it (term {after['term']} unchanged) and stopped it on remove")


def finish(sc: Any, clients: dict[str, Any]) -> None:
    for name, p in clients.items():
        os.kill(p.pid, signal.SIGINT)
        res = sc.wait_client(p, f"{name}.json", timeout=120)
        assert res["connection_survived"], f"{name}: {res['error']}\n{logs(sc)}"
        assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0, res
