"""`remus status` of the primary agent: one JSON-able snapshot."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from remus.roles import P

if TYPE_CHECKING:
    from remus.primary import Primary


def primary_status(p: Primary) -> dict[str, Any]:
    now = p.clock()
    t = p.epoch_times[-50:]
    eps = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0
    elapsed = max(now - p.started, 1e-9)
    nb = p.buffer.counters()  # one snapshot (it takes the buffer's lock)
    tracker = p._uffd_tracker()
    return {
        "role": "primary",
        "pid": os.getpid(),
        "unit": p.cfg.unit_id,
        "unit_pid": p.cfg.pid,
        "backup": f"{p.cfg.backup[0]}:{p.cfg.backup[1]}",
        "connected": p.link is not None and not p.link.closed,
        "generation": p.generation,
        "epoch": p.epoch - 1,  # the newest checkpoint taken
        "running_epoch": p.epoch,  # output now is tagged with this
        "acked_epoch": p.acked,
        "inflight": len(p.inflight),
        "interval_ms": round(p.cfg.timing.interval * 1000, 3),
        "dirty_tracking": p.chain.mode,
        "uffd_wp": dataclasses.asdict(tracker.stats) if tracker is not None else None,
        "pause_ms": p.pause.summary(),
        "dump_ms": p.dump_wall.summary(),
        "ack_latency_ms": p.ack_latency.summary(),
        "bytes_per_epoch": p.delta_bytes.summary(0),
        "checkpoint_bytes": p.full_bytes.last,
        "encode_ms": p.encode_ms.summary(),
        "changed_pages": p.dirty_pages.summary(0),
        # TCP stream images left at the backup in the last epoch (only their clock moved)
        "tcp_streams_carried": p.encoder.stats.streams_carried,
        "dumped_pages": p.dumped_pages.summary(0),
        # where the pause goes (p50 of each part; checkpoint.criu.DumpResult.split)
        "frozen_split": {k: v.summary()["p50"] for k, v in p.frozen_split.items()},
        "epochs_per_s": round(eps, 2),
        "bytes_per_s": round(p.bytes_total / elapsed, 1),
        "epochs_acked": p.epochs_done,
        "lease_ms_left": round(max(0.0, p.lease_until - now) * 1000, 1),
        "netbuf": nb,
        "disk": dataclasses.asdict(p.disk.stats) if p.disk is not None else None,
        "guarantee": p.role.output_held and bool(nb.get("guarantee", True)),
        "protected": p.role.state is P.PROTECTED,
        "state": p.role.state.value,
        "state_since_s": round(now - p.role.since, 3),
        "on_peer_loss": p.cfg.on_peer_loss,
        "progress": p.progress.snapshot() if p.progress is not None else None,
        "last": p.last_sentence,
    }
