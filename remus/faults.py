"""Fault points: a real kill -9 of an agent at an exact step, for the tests.

`REMUS_FAULT=POINT[:N]` in an agent's environment makes it SIGKILL itself the
N-th time (default: the first) it reaches POINT. Nothing else changes: the
agent dies as abruptly as `kill -9` from outside would make it, only at a
moment no outside timing can hit reliably (between a commit and its ACK is a
few microseconds). Unset (always, outside tests), a point costs one
attribute check.

`REMUS_FAULT=POINT:N:stall=SECONDS` instead makes the thread that reaches
POINT the N-th time sleep that long, once: a step as slow as it is with a
huge unit (at primary-dump the unit stays frozen: a 1 GiB epoch's freeze),
at a moment a test knows (it logs "REMUS_FAULT: stalling").

The points (tests/reliability/test_agent_kill.py):

    primary-dump       the unit is frozen and CRIU dumps it (post-dump notify)
    primary-transfer   an epoch's chunks are half sent
    primary-sent       an epoch's END is sent, its ACK not received
    backup-transfer    an epoch's chunks are half received
    backup-received    an epoch is complete and verified, not committed yet
    backup-committed   an epoch is committed, its ACK not sent yet
    backup-apply       a committed epoch is being applied to the images
    backup-restore     a takeover applied and prepared, CRIU not started yet
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

POINTS = ("primary-dump", "primary-transfer", "primary-sent", "backup-transfer",
          "backup-received", "backup-committed", "backup-apply", "backup-restore")


def _parse(spec: str) -> tuple[str, int, float] | None:
    """(point, N, stall seconds; 0: kill) of a REMUS_FAULT value, or None."""
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"REMUS_FAULT: unknown point {name!r} (known: {', '.join(POINTS)})")
    n, _, action = rest.partition(":")
    stall = 0.0
    if action:
        key, _, value = action.partition("=")
        if key != "stall" or float(value or 0) <= 0:
            raise ValueError(f"REMUS_FAULT: unknown action {action!r} (known: stall=SECONDS)")
        stall = float(value)
    return name, int(n or 1), stall


_ARMED = _parse(os.environ.get("REMUS_FAULT", ""))
_count = 0
_lock = threading.Lock()


def point(name: str) -> None:
    """Die here (SIGKILL) if REMUS_FAULT names this point and its count is reached."""
    global _count
    if _ARMED is None or _ARMED[0] != name:
        return
    with _lock:
        _count += 1
        # a kill happens once anyway; a stall only the N-th time, not after it
        if _count < _ARMED[1] or (_ARMED[2] and _count > _ARMED[1]):
            return
    if _ARMED[2]:
        log.warning("REMUS_FAULT: stalling this thread for %.1f s at %s", _ARMED[2], name)
        time.sleep(_ARMED[2])
        return
    log.error("REMUS_FAULT: killing this agent (pid %d) at %s", os.getpid(), name)
    for h in logging.getLogger().handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGKILL)
