"""Rolling statistics for status output (last, p50, p99 over a window), and
cumulative histogram buckets for the metrics (remus.metrics)."""

from __future__ import annotations

import bisect
from collections import deque

# Upper bounds (ms) of the latency histograms: pause, ACK, commit latency.
MS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0)


class Series:
    """The last `window` samples (and a running total and count of all of them).

    Percentiles are the sample at index int(n * p / 100) of the sorted window
    (clamped to the last): p50 of 1..100 is 51, p99 is 100."""

    def __init__(self, window: int = 2000, bounds: tuple[float, ...] | None = None) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0
        # Histogram of every sample (not only the window): counts per bound, the
        # last slot for samples above every bound.
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1) if bounds else []

    def add(self, v: float) -> None:
        self.values.append(v)
        self.total += v
        self.count += 1
        if self.bounds:
            self.buckets[bisect.bisect_left(self.bounds, v)] += 1

    def histogram(self) -> list[tuple[float, int]]:
        """Cumulative (upper bound, count) pairs, +inf last (Prometheus' form)."""
        if not self.bounds:
            return [(float("inf"), self.count)]
        out, acc = [], 0
        for bound, n in zip((*(self.bounds or ()), float("inf")), self.buckets, strict=True):
            acc += n
            out.append((bound, acc))
        return out

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    def pct(self, p: float) -> float | None:
        if not self.values:
            return None
        s = sorted(self.values)
        return s[min(len(s) - 1, int(len(s) * p / 100))]

    def summary(self, digits: int = 2) -> dict[str, float | None]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, digits)

        return {"last": r(self.last), "p50": r(self.pct(50)), "p99": r(self.pct(99)),
                "max": r(max(self.values) if self.values else None)}
