"""`make bench` output: the tables printed at the end and the PNG plots.

Reads the dict that bench/run.py writes to bench/results/latest.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def config(level: dict[str, Any]) -> str:
    return f"{level['clients']}x{level['pipeline']}"


def report(out: dict[str, Any]) -> None:
    base = out.get("unprotected")
    if base and out["results"]:
        report_load(base, out["results"])
    prof = out.get("profile_50ms")
    if prof:
        report_profile(prof)
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
    if out.get("pause_series") or out.get("connection_series"):
        report_split(out)


SPLIT = ("freezing_ms", "memory_ms", "sockets_ms", "other_fds_ms", "post_dump_ms", "thaw_ms",
         "rest_ms")


def report_split(out: dict[str, Any]) -> None:
    """Where the pause goes (ms, p50 per part; CRIU stats with our patch 0005)."""
    print("\nwhere the pause goes, p50 ms: " + " / ".join(k.removesuffix("_ms") for k in SPLIT)
          + " (sockets: count x us each)")
    rows = [(f"{r['mib']} MiB dirty {r['dirty_pct_per_50ms']}% {r.get('dirty_tracking', '')}",
             r.get("frozen_split_ms_p50")) for r in out.get("pause_series", []) if "error" not in r]
    rows += [(f"redis, {r['connections']} idle connections", r.get("frozen_split_ms_p50"))
             for r in (out.get("connection_series") or {}).get("rows", [])]
    for label, sp in rows:
        if not sp:
            print(f"  {label:<34} -")
            continue
        parts = " / ".join(f"{sp.get(k, 0):.1f}" for k in SPLIT)
        print(f"  {label:<34} {parts}  ({sp.get('sockets', 0):.0f} x {sp.get('us_per_socket', 0):.0f} us)")


def _k(x: float | None) -> str:
    return "-" if x is None else f"{x / 1000:.0f}k"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else f"{x:{fmt}}"


def report_load(base: dict[str, Any], results: dict[str, Any]) -> None:
    lv = ", ".join(f"{config(r)} {_k(r['rps'])}{'' if r['saturated'] else ' (NOT saturated)'}"
                   for r in base["levels"])
    print(f"\nunprotected redis: peak {_k(base['peak_rps'])} SET/s at {base['peak_config']} "
          f"(levels: {lv}); one in flight p50 {base['latency_p50_ms']} ms, p99 {base['latency_p99_ms']} ms")
    print("\nthroughput, SET/s. ratio = protected / unprotected; 'peak' = best over the in-flight "
          "sweep (throughput_ratio, the headline); 'fixed' = 200x32 only")
    print(f"{'epoch':>6} {'fixed':>6} {'ratio':>6} {'peak':>6} {'at':>9} {'RATIO':>6} "
          f"{'p50/p99 ms':>13} {'ep/s':>5} {'commit p50/90':>14} {'pause':>6} {'B/ep':>6} "
          f"{'cpu own+criu/bak':>17}   (! = a level failed: peak over the rest)")
    ok = {iv: r for iv, r in results.items() if "error" not in r}
    for iv, r in results.items():
        if iv not in ok:
            print(f"{iv:>6} FAILED: {r['error'][-200:]}")
            continue
        print(f"{iv:>6} {_k(r['throughput_rps_fixed_load']):>6} "
              f"{_f(r['throughput_ratio_fixed_load'], '.3f'):>6} "
              f"{_k(r['peak_rps']):>6} {str(r['peak_config']):>9} {_f(r['throughput_ratio'], '.3f'):>6}"
              f"{' ' if r['all_levels_done'] else '!'}"
              f"{_f(r['peak_p50_ms'], '.0f'):>6}/{_f(r['peak_p99_ms'], '.0f'):<6} "
              f"{_f(r['epochs_per_s'], '.1f'):>5} "
              f"{_f(r['commit_ms_p50'], '.0f'):>6}/{_f(r['commit_ms_p90'], '.0f'):<7} "
              f"{_f(r['pause_ms_p50'], '.1f'):>6} "
              f"{_k(r['bytes_per_epoch_p50']):>6} "
              f"{_f(r['cpu_primary_agent_own'])}+{_f(r['cpu_primary_agent_children'])}"
              f"/{_f(r['cpu_backup_agent'])}")
    print("\nlatency, one request in flight at a random phase (ms). floor = interval/2 + pause + ack; "
          "+xfer: boundary->sent instead of pause; dump/period: share of time inbound may be held")
    print(f"{'epoch':>6} {'p50':>7} {'p99':>7} {'added':>7} {'floor':>7} {'add/fl':>7} "
          f"{'fl+xfer':>8} {'add/fl+x':>8} {'period':>7} {'dump/period':>11} {'cpu own+criu':>13}")
    for iv, r in ok.items():
        ph = r["latency_phase"]
        print(f"{iv:>6} {r['latency_p50_ms']:>7.2f} {r['latency_p99_ms']:>7.2f} "
              f"{r['added_latency_p50_ms']:>7.2f} {r['latency_floor_ms']:>7.2f} "
              f"{r['added_over_floor']:>7.2f} {_f(r['latency_floor_incl_transfer_ms']):>8} "
              f"{_f(r['added_over_floor_incl_transfer']):>8} {_f(ph['period_ms'], '.1f'):>7} "
              f"{_f(ph['dump_wall_over_period']):>11} "
              f"{_f(ph['cpu']['primary_own'])}+{_f(ph['cpu']['primary_children'])}")


def report_profile(prof: dict[str, Any]) -> None:
    if "error" in prof:
        print(f"\nprofile of the primary agent at 50 ms: {prof['error']}")
        return
    d = prof.get("during", {})
    print(f"\nprofile of the primary agent at 50 ms, {d.get('config')} ({_k(d.get('rps'))} SET/s "
          f"while sampled), {prof['busy_samples']} busy samples over {prof['seconds']} s:")
    print("  threads: " + ", ".join(f"{t['name']} {t['share']:.0%} ({t['cores']} cores)"
                                    for t in prof["threads"]))
    for key in ("top_inclusive", "top_self"):
        print(f"  {key.replace('_', ' ')}: " + ", ".join(f"{f['name']} {f['share']:.0%}"
                                                       for f in prof[key]))


# -- plots --------------------------------------------------------------------------------------
def plots(out: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    series = out.get("pause_series") or []
    if series:
        plot_series(plt, series)
    ok = {iv: r for iv, r in (out.get("results") or {}).items() if "error" not in r}
    if ok and out.get("unprotected"):
        plot_load(plt, out["unprotected"], ok)


def plot_series(plt: Any, series: list[dict[str, Any]]) -> None:
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


def plot_load(plt: Any, base: dict[str, Any], results: dict[str, Any]) -> None:
    ivs = list(results)
    x = list(range(len(ivs)))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar([i - 0.2 for i in x], [results[i]["throughput_ratio_fixed_load"] or 0 for i in ivs], 0.4,
           label="fixed load 200x32")
    a1.bar([i + 0.2 for i in x], [results[i]["throughput_ratio"] or 0 for i in ivs], 0.4,
           label="peak over the sweep (headline)")
    a1.set_xticks(x, ivs)
    a1.axhline(0.75, color="red", ls="--", label="target 0.75")
    a1.set_ylabel("throughput protected / unprotected")
    a1.legend(fontsize=7)
    for name, levels in [("unprotected", base["levels"])] + [(i, results[i]["levels"]) for i in ivs]:
        done = [r for r in levels if r["rps"] is not None]
        a2.plot([r["inflight"] for r in done], [r["rps"] / 1000 for r in done], "o-", label=name)
    a2.set_xscale("log")
    a2.set_yscale("log")  # protected rates are ~1/10 of unprotected: keep both readable
    a2.set_xlabel("requests in flight (connections x pipeline)")
    a2.set_ylabel("k SET/s")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=100)

    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.27
    ax.bar([i - w for i in x], [results[i]["added_latency_p50_ms"] for i in ivs], w,
           label="added p50 (measured)")
    ax.bar(x, [results[i]["latency_floor_ms"] for i in ivs], w, label="floor: iv/2+pause+ack")
    ax.bar([i + w for i in x], [results[i]["latency_floor_incl_transfer_ms"] or 0 for i in ivs], w,
           label="floor incl. transfer")
    ax.set_xticks(x, ivs)
    ax.set_ylabel("ms, one request in flight, random phase")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "latency.png", dpi=100)
