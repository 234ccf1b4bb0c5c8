"""Processes the tests watch from outside (a unit, an agent), by pid."""

from __future__ import annotations

import time
from pathlib import Path


def alive(pid: int) -> bool:
    """`pid` runs (or sleeps, or is stopped): it exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def inner_init(outer: int, timeout: float = 10.0) -> int:
    """The pid of the first child of `outer` (`unshare --pid --fork`: the init of
    the new PID namespace), once it exists; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{outer}/task/{outer}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.01)
    raise AssertionError("unit did not start")
