"""What the command line hands to the agents: typed, one default per setting.

`remus run` and `remus protect` build PrimaryOptions; remus.agents turns
them into the primary's configuration (`remus backup` builds the backup's
BackupConfig directly: its options are that configuration).
Defaults live here (and in remus.config for timings, remus.checkpoint.tracking
for the dirty-tracking mode); the CLI shows the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from remus.checkpoint.tracking import DEFAULT_MODE
from remus.config import Timing
from remus.protocol.connection import Keys

#: --on-peer-loss
ON_PEER_LOSS = ("stall", "continue")
DEFAULT_ON_PEER_LOSS = "stall"


@dataclass(frozen=True)
class PrimaryOptions:
    """`remus run` / `remus protect`."""

    name: str
    backup: tuple[str, int]
    psk: Keys  # one key, or the key file's ring (read again when it changes)
    timing: Timing
    compress: bool = True
    dirty_tracking: str = DEFAULT_MODE
    on_peer_loss: str = DEFAULT_ON_PEER_LOSS
    trace: Path | None = None
    state_dirs: list[Path] = field(default_factory=list)
    vip: str | None = None  # run: the unit's service address (CIDR)
    dev: str = "eth0"  # run: the host's LAN interface
    host_if: str | None = None  # protect: the expected host side of the veth
    coordinator: str | None = None  # zk://HOST:PORT/PATH (remus.coordinator)
