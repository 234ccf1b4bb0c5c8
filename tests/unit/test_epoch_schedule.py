"""When the primary starts the next epoch (remus.primary.next_epoch_at)."""

from __future__ import annotations

import pytest

from remus.primary import next_epoch_at


def test_a_short_pause_keeps_the_interval() -> None:
    # started at 0, frozen 8 ms, thawed at 15 ms: the next epoch at 50 ms, as before
    assert next_epoch_at(0.0, 0.050, 0.015, 0.008) == pytest.approx(0.050)


def test_a_long_pause_lets_the_unit_run_as_long_as_it_was_frozen() -> None:
    # 40 ms frozen, thawed at 55 ms: it runs 40 ms before the next freeze, not 0
    assert next_epoch_at(0.0, 0.050, 0.055, 0.040) == pytest.approx(0.095)


def test_the_run_is_at_most_an_interval() -> None:
    # a 400 ms freeze (a first full checkpoint) does not hold the next epoch 400 ms
    assert next_epoch_at(0.0, 0.050, 0.500, 0.400) == pytest.approx(0.550)
