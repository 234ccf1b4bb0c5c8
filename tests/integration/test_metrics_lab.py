"""Prometheus metrics of live lab agents: scraped over the lab network, values move."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.ha import logs, wait

pytestmark = [pytest.mark.root, pytest.mark.slow]

PORT = 9788


def scrape(sc: Any, host: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, labels): value} of host's agent, fetched from the client host."""
    url = f"http://{sc.lab.addr(host)}:{PORT}/metrics"
    code = f"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen({url!r}," \
           f"timeout=5).read().decode())"
    r = sc.lab.run("client", [sys.executable, "-c", code], capture_output=True, text=True,
                   timeout=30)
    assert r.returncode == 0, r.stderr
    out = {}
    for fam in text_string_to_metric_families(r.stdout):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def v(m: dict[Any, float], name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def test_metrics_of_both_agents_move(scenario: Any) -> None:
    sc = scenario(server="redis")
    sc.extra_backup = ["--metrics", f"{sc.lab.addr('bak')}:{PORT}"]
    sc.extra_primary = ["--metrics", f"{sc.lab.addr('pri')}:{PORT}"]
    sc.start_backup()
    sc.start_primary()
    sc.wait_protected()
    client = sc.start_client(6, "c.json", pace=0.002)
    p1, b1 = scrape(sc, "pri"), scrape(sc, "bak")
    time.sleep(2)
    p2, b2 = scrape(sc, "pri"), scrape(sc, "bak")
    sc.wait_client(client, "c.json")

    assert v(p2, "remus_info", role="primary", unit="kv", backup=f"{sc.lab.addr('bak')}:7788",
             dirty_tracking=str(sc.status("pri")["dirty_tracking"])) == 1
    assert v(p2, "remus_primary_state", state="protected") == 1
    assert v(p2, "remus_primary_state", state="stalled") == 0
    assert v(p2, "remus_epoch") > v(p1, "remus_epoch")
    assert v(p2, "remus_acked_epoch") > v(p1, "remus_acked_epoch")
    assert 0 <= v(p2, "remus_lag_epochs") <= 3
    assert v(p2, "remus_output_commit") == 1 and v(p2, "remus_protected") == 1
    for h in ("remus_pause_seconds", "remus_ack_latency_seconds", "remus_commit_latency_seconds"):
        assert v(p2, f"{h}_count") > v(p1, f"{h}_count") > 0, h
        assert v(p2, f"{h}_bucket", le="+Inf") == v(p2, f"{h}_count"), h
        assert v(p2, f"{h}_sum") > 0, h
    assert v(p2, "remus_sent_bytes_total") > v(p1, "remus_sent_bytes_total")
    assert v(p2, "remus_output_released_packets_total") > \
        v(p1, "remus_output_released_packets_total")
    assert v(p2, "remus_generation") == v(b2, "remus_generation")

    assert v(b2, "remus_backup_state", state="replicating") == 1
    assert v(b2, "remus_committed_epoch") > v(b1, "remus_committed_epoch")
    assert v(b2, "remus_epochs_received_total") > v(b1, "remus_epochs_received_total")
    assert v(b2, "remus_store_problem") == 0 and v(b2, "remus_failovers_total") == 0

    sc.lab.crash("pri")
    wait("takeover", lambda: (sc.status("bak") or {}).get("state") == "active", 30, sc)
    b3 = scrape(sc, "bak")
    assert v(b3, "remus_backup_state", state="active") == 1, logs(sc)
    assert v(b3, "remus_failovers_total") == 1
    assert 0 < v(b3, "remus_last_failover_seconds") < 30


def test_primary_is_ready_for_systemd_once_protected(scenario: Any, tmp_path: Any) -> None:
    """Type=notify: READY=1 comes after the first checkpoint is acknowledged, not
    when the agent starts (a unit that is not protected yet is not "up")."""
    import socket

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(60)
        sc = scenario(server="redis", env_primary={"NOTIFY_SOCKET": str(path)},
                      env_backup={"NOTIFY_SOCKET": str(path)})
        sc.start_backup()
        first = s.recv(4096).decode()
        assert first.startswith("READY=1") and "listening on" in first, first
        sc.start_primary()
        msg = s.recv(4096).decode()
        got_at = time.time()
    assert msg.startswith("READY=1\nSTATUS=protected by"), msg
    log = (sc.workdir / "primary.log").read_text()
    assert "protected by" in log  # said before READY went out
    st = sc.status("pri")
    assert st is not None and st["acked_epoch"] >= 0 and got_at > 0


def test_progress_of_a_first_full_checkpoint(scenario: Any) -> None:
    """A 1 GiB unit's first checkpoint: status and metrics show how far it is,
    and the foreground command says so without -v."""
    from remus.paths import REPO

    big = [sys.executable, str(REPO / "bench" / "filler.py"), "1024", "0", "0.05"]
    sc = scenario(server="filler", command=big, status_timeout=20.0)
    sc.extra_primary = ["--metrics", f"{sc.lab.addr('pri')}:{PORT}"]
    sc.start_backup()
    sc.start_primary()
    seen = wait("progress in status",
                lambda: ((sc.status("pri") or {}).get("progress") or None), 120, sc)
    # The total is this dump's page files: the filler may still be growing to 1 GiB.
    assert seen["what"].startswith("full checkpoint to ") and seen["total_bytes"] > 100 << 20
    assert 0 <= seen["done_bytes"] <= seen["total_bytes"]
    assert seen["percent"] == round(100 * seen["done_bytes"] / seen["total_bytes"], 1)
    m = scrape(sc, "pri")
    assert v(m, "remus_full_checkpoint_bytes") > 100 << 20 or \
        (sc.status("pri") or {}).get("progress") is None  # it may have ended meanwhile
    sc.wait_protected(timeout=300, min_acked=2)
    assert (sc.status("pri") or {}).get("progress") is None
    m = scrape(sc, "pri")
    assert ("remus_full_checkpoint_bytes", ()) not in m  # absent when nothing is in transfer
