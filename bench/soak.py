"""`make soak`: >= 100 random power cuts of a protected server, one summary.

Run: `python bench/soak.py [--cuts 100] [--seed N] [--out bench/results/soak.json]`.
Each cut: redis, memcached or redis with an fsync'd AOF in a replicated state
directory (drawn at random), a client writing over one connection, pri's
power cut at a random moment (remus.soak). Exit status 1 if any cut lost an
acknowledged write, a connection, or its takeover.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remus.scenario import exclusive_lab  # noqa: E402
from remus.soak import soak  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="remus-soak-") as tmp, exclusive_lab() as lab:
        doc = soak(lab, Path(tmp), args.cuts, args.seed, out=args.out)
    s = doc["summary"]["all"]
    print(f"\n{s['cuts']} cuts: {s['acknowledged_writes']} acknowledged writes, lost {s['lost']}; "
          f"connections kept {s['connections_kept']}/{s['cuts']}; taken over "
          f"{s['taken_over']}/{s['cuts']}; gap median {s['gap_median_s']} s, p99 "
          f"{s['gap_p99_s']} s, max {s['gap_max_s']} s; failed cuts {doc['failed_cuts']}"
          f"\nwritten to {args.out}")
    return 1 if doc["failed_cuts"] else 0


if __name__ == "__main__":
    sys.exit(main())
