"""What a backup that took over tells a primary asking to be protected.

"taken over" makes the asker fence itself, so it is said only while the unit
runs here. Seen in a switchover there and back: the agent handing the unit
back still answered "taken over" to the new primary connecting to it, which
fenced the only copy of the unit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from remus.backup import Backup, BackupConfig
from remus.config import Timing
from remus.roles import P, PrimaryRole

pytestmark = pytest.mark.unit


def active_backup(tmp_path: Path) -> Backup:
    timing = Timing(interval=0.05, heartbeat=0.05, lease=0.2, takeover_timeout=0.3)
    b = Backup(BackupConfig(listen=("127.0.0.1", 0), psk=b"k" * 32, workdir=tmp_path,
                            timing=timing))
    for ev in ("welcome", "takeover", "restored"):
        b.role.require(ev, 1.0)
    return b


def test_taken_over_while_the_unit_runs_here(tmp_path: Path) -> None:
    b = active_backup(tmp_path)
    assert "taken over" in b._refusal()  # no re-protection (--reprotect off)
    b.reprotector = SimpleNamespace(role=PrimaryRole("stall", 0.0, solo=True))
    assert "taken over" in b._refusal()  # solo: the unit runs here


@pytest.mark.parametrize("end", [P.HANDED_OVER, P.FENCED])
def test_retry_once_the_unit_left(tmp_path: Path, end: P) -> None:
    b = active_backup(tmp_path)
    role = PrimaryRole("stall", 0.0)
    role._state = end
    b.reprotector = SimpleNamespace(role=role)
    why = b._refusal()
    assert "taken over" not in why and "retry" in why
