"""A diagnostic: log when this agent's threads could not run for a while.

Enabled with REMUS_STALL_WATCH_MS=N (off by default). A thread sleeps 10 ms
at a time; when it wakes more than N ms late, it logs how late and where
every other thread of the agent was at that moment. A long hold of the GIL
by one thread (a big bytes copy), a starved core and a stopped process look
different there: the first names the busy thread's line, the others none.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

log = logging.getLogger("remus.stallwatch")

TICK = 0.010


def start_from_env() -> None:
    ms = os.environ.get("REMUS_STALL_WATCH_MS")
    if not ms:
        return
    threading.Thread(target=_watch, args=(float(ms) / 1000,), name="stallwatch",
                     daemon=True).start()


def _watch(limit: float) -> None:
    me = threading.get_ident()
    last = time.monotonic()
    while True:
        time.sleep(TICK)
        now = time.monotonic()
        late = now - last - TICK
        last = now
        if late < limit:
            continue
        names = {t.ident: t.name for t in threading.enumerate()}
        where = []
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            top = traceback.extract_stack(frame, limit=3)
            where.append(f"{names.get(ident, ident)}: " + " < ".join(
                f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(top)))
        log.warning("agent threads did not run for %.0f ms; now: %s", late * 1000,
                    " | ".join(where))
