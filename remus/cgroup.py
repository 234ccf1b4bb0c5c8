"""The unit's cgroup: a freezer cgroup below the agent's own (v2 or v1 freezer).

Created below the caller's cgroup so that whatever contains the agent (a lab
host, a systemd service) also contains the unit. No controllers are enabled,
so processes may live in both parent and child (cgroup v2's no-internal-
processes rule only applies to domain controllers).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from remus.errors import HostError

log = logging.getLogger(__name__)

V2_ROOT = Path("/sys/fs/cgroup")
V1_FREEZER = Path("/sys/fs/cgroup/freezer")


def _own_path(controller: str | None) -> str:
    """Our cgroup path in the v2 hierarchy (controller None) or a v1 one."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if controller is None and hid == "0":
            return path
        if controller is not None and controller in ctrls.split(","):
            return path
    raise HostError(f"no cgroup {'v2' if controller is None else controller} entry for this process")


def is_v2() -> bool:
    return (V2_ROOT / "cgroup.controllers").exists()


class UnitCgroup:
    """A freezer cgroup for one unit. `path` is what CRIU's freeze_cgroup takes."""

    def __init__(self, name: str) -> None:
        if is_v2():
            self.v2 = True
            parent = V2_ROOT / _own_path(None).lstrip("/")
        elif V1_FREEZER.is_dir():
            self.v2 = False
            parent = V1_FREEZER / _own_path("freezer").lstrip("/")
        else:
            raise HostError("no cgroup freezer (neither cgroup v2 nor v1 freezer is mounted)")
        self.path = parent / f"remus-{name}"

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def create(self) -> None:
        self.path.mkdir(exist_ok=True)

    def pids(self) -> list[int]:
        pids: list[int] = []
        for d, _dirs, files in os.walk(self.path):
            if "cgroup.procs" in files:
                try:
                    text = Path(d, "cgroup.procs").read_text()
                except OSError:
                    continue
                pids += [int(x) for x in text.split()]
        return pids

    def freeze(self, on: bool) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1" if on else "0")
        else:
            (self.path / "freezer.state").write_text("FROZEN" if on else "THAWED")

    def remove(self, timeout: float = 2.0) -> None:
        """Remove the cgroup once empty (processes moved out or gone)."""
        deadline = time.monotonic() + timeout
        while self.path.exists():
            try:
                for d, _dirs, _files in sorted(os.walk(self.path), key=lambda t: -len(t[0])):
                    os.rmdir(d)
                return
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("cgroup %s still busy; left in place", self.path)
                    return
                time.sleep(0.02)

    def release_to_parent(self) -> None:
        """Move every process to the parent cgroup (used when protection stops)."""
        parent = self.path.parent / "cgroup.procs"
        for pid in self.pids():
            try:
                parent.write_text(str(pid))
            except OSError:
                pass
