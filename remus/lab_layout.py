"""The lab's layout: its hosts (pri, bak, client, coord), their names, addresses and paths, and the
lab dir's state file and lock.

Each host is a network namespace (`remus-lab-<host>`) with a veth `eth0`
plugged into the bridge of a switch namespace, a persistent mount namespace
(`<lab_dir>/ns/<host>.mnt`) and a freezer cgroup (`<root>/remus-lab/<host>`).
remus.lab brings them up and down; remus.lab_hosts enters and crashes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from remus import cgroup
from remus.errors import ConfigError, HostError
from remus.netns import netns_path

LAB_DIR = Path("/run/remus-lab")
LAB_DIR_ENV = "REMUS_LAB_DIR"
# The lab's names (netns, cgroups) are global, so one lock for every lab dir.
LOCK_FILE = Path("/run/remus-lab.lock")
NETNS_PREFIX = "remus-lab-"
SWITCH_NETNS = "remus-lab-sw"
BRIDGE = "br0"
BRIDGE_MAC = "02:77:00:00:02:00"
DEV = "eth0"
PREFIXLEN = 24
VIP_ADDR = "10.77.0.100"
VIP = f"{VIP_ADDR}/{PREFIXLEN}"
CGROUP_NAME = "remus-lab"


@dataclass(frozen=True)
class HostSpec:
    """One emulated machine: its address, eth0 MAC and switch-port MAC."""

    name: str
    addr: str
    mac: str
    port_mac: str
    router: bool  # pri and bak route to units in nested namespaces


HOSTS: dict[str, HostSpec] = {
    h.name: h
    for h in (
        HostSpec("pri", "10.77.0.1", "02:77:00:00:00:01", "02:77:00:00:01:01", True),
        HostSpec("bak", "10.77.0.2", "02:77:00:00:00:02", "02:77:00:00:01:02", True),
        HostSpec("client", "10.77.0.3", "02:77:00:00:00:03", "02:77:00:00:01:03", False),
        # The coordinator's host (a ZooKeeper for `--coordinator`), a third party
        # that neither agent's host failure takes down.
        HostSpec("coord", "10.77.0.4", "02:77:00:00:00:04", "02:77:00:00:01:04", False),
        # A third host for a fleet's units and backups (remus agent).
        HostSpec("spare", "10.77.0.5", "02:77:00:00:00:05", "02:77:00:00:01:05", True),
    )
}


def lab_dir_default() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or LAB_DIR)


class LabLayout:
    """Where everything of a lab is, and its state file (which hosts are crashed)."""

    def __init__(self, lab_dir: str | Path | None = None) -> None:
        self.lab_dir = Path(lab_dir) if lab_dir is not None else lab_dir_default()
        self.ns_dir = self.lab_dir / "ns"
        self.state_file = self.lab_dir / "state.json"
        self.cgroup_v2 = cgroup.is_v2()
        self.cgroup_root = cgroup.freezer_root(self.cgroup_v2) / CGROUP_NAME

    vip = VIP  # "10.77.0.100/24", the service address that moves on failover
    vip_addr = VIP_ADDR
    dev = DEV  # the hosts' link to the switch, where the VIP goes
    hosts = tuple(HOSTS)

    # ---- names and paths -------------------------------------------------

    def spec(self, host: str) -> HostSpec:
        try:
            return HOSTS[host]
        except KeyError:
            raise ConfigError(f"unknown lab host {host!r} (hosts: {', '.join(HOSTS)})") from None

    def addr(self, host: str) -> str:
        return self.spec(host).addr

    def netns_name(self, host: str) -> str:
        return NETNS_PREFIX + self.spec(host).name

    def netns_path(self, host: str) -> str:
        return netns_path(self.netns_name(host))

    def mntns_path(self, host: str) -> str:
        return str(self.ns_dir / f"{self.spec(host).name}.mnt")

    def cgroup_path(self, host: str) -> str:
        return str(self.cgroup_root / self.spec(host).name)

    def host_dir(self, host: str) -> Path:
        """Backing folders of the host's disk: var-lib/ and srv/."""
        return self.lab_dir / "hosts" / self.spec(host).name

    # ---- state -----------------------------------------------------------

    def _crashed(self) -> set[str]:
        try:
            return set(json.loads(self.state_file.read_text()).get("crashed", []))
        except (OSError, ValueError):
            return set()

    def _save_state(self, crashed: set[str]) -> None:
        state = {"lab_dir": str(self.lab_dir), "crashed": sorted(crashed), "time": time.time()}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if os.geteuid() != 0:
            raise HostError("the lab needs root (namespaces, mounts, cgroups)")
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK_FILE, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
