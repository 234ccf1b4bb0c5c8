"""Pause per epoch: remus's dump vs a bare `criu dump --leave-running`, same process.

Run inside a lab host (the unit's container needs the host's uplink):
    ./bin/remus lab up
    ./bin/remus lab exec pri -- .venv/bin/python bench/pause_bench.py [--rounds 20]

For each unit size it starts a process in a remus container (own netns, PID
namespace), then alternates: one dump the way the primary agent does it (CRIU
RPC with pre/post-dump notifications, network lock skipped, tcp-established)
and one bare CLI `criu dump --leave-running` with the same options. It
reports the frozen time CRIU itself measures (stats-dump: freezing + frozen)
and the wall time of the call, and the ratio remus/bare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remus.cgroup import UnitCgroup  # noqa: E402
from remus.checkpoint.criu import Criu, read_dump_stats  # noqa: E402
from remus.container import Container  # noqa: E402
from remus.paths import criu_binary  # noqa: E402
from remus.unit import UnitSpec, start_unit  # noqa: E402

FILLER = ("import mmap,time,sys\n"
          "n=int(sys.argv[1])*1024*1024\n"
          "m=mmap.mmap(-1,n)\n"
          "for i in range(0,n,4096): m[i:i+8]=i.to_bytes(8,'little')\n"
          "while True: time.sleep(1)\n")


def bare_dump(netns: str, pid: int, d: Path) -> tuple[float, float]:
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["nsenter", f"--net={netns}", criu_binary() or "criu", "dump", "-t", str(pid),
                    "-D", str(d), "--leave-running", "--tcp-established", "--skip-in-flight",
                    "--network-lock", "skip", "--ext-unix-sk", "--file-locks",
                    "--manage-cgroups=ignore", "-v0", "-o", "dump.log"], check=True)
    wall = (time.perf_counter() - t0) * 1000
    st = read_dump_stats(d)
    return (st.get("freezing_time", 0) + st.get("frozen_time", 0)) / 1000, wall


def remus_dump(criu: Criu, pid: int, d: Path) -> tuple[float, float]:
    res = criu.dump(pid, d, notify=lambda _s: None)
    return res.freezing_ms + res.frozen_ms, res.wall_ms


def one_size(mib: int, rounds: int, root: Path) -> dict[str, object]:
    spec = UnitSpec.for_run(f"pb{mib}", "10.77.0.200/24", "eth0")
    c = Container(spec)
    c.create(active=False)
    cg = UnitCgroup(spec.name)
    argv = [sys.executable, "-c", FILLER, str(mib)] if mib else ["redis-server", "--save", "",
                                                                   "--port", "6390"]
    wrapper, pid = start_unit(spec, argv, cg)
    time.sleep(1.0 + mib / 200)
    criu = Criu(netns=spec.netns_path)
    r_p, b_p, r_w, b_w = [], [], [], []
    try:
        for i in range(rounds):
            for kind in ("remus", "bare"):
                d = root / f"{kind}-{mib}-{i}"
                if kind == "remus":
                    p, w = remus_dump(criu, pid, d)
                    r_p.append(p)
                    r_w.append(w)
                else:
                    p, w = bare_dump(spec.netns_path, pid, d)
                    b_p.append(p)
                    b_w.append(w)
                shutil.rmtree(d)
    finally:
        subprocess.run(["kill", "-9", str(pid)])
        wrapper.wait()
        c.remove()
        cg.remove()
    med = statistics.median
    return {"unit": f"{mib} MiB filler" if mib else "redis-server idle",
            "remus_pause_ms_p50": round(med(r_p), 2), "bare_pause_ms_p50": round(med(b_p), 2),
            "pause_ratio": round(med(r_p) / med(b_p), 3),
            "remus_wall_ms_p50": round(med(r_w), 2), "bare_wall_ms_p50": round(med(b_w), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sizes", default="0,16,128", help="MiB; 0 = idle redis-server")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    root = Path("/dev/shm/remus-pause-bench")
    root.mkdir(exist_ok=True)
    rows = [one_size(int(s), a.rounds, root) for s in a.sizes.split(",")]
    shutil.rmtree(root, ignore_errors=True)
    for r in rows:
        print(f"{r['unit']:<20} pause p50 remus {r['remus_pause_ms_p50']:7.2f} ms  bare "
              f"{r['bare_pause_ms_p50']:7.2f} ms  ratio {r['pause_ratio']:.3f}   wall remus "
              f"{r['remus_wall_ms_p50']:.1f} ms bare {r['bare_wall_ms_p50']:.1f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
