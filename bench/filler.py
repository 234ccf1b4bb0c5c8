"""A unit with a known memory footprint and dirty rate: `filler.py MIB PCT PERIOD`.

Maps MIB MiB, touches every page, then every PERIOD seconds rewrites PCT % of
its pages (a moving window, so consecutive rounds dirty different pages).
"""

import mmap
import sys
import time

mib, pct, period = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
n = mib * 2**20
pages = n // 4096
m = mmap.mmap(-1, n)
for i in range(0, n, 4096):
    m[i:i + 8] = i.to_bytes(8, "little")
per_round = int(pages * pct / 100)
pos = 0
stamp = 0
while True:
    t0 = time.monotonic()
    stamp += 1
    word = stamp.to_bytes(8, "little")
    for _ in range(per_round):
        off = (pos % pages) * 4096
        m[off + 8:off + 16] = word
        pos += 1
    time.sleep(max(0.0, period - (time.monotonic() - t0)))
