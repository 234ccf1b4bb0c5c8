"""When the primary starts the next epoch (remus.primary.next_epoch_at)."""

from __future__ import annotations

import pytest

from remus.primary import BUSY_PAUSE_MS, next_epoch_at


def test_a_short_pause_keeps_the_interval() -> None:
    # started at 0, frozen 8 ms, thawed at 15 ms: the next epoch at 50 ms, as before
    assert next_epoch_at(0.0, 0.050, 0.015, 0.008) == pytest.approx(0.050)


def test_a_pause_just_under_busy_lets_the_unit_run_as_long_as_it_was_frozen() -> None:
    # 18 ms frozen at a 25 ms interval, thawed at 24 ms: it runs 18 ms, not 1
    assert BUSY_PAUSE_MS > 18
    assert next_epoch_at(0.0, 0.025, 0.024, 0.018) == pytest.approx(0.042)


def test_a_busy_pause_lets_the_unit_run_twice_as_long_as_it_was_frozen() -> None:
    # 40 ms frozen, thawed at 55 ms: it runs 80 ms before the next freeze, not 0
    assert BUSY_PAUSE_MS < 40
    assert next_epoch_at(0.0, 0.050, 0.055, 0.040) == pytest.approx(0.135)


def test_the_run_is_at_most_twice_an_interval() -> None:
    # a 400 ms freeze (a first full checkpoint) does not hold the next epoch 800 ms
    assert next_epoch_at(0.0, 0.050, 0.500, 0.400) == pytest.approx(0.600)
