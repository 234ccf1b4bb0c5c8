"""Pause against pages dirtied with CRIU memory tracking (soft-dirty), in a VM.

This machine's kernel has no soft-dirty, so the series runs inside the VM of
remus/vm.py (Debian's stock kernel, the host's files, an emulated CPU:
absolute times are several times this machine's; compare rows with each
other). For a filler unit of MIB MiB that rewrites PCT % of its pages every
50 ms, protected by `remus run --dirty-tracking soft-dirty` and then by
`--dirty-tracking diff` (full dumps), in the same VM: pause p50, pages CRIU
copied per epoch (`dumped_pages`), bytes sent per epoch, and a bare full
`criu dump --leave-running` of the same process.

    .venv/bin/python bench/softdirty_bench.py [--sizes 16,64] [--pcts 0,1,10,50]

Writes bench/results/softdirty.json. Takes ~1 min per point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = ROOT / "bench" / "results" / "softdirty.json"
SLOW = 8.0  # emulated CPU: timeouts scaled by this


def inside(sizes: list[int], pcts: list[int]) -> list[dict[str, Any]]:
    """Runs in the VM: the series, both modes."""
    from run import one_series_point

    from remus.scenario import exclusive_lab

    rows = []
    with exclusive_lab() as lab:
        for mib in sizes:
            for pct in pcts:
                for mode in ("soft-dirty", "diff"):
                    t0 = time.monotonic()
                    try:
                        r = one_series_point(lab, mib, pct, Path("/tmp/sdb") / mode,
                                             extra=["--dirty-tracking", mode, "--heartbeat", "100ms",
                                                    "--lease", "1500ms", "--takeover-timeout", "3s"],
                                             slow=SLOW)
                    except Exception as e:  # one bad point must not lose the run
                        logs = Path("/tmp/sdb") / mode / f"s{mib}-{pct}"
                        tail = "".join((logs / n).read_text(errors="replace")[-600:]
                                       for n in ("primary.log", "backup.log") if (logs / n).exists())
                        r = {"mib": mib, "dirty_pct_per_50ms": pct, "error": str(e)[:300],
                             "log_tail": tail}
                    r["mode"] = mode
                    r["seconds"] = round(time.monotonic() - t0, 1)
                    print("ROW " + json.dumps(r), flush=True)
                    rows.append(r)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="16,64")
    ap.add_argument("--pcts", default="0,1,10,50")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    pcts = [int(x) for x in a.pcts.split(",")]
    if a.inside:
        inside(sizes, pcts)
        return 0
    from remus.vm import run_in_vm

    rc, out = run_in_vm(f".venv/bin/python bench/softdirty_bench.py --inside --sizes {a.sizes} "
                        f"--pcts {a.pcts}\n", timeout=3600)
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    if not rows:
        sys.stderr.write(out[-4000:])
        return 1
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"kernel": "Debian stock (VM, emulated CPU)", "rows": rows}, indent=2))
    print(f"{'MiB':>4} {'dirty%':>6} {'mode':>10} {'pause p50':>9} {'bare':>7} {'dumped':>7} "
          f"{'of pages':>8} {'sent B/epoch':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['mib']:>4} {r['dirty_pct_per_50ms']:>6} {r['mode']:>10} FAILED {r['error'][:80]}")
            continue
        print(f"{r['mib']:>4} {r['dirty_pct_per_50ms']:>6} {r['mode']:>10} {r['pause_ms_p50']:>9} "
              f"{r['bare_pause_ms_p50']!s:>7} {r['dumped_pages_p50']!s:>7} {r['checkpoint_pages']!s:>8} "
              f"{r['bytes_per_epoch_p50']:>12.0f}")
    print(f"wrote {RESULTS}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
