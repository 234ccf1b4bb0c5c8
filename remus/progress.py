"""Progress of long work: a full checkpoint (the first, or a resync) on the wire.

Both agents keep one Progress while a full checkpoint is in transfer: status
shows it (`progress` in `remus status --json`, a line in the table), the
metrics export it, and the agent's log says it every few seconds even
without -v (logger `remus.progress`), so a foreground `remus run` of a large
unit is never silent for minutes. The primary knows the total (the dump's
page files) and gives percent and ETA; the backup learns the total only
from the last record, and gives bytes and rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("remus.progress")

SAY_EVERY_S = 3.0


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


@dataclass
class Progress:
    what: str                  # "full checkpoint to 10.0.0.2:7788", ...
    total: int | None          # bytes, None when unknown
    clock: Callable[[], float] = time.monotonic
    done: int = 0
    started: float = field(default=0.0)
    _said: float = 0.0

    def __post_init__(self) -> None:
        self.started = self._said = self.clock()

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if now - self._said >= SAY_EVERY_S:
            self._said = now
            log.info("%s", self.sentence())

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        pct = eta = None
        if self.total:
            pct = round(min(100.0, 100.0 * self.done / self.total), 1)
            eta = round(max(0.0, self.total - self.done) / rate, 1) if rate > 0 else None
        return {"what": self.what, "done_bytes": self.done, "total_bytes": self.total,
                "percent": pct, "bytes_per_s": round(rate), "eta_s": eta,
                "elapsed_s": round(elapsed, 1)}

    def sentence(self) -> str:
        s = self.snapshot()
        of = f" of {_mib(self.total)} ({s['percent']:.0f} %)" if self.total else ""
        eta = f", about {s['eta_s']:.0f} s left" if s["eta_s"] is not None else ""
        return (f"{self.what}: {_mib(self.done)}{of} in {s['elapsed_s']:.0f} s, "
                f"{_mib(s['bytes_per_s'])}/s{eta}")

    def finish(self) -> None:
        if self.clock() - self.started >= SAY_EVERY_S:
            log.info("%s: done, %s in %.0f s", self.what, _mib(self.done),
                     self.clock() - self.started)
