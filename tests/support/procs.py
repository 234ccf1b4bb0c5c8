"""Processes the tests watch from outside (a unit, an agent), by pid."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from remus import paths


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


def criu_or_skip() -> str:
    """Our CRIU binary (remus.paths.criu_binary); the test skips where it is not built."""
    binary = paths.criu_binary()
    if binary is None:
        pytest.skip("CRIU is not built")
    return binary


def ask_unit(ctl: Path, cmd: str, fields: int, timeout: float = 10.0) -> list[str]:
    """Hand `cmd` to a test unit through files in `ctl` and return its answer.

    The command goes into `ctl/ctl` (renamed into place); the unit answers in
    `ctl/ack` as "CMD|FIELD|...": the `fields` fields after the echoed command
    are returned. AssertionError when no such answer came within `timeout`."""
    (ctl / "ctl.tmp").write_text(cmd)
    os.rename(ctl / "ctl.tmp", ctl / "ctl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            parts = (ctl / "ack").read_text().split("|")
        except OSError:
            parts = []
        if len(parts) == fields + 1 and parts[0] == cmd:
            return parts[1:]
        time.sleep(0.01)
    raise AssertionError(f"unit did not answer {cmd!r}")
