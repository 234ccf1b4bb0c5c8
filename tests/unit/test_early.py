"""EarlyPages: pagemaps handed to the encoder as CRIU closes them (real inotify)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from remus.checkpoint.early import EarlyPages

pytestmark = pytest.mark.unit


def _run(early: EarlyPages, prelude, stop: threading.Event) -> tuple[threading.Thread, list[str]]:
    seen: list[str] = []
    t = threading.Thread(target=early.run, args=(prelude, lambda d, n: seen.append(n), stop))
    t.start()
    return t, seen


def _write(path: Path, data: bytes = b"x") -> None:
    with open(path, "wb") as f:  # IN_CLOSE_WRITE on close
        f.write(data)


def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_closed_pagemaps_are_encoded_until_the_dump_is_handed_over(tmp_path: Path) -> None:
    early, stop = EarlyPages(), threading.Event()
    try:
        d = tmp_path / "e1"
        d.mkdir()
        prelude = early.watch(1, d)
        assert prelude is not None
        t, seen = _run(early, prelude, stop)
        _write(d / "pages-1.img")  # not a pagemap
        _write(d / "core-1.img")
        _write(d / "pagemap-1.img")
        _write(d / "pagemap-shmem-7.img")
        _until(lambda: len(seen) == 2)
        early.finish(prelude, handed=True)
        t.join(5)
        assert not t.is_alive()
        assert seen == ["pagemap-1.img", "pagemap-shmem-7.img"] and prelude.handed
        # the watch is gone: a later close of that dump is nobody's business, and
        # the next dump's run does not see the old events
        _write(d / "pagemap-2.img")
        d2 = tmp_path / "e2"
        d2.mkdir()
        p2 = early.watch(2, d2)
        assert p2 is not None
        t2, seen2 = _run(early, p2, stop)
        _write(d2 / "pagemap-9.img")
        _until(lambda: seen2 == ["pagemap-9.img"])
        early.finish(p2, handed=False)
        early.finish(p2, handed=True)  # the first word stands
        t2.join(5)
        assert not t2.is_alive() and not p2.handed
    finally:
        stop.set()
        early.close()


def test_a_dump_that_ended_before_the_sender_came_is_not_waited_for(tmp_path: Path) -> None:
    early, stop = EarlyPages(), threading.Event()
    try:
        d = tmp_path / "e1"
        d.mkdir()
        prelude = early.watch(1, d)
        assert prelude is not None
        _write(d / "pagemap-1.img")
        early.finish(prelude, handed=False)
        t, seen = _run(early, prelude, stop)
        t.join(5)
        assert not t.is_alive() and seen == []
        assert early.watch(2, tmp_path / "missing") is None  # no dir: no early encoding
    finally:
        stop.set()
        early.close()
