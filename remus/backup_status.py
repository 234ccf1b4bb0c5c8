"""`remus status` of the backup agent: one JSON-able snapshot."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from remus.backup import Backup


def backup_status(b: Backup) -> dict[str, Any]:
    now = b.clock()
    return {
        "role": "backup" if b.state != "active" else "primary (after failover)",
        "state": b.state,
        "pid": os.getpid(),
        "unit": (b.unit or {}).get("unit_id"),
        "unit_pid": b.timeline.get("unit_pid"),
        "primary": b.peer if b.link is not None and not b.link.closed else None,
        "generation": b.generation,
        "epoch": b.epoch,
        "acked_epoch": b.epoch,
        "resume_epoch": b.epoch,
        "interval_ms": None,
        "since_heartbeat_ms": round((now - b.last_heard) * 1000, 1),
        "takeover_timeout_ms": round(b.cfg.timing.takeover_timeout * 1000, 1),
        "pause_ms": None,
        "bytes_per_epoch": b.epoch_bytes.summary(0),
        "ack_latency_ms": b.ack_time.summary(),
        "epochs_received": b.epochs_received,
        "epochs_rejected": b.rejected,
        "store": getattr(b.store, "stats", None) and _plain(b.store.stats),
        "failover": b.timeline or None,
        # Why epochs are refused now (full disk, an epoch that does not apply), or None.
        "store_problem": b.store_problem,
        "progress": b.progress.snapshot() if b.progress is not None else None,
        "last": b.last_sentence,
    }


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return obj
    return {k: v for k, v in vars(obj).items() if isinstance(v, int | float | str)}
