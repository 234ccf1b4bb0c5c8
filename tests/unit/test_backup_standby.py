"""The standby container is built by one HELLO at a time, and a takeover waits for it.

Found in an emulated VM: building the standby took longer than the primary's
handshake wait, the primary reconnected, and two HELLO handlers built the same
container at once; the takeover later found it half-built and failed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from remus.backup import Backup, BackupConfig
from remus.config import Timing
from tests.support.fakes import FakeLink, commit, hello
from tests.support.timing import wait_for


class SlowBuilder:
    """A prepare() that takes a while and records overlaps and rebuild flags."""

    def __init__(self, seconds: float, fail_first: bool = False) -> None:
        self.seconds = seconds
        self.fail_first = fail_first
        self.active = 0
        self.max_active = 0
        self.rebuilds: list[bool] = []
        self.lock = threading.Lock()

    def __call__(self, spec: dict[str, Any], rebuild: bool) -> None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.rebuilds.append(rebuild)
            first = len(self.rebuilds) == 1
        try:
            time.sleep(self.seconds)
            if first and self.fail_first:
                raise RuntimeError("build cut short")
        finally:
            with self.lock:
                self.active -= 1


def backup(workdir: Path, builder: SlowBuilder, takeover: Any = None) -> Backup:
    timing = Timing(interval=0.05, heartbeat=0.05, lease=0.2, takeover_timeout=0.3)
    cfg = BackupConfig(listen=("127.0.0.1", 0), psk=b"k" * 32, workdir=workdir, timing=timing)
    return Backup(cfg, prepare=builder, takeover=takeover)


def test_concurrent_hellos_build_one_at_a_time(tmp_path: Path) -> None:
    builder = SlowBuilder(0.2)
    b = backup(tmp_path, builder)
    threads = [threading.Thread(target=b._on_hello, args=(FakeLink(), hello("run-a", g)))
               for g in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builder.max_active == 1
    # the first build after the agent started is a full rebuild; later ones may reuse it
    assert builder.rebuilds == [True, False, False]
    assert b.standby_ready


def test_a_failed_build_is_redone_in_full(tmp_path: Path) -> None:
    builder = SlowBuilder(0.01, fail_first=True)
    b = backup(tmp_path, builder)
    try:
        b._on_hello(FakeLink(), hello("run-a", 1))  # type: ignore[arg-type]
    except RuntimeError:
        pass
    assert not b.standby_ready
    b._on_hello(FakeLink(), hello("run-a", 2))  # type: ignore[arg-type]
    assert builder.rebuilds == [True, True]
    assert b.standby_ready


def test_silence_while_building_is_not_a_dead_primary(tmp_path: Path) -> None:
    """The primary waits for our WELCOME while we build: that is not silence."""
    builder = SlowBuilder(1.0)  # > 3x the takeover timeout
    taken: list[str] = []
    b = backup(tmp_path, builder, takeover=lambda b, why: taken.append(why))
    b._on_hello(FakeLink(), hello("run-a", 1))  # type: ignore[arg-type]
    commit(b, 1, 0)
    detector = threading.Thread(target=b._detector_loop, daemon=True)
    detector.start()
    try:
        b._on_hello(FakeLink(), hello("run-a", 2))  # type: ignore[arg-type]
        assert taken == []
        # ...but silence after the build counts again
        wait_for(lambda: taken, timeout=3, every=0.02)
        assert taken and "silent" in taken[0]
    finally:
        b.stop_event.set()
        detector.join()


def test_takeover_waits_for_a_build_in_progress(tmp_path: Path) -> None:
    builder = SlowBuilder(0.5)
    seen: list[bool] = []
    b = backup(tmp_path, builder, takeover=lambda b, why: seen.append(b.standby_ready))
    b._on_hello(FakeLink(), hello("run-a", 1))  # type: ignore[arg-type]
    commit(b, 1, 0)
    errors: list[Exception] = []

    def second_hello() -> None:
        try:
            b._on_hello(FakeLink(), hello("run-a", 2))  # type: ignore[arg-type]
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=second_hello)
    t.start()
    # the second build is under way (it holds the standby lock)
    assert wait_for(lambda: len(builder.rebuilds) == 2, timeout=5.0, every=0.005)
    b.failover("test")
    t.join()
    assert seen == [True]
    assert b.state == "active"
    # and the HELLO whose build the takeover waited for is refused, not welcomed
    assert errors and "taken over" in str(errors[0])


def test_a_hello_that_waited_for_a_takeover_is_refused(tmp_path: Path) -> None:
    """A primary whose HELLO waited while the backup took over must not turn the
    active backup back into a replicating one."""
    builder = SlowBuilder(0.01)
    holding, release = threading.Event(), threading.Event()

    def slow_takeover(b: Backup, why: str) -> None:
        holding.set()
        release.wait(2)

    b = backup(tmp_path, builder, takeover=slow_takeover)
    b._on_hello(FakeLink(), hello("run-a", 1))  # type: ignore[arg-type]
    commit(b, 1, 0)
    t = threading.Thread(target=b.failover, args=("test",))
    t.start()
    assert holding.wait(2)  # the takeover holds the standby lock
    late = FakeLink()
    errors: list[Exception] = []

    def hello_late() -> None:
        try:
            b._on_hello(late, hello("run-a", 2))  # type: ignore[arg-type]
        except Exception as e:
            errors.append(e)

    h = threading.Thread(target=hello_late)
    h.start()
    assert wait_for(lambda: b.preparing == 1, timeout=2.0, every=0.005)  # the HELLO waits for that lock
    release.set()
    t.join()
    h.join()
    assert b.state == "active"
    assert errors and "taken over" in str(errors[0])
    assert [type(x).__name__ for x in late.sent] == ["Error"]
