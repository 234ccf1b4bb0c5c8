"""Replication core in the lab: real redis-server, real CRIU, real netfilter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from remus.paths import REPO
from tests.support.timing import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

REMUS = [sys.executable, "-m", "remus.cli"]


def sample(sc: Any, seconds: float, every: float = 0.5) -> list[tuple[float, dict, dict, dict]]:
    """(time, primary status, backup status, primary status read after the backup's).

    The two agents are asked one after the other (a `remus status` process each,
    ~0.1-0.3 s): the backup's answer lies between the two primary answers."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        p = sc.status("pri")
        b = sc.status("bak")
        p2 = sc.status("pri")
        assert p is not None and b is not None and p2 is not None, "an agent stopped answering"
        out.append((time.monotonic(), p, b, p2))
        time.sleep(every)
    return out


def test_protected_redis_30s(scenario: Any) -> None:
    """50 ms epochs for 30 s under a steady client: acks keep up, both sides agree."""
    sc = scenario(server="redis", interval="50ms")
    sc.start_backup()
    sc.start_primary()
    sc.wait_protected()
    client = sc.start_client(30, "load.json", pace=0.002)
    samples = sample(sc, 30)
    res = sc.wait_client(client, "load.json")
    assert res["connection_survived"] and res["verified"] and res["missing"] == 0

    for _, p, b, p2 in samples:
        assert p["epoch"] - p["acked_epoch"] <= 2, p
        assert b["generation"] == p["generation"]
        assert b["unit"] == p["unit"] == "kv"
        assert b["state"] == "replicating"
        # The backup commits before it ACKs, and cannot be ahead of what was taken.
        assert p["acked_epoch"] - 1 <= b["epoch"] <= p2["epoch"] + 1
    (t0, p0, _, _), (t1, p1, _, _) = samples[0], samples[-1]
    eps = (p1["epoch"] - p0["epoch"]) / (t1 - t0)
    # The rate this run's own times allow (not a speed): an epoch starts every
    # interval unless its dump takes longer or the window of 2 unacknowledged
    # epochs is full (epoch e+2 waits for e's dump, encoding and ACK).
    dump_ms = p1["dump_ms"]["p50"]
    window_ms = (dump_ms + (p1["encode_ms"]["p50"] or 0.0) + p1["ack_latency_ms"]["p50"]) / 2
    possible = 1000 / max(50.0, dump_ms, window_ms)
    print(f"epochs/s {eps:.1f} (possible {possible:.1f}); pause p50 {p1['pause_ms']['p50']} ms "
          f"p99 {p1['pause_ms']['p99']} ms; ack p50 {p1['ack_latency_ms']['p50']} ms; "
          f"bytes/epoch p50 {p1['bytes_per_epoch']['p50']} of {p1['checkpoint_bytes']}")
    assert eps >= 0.8 * possible
    assert p1["netbuf"]["released_packets"] > 0 and p1["guarantee"] is True


def test_idle_service_sends_small_deltas(scenario: Any) -> None:
    sc = scenario(server="redis")
    sc.start_backup()
    sc.start_primary()
    sc.wait_protected(min_acked=20)
    time.sleep(3)
    p = sc.status("pri")
    assert p is not None
    median = p["bytes_per_epoch"]["p50"]
    full = p["checkpoint_bytes"]
    print(f"idle redis: median {median} bytes/epoch vs checkpoint {full} bytes "
          f"({100 * median / full:.2f}%)")
    assert full > 1_000_000
    assert median < 0.1 * full


def _extra_primary(sc: Any, key: Any, name: str, vip: str, log: Any) -> None:
    """Start another `remus run` on pri (sleep as its unit); it is stopped with the scenario."""
    p = sc.lab.popen("pri", [*REMUS, "-v", "run", "--backup", sc.lab.addr("bak"), "--key-file",
                             str(key), "--vip", vip, "--name", name, "--", "sleep", "1000"],
                     stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=str(REPO),
                     start_new_session=True)
    sc.procs.append(p)


def _agent_log(sc: Any, name: str) -> str:
    return (sc.workdir / name).read_text(errors="replace")


def _log_says(path: Any, *words: str, timeout: float = 30.0) -> str:
    """The log at `path` once it contains one of `words` (case-insensitive), or as
    it is after `timeout` s (a hang bound: returns as soon as the words appear)."""
    def text() -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def says() -> str:
        t = text()
        return t if any(w.lower() in t.lower() for w in words) else ""

    return wait_for(says, timeout) or text()


def epoch_rate(sc: Any, seconds: float) -> tuple[float, dict[str, Any]]:
    """Epochs per second on pri over about `seconds` s, and the last status. Each
    reading is stamped at the middle of its `remus status` call (~0.1-0.3 s)."""
    def reading() -> tuple[float, dict[str, Any]]:
        t = time.monotonic()
        st = sc.status("pri")
        assert st is not None, "the primary stopped answering"
        return (t + time.monotonic()) / 2, st

    t0, s0 = reading()
    time.sleep(seconds)
    t1, s1 = reading()
    return (s1["epoch"] - s0["epoch"]) / (t1 - t0), s1


def test_wrong_key_is_rejected_and_store_untouched(scenario: Any, tmp_path: Any) -> None:
    sc = scenario(server="redis")
    sc.start_backup()
    sc.start_primary()
    sc.wait_protected()
    before = sc.status("bak")
    assert before is not None
    # A second primary with another key: refused at the first frame, nothing committed.
    wrong = tmp_path / "wrong.key"
    wrong.write_text(os.urandom(32).hex())
    _extra_primary(sc, wrong, "evil", "10.77.0.101/24", tmp_path / "evil.log")
    evil = _log_says(tmp_path / "evil.log", "handshake", "refused")
    assert "handshake" in evil or "refused" in evil, evil[-2000:]
    log = _log_says(sc.workdir / "backup.log", "does not open")
    assert "does not open under our key (wrong pre-shared key?)" in log, log[-2000:]
    after = sc.status("bak")
    assert after is not None
    assert after["generation"] == before["generation"], "the intruder changed the lineage"
    assert after["state"] == "replicating" and after["epoch"] >= before["epoch"]


def test_second_primary_is_rejected(scenario: Any, tmp_path: Any) -> None:
    sc = scenario(server="redis")
    sc.start_backup()
    sc.start_primary()
    sc.wait_protected()
    _extra_primary(sc, sc.key, "two", "10.77.0.102/24", tmp_path / "two.log")
    two = _log_says(tmp_path / "two.log", "another primary")
    assert "another primary" in two, two[-2000:]
    log = _log_says(sc.workdir / "backup.log", "rejected connection")
    assert "rejected connection" in log, log[-2000:]
    b = sc.status("bak")
    assert b is not None and b["unit"] == "kv" and b["state"] == "replicating"


def test_backup_kill9_comes_back_with_last_commit(scenario: Any) -> None:
    sc = scenario(server="redis")
    bak = sc.start_backup()
    sc.start_primary()
    sc.wait_protected(min_acked=10)
    os.kill(bak.pid, signal.SIGKILL)
    bak.wait()
    p = sc.status("pri")
    assert p is not None
    acked_before = p["acked_epoch"]
    log = sc.workdir / "backup.log"
    # The first backup logged "recovered ..." too (of the store an earlier test
    # left in the same directory): only what the restarted one says counts.
    seen = log.read_text(errors="replace").count("recovered generation")
    sc.start_backup()
    wait_for(lambda: log.read_text(errors="replace").count("recovered generation") > seen, 30.0)
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if "recovered generation" in ln][seen:]
    assert lines, f"the restarted backup did not recover its store: {text[-2000:]}"
    gen, epoch = lines[0].split("recovered generation")[1].split(" epoch ")
    assert int(gen) == p["generation"], (lines[0], p["generation"])
    assert int(epoch.split()[0]) >= acked_before, (lines[0], acked_before)
    # The primary reconnects, starts a new generation with a full checkpoint, goes on.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        p2 = sc.status("pri")
        if p2 and p2["generation"] != p["generation"] and p2["acked_epoch"] > acked_before + 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"protection did not resume: {p2}")


