"""Request latency under output commit (root; a benchmark, not a test).

One request in flight (`INCR` against redis over one TCP connection, from the
lab's `client` host to the VIP), in five set-ups on the lab's `pri` host:

  plain         redis in the same container (netns, veth, VIP) with no remus
  no-netbuf     `remus run --no-netbuf --interval 50ms`: checkpoint pauses, no buffer
  protected     `remus run` at 25, 50 and 100 ms epochs

Requests are spaced by a random pause, uniform in [0, interval], so they land
at a random phase of the epoch. Expected added latency ("floor") of a request
under protection: it waits for the end of its epoch (interval/2 on average),
the dump (pause p50), then the backup's ACK (ack latency p50). The table
shows p50/p99, the added latency over `plain`, the floor, and added/floor.
Also runs bench/netbuf_bench.py for the buffer's packets/s. Writes
bench/results/latency.json. Takes the lab test lock, so it waits for (and
does not disturb) lab tests. Run:

    .venv/bin/python bench/latency_bench.py [--seconds 15] [--no-netbuf-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remus.errors import HostError  # noqa: E402
from remus.lab import Lab  # noqa: E402
from remus.scenario import SERVERS, Scenario, exclusive_lab  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "latency.json"
WORKDIR = Path("/tmp/remus-latency-bench")
PORT = SERVERS["redis"][1]

# On `client`: closed loop, one INCR in flight, random spacing. Prints JSON
# latencies in ms.
CLIENT = r"""
import json, random, socket, sys, time
host, port, dur, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
REQ = b"*2\r\n$4\r\nINCR\r\n$3\r\nctr\r\n"
sk = socket.create_connection((host, port), timeout=5)
sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sk.settimeout(10)
lat, buf = [], b""
end = time.monotonic() + dur
while time.monotonic() < end:
    t = time.perf_counter()
    sk.sendall(REQ)
    while b"\r\n" not in buf:
        d = sk.recv(4096)
        if not d:
            raise SystemExit("server closed the connection")
        buf += d
    lat.append((time.perf_counter() - t) * 1000)
    buf = buf.split(b"\r\n", 1)[1]
    time.sleep(random.uniform(0, gap))
