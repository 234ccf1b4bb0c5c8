"""EarlyPages: pagemaps handed to the encoder as CRIU closes them (real inotify)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remus.checkpoint.early import EarlyPages, Prelude

pytestmark = pytest.mark.unit


@pytest.fixture
def early() -> Iterator[tuple[EarlyPages, threading.Event]]:
    pages, stop = EarlyPages(), threading.Event()
    try:
        yield pages, stop
    finally:
        stop.set()
        pages.close()


def _watch(early: EarlyPages, d: Path) -> Prelude:
    d.mkdir()
    prelude = early.watch(d)
    assert prelude is not None
    return prelude


def _run(early: EarlyPages, prelude: Prelude, stop: threading.Event
         ) -> tuple[threading.Thread, list[str]]:
    seen: list[str] = []
    t = threading.Thread(target=early.run, args=(prelude, lambda d, n: seen.append(n), stop))
    t.start()
    return t, seen


def _write(path: Path, data: bytes = b"x") -> None:
    with open(path, "wb") as f:  # IN_CLOSE_WRITE on close
        f.write(data)


def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_closed_pagemaps_are_encoded_until_the_dump_is_handed_over(
        tmp_path: Path, early: tuple[EarlyPages, threading.Event]) -> None:
    pages, stop = early
    d = tmp_path / "e1"
    prelude = _watch(pages, d)
    t, seen = _run(pages, prelude, stop)
    _write(d / "pages-1.img")  # not a pagemap
    _write(d / "core-1.img")
    _write(d / "pagemap-1.img")
    _write(d / "pagemap-shmem-7.img")
    _until(lambda: len(seen) == 2)
    pages.finish(prelude, handed=True)
    t.join(5)
    assert not t.is_alive()
    assert seen == ["pagemap-1.img", "pagemap-shmem-7.img"] and prelude.handed
    # the watch is gone: a later close of that dump is nobody's business, and
    # the next dump's run does not see the old events
    _write(d / "pagemap-2.img")
    d2 = tmp_path / "e2"
    p2 = _watch(pages, d2)
    t2, seen2 = _run(pages, p2, stop)
    _write(d2 / "pagemap-9.img")
    _until(lambda: seen2 == ["pagemap-9.img"])
    pages.finish(p2, handed=False)
    pages.finish(p2, handed=True)  # the first word stands
    t2.join(5)
    assert not t2.is_alive() and not p2.handed


def test_a_dump_that_ended_before_the_sender_came_is_not_waited_for(
        tmp_path: Path, early: tuple[EarlyPages, threading.Event]) -> None:
    pages, stop = early
    d = tmp_path / "e1"
    prelude = _watch(pages, d)
    _write(d / "pagemap-1.img")
    pages.finish(prelude, handed=False)
    t, seen = _run(pages, prelude, stop)
    t.join(5)
    assert not t.is_alive() and seen == []
    assert pages.watch(tmp_path / "missing") is None  # no dir: no early encoding
