"""A power cut of the primary at a chosen moment, and what the client saw.

`crash_once(sc, rng, mode, trace)` runs one case over a fresh `Scenario` whose
primary was given `--trace trace`: backup, then primary, one loadgen client
writing over ONE TCP connection to the VIP; at a seeded random moment `pri`
loses power (`lab.crash`: freeze + link cut + SIGKILL). `mode` "random" picks
the moment uniformly over two epochs from now; "aimed" picks it with the
primary's trace just after an epoch boundary, while that epoch is on the wire
and unacknowledged. It returns a JSON-able record (where in the epoch cycle
the cut landed, the client's reply gap, the backup's takeover timeline, what
the client verified) and asserts nothing: tests/reliability/test_failover.py
asserts what is guaranteed, bench/failover_bench.py measures how fast.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from remus.scenario import Scenario

SEED = 20240505  # the power-cut series' seed (tests and bench)
INTERVAL = 0.050  # the epoch the series runs at (s): the fallback epoch period
WARMUP = 1.5  # client running before the crash: the connection is established and busy
CLIENT_SECONDS = 6.0
# The client gives up after this long without a reply: the only bound on the gap
# (a hang bound). How long a failover takes is measured by `make bench`.
CLIENT_STALL_S = 15.0


def read_trace(path: Path) -> list[dict[str, Any]]:
    """Acked epochs the primary traced; a torn last line (power cut) is skipped."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def epoch_period(trace: list[dict[str, Any]]) -> float:
    """Median spacing of consecutive traced boundaries (interval + stretch)."""
    b = [t["boundary"] for t in trace[-40:] if t.get("boundary")]
    diffs = [y - x for x, y in zip(b, b[1:], strict=False) if y > x]
    return statistics.median(diffs) if diffs else INTERVAL


def pick_moment(trace_path: Path, rng: random.Random, mode: str) -> float:
    """Wall-clock time (time.time()) at which to cut the power.

    random: uniform over two epochs from now. aimed: from 15 ms before to 8 ms
    after the next boundary (measured: the unit is frozen ~15 ms before the
    post-dump boundary, and the ACK comes ~6 ms after it), so the cut lands
    mid-dump or while that epoch is on the wire, unacknowledged."""
    if mode == "random":
        return time.time() + rng.uniform(0.0, 2 * INTERVAL)
    seen = len(read_trace(trace_path))
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        trace = read_trace(trace_path)
        if len(trace) > seen and trace[-1].get("boundary"):
            period = epoch_period(trace)
            target = float(trace[-1]["boundary"]) + period + rng.uniform(-0.015, 0.008)
            while target < time.time() + 0.001:
                target += period
            return target
        time.sleep(0.001)
    raise AssertionError(f"no epoch acked for 5 s; see {trace_path}")


def phase(since_ms: float | None, period_ms: float, pause_ms: float) -> tuple[str, float | None]:
    """Where the cut landed: (phase, ms from the nearest boundary), from the ms since
    the newest boundary whose epoch was acked before the cut; boundaries are taken
    to follow every `period_ms`. dump: the unit frozen before the next boundary;
    transfer: a boundary passed whose epoch was never acked; running: otherwise."""
    if since_ms is None:
        return "unknown", None
    k = round(since_ms / period_ms)
    off = since_ms - k * period_ms
    if k >= 1 and off >= 0:
        return "transfer", off
    if off < 0 and off > -pause_ms - 2:
        return "dump", off
    return "running", off


def reply_gap(times: list[float], start: float, end: float) -> tuple[float | None, float | None]:
    """The longest pause between consecutive replies that spans the power cut,
    which happened somewhere in [start, end] (lab.crash freezes the host a few
    ms after it is called, so an epoch in flight may still be released)."""
    pairs = [(a, b) for a, b in zip(times, times[1:], strict=False) if a <= end and b > start]
    if not pairs:
        before = [t for t in times if t <= end]
        return (before[-1] if before else None, None)
    return max(pairs, key=lambda p: p[1] - p[0])


def wait_backup_state(sc: Scenario, states: set[str], timeout: float) -> dict[str, Any] | None:
    """The backup's status once its state is one of `states`; after `timeout` s (a
    bound that only catches hangs) the last status seen, or None."""
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = sc.status("bak")
        if st and st.get("state") in states:
            return st
        time.sleep(0.05)
    return st


def timeline(crash_at: float, first_after: float | None, fo: dict[str, Any] | None
             ) -> dict[str, float | None]:
    """The backup's takeover split into steps, in seconds (None if unknown)."""
    fo = fo or {}
    marks = [("detect", crash_at, fo.get("detected")), ("apply", fo.get("detected"), fo.get("applied")),
             ("address_up", fo.get("applied"), fo.get("address_up")),
             ("restore", fo.get("address_up"), fo.get("restored")),
             ("first_reply", fo.get("restored"), first_after)]
    return {k: (b - a if a is not None and b is not None else None) for k, a, b in marks}