print(json.dumps(lat))
"""

# On `pri`: the same container `remus run` builds, then redis in it, no remus.
PLAIN = r"""
import os, sys
from remus.container import Container
from remus.unit import UnitSpec
spec = UnitSpec.for_run("kv", sys.argv[1], sys.argv[2])
Container(spec).create(active=True)
os.execvp("nsenter", ["nsenter", "--net=" + spec.netns_path, "--", *sys.argv[3:]])
"""


def reset(sc: Scenario) -> None:
    """Power-cycle the lab hosts. Retried: lab.up() can race with the kernel's
    asynchronous teardown of a deleted netns (its veth peer vanishes late)."""
    try:
        sc.reset()
    except HostError as e:
        print(f"lab reset: {e}; retrying", file=sys.stderr)
        time.sleep(1.0)
        sc.lab.up()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def client_latencies(lab: Lab, seconds: float, gap: float) -> list[float]:
    """Run CLIENT on the lab's `client` host against redis on the VIP for
    `seconds`: one request in flight, a random pause uniform in [0, gap] after
    each reply (so requests land at a random phase of an epoch of length gap).
    Returns the latencies in ms. Also used by bench/run.py (`make bench`)."""
    p = lab.run("client", [sys.executable, "-c", CLIENT, lab.vip_addr, str(PORT),
                           str(seconds), str(gap)], capture_output=True, text=True,
                timeout=seconds + 30)
    if p.returncode != 0:
        raise RuntimeError(f"latency client failed: {p.stderr.strip()}")
    lat: list[float] = json.loads(p.stdout)
    return lat


def measure(sc: Scenario, seconds: float, gap: float) -> list[float]:
    return client_latencies(sc.lab, seconds, gap)


def wait_port(sc: Scenario, timeout: float = 20.0) -> None:
    probe = f"import socket; socket.create_connection(('{sc.lab.vip_addr}', {PORT}), timeout=1)"
    deadline = time.monotonic() + timeout
    while sc.lab.run("client", [sys.executable, "-c", probe], capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise TimeoutError("plain redis did not come up")
        time.sleep(0.2)


def run_plain(lab: Lab, seconds: float) -> dict[str, Any]:
    sc = Scenario(lab, WORKDIR / "plain")
    try:
        argv, _ = SERVERS["redis"]
        sc._spawn("pri", [sys.executable, "-c", PLAIN, lab.vip, lab.dev, *argv], "plain.log")
        wait_port(sc)
        lat = measure(sc, seconds, 0.05)
    finally:
        reset(sc)
    return {"setup": "plain", "interval_ms": None, "latency_ms": lat}


def run_remus(lab: Lab, seconds: float, interval_ms: int, netbuf: bool) -> dict[str, Any]:
    name = f"{'protected' if netbuf else 'no-netbuf'}-{interval_ms}ms"
    trace = WORKDIR / name / "trace.jsonl"
    trace.unlink(missing_ok=True)
    sc = Scenario(lab, WORKDIR / name, interval=f"{interval_ms}ms",
                  extra_primary=["--trace", str(trace)] + ([] if netbuf else ["--no-netbuf"]))
    try:
        sc.start_backup()
        sc.start_primary()
        sc.wait_protected()
        lat = measure(sc, seconds, interval_ms / 1000)
        st = sc.status("pri")
    finally:
        reset(sc)
    assert st is not None
    return {"setup": name, "interval_ms": interval_ms, "latency_ms": lat,
            "pause_ms": st["pause_ms"], "ack_latency_ms": st["ack_latency_ms"],
            "dump_ms": st["dump_ms"], "epochs_per_s": st["epochs_per_s"], "netbuf_on": netbuf,
            "send_ms": send_times(trace),
            "netbuf": {k: st["netbuf"].get(k) for k in ("backend", "released_packets",
                                                          "dropped_packets")}}


def send_times(trace: Path) -> dict[str, float]:
    """From the trace: boundary (unit frozen, output cut) -> checkpoint sent, i.e.
    the rest of the dump plus diffing and streaming the delta."""
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    ms = [(r["sent"] - r["boundary"]) * 1000 for r in rows if r["sent"] and r["boundary"]]
    return {"p50": pct(ms, 0.5), "p99": pct(ms, 0.99)} if ms else {"p50": 0.0, "p99": 0.0}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next(r for r in runs if r["setup"] == "plain")
    b50, b99 = pct(base["latency_ms"], 0.5), pct(base["latency_ms"], 0.99)
    rows = []
    for r in runs:
        lat = r.pop("latency_ms")
        row: dict[str, Any] = {**r, "requests": len(lat), "p50_ms": pct(lat, 0.5),
                               "p99_ms": pct(lat, 0.99), "mean_ms": round(sum(lat) / len(lat), 2)}
        row["added_p50_ms"] = round(row["p50_ms"] - b50, 2)
        row["added_p99_ms"] = round(row["p99_ms"] - b99, 2)
        if r.get("netbuf_on"):
            # The epoch period can exceed --interval when a dump takes longer.
            period = max(r["interval_ms"], 1000 / r["epochs_per_s"] if r["epochs_per_s"] else 0)
            extra = r["pause_ms"]["p50"] + r["ack_latency_ms"]["p50"]
            row["period_ms"] = round(period, 2)
            row["floor_ms"] = round(r["interval_ms"] / 2 + extra, 2)
            row["added_over_floor"] = round(row["added_p50_ms"] / row["floor_ms"], 2)
            row["floor_period_ms"] = round(period / 2 + extra, 2)
            row["added_over_floor_period"] = round(row["added_p50_ms"] / row["floor_period_ms"], 2)
            # The floor leaves out diffing and sending the delta; the model adds it.
            row["model_ms"] = round(period / 2 + extra + r["send_ms"]["p50"], 2)
            row["added_over_model"] = round(row["added_p50_ms"] / row["model_ms"], 2)
        rows.append(row)
    return rows


def netbuf_bench(seconds: float) -> dict[str, Any] | None:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "netbuf_bench.py"), "--seconds",
                        str(seconds)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        print(f"netbuf_bench failed: {p.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    doc: dict[str, Any] = json.loads(p.stdout)
    top = doc["buffered"].get("0", {})
    return {"unbuffered_pps": doc["unbuffered_flood"]["delivered_pps"],
            "buffered_max_pps": top.get("delivered_pps"),
            "us_per_packet": top.get("us_per_packet"),
            "release_ms_by_batch": doc["release_ms_by_batch"], "raw": doc}


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("setup", "setup", "<16"), ("n", "requests", ">5"), ("p50", "p50_ms", ">8.2f"),
            ("p99", "p99_ms", ">8.2f"), ("+p50", "added_p50_ms", ">8.2f"),
            ("+p99", "added_p99_ms", ">8.2f"), ("period", "period_ms", ">8.1f"),
            ("pause", "pause_p50", ">7.2f"), ("send", "send_p50", ">7.2f"),
            ("ack", "ack_p50", ">6.2f"), ("floor", "floor_ms", ">7.2f"),
            ("+/fl", "added_over_floor", ">6.2f"), ("model", "model_ms", ">7.2f"),
            ("+/mod", "added_over_model", ">6.2f")]
    def width(fmt: str) -> str:
        return fmt[1:].split(".")[0]

    head = "".join(f"{title:{fmt[0]}{width(fmt)}}" for title, _, fmt in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        flat = {**r, **{f"{k}_p50": (r.get(f"{k}_ms") or {}).get("p50")
                        for k in ("pause", "send", "ack_latency")}}
        flat["ack_p50"] = flat.pop("ack_latency_p50")
        cells = []
        for _, key, fmt in cols:
            v = flat.get(key)
            cells.append(f"{v:{fmt}}" if v is not None else f"{'-':>{width(fmt)}}")
        lines.append("".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="per set-up")
    ap.add_argument("--no-netbuf-bench", action="store_true", help="skip bench/netbuf_bench.py")
    args = ap.parse_args()
    with exclusive_lab() as lab:
        runs = [run_plain(lab, args.seconds),
                run_remus(lab, args.seconds, 50, netbuf=False),
                *(run_remus(lab, args.seconds, ms, netbuf=True) for ms in (25, 50, 100))]
    rows = summarize(runs)
    print(table(rows))
    out: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": args.seconds,
                           "rows": rows}
    if not args.no_netbuf_bench:
        nb = netbuf_bench(3.0)
        out["netbuf"] = nb
        if nb is not None:
            print(f"\nNFQUEUE buffer: {nb['buffered_max_pps']} packets/s delivered through the "
                  f"buffer at the highest offered rate (unbuffered {nb['unbuffered_pps']}); "
                  f"{nb['us_per_packet']} us of reader CPU per packet")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
