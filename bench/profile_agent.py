"""What an agent does during a measurement window, and where its CPU goes.

Used by bench/run.py:

- `AgentWatch`: wraps one measurement; adds both agents' CPU and statistics of
  the primary's `--trace` rows (epochs, pause, boundary -> sent -> released)
  for the epochs whose boundary fell inside the window.

- `CpuSample` / `cpu_split`: the agent's own CPU (utime+stime: its Python
  threads) apart from its children's (cutime+cstime: the `criu swrk`
  processes it runs and reaps once per epoch; live descendants are counted
  too, so a CRIU call that straddles the end of a window is not lost). CRIU's
  parasite code runs inside the unit and is charged to the unit, not here.
  The unit itself (`remus run` starts it, so it is a live descendant of the
  primary agent) is left out of the children and counted apart: until
  2026-12-01 (run o) "children" included the unit, i.e. redis's own CPU.
- `profile`: `py-spy record --threads -f raw` on a pid for a few seconds, then
  `summarize_raw`: share of samples per thread and the top functions
  (inclusive: a function counts once per sample in which it is anywhere on
  the stack, except functions on every sample of their threads, such as
  thread entry points; self: it is the innermost frame). py-spy skips idle threads by
  default, so shares are of *busy* samples; `cores` is busy samples / (rate x
  duration), i.e. roughly how many cores that thread kept busy.

Run by hand: `python bench/profile_agent.py PID [--seconds 8] [--rate 200]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latency_bench import pct as quantile

TICK = os.sysconf("SC_CLK_TCK")
# "thread (7744): sender" or, for threads py-spy cannot name, "thread (0x7f..)"
THREAD_RE = re.compile(r"^thread \((?P<tid>[^)]*)\)(?::\s*(?P<name>.*))?$")
# "Thread.run (threading.py:982)" or "encode (remus/checkpoint/delta_encoder.py:120)"
FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")
WRAPPER_SHARE = 0.97


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of one process at one moment (from /proc/PID/stat)."""

    own: float  # utime + stime
    children: float  # cutime + cstime (reaped) + live descendants' totals, but the unit's

    @staticmethod
    def of(pid: int, unit: int | None = None) -> CpuSample | None:
        """``unit``: a descendant whose tree is not counted (the protected unit)."""
        own = _stat_cpu(pid)
        if own is None:
            return None
        live = sum(sum(c) for c in (_stat_cpu(k) for k in _descendants(pid, unit))
                   if c is not None)
        return CpuSample(own=own[0] + own[1], children=own[2] + own[3] + live)


def tree_cpu(pid: int | None) -> float | None:
    """utime + stime of pid and its live descendants (the unit), in seconds."""
    if pid is None or (top := _stat_cpu(pid)) is None:
        return None
    kids = (_stat_cpu(k) for k in _descendants(pid))
    return top[0] + top[1] + sum(c[0] + c[1] for c in kids if c is not None)


def cpu_split(before: CpuSample | None, after: CpuSample | None, wall: float) -> dict[str, Any]:
    """Cores used over a window: the agent's own, its children's (CRIU), total."""
    if before is None or after is None or wall <= 0:
        return {"own": None, "children": None, "total": None}
    own = (after.own - before.own) / wall
    # A live descendant counted in `before` that was reaped since moves from
    # "live" to "cutime": the difference stays right. One that exited unreaped
    # between the samples is lost; clamp so that cannot go negative.
    kids = max(0.0, (after.children - before.children) / wall)
    return {"own": round(own, 3), "children": round(kids, 3), "total": round(own + kids, 3)}


def _stat_cpu(pid: int) -> tuple[float, float, float, float] | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # Fields 14-17 of proc(5); f[0] is field 3 (state).
    u, s, cu, cs = (int(x) / TICK for x in f[11:15])
    return u, s, cu, cs


def _descendants(pid: int, skip: int | None = None) -> list[int]:
    """Live descendants of pid, without ``skip`` and its own descendants."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            kids = [k for k in kids if k != skip]
            todo.extend(kids)
            out.extend(kids)
    return out


def py_spy() -> str | None:
    """The py-spy next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def profile(pid: int, seconds: int = 8, rate: int = 200, raw_out: Path | None = None,
            top: int = 10) -> dict[str, Any]:
    """Sample `pid` with py-spy; never raises for a missing or failing py-spy
    (a benchmark must go on without its profile), returns {"error": ...}."""
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy not installed"}
    with tempfile.TemporaryDirectory(prefix="remus-pyspy-") as tmp:
        raw = raw_out or Path(tmp) / "raw.txt"
        # py-spy takes whole seconds only (it panics on "8.0").
        argv = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate),
                "--nonblocking", "-f", "raw", "--threads", "-o", str(raw)]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"error": f"py-spy: {e}"}
        if p.returncode != 0 or not raw.exists():
            return {"error": f"py-spy exited {p.returncode}: {p.stderr.strip()[-300:]}"}
        doc = summarize_raw(raw.read_text(), seconds, rate, top)
    doc["command"] = " ".join(argv[1:])
    if raw_out is not None:
        doc["raw_file"] = str(raw_out)
    return doc


