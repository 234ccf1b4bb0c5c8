"""Throughput of the replication protocol's framing, without sockets.

Run: `python bench/protocol_bench.py [--mib 256] [--json F]`. Prints MiB/s
and ms per GiB of 1 MiB chunks through the primary's `send_buffers(Chunk)`
(AES-256-GCM seal + epoch digest), the backup's decoder fed in 64 KiB reads
(open + digest), and both in one thread; side by side in the same run, for
scale: HMAC-SHA256 over the same bytes (what frame version 1, authenticated
but readable, paid per frame) and a plain copy. The numbers in
docs/protocol.md come from here.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remus.protocol import NEED_DATA, BackupConnection, PrimaryConnection  # noqa: E402
from remus.protocol import messages as m  # noqa: E402

PSK = os.urandom(32)
CHUNK = 1 << 20
READ = 64 << 10


def pair() -> tuple[PrimaryConnection, BackupConnection]:
    p = PrimaryConnection(PSK, "bench", 1, {})
    b = BackupConnection(PSK)
    b.receive_data(p.start())
    assert b.next_event() is not NEED_DATA
    p.receive_data(b.welcome())
    assert p.next_event() is not NEED_DATA
    return p, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = ap.parse_args()
    n = args.mib
    data = os.urandom(CHUNK)
    p, b = pair()
    p.send(m.EpochBegin(generation=1, epoch=0, base_epoch=-1, full=True))
    t0 = time.perf_counter()
    for _ in range(n):
        p.send_buffers(m.Chunk(epoch=0, kind=2, name="pagemap-1.img", meta=b"", data=data))
    send_s = time.perf_counter() - t0
    p2, b2 = pair()
    begin = p2.send(m.EpochBegin(generation=1, epoch=0, base_epoch=-1, full=True))
    b2.receive_data(begin)
    b2.next_event()
    body = b"".join(b"".join(p2.send_buffers(m.Chunk(epoch=0, kind=2, name="pagemap-1.img",
                                                         meta=b"", data=data))) for _ in range(n))
    t0 = time.perf_counter()
    for off in range(0, len(body), READ):
        b2.receive_data(body[off:off + READ])
        while b2.next_event() is not NEED_DATA:
            pass
    recv_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    key = os.urandom(32)
    for _ in range(n):
        hmac.new(key, data, hashlib.sha256).digest()
    hmac_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        bytearray(data)
    copy_s = time.perf_counter() - t0
    rows = {
        "primary send_buffers(Chunk): seal + digest": send_s,
        "backup decode, 64 KiB reads: open + digest": recv_s,
        "both ends in one thread": send_s + recv_s,
        "reference: HMAC-SHA256 only (frame version 1's tag)": hmac_s,
        "reference: one copy of the bytes": copy_s,
    }
    out = {}
    for what, secs in rows.items():
        out[what] = {"mib_per_s": round(n / secs), "ms_per_gib": round(secs / n * 1024 * 1000, 1)}
        print(f"{what}: {n / secs:.0f} MiB/s, {secs / n * 1024 * 1000:.0f} ms per GiB")
    if args.json:
        args.json.write_text(json.dumps({"mib": n, "chunk": CHUNK, "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
