"""Benchmark memory deltas: encode time, bytes sent, store apply time.

    python bench/delta_bench.py                 # synthetic dumps: 16 MiB, 128 MiB, 1 GiB
    python bench/delta_bench.py --sizes 16,128  # MiB
    python bench/delta_bench.py --real          # real CRIU dumps (root): idle and dirtying

Synthetic: one pagemap of random pages on tmpfs (/dev/shm); the second dump
changes 1% of the pages in place, the third also drops the first 64 pages
(a VMA vanished, so every later page shifts in the pages file). Times are
the best of --repeat runs.

Real: a python process in its own PID namespace holding --rss MiB, dumped
with criu --leave-running every epoch while idle, then while it dirties
--dirty MiB per epoch; prints bytes sent per epoch against RSS and D.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remus import paths  # noqa: E402
from remus.checkpoint import images, pagemap  # noqa: E402
from remus.checkpoint.delta_encoder import DeltaEncoder  # noqa: E402
from remus.checkpoint.store import CheckpointStore  # noqa: E402

PAGE = images.PAGE_SIZE
MiB = 1 << 20


def write_synthetic(d: Path, layout: np.ndarray, words: np.ndarray) -> None:
    d.mkdir()
    pagemap.write_pagemap_image(d, "pagemap-1.img", 1, layout, words.tobytes())
    (d / "core-1.img").write_bytes(b"core" * 1000)
    (d / "inventory.img").write_bytes(b"inv")


def synthetic(size_mib: int, repeat: int, root: Path) -> None:
    n = size_mib * MiB // PAGE
    rng = np.random.default_rng(size_mib)
    words = rng.integers(0, 2**63, (n, PAGE // 8), dtype=np.uint64)
    layout = (np.uint64(0x7F00_0000_0000) + np.arange(n, dtype=np.uint64) * np.uint64(PAGE))
    base = root / f"s{size_mib}"
    base.mkdir()
    d0, d1, d2 = base / "d0", base / "d1", base / "d2"
    write_synthetic(d0, layout, words)
    changed = rng.choice(n, n // 100, replace=False)
    words[changed, 3] ^= np.uint64(1)
    write_synthetic(d1, layout, words)
    write_synthetic(d2, layout[64:], words[64:])
    del words

    def timed(prev: Path | None, cur: Path) -> tuple[float, DeltaEncoder]:
        enc = DeltaEncoder()
        return min(_encode_once(enc, prev, cur) for _ in range(repeat)), enc

    t_full, _ = timed(None, d0)
    t_same, _ = timed(d0, d0)
    t_delta, e1 = timed(d0, d1)
    t_shift, _ = timed(d1, d2)
    t_apply_inplace, t_apply_shift = store_apply(base, d0, d1, d2)
    gib = size_mib / 1024
    print(
        f"{size_mib:6d} MiB | full {t_full * 1e3:7.1f} ms | unchanged {t_same * 1e3:7.1f} ms "
        f"({t_same / gib:.2f} s/GiB) | 1% changed {t_delta * 1e3:7.1f} ms "
        f"({e1.stats.pages_changed} pages, {e1.stats.page_bytes / MiB:.1f} MiB) | "
        f"shifted {t_shift * 1e3:7.1f} ms | apply in place {t_apply_inplace * 1e3:6.1f} ms, "
        f"new layout {t_apply_shift * 1e3:6.1f} ms"
    )
    shutil.rmtree(base)


def _encode_once(enc: DeltaEncoder, prev: Path | None, cur: Path) -> float:
    # re-prime the base each time: encode() adopts cur as the next base
    if prev is not None:
        enc.reset()
        for _ in enc.encode(prev, True):
            pass
    t = time.perf_counter()
    for _ in enc.encode(cur, prev is None):
        pass
    return time.perf_counter() - t


def store_apply(base: Path, *dumps: Path) -> tuple[float, float]:
    """Apply times of dumps[1] (in place) and dumps[2] (new layout) on a store."""
    store = CheckpointStore(base / "store")
    store.recover()
    enc = DeltaEncoder()
    times = []
    for epoch, d in enumerate(dumps):
        staged = store.begin(1, epoch, epoch - 1, epoch == 0)
        for chunk in enc.encode(d, epoch == 0):
            staged.add(*chunk)
        staged.commit()
        t = time.perf_counter()
        store.apply_pending()
        times.append(time.perf_counter() - t)
    return times[1], times[2]


# ---- real CRIU dumps -------------------------------------------------------

UNIT = r"""
import os, sys, time
buf = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
d, dirty = sys.argv[2], int(sys.argv[3]) << 20
n = 0
while True:
    if os.path.exists(d + "/go%d" % n):
        if dirty:
            off = (n * dirty) % len(buf)
            for i in range(off, min(off + dirty, len(buf)), 4096):
                buf[i] = (buf[i] + 1) % 256
        n += 1
        open(d + "/done%d" % (n - 1), "w").close()
    time.sleep(0.002)
"""


def real(rss: int, dirty: int, epochs: int, root: Path) -> None:
    criu = paths.criu_binary()
    assert criu, "CRIU is not built"
    for mode, d_mib in (("idle", 0), ("dirty", dirty)):
        ctl = root / f"ctl-{mode}"
        ctl.mkdir()
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "setsid", "python3", "-c", UNIT, str(rss), str(ctl),
             str(d_mib)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        init = 0
        try:
            init = _child(proc.pid)
            time.sleep(0.5)
            enc = DeltaEncoder()
            prev: Path | None = None
            rows = []
            for e in range(epochs):
                if e:
                    (ctl / f"go{e - 1}").touch()
                    while not (ctl / f"done{e - 1}").exists():
                        time.sleep(0.002)
                d = root / f"{mode}{e}"
                d.mkdir()
                subprocess.run(
                    [criu, "dump", "-t", str(init), "-D", str(d), "--leave-running",
                     "--shell-job", "-v0"], check=True,
                )
                for _ in enc.encode(d, prev is None):
                    pass
                s = enc.stats
                rows.append((s.image_bytes, s.page_bytes, s.file_bytes, s.seconds))
                if prev is not None:
                    shutil.rmtree(prev)
                prev = d
            status = Path(f"/proc/{init}/status").read_text()
            vmrss = next(ln for ln in status.splitlines() if ln.startswith("VmRSS"))
            print(f"{mode}: {vmrss.split(':')[1].strip()} RSS, D = {d_mib} MiB per epoch")
            for e, (img, pg, fb, sec) in enumerate(rows):
                print(
                    f"  epoch {e}: pages image {img / MiB:7.1f} MiB, sent pages "
                    f"{pg / 1024:9.1f} KiB + files {fb / 1024:6.1f} KiB, encode {sec * 1e3:6.1f} ms"
                )
        finally:
            if init:
                os.kill(init, signal.SIGKILL)
            proc.kill()
            proc.wait(timeout=10)


def _child(pid: int) -> int:
    for _ in range(1000):
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.01)
    raise RuntimeError("unit did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="16,128,1024", help="MiB, comma separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="real CRIU dumps (root)")
    ap.add_argument("--rss", type=int, default=64, help="MiB held by the real unit")
    ap.add_argument("--dirty", type=int, default=4, help="MiB dirtied per epoch")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="remus-delta-bench-", dir="/dev/shm"))
    try:
        if args.real:
            real(args.rss, args.dirty, args.epochs, root)
        else:
            for size in (int(s) for s in args.sizes.split(",")):
                synthetic(size, args.repeat, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
