"""Failover time: from a power cut of the primary to the client's first reply.

Run as root from the checkout (it brings the lab down and up itself, and waits
for any test run that holds the lab):
    .venv/bin/python bench/failover_bench.py [-n 10] [--server redis] [--interval 50ms]

Each run: a fresh lab, a protected server on `pri`, its backup on `bak`, one
client writing over one TCP connection; `pri` loses power at a seeded random
moment within two epochs. Measured per run: crash -> first reply after it
(what a user waits), the client's gap (last reply before -> first after) and
the backup's timeline: detect (crash -> takeover decided), apply (finish
applying committed epochs), address_up (restore preparation, inbound hold,
link up, route, proxy ARP, gratuitous ARP: the address moves before the
restore so the unit's first packets leave at once), restore (CRIU restore),
first_reply (restored -> first reply; the client's TCP retransmission timer
dominates it). Prints the medians and writes every run to
bench/results/failover.json.

--fast-detection runs both agents with --heartbeat 20ms --lease 80ms
--takeover-timeout 120ms instead of the defaults (50/200/300 ms).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from remus.lab import Lab  # noqa: E402
from remus.powercut import SEED, crash_once  # noqa: E402
from remus.scenario import Scenario, exclusive_lab  # noqa: E402

OUT = REPO / "bench" / "results" / "failover.json"
STEPS = ("detect", "apply", "address_up", "restore", "first_reply")


FAST = ["--heartbeat", "20ms", "--lease", "80ms", "--takeover-timeout", "120ms"]


def one_run(lab: Lab, workdir: Path, server: str, interval: str, rng: random.Random,
            mode: str, timing: list[str] | None = None) -> dict[str, Any]:
    trace = workdir / "trace.jsonl"
    sc = Scenario(lab, workdir, server=server, interval=interval,
                  extra_primary=["--trace", str(trace), *(timing or [])],
                  extra_backup=list(timing or []))
    try:
        rec = crash_once(sc, rng, mode, trace)
    finally:
        sc.reset()
    rec["workdir"] = str(workdir)
    rec["ok"] = bool(rec["connection_survived"] and rec["missing"] == 0 and rec["verified"])
    return rec


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        v = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.median(v), 4) if v else None

    steps = {}
    for k in STEPS:
        v = [r["timeline_s"][k] for r in runs if r["timeline_s"].get(k) is not None]
        steps[k] = {"median": round(statistics.median(v), 4), "max": round(max(v), 4)} if v else None
    fos = [r["failover_s"] for r in runs if r.get("failover_s") is not None]
    return {"runs": len(runs), "ok": sum(r["ok"] for r in runs),
            "failover_median_s": med("failover_s"),
            "failover_max_s": round(max(fos), 4) if fos else None,
            "gap_median_s": med("gap_s"), "timeline": steps,
            "failover_all_s": [round(x, 4) for x in fos]}


def _s(x: float | None) -> str:
    return "?" if x is None else f"{x:.3f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--runs", type=int, default=10)
    ap.add_argument("--server", choices=["redis", "memcached"], default="redis")
    ap.add_argument("--interval", default="50ms")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--aimed", action="store_true",
                    help="aim every cut at an epoch boundary (mid-dump / mid-transfer)")
    ap.add_argument("--fast-detection", action="store_true",
                    help="heartbeat 20 ms, lease 80 ms, takeover timeout 120 ms (both agents)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    runs: list[dict[str, Any]] = []
    with exclusive_lab() as lab, tempfile.TemporaryDirectory(prefix="remus-fobench-") as td:
        for i in range(a.runs):
            rng = random.Random(f"{a.seed}-bench-{i}")
            rec = one_run(lab, Path(td) / f"run{i}", a.server, a.interval, rng,
                          "aimed" if a.aimed else "random", FAST if a.fast_detection else None)
            runs.append(rec)
            steps = " ".join(f"{k} {_s(v)}" for k, v in rec["timeline_s"].items())
            print(f"run {i}: crash -> first reply {_s(rec['failover_s'])} (gap {_s(rec['gap_s'])};"
                  f" {steps}){'' if rec['ok'] else '  FAILED: ' + str(rec['error'])}", flush=True)
    summary = report(runs)
    doc = {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "server": a.server,
           "interval": a.interval, "seed": a.seed,
           "timing": " ".join(FAST) if a.fast_detection else "defaults", "summary": summary, "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    tl = summary["timeline"]
    print(f"\nfailover (power cut -> first reply), median of {summary['runs']}: "
          f"{summary['failover_median_s']} s (max {summary['failover_max_s']} s); "
          f"backup timeline medians: " + ", ".join(
              f"{k} {v['median'] * 1000:.1f} ms" for k, v in tl.items() if v) + f"\nwritten to {a.out}")
    return 0 if summary["ok"] == summary["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
