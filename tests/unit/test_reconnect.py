"""The primary's reconnection: back-off and one log line per change, not per try."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest

from remus.primary_session import BackupSession, retry_delay
from remus.roles import PrimaryRole

pytestmark = pytest.mark.unit


def test_refusals_back_off_to_five_seconds() -> None:
    delays = [retry_delay(n, True, True, 0.05) for n in range(1, 12)]
    assert delays == sorted(delays) and delays[0] == 0.2 and delays[-1] == 5.0


def test_unreachable_backup_is_retried_soon_while_output_is_held() -> None:
    assert retry_delay(50, False, True, 0.05) == 0.05
    assert retry_delay(50, False, True, 5.0) == 0.5  # never slower than 0.5 s
    assert retry_delay(50, False, False, 0.05) == 1.0  # solo: output flows, no hurry


class Session(BackupSession):
    def __init__(self) -> None:
        self.cfg = SimpleNamespace(backup=("10.0.0.2", 7788),  # type: ignore[assignment]
                                   timing=SimpleNamespace(heartbeat=0.0))
        self.role = PrimaryRole("stall", 0.0)
        self._failures, self._said = 0, None
        self.stop_event = threading.Event()
        self.stop_event.set()  # no waiting in tests
        self.last_sentence = ""


def test_the_same_failure_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    s = Session()
    with caplog.at_level(logging.WARNING, logger="remus.primary"):
        for _ in range(18):  # what one second of retries used to log
            s._not_connected("backup 10.0.0.2:7788 refused: state directories differ",
                             refused=True)
        s._not_connected("backup 10.0.0.2:7788 unreachable: timed out")
        s._not_connected("backup 10.0.0.2:7788 unreachable: timed out")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "state directories differ" in lines[0] and "timed out" in lines[1]
    assert caplog.records[0].levelno == logging.ERROR  # a refusal needs the operator
    assert "connecting" in s.last_sentence and "timed out" in s.last_sentence
    assert s._failures == 20
