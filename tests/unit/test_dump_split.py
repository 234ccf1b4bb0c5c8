"""Where a dump's pause goes: DumpResult.split from CRIU's stats (patch 0005)."""

from __future__ import annotations

import pytest

from remus.checkpoint.criu import DumpResult
from remus.status_view import render


def result(**stats: int) -> DumpResult:
    return DumpResult(wall_ms=0, frozen_ms=stats.get("frozen_time", 0) / 1000,
                      freezing_ms=stats.get("freezing_time", 0) / 1000,
                      memdump_ms=stats.get("memdump_time", 0) / 1000, pages_written=0,
                      stats=stats)


def test_split_adds_up_to_the_pause() -> None:
    r = result(freezing_time=1500, frozen_time=50_000, memdump_time=4000, remus_fds_time=38_000,
               remus_sockets_time=36_000, remus_post_dump_time=2000, remus_thaw_time=5000,
               remus_fds=1010, remus_sockets=1000)
    s = r.split()
    assert s["sockets"] == 1000 and s["us_per_socket"] == pytest.approx(36.0)
    assert s["other_fds_ms"] == pytest.approx(2.0) and s["rest_ms"] == pytest.approx(1.0)
    parts = sum(v for k, v in s.items() if k.endswith("_ms"))
    assert parts == pytest.approx(r.freezing_ms + r.frozen_ms)


def test_split_is_empty_without_the_patch_and_never_negative() -> None:
    assert result(freezing_time=1000, frozen_time=2000, memdump_time=500).split() == {}
    s = result(frozen_time=1000, memdump_time=900, remus_fds_time=500, remus_sockets_time=600,
               remus_post_dump_time=0, remus_thaw_time=0, remus_sockets=0).split()
    assert s["rest_ms"] == 0 and s["other_fds_ms"] == 0 and s["us_per_socket"] == 0


def test_status_shows_the_split() -> None:
    text = render({"role": "primary", "frozen_split": result(
        frozen_time=10_000, memdump_time=2000, remus_fds_time=5000, remus_sockets_time=4000,
        remus_post_dump_time=1000, remus_thaw_time=1000, remus_sockets=100).split()})
    line = next(ln for ln in text.splitlines() if ln.startswith("pause split"))
    assert "sockets 4.0 (100 x 40 us)" in line and "memory 2.0" in line

