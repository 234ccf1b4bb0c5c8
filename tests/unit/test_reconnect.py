"""The primary's reconnection: back-off and one log line per change, not per try."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest

from remus.primary_session import BackupSession, retry_delay
from remus.roles import PrimaryRole
from remus.saying import Once

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
        self._failures, self._once = 0, Once(logging.getLogger("remus.primary"))
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


class Refused(Session):
    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()
        self.wake = threading.Event()
        self.generation, self.inflight = 7, {3: 0.0, 4: 0.0}
        self._nacks, self._nacked_gen, self._retry_at = 0, -1, 0.0
        self.need_full = self._new_generation = False
        self.link = SimpleNamespace(closed=False, close=lambda: pytest.fail("link closed"))


def test_a_refused_epoch_keeps_the_link_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    """A NACK (a full disk at the backup) is no reason to drop the link: heartbeats
    go on, so the backup never takes the primary for dead; the next checkpoint is
    full, in a new generation, after a back-off that grows while refusals repeat."""
    from remus.protocol import messages as m

    s = Refused()
    reason = "backup store /var/lib/remus/kv/store cannot be written: No space left on device"
    with caplog.at_level(logging.ERROR, logger="remus.primary"):
        s._on_nack(m.Nack(generation=7, epoch=3, reason=reason), now=100.0)
        s._on_nack(m.Nack(generation=7, epoch=4, reason=reason), now=100.0)  # same generation
    assert s.inflight == {} and s.need_full and s._new_generation
    assert s._nacks == 1 and s._retry_at == pytest.approx(100.2)
    assert "No space left" in s.last_sentence and "output held" in s.last_sentence
    delays = []
    for gen in (8, 9, 10, 11, 12, 13, 14):
        s.generation = gen
        s._on_nack(m.Nack(generation=gen, epoch=gen, reason=reason), now=200.0)
        delays.append(s._retry_at - 200.0)
    assert delays == sorted(delays) and delays[-1] == 5.0
    assert len(caplog.records) == 1  # the same refusal, said once


def test_once_says_each_change_and_again_after_forget(caplog: pytest.LogCaptureFixture) -> None:
    once = Once(logging.getLogger("remus.test"))
    with caplog.at_level(logging.INFO, logger="remus.test"):
        said = [once.say("a"), once.say("a"), once.say("b"), once.say("b, epoch 7", key="b")]
        once.forget()
        said.append(once.say("b"))
    assert said == [True, False, True, False, True]
    assert [r.getMessage() for r in caplog.records] == ["a", "b", "b"]
