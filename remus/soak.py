"""Many power cuts in a row: the soak behind `make soak` (and its short form in
`make test`).

Each cut is remus.powercut.crash_once on a fresh Scenario: a protected server,
one loadgen client writing over one TCP connection to the VIP, pri's power cut
at a seeded random moment (half uniform over two epochs, half aimed just after
an epoch boundary, while that epoch is on the wire). The workload is drawn at
random per cut: redis, memcached, or redis keeping an fsync-always append-only
file in a replicated state directory. The summary counts what must never
happen (a lost acknowledged write, a wrong value, a dropped connection, a
backup that did not take over) and how long clients waited.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remus.lab import Lab
from remus.powercut import INTERVAL, crash_once
from remus.scenario import Scenario

STATE = "/var/lib/kv"
WORKLOADS: dict[str, dict[str, Any]] = {
    "redis": {"server": "redis"},
    "memcached": {"server": "memcached"},
    "redis-aof": {
        "server": "redis",
        "command": ["redis-server", "--port", "6379", "--dir", STATE, "--appendonly", "yes",
                    "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
        "state_dir": STATE,
    },
}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 4)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    gaps = [r["gap_s"] for r in runs if r.get("gap_s") is not None]
    return {
        "cuts": len(runs),
        "acknowledged_writes": sum(int(r.get("acked") or 0) for r in runs),
        "lost": sum(int(r.get("missing") or 0) + int(r.get("wrong_values") or 0) for r in runs),
        "connections_kept": sum(1 for r in runs if r.get("connection_survived")),
        "taken_over": sum(1 for r in runs if r.get("backup_state") == "active"),
        "verified": sum(1 for r in runs if r.get("verified")),
        "gap_median_s": round(statistics.median(gaps), 4) if gaps else None,
        "gap_p99_s": _pct(gaps, 0.99),
        "gap_max_s": round(max(gaps), 4) if gaps else None,
        "phases": {p: sum(1 for r in runs if r.get("phase") == p)
                   for p in sorted({str(r.get("phase")) for r in runs})},
    }


def failures(r: dict[str, Any]) -> list[str]:
    """What went wrong in one cut (empty: everything the guarantee promises held)."""
    bad = []
    if r.get("backup_state") != "active":
        bad.append(f"backup state {r.get('backup_state')}")
    if not r.get("connection_survived"):
        bad.append(f"connection lost: {r.get('error')}")
    if not r.get("verified") or r.get("missing") or r.get("wrong_values"):
        bad.append(f"lost {r.get('missing')} / wrong {r.get('wrong_values')}")
    released = r.get("last_released_epoch")
    if released is not None and (r.get("resume_epoch") or -1) < released:
        bad.append(f"resumed epoch {r.get('resume_epoch')} < released {released}")
    return bad


def one_cut(lab: Lab, workdir: Path, rng: random.Random, workload: str,
            mode: str) -> dict[str, Any]:
    w = WORKLOADS[workload]
    trace = workdir / "trace.jsonl"
    state = ["--state-dir", w["state_dir"]] if w.get("state_dir") else []
    sc = Scenario(lab, workdir, server=w["server"], command=w.get("command"),
                  interval=f"{INTERVAL * 1000:g}ms",
                  extra_primary=["--trace", str(trace), *state], extra_backup=state)
    try:
        if state:
            lab.run("pri", ["mkdir", "-p", w["state_dir"]], check=True)
        rec = crash_once(sc, rng, mode, trace)
    except Exception as e:  # a cut that could not even run is a failure, recorded
        rec = {"error": f"{type(e).__name__}: {e}"}
    finally:
        sc.reset()
        if state:
            for host in ("pri", "bak"):
                lab.run(host, ["rm", "-rf", w["state_dir"]], check=False)
    return rec


def soak(lab: Lab, workdir: Path, cuts: int, seed: int,
         out: Path | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """`cuts` power cuts; the JSON document (written to `out` after every cut)."""
    rng = random.Random(seed)
    runs: list[dict[str, Any]] = []
    doc: dict[str, Any] = {}
    started = time.time()
    for i in range(cuts):
        workload = rng.choice(sorted(WORKLOADS))
        mode = rng.choice(["random", "aimed"])
        rec = {"cut": i, "workload": workload, "mode": mode,
               **one_cut(lab, workdir / f"cut{i:03d}", random.Random(f"{seed}-{i}"),
                         workload, mode)}
        rec["failures"] = failures(rec)
        runs.append(rec)
        say(f"cut {i + 1}/{cuts} {workload} {mode}: gap {rec.get('gap_s')} s, acked "
            f"{rec.get('acked')}, {'OK' if not rec['failures'] else rec['failures']}")
        doc = {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "seed": seed,
               "interval_s": INTERVAL, "seconds": round(time.time() - started),
               "workloads": sorted(WORKLOADS),
               "summary": {"all": summarize(runs),
                           **{w: summarize([r for r in runs if r["workload"] == w])
                              for w in sorted({r["workload"] for r in runs})}},
               "failed_cuts": [r["cut"] for r in runs if r["failures"]],
               "runs": runs}
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc
