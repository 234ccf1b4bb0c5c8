"""The idle share of the CPU between two looks at /proc/stat (remus.cpu_idle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from remus.cpu_idle import IdleMeter, parse_cpu_line

pytestmark = pytest.mark.unit

STAT = """cpu  {u} 0 {s} {i} {w} 0 {q} 0 0 0
cpu0 1 2 3 4 5 6 7 8 9 10
intr 12345
"""


def test_parse_counts_idle_and_iowait_against_all_fields_to_steal() -> None:
    assert parse_cpu_line(STAT.format(u=10, s=5, i=80, w=5, q=0)) == (85, 100)
    assert parse_cpu_line("cpu0 1 2 3 4\n") is None  # no aggregate line
    assert parse_cpu_line("cpu  a b c d\n") is None
    assert parse_cpu_line("cpu  1 2\n") is None


def test_meter_reports_the_share_since_the_last_call(tmp_path: Path) -> None:
    f = tmp_path / "stat"
    m = IdleMeter(str(f))
    f.write_text(STAT.format(u=100, s=0, i=100, w=0, q=0))
    assert m.share() is None  # first look: nothing to compare with
    f.write_text(STAT.format(u=130, s=10, i=150, w=10, q=0))  # +40 busy, +60 idle
    assert m.share() == pytest.approx(0.6)
    assert m.share() is None  # nothing elapsed
    f.write_text(STAT.format(u=230, s=10, i=150, w=10, q=0))
    assert m.share() == 0.0
    f.unlink()
    assert m.share() is None  # unreadable: unknown, not an error


def test_this_kernels_proc_stat_parses() -> None:
    with open("/proc/stat") as f:
        got = parse_cpu_line(f.read(4096))  # as IdleMeter reads it
    assert got is not None, "no aggregate cpu line in the first 4 KiB of /proc/stat"
    idle, total = got
    assert 0 <= idle <= total and total > 0
