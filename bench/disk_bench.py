"""Disk delta cost: capture time while frozen and bytes sent, per epoch, vs a full rescan.

A state directory of 64 files x 16 MiB of real (random) data; every epoch a
writer changes about 1 MiB in one of three patterns, then the tracker
captures (in the benchmark nothing runs between the writes and the capture,
which is what a frozen unit looks like to the tracker):

- scattered: 16 writes of 64 KiB at random block-aligned offsets of random files
- one file: 1 MiB contiguous at a random offset of one file
- append: 1 MiB appended to a log file

    .venv/bin/python bench/disk_bench.py [--dir /var/tmp/remus-disk-bench] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from remus.checkpoint.disk_track import DiskTracker

MiB = 1 << 20


def build(root: Path, files: int, size: int) -> None:
    root.mkdir(parents=True)
    chunk = os.urandom(MiB)
    for i in range(files):
        with open(root / f"data{i:02d}", "wb") as f:
            for k in range(size // MiB):
                f.write(chunk[k:] + chunk[:k])  # distinct blocks, cheap to make
    (root / "log").write_bytes(b"")


def writers(root: Path, files: int, size: int, rnd: random.Random) -> dict[str, Callable[[], None]]:
    def pwrite(name: str, off: int, n: int) -> None:
        fd = os.open(root / name, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(n), off)
        finally:
            os.close(fd)

    def scattered() -> None:
        for _ in range(16):
            pwrite(f"data{rnd.randrange(files):02d}", rnd.randrange(size // 65536) * 65536, 65536)

    def one_file() -> None:
        pwrite(f"data{rnd.randrange(files):02d}", rnd.randrange(size // MiB - 1) * MiB, MiB)

    def append() -> None:
        with open(root / "log", "ab") as f:
            f.write(os.urandom(MiB))

    return {"scattered": scattered, "one file": one_file, "append": append}


def run(root: Path, epochs: int, files: int, size: int) -> dict[str, object]:
    rnd = random.Random(1)
    tracker = DiskTracker([root], spool_dir=root.parent)
    tracker.start()
    t0 = time.perf_counter()
    tracker.capture(full=True).close()
    full = {"capture_ms": round((time.perf_counter() - t0) * 1e3, 1),
            "bytes": tracker.stats.bytes}
    out: dict[str, object] = {"tree_bytes": files * size, "full": full}
    for name, write in writers(root, files, size, rnd).items():
        ms, sent, hashed = [], [], []
        for _ in range(epochs):
            write()
            delta = tracker.capture()
            ms.append(tracker.stats.capture_ms)
            sent.append(tracker.stats.bytes)
            hashed.append(tracker.stats.bytes_hashed)
            for _chunk in delta.chunks():
                pass
        out[name] = {
            "capture_ms_p50": round(statistics.median(ms), 2),
            "capture_ms_max": round(max(ms), 2),
            "sent_bytes_mean": int(statistics.mean(sent)),
            "read_bytes_mean": int(statistics.mean(hashed)),
        }
    tracker.reset()  # what a new generation (or an overflow) costs
    t0 = time.perf_counter()
    tracker.capture().close()
    out["rescan_after_reset"] = {"capture_ms": round((time.perf_counter() - t0) * 1e3, 1),
                                 "bytes": tracker.stats.bytes}
    tracker.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/remus-disk-bench"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--file-mib", type=int, default=16)
    args = ap.parse_args()
    root = args.dir / "state"
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        build(root, args.files, args.file_mib * MiB)
        print(json.dumps(run(root, args.epochs, args.files, args.file_mib * MiB), indent=2))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
