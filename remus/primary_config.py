"""What the primary agent is told: its configuration and limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remus.checkpoint.tracking import DEFAULT_MODE
from remus.config import Timing
from remus.protocol.connection import Keys

# The unit cannot be checkpointed: give up (saying why) after this many failures
# in a row spanning at least this long. Output stays held meanwhile.
MAX_FAILED_DUMPS = 10
MAX_FAILING_S = 10.0
# A unit that was never checkpointed gives up sooner (a unit CRIU cannot dump).
MAX_FAILED_FIRST_DUMPS = 3


def _bulk_proof() -> int:
    """Bytes the backup must have read to prove its agent alive by stream progress:
    more than any receive buffer its kernel fills on its own (2x our tcp_rmem max,
    at least 8 MiB)."""
    try:
        rmem_max = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        rmem_max = 6 << 20
    return max(8 << 20, 2 * rmem_max)


BULK_PROOF = _bulk_proof()


@dataclass
class PrimaryConfig:
    unit_id: str
    spec: dict[str, Any]
    backup: tuple[str, int]
    psk: Keys  # one key, or the key file's ring (read again when it changes)
    timing: Timing
    pid: int  # root of the dumped tree
    netns_path: str | None
    dump_root: Path
    freeze_cgroup: str | None = None
    compress: bool = False
    dirty_tracking: str = DEFAULT_MODE  # auto | soft-dirty | uffd-wp | diff (checkpoint.tracking)
    max_inflight: int = 2
    on_peer_loss: str = "stall"
    connect_timeout: float = 2.0
    # The backup answers HELLO after building its standby container (seconds on a
    # slow or loaded host): a short wait here made the primary reconnect in a loop.
    handshake_timeout: float = 15.0
    trace: Path | None = None  # JSON lines, one per acked epoch (tests, plots)
    state_dirs: list[Path] = field(default_factory=list)  # replicated with each checkpoint
    unit_pids: Callable[[], list[int]] | None = None  # for files the unit has mmapped
    fence: Callable[[], None] | None = None  # kills our copy of the unit
    # A fresh, not started output buffer for the unit: output commit comes back
    # with a backup after a stretch of running solo (remus.roles: solo).
    buffer_factory: Callable[[], Any] | None = None
    # Start solo (output flows) until a backup attaches: the new primary after a
    # takeover, whose only alternative would be to stall the service it just saved.
    start_solo: bool = False
    # What the HELLO tells the backup about how we protect (it re-protects the
    # same way after a takeover): interval, dirty tracking, compression.
    protection: dict[str, Any] = field(default_factory=dict)
    # remus.coordinator.Coordinator (None: the pair decides alone, per on_peer_loss),
    # and this host's name in its records (its address on the replication link).
    coordinator: Any = None
    coord_me: str = ""
    # Where the backup is, asked before each connection (a fleet's placement moves
    # it); None from it: no backup placed yet. Without it, `backup` is fixed.
    backup_resolver: Callable[[], tuple[str, int] | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
