"""Dumps of units that share a working directory take turns (remus.checkpoint.criu):
CRIU's parasite mounts its /proc at a fixed name in that directory."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from remus.checkpoint import criu

pytestmark = pytest.mark.unit


def test_same_cwd_takes_turns_other_cwd_does_not_wait(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criu, "LOCK_DIR", tmp_path / "locks")
    me = os.getpid()  # this process and its threads share one cwd
    inside = []
    overlap = []

    def dump(tag: str) -> None:
        with criu.parasite_dir_lock(me):
            if inside:
                overlap.append(tag)
            inside.append(tag)
            time.sleep(0.05)
            inside.remove(tag)

    ts = [threading.Thread(target=dump, args=(str(i),)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not overlap  # never two at once in one directory

    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with criu.parasite_dir_lock(me):
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    t0 = time.monotonic()
    with criu.parasite_dir_lock(999_999_999):  # no such process: nothing to lock
        pass
    assert time.monotonic() - t0 < 0.5
    release.set()
    t.join()