# set-interval 25ms after 50 ms raises the epoch rate only while an epoch's own
# work (CRIU's call, the dump, the ACK window) is well under 25 ms: on a slow hour
# of this host an idle redis's CRIU call took 26-32 ms, and 50 ms gave 15-18
# epochs/s, 25 ms 16-20 (the old 1.15x rise failed, with and without our newest
# CRIU patch). A longer interval bounds the rate on any host: at 200 ms at most
# 5 epochs start per second, so the live change shows as a clear fall.
SLOW_INTERVAL_S = 0.2


def test_set_interval_and_stop(scenario: Any) -> None:
    sc = scenario(server="redis", interval="50ms")
    sc.start_backup()
    primary = sc.start_primary()
    sc.wait_protected()
    eps50, before = epoch_rate(sc, 3.0)
    assert before["interval_ms"] == 50
    r = sc.lab.run("pri", [*REMUS, "set-interval", "25ms"], capture_output=True, text=True,
                   cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    eps25, p = epoch_rate(sc, 3.0)
    assert p["interval_ms"] == 25
    r = sc.lab.run("pri", [*REMUS, "set-interval", f"{SLOW_INTERVAL_S * 1000:.0f}ms"],
                   capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    time.sleep(2 * SLOW_INTERVAL_S)  # the epoch under way when it changed ends
    eps200, p = epoch_rate(sc, 4.0)
    print(f"epochs/s: {eps50:.1f} at 50 ms, {eps25:.1f} after set-interval 25ms, {eps200:.1f} "
          f"after set-interval 200ms; dump p50 {p['dump_ms']['p50']} ms")
    assert p["interval_ms"] == SLOW_INTERVAL_S * 1000
    assert eps25 > 0.8 * eps50, f"{eps25:.1f} epochs/s at 25 ms vs {eps50:.1f} at 50 ms"
    assert eps200 <= 1.2 / SLOW_INTERVAL_S, f"{eps200:.1f} epochs/s at 200 ms"
    assert eps200 < eps50 / 1.3, f"{eps200:.1f} epochs/s at 200 ms vs {eps50:.1f} at 50 ms"
    bad = sc.lab.run("pri", [*REMUS, "set-interval", "fast"], capture_output=True, text=True,
                     cwd=str(REPO))
    assert bad.returncode != 0 and "fast" in bad.stderr
    unit_pid = p["unit_pid"]
    r = sc.lab.run("pri", [*REMUS, "stop"], capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    primary.wait(10)
    assert primary.returncode == 0
    assert os.path.exists(f"/proc/{unit_pid}"), "stop must leave the unit running"
    # Unprotected now: the client is served at once, and the backup does not take over.
    res = sc.wait_client(sc.start_client(1, "after.json"), "after.json")
    assert res["connection_survived"] and res["acked"] > 0
    # Idle, not active: a backup that missed the stop would take over (after its
    # 300 ms takeover timeout) and never become idle; 30 s only catches a hang.
    b = wait_for(lambda: (st := sc.status("bak")) is not None and st["state"] == "idle" and st,
                 30.0)
    assert b, sc.status("bak")
    rules = sc.lab.run("pri", ["iptables", "-S"], capture_output=True, text=True).stdout
    assert "REMUS" not in rules


def test_stop_during_a_long_freeze_is_no_takeover(scenario: Any) -> None:
    """`remus stop` while a dump keeps the unit frozen for longer than the
    takeover timeout (a huge unit's epoch; here a stalled post-dump step).

    Seen in the bench at 1 GiB: the heartbeats ended with the stop request
    while the freeze went on, the backup heard nothing for 300 ms and took
    over, and the primary then released its copy too: two copies."""
    sc = scenario(server="redis", env_primary={"REMUS_FAULT": "primary-dump:60:stall=2"})
    sc.start_backup()
    primary = sc.start_primary()
    sc.wait_protected()
    log = sc.workdir / "primary.log"
    assert wait_for(lambda: "REMUS_FAULT: stalling" in log.read_text(), 60.0), log.read_text()
    r = sc.lab.run("pri", [*REMUS, "stop"], capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    primary.wait(30)
    assert primary.returncode == 0, log.read_text()[-3000:]
    b = wait_for(lambda: (st := sc.status("bak")) is not None and st["state"] != "replicating"
                 and st, 30.0)
    blog = (sc.workdir / "backup.log").read_text()
    assert b and b["state"] == "idle", (b, blog[-3000:])
    assert "taking over" not in blog and "primary ended protection" in blog, blog[-3000:]


@pytest.mark.parametrize("how", ["force", "signal"])
def test_stop_while_the_backup_is_lost_needs_force(scenario: Any, how: str) -> None:
    """A stalled primary cannot know whether its lost backup took over: `remus
    stop` refuses to release the held output (two copies), --force does; an
    agent ended by SIGTERM meanwhile keeps it held (fail closed)."""
    sc = scenario(server="redis", interval="50ms")
    bak = sc.start_backup()
    primary = sc.start_primary()
    sc.wait_protected()
    unit_pid = sc.status("pri")["unit_pid"]
    bak.kill()  # our own agent; it cannot take over now, but pri cannot know that
    bak.wait(10)
    assert wait_for(lambda: (st := sc.status("pri")) is not None and st["state"] == "stalled",
                    30.0), sc.status("pri")
    r = sc.lab.run("pri", [*REMUS, "stop"], capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode != 0 and "--force" in r.stderr and "twice" in r.stderr, r
    time.sleep(0.5)
    assert primary.poll() is None and sc.status("pri")["state"] == "stalled"
    if how == "signal":
        primary.send_signal(signal.SIGTERM)
        primary.wait(30)
        assert "output stays held" in (sc.workdir / "primary.log").read_text()
        rules = sc.lab.run("pri", ["iptables", "-S"], capture_output=True, text=True).stdout
        assert "REMUS" in rules, "the held output must stay held"
        return
    r = sc.lab.run("pri", [*REMUS, "stop", "--force"], capture_output=True, text=True,
                   cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    primary.wait(30)
    assert primary.returncode == 0
    assert os.path.exists(f"/proc/{unit_pid}"), "stop must leave the unit running"
    res = sc.wait_client(sc.start_client(1, "after.json"), "after.json")
    assert res["connection_survived"] and res["acked"] > 0, res


def test_status_json_keys(scenario: Any) -> None:
    sc = scenario(server="redis")
    sc.start_backup()
    sc.start_primary()
    sc.wait_protected()
    for host in ("pri", "bak"):
        st = sc.status(host)
        assert st is not None
        for key in ("role", "pid", "unit_pid", "generation", "epoch", "acked_epoch",
                    "interval_ms", "pause_ms", "bytes_per_epoch", "ack_latency_ms"):
            assert key in st, (host, key)
    human = sc.lab.run("pri", [*REMUS, "status"], capture_output=True, text=True, cwd=str(REPO))
    assert "epoch / acked" in human.stdout and "pause ms" in human.stdout
    assert json.loads(sc.lab.run("bak", [*REMUS, "status", "--json"], capture_output=True,
                                 text=True, cwd=str(REPO)).stdout)["role"] == "backup"


def test_stale_parasite_dir_is_cleared(scenario: Any) -> None:
    """A dump killed mid-way leaves proc.crtools in the unit's cwd; protection must recover."""
    sc = scenario(server="redis")
    sc.start_backup()
    sc.start_primary()
    p = sc.wait_protected()
    stale = f"/proc/{p['unit_pid']}/cwd/proc.crtools"
    for _ in range(200):  # a running dump has its own proc.crtools there for a moment
        try:
            os.mkdir(stale, 0o700)
            break
        except FileExistsError:
            time.sleep(0.005)
    else:
        raise AssertionError(f"{stale} never free")
    ours = os.stat(stale).st_ctime_ns
    try:
        # Protection goes on past the stale directory (a hang bound, not a rate).
        after = wait_for(lambda: (st := sc.status("pri")) is not None
                         and st["acked_epoch"] > p["acked_epoch"] + 5 and st, 30.0)
        assert after, f"acks stopped after the stale proc.crtools: {sc.status('pri')}"
        # A dump running now has its own proc.crtools there (this check once
        # failed on one); ours, made before, must be gone.
        assert wait_for(lambda: not _same_dir(stale, ours), 5.0), f"{stale} was not removed"
        assert "stale proc.crtools" in _agent_log(sc, "primary.log")
    finally:
        if os.path.isdir(stale):
            os.rmdir(stale)


def _same_dir(path: str, ctime_ns: int) -> bool:
    try:
        return os.stat(path).st_ctime_ns == ctime_ns
    except FileNotFoundError:
        return False
