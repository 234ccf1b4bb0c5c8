"""Is `--compress` (lz4 page deltas) worth it? Same redis load, with and without.

`python bench/compress_bench.py [--seconds 8]` (takes the lab lock; lab left down).
Reports bytes on the wire per epoch, encode time per epoch and acked epochs/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from remus.lab import Lab  # noqa: E402
from remus.scenario import Scenario, exclusive_lab  # noqa: E402


def one(lab: Lab, compress: bool, seconds: float) -> dict[str, object]:
    extra = ["--compress"] if compress else ["--no-compress"]
    sc = Scenario(lab, Path(f"/tmp/remus-compress-{int(compress)}"), extra_primary=extra)
    try:
        sc.start_backup()
        time.sleep(0.3)
        sc.start_primary()
        sc.wait_protected()
        c = sc.start_client(seconds, "c.json", inflight=32)
        sc.wait_client(c, "c.json", timeout=seconds + 60)
        st = sc.status("pri")
        assert st
        return {"compress": compress, "bytes_per_epoch_p50": st["bytes_per_epoch"]["p50"],
                "bytes_per_s": st["bytes_per_s"], "encode_ms_p50": st["encode_ms"]["p50"],
                "ack_ms_p50": st["ack_latency_ms"]["p50"], "epochs_per_s": st["epochs_per_s"]}
    finally:
        sc.reset()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    a = ap.parse_args()
    with exclusive_lab() as lab:
        rows = [one(lab, False, a.seconds), one(lab, True, a.seconds)]
    for r in rows:
        print(json.dumps(r))
    out = ROOT / "bench" / "results" / "compress.json"
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
