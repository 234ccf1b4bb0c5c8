"""A unit with a known memory footprint and dirty rate: `filler.py MIB PCT PERIOD [GROW]`.

Maps MIB MiB, touches every page, then every PERIOD seconds rewrites PCT % of
its pages (a moving window, so consecutive rounds dirty different pages).
With GROW (MiB), it maps and fills that much more after 3 s (a unit that
grows while protected), then goes on as before.
"""

import mmap
import sys
import time

mib, pct, period = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
grow = int(sys.argv[4]) if len(sys.argv) > 4 else 0
started = time.monotonic()
extra = None
n = mib * 2**20
pages = n // 4096
# Private anonymous memory, like a heap (MAP_SHARED would be shmem, which CRIU
# copies in full every epoch whatever the tracker says).
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, n, 4096):
    m[i:i + 8] = i.to_bytes(8, "little")
per_round = int(pages * pct / 100)
pos = 0
stamp = 0
while True:
    t0 = time.monotonic()
    if grow and extra is None and t0 - started > 3:
        extra = mmap.mmap(-1, grow * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for i in range(0, len(extra), 4096):
            extra[i:i + 8] = i.to_bytes(8, "little")
    stamp += 1
    word = stamp.to_bytes(8, "little")
    for _ in range(per_round):
        off = (pos % pages) * 4096
        m[off + 8:off + 16] = word
        pos += 1
    time.sleep(max(0.0, period - (time.monotonic() - t0)))
