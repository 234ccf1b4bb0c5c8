"""Cgroups: the unit's freezer cgroup, and the pieces every cgroup user shares.

UnitCgroup is created below the caller's cgroup so that whatever contains the
agent (a lab host, a systemd service) also contains the unit. No controllers
are enabled, so processes may live in both parent and child (cgroup v2's
no-internal-processes rule only applies to domain controllers).

The functions below serve UnitCgroup, the lab's host cgroups (remus.lab) and
the freezer probes of `remus check`: which hierarchy freezes (v2's
cgroup.freeze or the v1 freezer), a process's cgroup, freezing and thawing,
the pids of a subtree, and removing a subtree.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

from remus.errors import HostError

log = logging.getLogger(__name__)

V2_ROOT = Path("/sys/fs/cgroup")
V1_FREEZER = Path("/sys/fs/cgroup/freezer")


class Freezer(NamedTuple):
    """How one cgroup version freezes: the file written and the file that reports."""

    knob: str
    freeze: str  # value written to freeze
    thaw: str
    report: str
    frozen: str  # the report's line once frozen
    thawed: str


FREEZERS = {
    1: Freezer("freezer.state", "FROZEN", "THAWED", "freezer.state", "FROZEN", "THAWED"),
    2: Freezer("cgroup.freeze", "1", "0", "cgroup.events", "frozen 1", "frozen 0"),
}


def is_v2() -> bool:
    """A pure cgroup v2 host (remus then freezes with cgroup.freeze)."""
    return (V2_ROOT / "cgroup.controllers").exists()


def freezer_root(v2: bool) -> Path:
    """The mount of the hierarchy that freezes: cgroup2's, or the v1 freezer's."""
    return V2_ROOT if v2 else V1_FREEZER


def cgroup_of(pid: int | str = "self", controller: str | None = None) -> str | None:
    """pid's cgroup path in the v2 hierarchy (controller None) or in the v1 hierarchy
    that has `controller`; None without such an entry. OSError: no such process."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if (hid == "0") if controller is None else (controller in ctrls.split(",")):
            return path
    return None


def freeze(path: Path, on: bool, v2: bool, wait: float = 0.0) -> bool:
    """Freeze (on) or thaw the cgroup at `path`. wait > 0: wait up to that many
    seconds until the kernel reports it; returns whether it does (True if not waiting)."""
    f = FREEZERS[2 if v2 else 1]
    (path / f.knob).write_text(f.freeze if on else f.thaw)
    if wait <= 0:
        return True
    deadline = time.monotonic() + wait
    while not reports(path, on, v2):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def reports(path: Path, on: bool, v2: bool) -> bool:
    """Whether the kernel reports the cgroup at `path` frozen (on) or thawed."""
    f = FREEZERS[2 if v2 else 1]
    want = f.frozen if on else f.thawed
    return want in (ln.strip() for ln in (path / f.report).read_text().splitlines())


def procs(path: Path) -> list[int]:
    """Pids in the cgroup at `path` and below (cgroups that vanish meanwhile are skipped)."""
    pids: list[int] = []
    for d, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            try:
                text = Path(d, "cgroup.procs").read_text()
            except OSError:
                continue
            pids += [int(x) for x in text.split()]
    return pids


def remove_tree(path: Path, timeout: float = 2.0) -> None:
    """rmdir the cgroup at `path` and its children, deepest first (cgroupfs has no
    rm -r). Just-killed tasks may linger a moment, hence the retry; HostError
    if it is still busy after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while path.exists():
        try:
            for d, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
                os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError as e:
            if time.monotonic() > deadline:
                raise HostError(f"cannot remove cgroup {path}: {e}") from e
            time.sleep(0.01)


class UnitCgroup:
    """A freezer cgroup for one unit. `path` is what CRIU's freeze_cgroup takes."""

    def __init__(self, name: str) -> None:
        if is_v2():
            self.v2 = True
        elif V1_FREEZER.is_dir():
            self.v2 = False
        else:
            raise HostError("no cgroup freezer (neither cgroup v2 nor v1 freezer is mounted)")
        controller = None if self.v2 else "freezer"
        own = cgroup_of("self", controller)
        if own is None:
            raise HostError(f"no cgroup {controller or 'v2'} entry for this process")
        self.path = freezer_root(self.v2) / own.lstrip("/") / f"remus-{name}"

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def create(self) -> None:
        self.path.mkdir(exist_ok=True)

    def pids(self) -> list[int]:
        return procs(self.path)

    def freeze(self, on: bool) -> None:
        freeze(self.path, on, self.v2)

    def remove(self, timeout: float = 2.0) -> None:
        """Remove the cgroup once empty (processes moved out or gone)."""
        try:
            remove_tree(self.path, timeout)
        except HostError:
            log.warning("cgroup %s still busy; left in place", self.path)

    def release_to_parent(self) -> None:
        """Move every process to the parent cgroup (used when protection stops)."""
        parent = self.path.parent / "cgroup.procs"
        for pid in self.pids():
            try:
                parent.write_text(str(pid))
            except OSError:
                pass
