"""Time windows for the lab tests, relative to what the same run measured.

A test asserts what it is about (output held until the backup has it, replies
in order, one active copy, epochs follow the interval), never how fast this
machine is. Where it needs a time window, the window comes from the run's own
measurements (the primary's ACK latency, a rate measured a moment before), so a
slower or busier machine gets a wider window instead of a failure. Absolute
numbers (latency, pause, epochs/s, failover time) belong to `make bench`
(bench/run.py). Fixed bounds that remain in the tests only catch hangs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

# A released packet crossing the lab's veths to the client, plus the skew of
# the test's own time.time() stamps around a signal or an iptables call.
HOP_S = 0.1


def ack_latency_p99_s(status: dict[str, Any]) -> float:
    """The primary's ACK latency p99 in seconds (epoch sent -> its ACK handled and its
    output released), from a `remus status --json` of the primary."""
    v = (status.get("ack_latency_ms") or {}).get("p99")
    return float(v or 0.0) / 1000


def release_grace_s(status: dict[str, Any]) -> float:
    """How long after the backup stops acknowledging (SIGSTOP, a partition) output
    may still reach a client: an ACK already on its way is handled and its epoch
    released. HOP_S plus the ACK latency p99 this run measured (`status` is the
    primary's, taken just before)."""
    return HOP_S + ack_latency_p99_s(status)


def rate(times: Iterable[float], start: float, end: float) -> float:
    """Events per second among `times` in [start, end); 0 for an empty window."""
    if end <= start:
        return 0.0
    return sum(1 for t in times if start <= t < end) / (end - start)


def wait_for(probe: Callable[[], T], timeout: float, every: float = 0.1) -> T:
    """Call `probe` until it returns something true or `timeout` s have passed (a
    bound that only catches hangs: it returns as soon as the condition holds);
    the last value either way."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)
