"""Processes the tests watch from outside (a unit, an agent), by pid."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """`pid` runs (or sleeps, or is stopped): it exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
