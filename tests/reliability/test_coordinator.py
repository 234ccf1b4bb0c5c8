"""A pair with a coordinator: a real ZooKeeper on the lab's `coord` host decides.

- A power cut of the backup host: the primary goes solo once the coordinator
  agrees and keeps serving (without a coordinator, `--on-peer-loss stall`
  would hold its output for good); a backup started again on the rebooted
  host brings protection back by itself.
- The replication link cut, both hosts healthy: the primary's lease lapses
  first and it wins the CAS (solo); the backup's takeover loses it: exactly
  one copy serves (checked on the wire: no frame from bak). Healed, the
  pair is protected again.
- The coordinator down, both hosts healthy: no failover, protection goes on.
  Then a power cut of the primary: no takeover while the coordinator is down
  (nobody can tell the primary did not go solo); once it is back, the backup
  takes over, and the client's connection survives.
- The CAS race, 100 rounds against the real ZooKeeper: the primary going solo
  and the backup taking over, at once, from two sessions: exactly one wins.
- A three-server ensemble named in the URL: the server the primary talks to
  dies; it moves to another (no failover, protection goes on), and a power
  cut of the primary is then decided by the two left (the backup finds one).
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
from tests.support.ha import active_on, logs, protected_from, wait
from tests.support.wire import Partition, macs

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(not ZK_JAR.exists(), reason=f"{ZK_JAR} missing: install "
                                 "Debian's zookeeper package (bin/setup does)")]

BOUND_S = 60.0  # a hang bound, not a speed


def state_of(sc: Scenario, host: str) -> str | None:
    return (sc.primary_status(host) or {}).get("state")


def coordinated_pair(sc: Scenario, ensemble: bool = False) -> Any:
    if ensemble:
        sc.start_coordinator_ensemble()
    else:
        sc.start_coordinator(empty=True)
    sc.start_backup("bak")
    wait("backup up", lambda: sc.status("bak"), 30, sc)
    sc.start_primary()
    sc.wait_protected(timeout=30)
    wait("the coordinator records the backup", lambda: "coordinator: protected by"
         in (sc.workdir / "primary.log").read_text(errors="replace"), 30, sc)
    client = sc.start_client(600, "client.json", stall_timeout=30)
    time.sleep(1.0)
    return client


def finish(sc: Scenario, client: Any) -> dict[str, Any]:
    os.kill(client.pid, signal.SIGINT)
    res: dict[str, Any] = sc.wait_client(client, "client.json", timeout=120)
    assert res["connection_survived"], f"{res['error']}\n{logs(sc)}"
    assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0, res
    return res


def test_backup_power_cut_primary_goes_solo_then_is_protected_again(scenario: Any) -> None:
    sc = scenario(server="redis")
    client = coordinated_pair(sc)
    cut = time.monotonic()
    sc.lab.crash("bak")
    wait("pri solo", lambda: state_of(sc, "pri") == "solo", BOUND_S, sc)
    solo_after = time.monotonic() - cut
    st = sc.status("pri") or {}
    assert not st.get("guarantee") and "coordinator agreed" in st.get("last", ""), st
    time.sleep(2.0)  # serving solo
    sc.lab.up()
    sc.start_backup("bak")
    wait("pri protected again", lambda: protected_from(sc, "pri", past=-1), BOUND_S, sc)
    time.sleep(1.0)
    res = finish(sc, client)
    print(f"\nbackup power cut with a coordinator: pri solo {solo_after:.2f} s after the cut, "
          f"protected again after the restart; client gap {res['max_gap_s']:.3f} s, "
          f"{res['acked']} acked, 0 lost")


def test_link_cut_exactly_one_copy_serves(scenario: Any, wire: Any) -> None:
    """Usually the primary wins (its lease lapses 100 ms before the backup's timeout);
    either way one copy serves, never both, and the pair heals afterwards."""
    part, cap = wire
    sc = scenario(server="redis")
    pri_mac, bak_mac = macs(sc.lab)
    client = coordinated_pair(sc)
    cap.start()
    part.cut()
    outcome = wait("one side decided", lambda: (
        "pri" if state_of(sc, "pri") == "solo" and
        (sc.status("bak") or {}).get("state") == "primary-lost" else
        "bak" if active_on(sc, "bak") else None), BOUND_S, sc)
    time.sleep(2.0)
    if outcome == "pri":
        bak = sc.status("bak") or {}
        assert bak.get("state") == "primary-lost" and "not taking over" in bak["last"], bak
    else:
        assert "fenc" in (sc.status("pri") or {}).get("last", "") or \
            "fencing" in (sc.workdir / "primary.log").read_text(errors="replace"), logs(sc)
    cap.stop()
    part.heal()
    healed = "pri" if outcome == "pri" else "bak"
    wait(f"{healed} protected again", lambda: protected_from(sc, healed, past=-1), BOUND_S, sc)
    res = finish(sc, client)
    frames = cap.frames()
    from_bak = [f for f in frames if f.src_mac == bak_mac]
    assert {f.src_mac for f in frames} <= {pri_mac, bak_mac}
    if outcome == "pri":
        assert not from_bak, from_bak[:3]
    else:
        late = [f for f in frames if f.src_mac == pri_mac and f.time >= from_bak[0].time]
        assert not late, late[:3]
    print(f"\nlink cut with a coordinator: {outcome} won the CAS and served alone; client gap "
          f"{res['max_gap_s']:.3f} s")


def test_coordinator_down_no_failover_until_it_returns(scenario: Any) -> None:
    sc = scenario(server="redis")
    client = coordinated_pair(sc)
    sc.lab.crash("coord")
    before = (sc.status("pri") or {})["acked_epoch"]
    time.sleep(3.0)
    st = sc.status("pri") or {}
    assert st["state"] == "protected" and st["acked_epoch"] > before + 20, st  # goes on
    sc.lab.crash("pri")
    deadline = time.monotonic() + 5.0  # 15x the takeover timeout
    while time.monotonic() < deadline:
        assert (sc.status("bak") or {}).get("state") == "replicating", logs(sc)
        time.sleep(0.2)
    blog = (sc.workdir / "backup.log").read_text(errors="replace")
    assert "not taking over until it answers" in blog, blog[-2000:]
    back = time.monotonic()
    sc.lab.up()
    sc.start_coordinator()  # the same data: it remembers the record
    wait("takeover once the coordinator is back", lambda: active_on(sc, "bak"), BOUND_S, sc)
    took = time.monotonic() - back
    res = finish(sc, client)
    print(f"\ncoordinator down: protection went on; a primary power cut waited for it; bak "
          f"took over {took:.2f} s after it came back; client gap {res['max_gap_s']:.3f} s")


RACE = r"""
import json, sys, threading
from remus.coordinator import UnitRecord, ZkCoordinator, decide_solo, decide_takeover
url, rounds = sys.argv[1], int(sys.argv[2])
pri, bak = ZkCoordinator(url), ZkCoordinator(url)
results = []
for i in range(rounds):
    unit = f"race-{i}"
    pri.create(unit, UnitRecord(1, "10.77.0.1", "10.77.0.2", "protected"))
    go = threading.Barrier(2)
    won = {}
    def race(name, coord, rule):
        go.wait()
        won[name] = coord.apply(unit, rule).won
    ts = [threading.Thread(target=race, args=("pri", pri, lambda r: decide_solo(r, "10.77.0.1"))),
          threading.Thread(target=race, args=("bak", bak,
                                              lambda r: decide_takeover(r, "10.77.0.2")))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    rec = pri.read(unit)[0]
    results.append({"pri": won["pri"], "bak": won["bak"], "primary": rec.primary})
print(json.dumps(results))
"""


def test_cas_race_has_exactly_one_winner_100_times(scenario: Any) -> None:
    sc = scenario(server="redis")
    url = sc.start_coordinator(empty=True)
    p = sc.lab.run("client", [sys.executable, "-c", RACE, url, "100"], capture_output=True,
                   text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout)
    assert len(results) == 100
    for r in results:
        assert r["pri"] != r["bak"], r  # exactly one winner
        assert r["primary"] == ("10.77.0.1" if r["pri"] else "10.77.0.2"), r
    wins = sum(r["pri"] for r in results)
    print(f"\nCAS race on ZooKeeper: 100 rounds, exactly one winner each; primary won {wins}, "
          f"backup {100 - wins}")


def test_primary_cut_off_from_the_coordinator_only_keeps_serving(scenario: Any, lab: Any
                                                                 ) -> None:
    sc = scenario(server="redis")
    client = coordinated_pair(sc)
    cut = Partition(lab, "pri", "coord")
    try:
        cut.cut()
        before = (sc.status("pri") or {})["acked_epoch"]
        time.sleep(4.0)  # past the coordinator's session: it plays no part while protected
        st = sc.status("pri") or {}
        assert st["state"] == "protected" and st["acked_epoch"] > before + 30, st
        assert (sc.status("bak") or {}).get("state") == "replicating"
    finally:
        cut.heal()
    res = finish(sc, client)
    print(f"\nprimary cut off from the coordinator: protection went on; client gap "
          f"{res['max_gap_s']:.3f} s")


def test_both_lose_the_coordinator_then_their_link(scenario: Any, lab: Any) -> None:
    """Nobody can decide: the primary holds its output, the backup does not take
    over; the coordinator back, exactly one of them wins and the client is served."""
    sc = scenario(server="redis")
    client = coordinated_pair(sc)
    cuts = [Partition(lab, "pri", "coord"), Partition(lab, "bak", "coord")]
    link = Partition(lab, "pri", "bak")
    try:
        for c in cuts:
            c.cut()
        link.cut()
        wait("pri stalled", lambda: state_of(sc, "pri") == "stalled", BOUND_S, sc)
        time.sleep(3.0)
        pri, bak = sc.status("pri") or {}, sc.status("bak") or {}
        assert pri["state"] == "stalled" and "output held" in pri["last"], pri
        assert bak["state"] == "replicating", bak
        held = pri["netbuf"]["released_packets"]
        time.sleep(1.0)
        assert (sc.status("pri") or {})["netbuf"]["released_packets"] == held  # nothing out
        for c in cuts:
            c.heal()
        outcome = wait("one side decided", lambda: (
            "pri" if state_of(sc, "pri") == "solo" else
            "bak" if active_on(sc, "bak") else None), BOUND_S, sc)
    finally:
        for c in (*cuts, link):
            c.heal()
    res = finish(sc, client)
    print(f"\nboth lost the coordinator, then their link: output held, no takeover; the "
          f"coordinator back, {outcome} won; client gap {res['max_gap_s']:.3f} s")


def zk_peer(sc: Scenario, host: str) -> str | None:
    """The ZooKeeper server `host`'s agent is connected to (its address), if any."""
    p = sc.lab.run(host, ["ss", "-Htn", "state", "established", "( dport = :2181 )"],
                   capture_output=True, text=True)
    peers = {line.split()[-1].rsplit(":", 1)[0] for line in p.stdout.splitlines() if line.split()}
    return peers.pop() if len(peers) == 1 else None


def test_an_ensemble_server_dies(scenario: Any) -> None:
    sc = scenario(server="redis")
    client = coordinated_pair(sc, ensemble=True)
    assert sc.coordinator and sc.coordinator.count(",") == 2, sc.coordinator
    by_addr = {sc.lab.addr(h): h for h in sc.zk_servers}
    # The primary keeps a session (it re-asserts its record); the backup asks only
    # when it must decide, so it will have to find a live server then.
    first = wait("pri talks to one server", lambda: zk_peer(sc, "pri"), BOUND_S, sc)
    victim = by_addr[first]
    sc.zk_servers[victim].kill()  # that ZooKeeper server dies (SIGKILL)
    sc.zk_servers[victim].wait(10)
    moved = wait("pri moved to another server",
                 lambda: (p := zk_peer(sc, "pri")) not in (None, first) and p, BOUND_S, sc)
    before = (sc.status("pri") or {})["acked_epoch"]
    time.sleep(3.0)
    st = sc.status("pri") or {}
    assert st["state"] == "protected" and st["acked_epoch"] > before + 20, st  # goes on
    assert (sc.status("bak") or {}).get("state") == "replicating"
    cut = time.monotonic()
    sc.lab.crash("pri")
    wait("takeover decided by the two servers left", lambda: active_on(sc, "bak"), BOUND_S, sc)
    took = time.monotonic() - cut
    blog = (sc.workdir / "backup.log").read_text(errors="replace")
    assert "coordinator: took over" in blog and "taking over from epoch" in blog, blog[-2000:]
    res = finish(sc, client)
    print(f"\nensemble of 3 in the URL: the primary's server ({victim}) died, it moved to "
          f"{by_addr[moved]}; protection went on; a primary power cut then took over in "
          f"{took:.2f} s (the backup found a live server); client gap "
          f"{res['max_gap_s']:.3f} s, 0 lost")
