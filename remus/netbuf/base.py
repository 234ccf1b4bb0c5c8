"""The output buffer: holds the unit's network output until its epoch is acked.

Epoch numbering, as the primary drives it:

    epoch e runs ........ hold_inbound(True) → freeze → begin_epoch(e+1)
    → dump e → thaw → hold_inbound(False) ........ ACK(e) → release(e)

Every packet the unit sent before begin_epoch(e+1) carries a tag <= e; every
packet read after it carries e+1 or more. Tagging a packet later than the
epoch that produced it is always safe (it is released later, never earlier).

Backends: nfqueue.NfqueueBuffer (netfilter queue, the default), plug.PlugBuffer
(sch_plug + IFB, where the kernel has it), NullBuffer (no guarantee).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any

from remus.stats import Series

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKETS = 10_000
DEFAULT_MAX_BYTES = 64 << 20


class OutputBuffer(ABC):
    """Holds a unit's outbound packets per epoch; releases them by epoch.

    Threads: start/close come from one owner thread; begin_epoch, release,
    hold_inbound and counters may be called from any thread, concurrently with
    each other and with the backend's own reader. None of them blocks on
    packet traffic.
    """

    name = "abstract"

    @abstractmethod
    def start(self) -> None:
        """Install the kernel rules, bind queues and start any reader.

        From return on, every outbound packet of the unit is held (tagged with
        the current epoch, initially 0). Raises HostError if the kernel lacks
        the mechanism or the interface is missing; on error nothing is left
        installed."""

    @abstractmethod
    def begin_epoch(self, epoch: int) -> None:
        """Mark the boundary: packets read from now on are tagged `epoch`.

        Called while the unit is frozen, so it must be quick. `epoch` must be
        greater than the current epoch (ValueError otherwise)."""

    @abstractmethod
    def release(self, through_epoch: int) -> None:
        """Let out, in order, every held outbound packet tagged <= through_epoch.

        Idempotent: releasing an epoch at or below the last released one does
        nothing. Releasing the running epoch (>= current) would let out output
        of state no backup has; it is logged as an error and clamped to
        current - 1. Does not wait for the reader thread."""

    @abstractmethod
    def hold_inbound(self, on: bool) -> None:
        """While on, packets towards the unit are held (not dropped); turning it
        off lets them in, in order. Idempotent in both directions."""

    @abstractmethod
    def counters(self) -> dict[str, Any]:
        """A snapshot: held_packets, held_bytes, released_packets, released_bytes,
        dropped_packets, dropped_bytes, inbound_held, inbound_passed,
        current_epoch, released_epoch, release_latency_ms {last, p50, p99},
        backend, guarantee. Cheap enough to call on every status request."""

    @abstractmethod
    def close(self, release_all: bool = False) -> None:
        """Remove every rule/qdisc this buffer installed and stop its reader.

        release_all=True lets every held packet out first (the unit keeps
        running unprotected); False drops them (they belong to state that may
        die). Safe to call twice, and after a failed start()."""

    def __enter__(self) -> OutputBuffer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(release_all=False)


# -- pieces shared by the backends --------------------------------------------

LATENCY_WINDOW = 1024  # release latencies kept for counters()


def latency_summary(window: Series) -> dict[str, float | None]:
    """release_latency_ms of counters(): last, p50 and p99 of the window, in ms."""
    s = window.summary(4)
    return {k: s[k] for k in ("last", "p50", "p99")}


@dataclass
class Span:
    """A run of consecutive held packets with one epoch tag."""

    epoch: int
    last_id: int
    packets: int
    nbytes: int


class EpochLedger:
    """Which held packet ids belong to which epoch; bounded. Not thread-safe:
    the owner serialises calls (a lock held only for these O(1) operations).

    Packet ids must arrive increasing (NFQUEUE ids are per-queue sequence
    numbers), so one span per epoch is enough: releasing epoch e means
    "everything up to the last id of the newest span tagged <= e"."""

    def __init__(self, max_packets: int = DEFAULT_MAX_PACKETS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_packets < 1 or max_bytes < 1:
            raise ValueError("buffer limits must be positive")
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.current = 0
        self.released = -1
        self.spans: deque[Span] = deque()
        self.held_packets = 0
        self.held_bytes = 0

    def boundary(self, epoch: int) -> None:
        if epoch <= self.current:
            raise ValueError(f"begin_epoch({epoch}) does not advance epoch {self.current}")
        self.current = epoch

    def admit(self, packet_id: int, length: int) -> bool:
        """Tag a packet with the current epoch; False if it would exceed a limit
        (the caller drops it; it is not recorded)."""
        if (self.held_packets + 1 > self.max_packets
                or self.held_bytes + length > self.max_bytes):
            return False
        last = self.spans[-1] if self.spans else None
        if last is not None and last.epoch == self.current:
            last.last_id = packet_id
            last.packets += 1
            last.nbytes += length
        else:
            self.spans.append(Span(self.current, packet_id, 1, length))
        self.held_packets += 1
        self.held_bytes += length
        return True

    def clamp(self, through_epoch: int) -> int:
        """The epoch release() may really use (never the running one)."""
        if through_epoch >= self.current:
            log.error("release(%d) asked while epoch %d is running; releasing through %d only",
                      through_epoch, self.current, self.current - 1)
            return self.current - 1
        return through_epoch

    def take_through(self, epoch: int) -> Span | None:
        """Forget every span tagged <= epoch; return their union (last id, totals),
        or None if nothing was held for those epochs."""
        if epoch > self.released:
            self.released = epoch
        out: Span | None = None
        while self.spans and self.spans[0].epoch <= epoch:
            s = self.spans.popleft()
            if out is None:
                out = Span(s.epoch, s.last_id, s.packets, s.nbytes)
            else:
                out.epoch, out.last_id = s.epoch, s.last_id
                out.packets += s.packets
                out.nbytes += s.nbytes
        if out is not None:
            self.held_packets -= out.packets
            self.held_bytes -= out.nbytes
        return out

    def take_all(self) -> Span | None:
        return self.take_through(self.spans[-1].epoch) if self.spans else None


class NullBuffer(OutputBuffer):
    """No buffering at all: output leaves at once. For --no-netbuf measurements
    only; counters() reports guarantee: false so status output says so."""

    name = "none"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = 0
        self._released = -1

    def start(self) -> None:
        log.warning("output buffering is off: clients may see output the backup does not have")

    def begin_epoch(self, epoch: int) -> None:
        with self._lock:
            if epoch <= self._current:
                raise ValueError(f"begin_epoch({epoch}) does not advance epoch {self._current}")
            self._current = epoch

    def release(self, through_epoch: int) -> None:
        with self._lock:
            self._released = max(self._released, min(through_epoch, self._current - 1))

    def hold_inbound(self, on: bool) -> None:
        pass

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": self.name, "guarantee": False, "held_packets": 0,
                    "held_bytes": 0, "released_packets": 0, "released_bytes": 0,
                    "dropped_packets": 0, "dropped_bytes": 0, "inbound_held": 0,
                    "inbound_passed": 0, "current_epoch": self._current,
                    "released_epoch": self._released,
                    "release_latency_ms": latency_summary(Series())}

    def close(self, release_all: bool = False) -> None:
        pass
