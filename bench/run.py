"""`make bench`: remus side by side with the unprotected service, in one run.

Runs in the lab on this machine:
  1. redis-server unprotected (same container, no agent), then protected at
     25, 50 and 100 ms:
     - latency with one request in flight at a random phase of the epoch
       (bench/latency_bench.py's client), against the floor
       interval/2 + pause + ack;
     - throughput (redis-benchmark SET) at a sweep of in-flight levels
       (connections x pipeline): the fixed load 200x32 and the peak over the
       sweep; per level p50/p99, epochs/s, commit latency (epoch boundary to
       output released, from `--trace`) and the primary agent's CPU split into
       its own threads and its CRIU children;
     - at 50 ms, a py-spy profile of the primary agent while it runs the level
       that reached the peak (`profile_50ms`).
  2. failover: power cuts of pri at a random moment under a one-connection
     client: power cut -> first reply on the same connection (median of N),
     and the backup's takeover timeline (bench/failover_bench.py's runs).
  3. pause scaling: a unit of 16/128/1024 MiB, idle and dirtying 1/10/50 % of
     its memory per epoch: remus pause vs a bare `criu dump --leave-running`
     of the same process, and bytes sent per epoch vs bytes dirtied.
Writes bench/results/latest.json (with the machine, git revision and a
`definitions` block explaining the fields) and PNG plots next to it, and
prints tables.  `--quick` for a short smoke run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from failover_bench import one_run as fo_one_run  # noqa: E402
from failover_bench import report as fo_report  # noqa: E402
from latency_bench import client_latencies  # noqa: E402
from latency_bench import pct as quantile  # noqa: E402
from profile_agent import AgentWatch, profile  # noqa: E402
from report import config, plots, report  # noqa: E402

from remus.lab import Lab  # noqa: E402
from remus.powercut import SEED as FAILOVER_SEED  # noqa: E402
from remus.scenario import SERVERS, Scenario, exclusive_lab  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PY = sys.executable
FILLER = ROOT / "bench" / "filler.py"
FIXED_LOAD = (200, 32)  # connections x pipeline of the historical `throughput_ratio`
SATURATION_TOLERANCE = 0.15  # an unprotected level within 15 % of the peak saturates redis

DEFINITIONS = {
    "throughput_ratio": "HEADLINE: protected peak SET/s / unprotected peak SET/s, each the best "
                        "over the same sweep of in-flight levels (connections x pipeline), "
                        "each level the best of the plan's repeats (rps_runs: all of them).",
    "throughput_ratio_fixed_load": "protected / unprotected SET/s at the one load 200x32 (6,400 in "
                                   "flight); protected it is bound by in-flight / commit latency.",
    "levels": "one redis-benchmark -t set -r 100000 run per level; unprotected levels record "
              "rps_over_peak and saturated (within 15 % of the unprotected peak).",
    "latency_p50_ms": "one INCR in flight, a pause uniform in [0, interval] after each reply: "
                      "requests land at a random phase of the epoch (bench/latency_bench.py).",
    "latency_floor_ms": "interval/2 + pause p50 + ack p50 (ack: END sent -> output released), "
                        "from the trace rows of the latency phase.",
    "latency_floor_incl_transfer_ms": "interval/2 + (boundary -> END sent) p50 + ack p50. The "
                                      "boundary is CRIU's post-dump point (memory already copied, "
                                      "output cut), so this replaces the pause by what follows the "
                                      "cut: end of the dump, diff, compression, streaming.",
    "added_over_floor": "(protected p50 - unprotected p50) / floor; _incl_transfer: same with "
                        "the transfer-inclusive floor.",
    "commit_ms": "epoch boundary -> that epoch's output released (`remus run --trace`); in a "
                 "level's trace, sent_to_acked / acked_to_released split the ack: END sent -> "
                 "ACK arrived -> release returned (the kernel re-injects the held packets in it).",
    "cpu": "cores used in a window: primary own = agent utime+stime (its threads), children = "
           "its CRIU processes (cutime+cstime and live descendants but the unit); backup = "
           "total; unit = the protected unit's tree. CRIU's parasite code runs in (and is "
           "charged to) the unit. Before run o (2026-12-01) children included the unit.",
    "profile_50ms": "py-spy on the primary agent during a re-run of the 50 ms peak level: share of "
                    "busy samples per thread, top module:function inclusive and self.",
    "failover": "median_s/max_s: power cut of pri (at a seeded random moment) -> the client's "
                "first reply after it on the same TCP connection, default timings (heartbeat "
                "50 ms, lease 200 ms, takeover timeout 300 ms); gap_median_s: last reply before "
                "-> first after; timeline: the backup's takeover steps (detect, apply, "
                "address_up, restore, first_reply = restored -> first reply).",
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


@dataclass(frozen=True)
class Plan:
    """How long and how wide the load measurements are."""

    levels: tuple[tuple[int, int], ...]
    level_seconds: float  # target duration of one redis-benchmark run
    latency_seconds: float
    profile_seconds: int = 8
    # Runs per level, the best kept (the same for the unprotected and every
    # protected sweep). One run was a poor estimate on this shared host: eight
    # back-to-back 1000x100 runs of one unprotected redis gave 1.38M to 2.32M
    # SET/s, rising over the first runs.
    repeats: int = 1

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(levels=((200, 32), (1000, 100)), level_seconds=3.0, latency_seconds=6.0)
        # 1000x200: protected, a closed-loop client gets one round per epoch (its
        # replies wait for the commit), so 1000x100 bounds it by in-flight, not
        # by the server (measured: 1000x100 487k, 1000x200 661k, 1000x400 627k
        # SET/s at 50 ms); more connections instead cost freeze time per socket
        # (2000x100 505k, 4000x50 365k). Unprotected is measured at it too.
        return Plan(levels=((200, 32), (500, 64), (1000, 100), (1000, 200)), level_seconds=8.0,
                    latency_seconds=15.0, repeats=3)


# -- load -------------------------------------------------------------------------------------
def bench_argv(lab: Lab, clients: int, pipeline: int, n: int) -> list[str]:
    return ["redis-benchmark", "-h", lab.vip_addr, "-p", "6379", "-c", str(clients),
            "-P", str(pipeline), "-n", str(n), "-t", "set", "--csv", "-r", "100000"]


def parse_bench(stdout: str, stderr: str) -> dict[str, float]:
    rows = list(csv.reader(io.StringIO(stdout)))
    if len(rows) < 2:
        raise RuntimeError(f"redis-benchmark failed: {stdout[-500:]} {stderr[-500:]}")
    d = dict(zip(rows[0], rows[1], strict=False))
    return {"rps": float(d["rps"]), "p50_ms": float(d.get("p50_latency_ms", "nan")),
            "p99_ms": float(d.get("p99_latency_ms", "nan"))}


def requests_for(inflight: int, est_rps: float, seconds: float) -> int:
    # At least 5 full rounds of the in-flight window, so connection set-up and
    # the pipeline's ramp are a small part of the run.
    return int(max(est_rps * seconds, 5 * inflight))


def run_level(lab: Lab, clients: int, pipeline: int, est_rps: float, seconds: float) -> dict[str, Any]:
    n = requests_for(clients * pipeline, est_rps, seconds)
    t0 = time.monotonic()
    p = lab.run("client", bench_argv(lab, clients, pipeline, n), capture_output=True, text=True,
                timeout=max(60.0, 5 * n / max(est_rps, 1.0)))
    wall = time.monotonic() - t0
    r = parse_bench(p.stdout, p.stderr)
    return {"clients": clients, "pipeline": pipeline, "inflight": clients * pipeline,
            "requests": n, "wall_s": round(wall, 2), **r}


Probe = Callable[[Callable[[], dict[str, Any]]], dict[str, Any]]


def sweep(lab: Lab, plan: Plan, est_rps: float, probe: Probe | None = None) -> list[dict[str, Any]]:
    """plan.repeats runs per in-flight level, the best kept (its SET/s and those of
    every run in `rps_runs`); `probe` wraps each run to add what the agents did
    meanwhile (CPU, trace statistics)."""
    levels = []
    for clients, pipeline in plan.levels:
        def one(c: int = clients, p: int = pipeline, e: float = est_rps) -> dict[str, Any]:
            return run_level(lab, c, p, e, plan.level_seconds)

        try:
            runs = [probe(one) if probe else one() for _ in range(plan.repeats)]
            r = {**max(runs, key=lambda x: float(x["rps"])),
                 "rps_runs": [round(x["rps"]) for x in runs]}
        except (subprocess.TimeoutExpired, RuntimeError) as e:
            # Typically protection ended (e.g. a takeover on a starved machine):
            # the next levels would only time out too.
            why = (f"redis-benchmark timed out after {e.timeout:.0f} s"
                   if isinstance(e, subprocess.TimeoutExpired) else str(e)[-300:])
            log(f"  {clients}x{pipeline}: FAILED: {why}")
            levels.append({"clients": clients, "pipeline": pipeline, "inflight": clients * pipeline,
                           "rps": None, "error": why})
            break
        log(f"  {clients}x{pipeline}: {r['rps']:.0f} SET/s (runs {r['rps_runs']}), p50 {r['p50_ms']} ms, "
            f"p99 {r['p99_ms']} ms")
        levels.append(r)
        # The next level takes the best rate seen so far as its estimate; sizing
        # runs by rate keeps each near plan.level_seconds.
        est_rps = max(est_rps, r["rps"])
    return levels


def peak(levels: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in levels if r["rps"] is not None]
    if not done:
        raise RuntimeError(f"no load level completed: {levels[-1].get('error')}")
    return max(done, key=lambda r: float(r["rps"]))


def fixed_rps(levels: list[dict[str, Any]]) -> float | None:
    return next((r["rps"] for r in levels if (r["clients"], r["pipeline"]) == FIXED_LOAD), None)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def latency(lab: Lab, seconds: float, gap: float) -> dict[str, Any]:
    lat = client_latencies(lab, seconds, gap)
    if not lat:
        raise RuntimeError("latency client got no replies")
    return {"latency_p50_ms": quantile(lat, 0.5), "latency_p99_ms": quantile(lat, 0.99),
            "latency_mean_ms": round(sum(lat) / len(lat), 2), "latency_requests": len(lat)}


# -- the set-ups --------------------------------------------------------------------------------
def unprotected(lab: Lab, plan: Plan) -> dict[str, Any]:
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
        # Random spacing up to 50 ms, like latency_bench's `plain`: without an
        # epoch the phase does not matter, the pauses only keep the rate low.
        res = latency(lab, plan.latency_seconds, 0.05)
        levels = sweep(lab, plan, est_rps=500_000)
    finally:
        p.stdin.close()
        p.wait(10)
        lab.run("client", ["ip", "neigh", "flush", "dev", lab.dev])
    top = peak(levels)
    for r in levels:
        r["rps_over_peak"] = ratio(r["rps"], top["rps"])
        r["saturated"] = (r["rps_over_peak"] or 0) >= 1 - SATURATION_TOLERANCE
        if not r["saturated"]:
            log(f"  WARNING: unprotected {r['clients']}x{r['pipeline']} reached only "
                f"{r['rps_over_peak']:.0%} of the unprotected peak: this level does not saturate redis")
    return {**res, "levels": levels, "peak_rps": top["rps"], "peak_config": config(top),
            "throughput_rps": top["rps"], "throughput_rps_fixed_load": fixed_rps(levels),
            "all_levels_saturate": all(r["saturated"] for r in levels)}


def protected(lab: Lab, interval: str, plan: Plan, work: Path, with_profile: bool) -> dict[str, Any]:
    wd = work / f"p{interval}"
    trace = wd / "trace.jsonl"
    trace.unlink(missing_ok=True)
    sc = Scenario(lab, wd, interval=interval, extra_primary=["--trace", str(trace)])
    try:
        pri, bak = start_agents(sc)
        watch = AgentWatch(int(pri["pid"]), int(bak["pid"]), trace,
                           unit_pid=int(pri["unit_pid"]) if pri.get("unit_pid") else None)
        iv_s = float(interval.rstrip("ms")) / 1000
        lat = watch(lambda: latency(lab, plan.latency_seconds, iv_s))
        st = sc.status("pri")
        assert st
        lat["status"] = {k: st[k]["p50"] for k in ("pause_ms", "dump_ms", "encode_ms",
                                                     "ack_latency_ms")}
        levels = sweep(lab, plan, est_rps=40_000, probe=watch)
        prof = None
        if with_profile:
            st = sc.status("pri")
            prof = (safe_profile(lab, peak(levels), int(pri["pid"]), plan, wd / "py-spy.raw")
                    if st and st.get("protected") and "error" not in levels[-1] else
                    {"error": "skipped: protection ended during the sweep (see its levels)"})
    finally:
        sc.reset()
    res = summarize_protected(iv_s * 1000, lat, levels)
    if prof is not None:
        res["profile"] = prof
    return res


def start_agents(sc: Scenario, tries: int = 2) -> tuple[dict[str, Any], dict[str, Any]]:
    """Backup, then primary; their status once protecting. One retry after a
    power cycle: on this shared machine an agent now and then fails to come up
    (its exit status is logged) and one bad start must not lose the run."""
    for attempt in range(1, tries + 1):
        t0 = time.monotonic()
        sc.start_backup()
        time.sleep(0.3)
        sc.start_primary()
        try:
            # Generous: this machine is shared, and before the backup applied a
            # heavy run's redo backlog in the background it took ~20 s to listen.
            sc.wait_protected(timeout=90)
        except TimeoutError as e:
            codes = [p.poll() for p in sc.procs]  # backup, primary (None: still running)
            log(f"  agents did not start (attempt {attempt}; exit codes {codes}): {str(e)[:160]}")
            if attempt == tries:
                raise
            sc.reset()
            continue
        pri, bak = sc.status("pri"), sc.status("bak")
        if pri and bak:
            log(f"  protecting after {time.monotonic() - t0:.1f} s")
            return pri, bak
    raise RuntimeError("agents did not report status")


def summarize_protected(iv_ms: float, lat: dict[str, Any], levels: list[dict[str, Any]]) -> dict[str, Any]:
    # With no level done (protection ended at once) keep the latency phase.
    top: dict[str, Any] = peak(levels) if any(r["rps"] is not None for r in levels) else {
        "rps": None, "clients": 0, "pipeline": 0, "p50_ms": None, "p99_ms": None, "trace": {},
        "cpu": {"primary_own": None, "primary_children": None, "primary_total": None,
                "backup_total": None, "unit": None}}
    tr, ltr = top["trace"], lat["trace"]
    # Floor terms from the latency phase's own epochs; status (a window over the
    # whole run) only if the trace has nothing.
    pause = ltr.get("pause_ms_p50") or lat["status"]["pause_ms"]
    ack = ltr.get("ack_ms_p50") or lat["status"]["ack_latency_ms"]
    floor = iv_ms / 2 + pause + ack
    to_sent = ltr.get("boundary_to_sent_ms_p50")
    eps = ltr.get("epochs_per_s")
    period = round(1000 / eps, 2) if eps else None
    return {
        "throughput_rps": top["rps"], "peak_rps": top["rps"],
        "peak_config": config(top) if top["rps"] is not None else None,
        "peak_p50_ms": top["p50_ms"], "peak_p99_ms": top["p99_ms"],
        "throughput_rps_fixed_load": fixed_rps(levels), "levels": levels,
        "all_levels_done": all(r["rps"] is not None for r in levels),
        "latency_p50_ms": lat["latency_p50_ms"], "latency_p99_ms": lat["latency_p99_ms"],
        "latency_requests": lat["latency_requests"],
        "latency_phase": {"trace": ltr, "cpu": lat["cpu"], "status_p50": lat["status"],
                          "period_ms": period, "dump_wall_over_period": (
                              round(lat["status"]["dump_ms"] / period, 3)
                              if period and lat["status"]["dump_ms"] else None)},
        "latency_floor_ms": round(floor, 2),
        "latency_floor_incl_transfer_ms": (round(iv_ms / 2 + to_sent + ack, 2)
                                           if to_sent is not None else None),
        "pause_ms_p50": tr.get("pause_ms_p50"), "pause_ms_p99": tr.get("pause_ms_p99"),
        "ack_ms_p50": tr.get("ack_ms_p50"), "commit_ms_p50": tr.get("commit_ms_p50"),
        "commit_ms_p90": tr.get("commit_ms_p90"), "epochs_per_s": tr.get("epochs_per_s"),
        "bytes_per_epoch_p50": tr.get("bytes_per_epoch_p50"),
        "cpu_primary_agent_own": top["cpu"]["primary_own"],
        "cpu_primary_agent_children": top["cpu"]["primary_children"],
        "cpu_primary_agent": top["cpu"]["primary_total"],
        "cpu_backup_agent": top["cpu"]["backup_total"],
        "cpu_unit": top["cpu"].get("unit"),
    }


def safe_profile(lab: Lab, level: dict[str, Any], pid: int, plan: Plan, raw: Path) -> dict[str, Any]:
    try:
        return profiled_run(lab, level, pid, plan, raw)
    except Exception as e:  # the profile is an extra: losing it must not lose the run
        why = (f"redis-benchmark timed out after {e.timeout:.0f} s"
               if isinstance(e, subprocess.TimeoutExpired) else str(e)[:300])
        log(f"  profile failed: {why}")
        return {"error": why}


def profiled_run(lab: Lab, level: dict[str, Any], pid: int, plan: Plan, raw: Path) -> dict[str, Any]:
    """Re-run the peak level with py-spy on the primary agent for plan.profile_seconds
    (started once the benchmark's connections are up). The rate during the
    profile is recorded: py-spy takes CPU on this 2-core machine too."""
    lead_in = 1.5
    n = requests_for(level["inflight"], level["rps"], plan.profile_seconds + 2 * lead_in + 1)
    start = time.monotonic()
    p = lab.popen("client", bench_argv(lab, level["clients"], level["pipeline"], n),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(lead_in)
        t0 = time.monotonic()
        prof = profile(pid, plan.profile_seconds, 200, raw)
        spy_s = time.monotonic() - t0
        out, err = p.communicate(timeout=120 + 6 * n / max(level["rps"], 1.0))
        bench_s = time.monotonic() - start
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    r: dict[str, Any]
    try:
        r = parse_bench(out, err)
    except RuntimeError as e:
        r = {"error": str(e)[:300]}
    prof["during"] = {"config": config(level), "requests": n, "py_spy_wall_s": round(spy_s, 2),
                      "bench_wall_s": round(bench_s, 2), **r}
    return prof


def failover_series(lab: Lab, n: int, work: Path) -> dict[str, Any]:
    """n power cuts, measured like bench/failover_bench.py (power cut -> first
    reply on the same connection, the backup's takeover timeline per step)."""
    runs = []
    for i in range(n):
        rng = random.Random(f"{FAILOVER_SEED}-bench-{i}")
        rec = fo_one_run(lab, work / f"fo{i}", "redis", "50ms", rng, "random")
        runs.append(rec)
        ms = rec["failover_s"] * 1000 if rec["failover_s"] is not None else float("nan")
        log(f"failover {i}: power cut -> first reply {ms:.0f} ms, missing {rec['missing']}, "
            f"survived {rec['connection_survived']}"
            f"{'' if rec['ok'] else ', FAILED: ' + str(rec['error'])}")
    summary = fo_report(runs)
    return {"runs": n, "ok": summary["ok"], "median_s": summary["failover_median_s"],
            "max_s": summary["failover_max_s"], "all_s": summary["failover_all_s"],
            "gap_median_s": summary["gap_median_s"], "timeline": summary["timeline"],
            "acked_writes_lost": sum(r["missing"] for r in runs),
            "connections_survived": sum(bool(r["connection_survived"]) for r in runs)}


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
            log(f"{mib} MiB dirty {pct}% ({r['dirty_tracking']}): pause {r['pause_ms_p50']} ms "
                f"vs bare {r['bare_pause_ms_p50']} ms; sent {r['bytes_per_epoch_p50']} B/epoch vs "
                f"dirtied {r['dirtied_bytes_per_epoch']} B/epoch")
    # The same points with full dumps and the page diff, side by side in this run
    # (what a host without soft-dirty or uffd-wp gets).
    for mib in sizes[:2]:
        for pct in (0, 1):
            try:
                r = one_series_point(lab, mib, pct, work, extra=["--dirty-tracking", "diff"])
            except Exception as e:
                log(f"{mib} MiB dirty {pct}% (diff): FAILED: {e}")
                rows.append({"mib": mib, "dirty_pct_per_50ms": pct, "dirty_tracking": "diff",
                             "error": str(e)[:500]})
                continue
            rows.append(r)
            log(f"{mib} MiB dirty {pct}% (diff): pause {r['pause_ms_p50']} ms")
    return rows


def one_series_point(lab: Lab, mib: int, pct: int, work: Path, extra: list[str] | None = None,
                     slow: float = 1.0) -> dict[str, Any]:
    """One unit size and dirty rate. `extra`: more `remus run` options; `slow`:
    how much slower than this machine the host is (an emulated VM), for timeouts."""
    sc = Scenario(lab, work / f"s{mib}-{pct}", server="filler",
                  command=[PY, str(FILLER), str(mib), str(pct), "0.05"],
                  extra_primary=list(extra or []), status_timeout=5.0 * slow)
    blog = sc.workdir / "backup.log"
    seen = blog.stat().st_size if blog.exists() else 0  # the log of earlier runs here
    try:
        sc.start_backup()
        time.sleep(0.3)
        agent = sc.start_primary()
        sc.wait_protected(timeout=(60 + mib / 10) * slow)
        time.sleep(3)
        st = sc.status("pri")
        assert st
        # Stop protection (the unit keeps running) so the bare dumps do not race the agent's.
        lab.run("pri", [PY, "-m", "remus.cli", "stop"], capture_output=True, cwd=str(ROOT))
        # The stop ends with the dump in hand; a backup that missed the primary's
        # Bye would take over a takeover timeout later (seen at 1 GiB).
        try:
            agent.wait(60 * slow)
        except subprocess.TimeoutExpired:
            pass  # (fenced, the agent became the backup's backup: said below)
        time.sleep(1.0 * slow)
        # A takeover during the measurement or the stop fails the point, even
        # when the status above was taken before it.
        with open(blog, "rb") as f:
            f.seek(seen)
            took = [ln for ln in f.read().decode(errors="replace").splitlines()
                    if "taking over" in ln]
        if took:
            raise RuntimeError(f"the backup took over: {took[0][-160:]}")
        if agent.poll() is None:
            raise RuntimeError("the primary agent did not end within 60 s of `remus stop`")
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
                "encode_ms_p50": st.get("encode_ms", {}).get("p50"),
                "dirty_tracking": st.get("dirty_tracking"),
                "dumped_pages_p50": (st.get("dumped_pages") or {}).get("p50"),
                "uffd_wp": st.get("uffd_wp"),
                "frozen_split_ms_p50": st.get("frozen_split"),
                "checkpoint_pages": int((st.get("checkpoint_bytes") or 0) / 4096) or None}
    finally:
        sc.reset()


# Opens N connections to the service and keeps them open, idle.
IDLE_CLIENT = ("import socket, sys, time\n"
               "conns = [socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
               "         for _ in range(int(sys.argv[3]))]\n"
               "print('ready', flush=True)\n"
               "time.sleep(3600)\n")


def split_p50(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Per-part median of the traced epochs' pause splits (DumpResult.split)."""
    splits = [r["split"] for r in rows if r.get("split")]
    if not splits:
        return None
    return {k: round(statistics.median(s[k] for s in splits), 3) for k in splits[0]}


def connection_series(lab: Lab, work: Path, counts: tuple[int, ...] = (0, 20, 500, 1000)
                      ) -> dict[str, Any]:
    """Pause per epoch of a protected, idle redis against the number of idle TCP
    connections to it (one protection run; per-epoch pauses from --trace)."""
    trace = work / "conns-trace.jsonl"
    trace.unlink(missing_ok=True)
    sc = Scenario(lab, work / "conns", extra_primary=["--trace", str(trace)])
    rows: list[dict[str, Any]] = []
    try:
        sc.start_backup()
        time.sleep(0.3)
        sc.start_primary()
        sc.wait_protected(timeout=60)
        for n in counts:
            p = None
            if n:
                p = lab.popen("client", [PY, "-c", IDLE_CLIENT, lab.vip_addr, str(sc.port), str(n)],
                              stdout=subprocess.PIPE, text=True)
                assert p.stdout is not None
                if not p.stdout.readline().startswith("ready"):
                    raise RuntimeError(f"{n} idle connections could not be opened")
            time.sleep(1.0)
            start = time.time()
            time.sleep(5.0)
            rows_n = [json.loads(line) for line in trace.read_text().splitlines() if line]
            window = [r for r in rows_n
                      if r.get("boundary") and r["boundary"] > start and r.get("pause_ms")]
            pauses = sorted(r["pause_ms"] for r in window)
            st = sc.status("pri") or {}
            rows.append({"connections": n, "epochs": len(pauses),
                         "pause_ms_p50": statistics.median(pauses) if pauses else None,
                         "frozen_split_ms_p50": split_p50(window),
                         "dirty_tracking": st.get("dirty_tracking")})
            log(f"{n} idle connections: pause p50 {rows[-1]['pause_ms_p50']} ms "
                f"over {len(pauses)} epochs")
            if p is not None:
                p.kill()
                p.wait()
            time.sleep(1.0)
    finally:
        sc.reset()
    base = rows[0]["pause_ms_p50"] if rows and rows[0]["pause_ms_p50"] is not None else None
    for r in rows[1:]:
        if base is not None and r["pause_ms_p50"] is not None:
            r["us_per_connection"] = round((r["pause_ms_p50"] - base) / r["connections"] * 1000, 1)
    return {"rows": rows}


def machine() -> dict[str, Any]:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "git_rev": rev.stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def load_stage(lab: Lab, plan: Plan, work: Path, out: dict[str, Any]) -> None:
    log("redis unprotected")
    base = unprotected(lab, plan)
    out["unprotected"] = base
    save(out)
    for iv in ("25ms", "50ms", "100ms"):
        log(f"redis protected at {iv}")
        try:
            r = protected(lab, iv, plan, work, with_profile=iv == "50ms")
        except Exception as e:  # one failed set-up must not lose the others
            log(f"protected at {iv}: FAILED: {e}")
            out["results"][iv] = {"error": str(e)[-500:]}
            continue
        if "profile" in r:
            out["profile_50ms"] = r.pop("profile")
        compare(r, base)
        out["results"][iv] = r
        save(out)


def compare(r: dict[str, Any], base: dict[str, Any]) -> None:
    """Add the protected-vs-unprotected ratios to a protected result `r`."""
    by_cfg = {config(b): b["rps"] for b in base["levels"]}
    for lv in r["levels"]:
        lv["ratio_same_level"] = ratio(lv["rps"], by_cfg.get(config(lv)))
    r["throughput_ratio"] = ratio(r["peak_rps"], base["peak_rps"])
    r["throughput_ratio_fixed_load"] = ratio(r["throughput_rps_fixed_load"],
                                             base["throughput_rps_fixed_load"])
    added = r["latency_p50_ms"] - base["latency_p50_ms"]
    r["added_latency_p50_ms"] = round(added, 2)
    r["added_over_floor"] = round(added / r["latency_floor_ms"], 3)
    r["added_over_floor_incl_transfer"] = ratio(added, r["latency_floor_incl_transfer_ms"])



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--failovers", type=int, default=7)
    ap.add_argument("--skip", default="",
                    help="comma list of: load,failover,series,connections")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    plan = Plan.make(a.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/remus-bench")
    work.mkdir(exist_ok=True)
    out: dict[str, Any] = {"machine": machine(), "quick": a.quick, "definitions": DEFINITIONS,
                           "results": {}}
    with exclusive_lab() as lab:
        try:
            if "load" not in skip:
                load_stage(lab, plan, work, out)
            if "failover" not in skip:
                out["failover"] = failover_series(lab, 3 if a.quick else a.failovers, work)
                save(out)
            if "series" not in skip:
                out["pause_series"] = pause_series(lab, a.quick, work)
                save(out)
            if "connections" not in skip:
                out["connection_series"] = connection_series(lab, work)
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


# -- report -------------------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
