"""Progress of a full checkpoint: percent, rate, ETA, said every few seconds."""

from __future__ import annotations

import logging

import pytest

from remus.progress import Progress


def test_percent_rate_eta_and_a_line_every_few_seconds(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    p = Progress("full checkpoint to 10.0.0.2:7788", 1000 << 20, lambda: now[0])
    with caplog.at_level(logging.INFO, logger="remus.progress"):
        for i in range(1, 11):
            now[0] += 1.0
            p.update(i * (50 << 20))  # 50 MiB/s
        p.finish()
    s = p.snapshot()
    assert s["percent"] == 50.0 and s["bytes_per_s"] == 50 << 20 and s["eta_s"] == 10.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # at 3, 6, 9 s, and done
    assert lines[0] == ("full checkpoint to 10.0.0.2:7788: 150 MiB of 1,000 MiB (15 %) in 3 s, "
                        "50 MiB/s, about 17 s left")
    assert lines[-1].endswith("done, 500 MiB in 10 s")


def test_unknown_total_gives_bytes_and_rate_only() -> None:
    now = [0.0]
    p = Progress("full checkpoint from 10.0.0.1:40000", None, lambda: now[0])
    now[0] = 2.0
    p.update(40 << 20)
    s = p.snapshot()
    assert s["percent"] is None and s["eta_s"] is None and s["bytes_per_s"] == 20 << 20
    assert "of" not in p.sentence() and "left" not in p.sentence()