def summarize_raw(text: str, seconds: float, rate: int, top: int = 10) -> dict[str, Any]:
    """Per-thread shares and top functions from py-spy's raw (collapsed) output:
    one line per distinct stack, `thread (..): NAME;frame;...;frame COUNT`,
    outermost frame first."""
    threads: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    seen_in: dict[str, set[str]] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = _thread_name(frames[0])
        funcs = [_func_name(f) for f in (frames[1:] if thread is not None else frames)]
        name = thread or "?"
        threads[name] += n
        total += n
        for f in set(funcs):  # inclusive: once per sample, however deep the recursion
            incl[f] += n
            seen_in.setdefault(f, set()).add(name)
        if funcs:
            self_[funcs[-1]] += n
    # A function on (nearly: py-spy truncates a few stacks) every sample of each
    # thread it runs in (thread start-up, the loop a thread is made of, the CLI
    # entry) only repeats the thread shares; leave it out of the inclusive list.
    for f, names in seen_in.items():
        if incl[f] >= WRAPPER_SHARE * sum(threads[t] for t in names):
            del incl[f]
    ticks = max(seconds * rate, 1)

    def share(c: Counter[str], k: int | None) -> list[dict[str, Any]]:
        return [{"name": name, "samples": n, "share": round(n / total, 3)}
                for name, n in c.most_common(k)] if total else []

    return {
        "seconds": seconds, "rate_hz": rate, "busy_samples": total,
        "threads": [{**d, "cores": round(d["samples"] / ticks, 3)} for d in share(threads, None)],
        "top_inclusive": share(incl, top),
        "top_self": share(self_, top),
    }


def _thread_name(frame: str) -> str | None:
    m = THREAD_RE.match(frame.strip())
    if m is None:
        return None
    return (m.group("name") or "").strip() or f"tid {m.group('tid')}"


def _func_name(frame: str) -> str:
    """`module:function`; the module from py-spy's (shortened) file name."""
    m = FRAME_RE.match(frame.strip())
    if m is None:
        return frame.strip()
    path = m.group("file")
    if "site-packages/" in path:
        path = path.rsplit("site-packages/", 1)[1]
    mod = path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    return f"{mod}:{m.group('func')}"


# -- trace ---------------------------------------------------------------------------------------
def trace_rows(trace: Path, t0: float, t1: float) -> list[dict[str, Any]]:
    """Trace rows (one per acked epoch) whose boundary fell in [t0, t1] (wall)."""
    if not trace.exists():
        return []
    rows = [json.loads(x) for x in trace.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("boundary") and r.get("sent") and t0 <= r["boundary"] <= t1]


def trace_stats(rows: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    if not rows:
        return {"epochs": 0}

    def ms(key_a: str, key_b: str) -> list[float]:
        return [(r[key_b] - r[key_a]) * 1000 for r in rows]

    commit, to_sent, ack = ms("boundary", "released"), ms("boundary", "sent"), ms("sent", "released")
    # Where boundary -> sent goes (rows of older traces lack the marks):
    # CRIU finishing after the cut, waiting for the sender, encoding + streaming.
    staged = [r for r in rows if r.get("dumped") and r.get("send_start")]
    stages = {f"{name}_ms_p50": quantile([(r[b] - r[a]) * 1000 for r in staged], 0.5)
              for name, a, b in (("boundary_to_dumped", "boundary", "dumped"),
                                 ("dumped_to_send_start", "dumped", "send_start"),
                                 ("send_start_to_sent", "send_start", "sent"))} if staged else {}
    # ack_ms split where the trace has the ACK's arrival: the backup's answer,
    # then the release (the kernel re-injects the held packets in that call).
    acked = [r for r in rows if r.get("acked")]
    if acked:
        stages["sent_to_acked_ms_p50"] = quantile([(r["acked"] - r["sent"]) * 1000
                                                   for r in acked], 0.5)
        stages["acked_to_released_ms_p50"] = quantile([(r["released"] - r["acked"]) * 1000
                                                       for r in acked], 0.5)
    pause = [r["pause_ms"] for r in rows if r.get("pause_ms") is not None]
    size = [float(r["bytes"]) for r in rows if r.get("bytes") is not None]
    return {"epochs": len(rows), "epochs_per_s": round(len(rows) / max(t1 - t0, 1e-9), 2),
            "commit_ms_p50": quantile(commit, 0.5), "commit_ms_p90": quantile(commit, 0.9),
            "boundary_to_sent_ms_p50": quantile(to_sent, 0.5), **stages,
            "ack_ms_p50": quantile(ack, 0.5),
            "pause_ms_p50": quantile(pause, 0.5) if pause else None,
            "pause_ms_p99": quantile(pause, 0.99) if pause else None,
            "bytes_per_epoch_p50": quantile(size, 0.5) if size else None}


@dataclass
class AgentWatch:
    """CPU of both agents and the primary's trace over one measurement window."""

    pri_pid: int
    bak_pid: int
    trace: Path
    unit_pid: int | None = None  # left out of the primary's children, reported apart

    def __call__(self, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        c0 = (CpuSample.of(self.pri_pid, self.unit_pid), CpuSample.of(self.bak_pid))
        u0 = tree_cpu(self.unit_pid)
        t0, m0 = time.time(), time.monotonic()
        res = measure()
        c1 = (CpuSample.of(self.pri_pid, self.unit_pid), CpuSample.of(self.bak_pid))
        u1 = tree_cpu(self.unit_pid)
        t1, wall = time.time(), time.monotonic() - m0
        time.sleep(0.3)  # the last epochs of the window are acked (traced) a little later
        pri, bak = cpu_split(c0[0], c1[0], wall), cpu_split(c0[1], c1[1], wall)
        unit = round((u1 - u0) / wall, 3) if u0 is not None and u1 is not None else None
        res["cpu"] = {"primary_own": pri["own"], "primary_children": pri["children"],
                      "primary_total": pri["total"], "backup_total": bak["total"],
                      "unit": unit}
        res["trace"] = trace_stats(trace_rows(self.trace, t0, t1), t0, t1)
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pid", type=int)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rate", type=int, default=200)
    a = ap.parse_args()
    print(json.dumps(profile(a.pid, a.seconds, a.rate), indent=1))


if __name__ == "__main__":
    main()
