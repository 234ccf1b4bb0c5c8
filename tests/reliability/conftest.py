"""Fixtures of the reliability tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.wire import Capture, Partition


@pytest.fixture
def wire(lab: Any, tmp_path: Path) -> Iterator[tuple[Partition, Capture]]:
    part = Partition(lab)
    cap = Capture(lab, tmp_path / "client.pcap")
    try:
        yield part, cap
    finally:
        cap.stop()
        with contextlib.suppress(Exception):
            part.heal()
