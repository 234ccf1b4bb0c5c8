"""Rolling statistics for status output (last, p50, p99 over a window)."""

from __future__ import annotations

from collections import deque


class Series:
    """The last `window` samples (and a running total and count of all of them).

    Percentiles are the sample at index int(n * p / 100) of the sorted window
    (clamped to the last): p50 of 1..100 is 51, p99 is 100."""

    def __init__(self, window: int = 2000) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def add(self, v: float) -> None:
        self.values.append(v)
        self.total += v
        self.count += 1

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
