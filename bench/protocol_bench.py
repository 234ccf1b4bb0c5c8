"""Throughput of the replication protocol's framing, without sockets.

Run: `python bench/protocol_bench.py [--mib 256]`. Prints MiB/s of 1 MiB
chunks through the primary's `send_buffers(Chunk)` (frame MAC + epoch
digest), the backup's decoder fed in 64 KiB reads (MAC check + digest), and
both in one thread. The numbers in docs/protocol.md come from here.
"""

from __future__ import annotations

import argparse
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
    n = ap.parse_args().mib
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
    print(f"primary send_buffers(Chunk): {n / send_s:.0f} MiB/s")
    print(f"backup decode, 64 KiB reads: {n / recv_s:.0f} MiB/s")
    print(f"both in one thread: {n / (send_s + recv_s):.0f} MiB/s")


if __name__ == "__main__":
    main()
