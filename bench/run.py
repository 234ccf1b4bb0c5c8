"""`make bench`: remus side by side with the unprotected service, in one run.

Runs in the lab on this machine:
  1. redis-server unprotected (same container, no agent), then protected at
     25, 50 and 100 ms: throughput under a saturating load (redis-benchmark,
     many connections, pipelined) and latency with one request in flight;
     pause, ack latency, bytes per epoch/second and agents' CPU from status.
  2. failover: power cuts of pri under a one-connection client; the gap from
     the last reply before the cut to the first after (median of N).
  3. pause scaling: a unit of 16/128/1024 MiB, idle and dirtying 1/10/50 % of
     its memory per epoch: remus pause vs a bare `criu dump --leave-running`
     of the same process, and bytes sent per epoch vs bytes dirtied.
Writes bench/results/latest.json (with the machine and git revision) and PNG
plots next to it, and prints tables.  `--quick` for a short smoke run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remus.lab import Lab  # noqa: E402
from remus.scenario import SERVERS, Scenario, exclusive_lab  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PY = sys.executable
FILLER = ROOT / "bench" / "filler.py"


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def redis_benchmark(lab: Lab, clients: int, pipeline: int, n: int) -> dict[str, float]:
    argv = ["redis-benchmark", "-h", lab.vip_addr, "-p", "6379", "-c", str(clients),
            "-P", str(pipeline), "-n", str(n), "-t", "set", "--csv", "-r", "100000"]
    p = lab.run("client", argv, capture_output=True, text=True, timeout=300)
    rows = list(csv.reader(io.StringIO(p.stdout)))
    if len(rows) < 2:
        raise RuntimeError(f"redis-benchmark failed: {p.stdout[-500:]} {p.stderr[-500:]}")
    head, vals = rows[0], rows[1]
    d = dict(zip(head, vals, strict=False))
    return {"rps": float(d["rps"]), "p50_ms": float(d.get("p50_latency_ms", "nan")),
            "p99_ms": float(d.get("p99_latency_ms", "nan"))}


def cpu_seconds(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, IndexError):
        return float("nan")


def measure_load(lab: Lab, quick: bool) -> dict[str, Any]:
    n_tp, n_lat = (50_000, 200) if quick else (300_000, 400)
    tp = redis_benchmark(lab, 200, 32, n_tp)
    lat = redis_benchmark(lab, 1, 1, n_lat)
    return {"throughput_rps": tp["rps"], "saturating_p50_ms": tp["p50_ms"],
            "latency_p50_ms": lat["p50_ms"], "latency_p99_ms": lat["p99_ms"],
            "latency_bound_rps": lat["rps"]}


def unprotected(lab: Lab, quick: bool) -> dict[str, Any]:
    argv, _ = SERVERS["redis"]
    p = lab.popen("pri", [PY, str(ROOT / "bench" / "plain_unit.py"), "plain", lab.vip, lab.dev,
                          "--", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                  cwd=str(ROOT))
    assert p.stdout is not None and p.stdin is not None
    line = p.stdout.readline()
    if not line.startswith("ready"):
        raise RuntimeError(f"unprotected unit did not start: {line!r}")
    time.sleep(0.5)
    try:
        return measure_load(lab, quick)
    finally:
        p.stdin.close()
        p.wait(10)
        lab.run("client", ["ip", "neigh", "flush", "dev", lab.dev])


def protected(lab: Lab, interval: str, quick: bool, work: Path) -> dict[str, Any]:
    sc = Scenario(lab, work / f"p{interval}", interval=interval)
    try:
        sc.start_backup()
        time.sleep(0.3)
        sc.start_primary()
        sc.wait_protected()
        pri, bak = sc.status("pri"), sc.status("bak")
        assert pri and bak
        cpu0 = (cpu_seconds(pri["pid"]), cpu_seconds(bak["pid"]), time.monotonic())
        res = measure_load(lab, quick)
        cpu1 = (cpu_seconds(pri["pid"]), cpu_seconds(bak["pid"]), time.monotonic())
        st = sc.status("pri")
        assert st
        wall = cpu1[2] - cpu0[2]
        floor = float(interval.rstrip("ms")) / 2 + st["pause_ms"]["p50"] + st["ack_latency_ms"]["p50"]
        res.update({
            "pause_ms_p50": st["pause_ms"]["p50"], "pause_ms_p99": st["pause_ms"]["p99"],
            "ack_ms_p50": st["ack_latency_ms"]["p50"], "epochs_per_s": st["epochs_per_s"],
            "bytes_per_epoch_p50": st["bytes_per_epoch"]["p50"], "bytes_per_s": st["bytes_per_s"],
            "cpu_primary_agent": round((cpu1[0] - cpu0[0]) / wall, 3),
            "cpu_backup_agent": round((cpu1[1] - cpu0[1]) / wall, 3),
            "latency_floor_ms": round(floor, 2),
        })
        return res
    finally:
        sc.reset()


def failover_series(lab: Lab, n: int, work: Path) -> dict[str, Any]:
    gaps, lost, survived = [], 0, 0
    for i in range(n):
        sc = Scenario(lab, work / f"fo{i}")
        try:
            sc.start_backup()
            time.sleep(0.3)
            sc.start_primary()
            sc.wait_protected()
            c = sc.start_client(4.0, "c.json", pace=0.001)
            time.sleep(1.5 + (i % 5) * 0.0137)
            cut = time.time()
            lab.crash("pri")
            r = sc.wait_client(c, "c.json", timeout=60)
            after = [t for t in r["reply_times"] if t > cut]
            before = [t for t in r["reply_times"] if t <= cut]
            if after and before:
                gaps.append(after[0] - before[-1])
            lost += r["missing"]
            survived += int(r["connection_survived"])
            log(f"failover {i}: gap {gaps[-1] * 1000 if gaps else float('nan'):.0f} ms, "
                f"missing {r['missing']}, survived {r['connection_survived']}")
        finally:
            sc.reset()
    return {"runs": n, "gaps_s": gaps, "median_s": statistics.median(gaps) if gaps else None,
            "max_s": max(gaps) if gaps else None, "acked_writes_lost": lost,
            "connections_survived": survived}


def pause_series(lab: Lab, quick: bool, work: Path) -> list[dict[str, Any]]:
    sizes = [16, 128] if quick else [16, 128, 1024]
    rows = []
    for mib in sizes:
        # 50 % of 1 GiB per 50 ms is more than this 2-core machine can write.
        for pct in (0, 1, 10, 50) if mib < 1024 else (0, 1, 10):
            try:
                rows.append(one_series_point(lab, mib, pct, work))
            except Exception as e:  # one bad point must not lose the run
                log(f"{mib} MiB dirty {pct}%: FAILED: {e}")
                rows.append({"mib": mib, "dirty_pct_per_50ms": pct, "error": str(e)[:500]})
                continue
            r = rows[-1]
            log(f"{mib} MiB dirty {pct}%: pause {r['pause_ms_p50']} ms vs bare "
                f"{r['bare_pause_ms_p50']} ms; sent {r['bytes_per_epoch_p50']} B/epoch vs "
                f"dirtied {r['dirtied_bytes_per_epoch']} B/epoch")
    return rows


def one_series_point(lab: Lab, mib: int, pct: int, work: Path) -> dict[str, Any]:
    sc = Scenario(lab, work / f"s{mib}-{pct}", server="filler",
                  command=[PY, str(FILLER), str(mib), str(pct), "0.05"])
    try:
        sc.start_backup()
        time.sleep(0.3)
        sc.start_primary()
        sc.wait_protected(timeout=60 + mib / 10)
        time.sleep(3)
        st = sc.status("pri")
        assert st
        # Stop protection (the unit keeps running) so the bare dumps do not race the agent's.
        lab.run("pri", [PY, "-m", "remus.cli", "stop"], capture_output=True, cwd=str(ROOT))
        time.sleep(0.5)
        bare = lab.run("pri", [PY, str(ROOT / "bench" / "bare_dump.py"), str(st["unit_pid"]),
                               "remus-kv"], capture_output=True, text=True, cwd=str(ROOT))
        bare_ms = json.loads(bare.stdout)["pause_ms_p50"] if bare.returncode == 0 else None
        period = 1.0 / st["epochs_per_s"] if st["epochs_per_s"] else 0.05
        # the filler dirties pct% of its memory every 50 ms; an epoch may be longer
        dirtied = min(1.0, pct / 100 * period / 0.05) * mib * 2**20 if pct else 0
        return {"mib": mib, "dirty_pct_per_50ms": pct, "pause_ms_p50": st["pause_ms"]["p50"],
                "pause_ms_p99": st["pause_ms"]["p99"], "bare_pause_ms_p50": bare_ms,
                "pause_ratio": round(st["pause_ms"]["p50"] / bare_ms, 3) if bare_ms else None,
                "epochs_per_s": st["epochs_per_s"],
                "bytes_per_epoch_p50": st["bytes_per_epoch"]["p50"],
                "dirtied_bytes_per_epoch": int(dirtied),
                "encode_ms_p50": st.get("encode_ms", {}).get("p50")}
    finally:
        sc.reset()


def machine() -> dict[str, Any]:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "git_rev": rev.stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--failovers", type=int, default=7)
    ap.add_argument("--skip", default="", help="comma list of: load,failover,series")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/remus-bench")
    work.mkdir(exist_ok=True)
    out: dict[str, Any] = {"machine": machine(), "results": {}}
    with exclusive_lab() as lab:
        try:
            if "load" not in skip:
                log("redis unprotected")
                base = unprotected(lab, a.quick)
                out["unprotected"] = base
                for iv in ("25ms", "50ms", "100ms"):
                    log(f"redis protected at {iv}")
                    r = protected(lab, iv, a.quick, work)
                    r["throughput_ratio"] = round(r["throughput_rps"] / base["throughput_rps"], 3)
                    r["added_latency_p50_ms"] = round(r["latency_p50_ms"] - base["latency_p50_ms"], 2)
                    r["added_over_floor"] = round(r["added_latency_p50_ms"] / r["latency_floor_ms"], 3)
                    out["results"][iv] = r
            save(out)
            if "failover" not in skip:
                out["failover"] = failover_series(lab, 3 if a.quick else a.failovers, work)
                save(out)
            if "series" not in skip:
                out["pause_series"] = pause_series(lab, a.quick, work)
        finally:
            path = save(out)
    report(out)
    plots(out)
    log(f"wrote {path}")
    return 0


def save(out: dict[str, Any]) -> Path:
    """Written after every stage, so a failure later keeps what was measured."""
    path = RESULTS / "latest.json"
    path.write_text(json.dumps(out, indent=2))
    return path


def report(out: dict[str, Any]) -> None:
    base = out.get("unprotected")
    if base:
        print(f"\nunprotected redis: {base['throughput_rps']:.0f} SET/s saturating; "
              f"p50 {base['latency_p50_ms']} ms one in flight")
        print(f"{'epoch':>6} {'tput ratio':>10} {'p50 ms':>7} {'p99 ms':>7} {'added':>6} "
              f"{'floor':>6} {'add/floor':>9} {'pause p50/p99':>14} {'B/epoch':>9} {'cpu p/b':>9}")
        for iv, r in out["results"].items():
            print(f"{iv:>6} {r['throughput_ratio']:>10} {r['latency_p50_ms']:>7} "
                  f"{r['latency_p99_ms']:>7} {r['added_latency_p50_ms']:>6} "
                  f"{r['latency_floor_ms']:>6} {r['added_over_floor']:>9} "
                  f"{r['pause_ms_p50']:>6}/{r['pause_ms_p99']:<7} {r['bytes_per_epoch_p50']:>9.0f} "
                  f"{r['cpu_primary_agent']:>4}/{r['cpu_backup_agent']:<4}")
    fo = out.get("failover")
    if fo and fo["median_s"] is not None:
        print(f"\nfailover: median {fo['median_s'] * 1000:.0f} ms, max {fo['max_s'] * 1000:.0f} ms "
              f"over {fo['runs']} power cuts; acked writes lost {fo['acked_writes_lost']}")
    for r in out.get("pause_series", []):
        if "error" in r:
            print(f"series {r['mib']:>5} MiB dirty {r['dirty_pct_per_50ms']:>2}%: FAILED")
            continue
        print(f"series {r['mib']:>5} MiB dirty {r['dirty_pct_per_50ms']:>2}%: pause p50 "
              f"{r['pause_ms_p50']} ms (bare {r['bare_pause_ms_p50']}), sent "
              f"{r['bytes_per_epoch_p50']:.0f} B/epoch, dirtied {r['dirtied_bytes_per_epoch']}")


def plots(out: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    series = out.get("pause_series") or []
    if series:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for mib in sorted({r["mib"] for r in series}):
            rs = [r for r in series if r["mib"] == mib and "error" not in r]
            x = [r["dirty_pct_per_50ms"] for r in rs]
            a1.plot(x, [r["pause_ms_p50"] for r in rs], "o-", label=f"remus {mib} MiB")
            a1.plot(x, [r["bare_pause_ms_p50"] or 0 for r in rs], "x--", label=f"bare {mib} MiB")
            a2.plot([r["dirtied_bytes_per_epoch"] / 2**20 for r in rs],
                    [r["bytes_per_epoch_p50"] / 2**20 for r in rs], "o-", label=f"{mib} MiB")
        a1.set_xlabel("% of memory dirtied per 50 ms")
        a1.set_ylabel("pause p50 (ms)")
        a1.legend(fontsize=7)
        a2.set_xlabel("MiB dirtied per epoch")
        a2.set_ylabel("MiB sent per epoch")
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "pause_series.png", dpi=100)
    if out.get("results"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ivs = list(out["results"])
        ax.bar(ivs, [out["results"][i]["throughput_ratio"] for i in ivs])
        ax.axhline(0.75, color="red", ls="--", label="target 0.75")
        ax.set_ylabel("throughput protected / unprotected")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "throughput.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
