"""The human rendering of an agent's status (remus.status_view)."""

from __future__ import annotations

import pytest

from remus.status_view import render

pytestmark = pytest.mark.unit


def test_a_backup_that_took_over_shows_its_protection() -> None:
    text = render({"role": "primary (after failover)", "state": "active",
                   "protection": {"state": "solo", "backup": "10.0.0.1:7788",
                                  "connected": False, "epoch": 12, "acked_epoch": -1}})
    assert "SOLO: backup 10.0.0.1:7788 (not connected), epoch 12 / acked -1" in text