def crash_once(sc: Scenario, rng: random.Random, mode: str, trace: Path) -> dict[str, Any]:
    """Protect, load, cut pri's power at a chosen moment; measure what the client saw.

    `sc` is a fresh Scenario whose primary was given `--trace trace`. Returns a
    JSON-able record; asserts nothing (callers decide what is guaranteed)."""
    sc.start_backup()
    wait_backup_state(sc, {"waiting"}, timeout=30)  # up, listening for its primary
    sc.start_primary()
    sc.wait_protected(timeout=30)
    client = sc.start_client(CLIENT_SECONDS, "client.json", stall_timeout=CLIENT_STALL_S)
    time.sleep(WARMUP)
    pri = sc.status("pri") or {}
    pause_ms = float((pri.get("pause_ms") or {}).get("p50") or 15.0)
    target = pick_moment(trace, rng, mode)
    time.sleep(max(0.0, target - time.time()))
    crash_at = time.time()
    sc.lab.crash("pri")
    crash_call = time.time() - crash_at
    bak = wait_backup_state(sc, {"active", "failed"}, timeout=15)
    res = sc.wait_client(client, "client.json", timeout=60)
    bak = sc.status("bak") or bak or {}
    acked = read_trace(trace)
    last = acked[-1] if acked else {}
    # Epochs released between the call and the freeze still count as acked after the cut.
    at_cut = [t for t in acked if t.get("released", 0) <= crash_at and t.get("boundary")]
    before, after = reply_gap(res["reply_times"], crash_at, crash_at + crash_call)
    since = (crash_at - at_cut[-1]["boundary"]) * 1000 if at_cut else None
    period_ms = epoch_period(acked) * 1000
    where, off = phase(since, period_ms, pause_ms)
    return {
        "server": sc.server, "mode": mode, "crash_at": crash_at,
        "crash_call_s": round(crash_call, 4),
        # Where in the epoch cycle the cut landed: since the newest boundary whose
        # epoch pri saw acknowledged (> one period: a later epoch was in flight).
        "since_acked_boundary_ms": round(since, 1) if since is not None else None,
        "period_ms": round(period_ms, 1), "pause_ms": pause_ms,
        "phase": where, "from_boundary_ms": round(off, 1) if off is not None else None,
        "last_released_epoch": last.get("epoch"),
        "released_during_cut": len(acked) - len(at_cut),
        "resume_epoch": bak.get("resume_epoch"),
        "backup_state": bak.get("state"),
        "gap_s": (after - before) if before is not None and after is not None else None,
        "failover_s": (after - crash_at) if after is not None else None,
        "timeline_s": timeline(crash_at, after, bak.get("failover")),
        "backup_timeline": bak.get("failover"),
        "max_gap_s": res["max_gap_s"], "acked": res["acked"], "missing": res["missing"],
        "wrong_values": res["wrong_values"], "verified": res["verified"],
        "connection_survived": res["connection_survived"], "error": res["error"],
    }


def wait_status(sc: Scenario, host: str, ok: Any, timeout: float, every: float = 0.1
                ) -> dict[str, Any] | None:
    """The status of `host` once `ok(status)` holds; None after `timeout` s (a hang bound)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = sc.status(host)
        if st and ok(st):
            return st
        time.sleep(every)
    return None


def rejoin_after_cut(sc: Scenario, cut: str, timeout: float = 300.0) -> dict[str, Any]:
    """Power cut of `cut` (the host running the unit), failover to the other host,
    `cut` reboots and starts `remus backup`: how long each step took (s).

    `backup_start_to_protected_s` runs from starting the backup agent to the new
    primary's first acknowledged checkpoint to it (the full copy included)."""
    other = "bak" if cut == "pri" else "pri"
    t0 = time.monotonic()
    sc.lab.crash(cut)
    active = wait_status(sc, other, lambda s: s.get("state") == "active", timeout)
    if active is None:
        raise RuntimeError(f"no takeover on {other} within {timeout:.0f} s")
    t_active = time.monotonic()
    sc.lab.up()
    t_start = time.monotonic()
    sc.start_backup(cut)
    prot = wait_status(sc, other, lambda s: (s.get("protection") or {}).get("state")
                       == "protected", timeout)
    if prot is None:
        raise RuntimeError(f"{other} not protected by {cut} within {timeout:.0f} s")
    return {"takeover_s": round(t_active - t0, 3),
            "backup_start_to_protected_s": round(time.monotonic() - t_start, 3),
            "checkpoint_bytes": (prot.get("protection") or {}).get("checkpoint_bytes")}
