"""The protected unit: its spec (name, VIP, MACs), its process tree, and the hold on
packets towards it during a restore.

Its network container (netns + veth) is remus.container; its freezer cgroup
is remus.cgroup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

from remus.cgroup import UnitCgroup
from remus.errors import ConfigError, FatalError, HostError
from remus.netns import netns_path
from remus.proc import run_cmd

log = logging.getLogger(__name__)

GATEWAY = "169.254.77.1"


def _mac(name: str, role: bytes) -> str:
    h = hashlib.sha256(role + name.encode()).digest()
    return "02:52:" + ":".join(f"{b:02x}" for b in h[:4])


@dataclass(frozen=True)
class UnitSpec:
    """Everything a host needs to build the unit's container. JSON-able."""

    name: str
    vip: str  # CIDR, e.g. 10.77.0.100/24
    dev: str  # the host's uplink: proxy ARP and gratuitous ARP go there
    unit_mac: str
    host_mac: str
    gateway: str = GATEWAY
    unit_if: str = "eth0"

    @classmethod
    def for_run(cls, name: str, vip: str, dev: str) -> UnitSpec:
        validate_name(name)
        try:
            ipaddress.ip_interface(vip)
        except ValueError as e:
            raise ConfigError(f"--vip {vip!r} is not an address/prefix: {e}") from e
        if "/" not in vip:
            vip += "/32"
        return cls(name, vip, dev, _mac(name, b"unit"), _mac(name, b"host"))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UnitSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def netns(self) -> str:
        return f"remus-{self.name}"

    @property
    def netns_path(self) -> str:
        return netns_path(self.netns)

    @property
    def host_if(self) -> str:
        return f"rmh-{self.name}"[:15]

    @property
    def vip_addr(self) -> str:
        return str(ipaddress.ip_interface(self.vip).ip)


def validate_name(name: str) -> None:
    if not name or len(name) > 10 or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"unit name {name!r}: use 1-10 letters, digits, '-' or '_'")


def hold_inbound(host_if: str, on: bool) -> None:
    """Drop packets towards a unit behind host_if (during a restore its kernel would RST them)."""
    rule = ["FORWARD", "-o", host_if, "-j", "DROP", "-m", "comment", "--comment",
            f"remus-restore-{host_if}"]
    if on:
        run_cmd(["iptables", "-w", "-I", *rule])
    else:
        # One delete releases the hold (it is on the failover path); leftovers of an
        # earlier takeover that died holding are removed in the background.
        delete = ["iptables", "-w", "-D", *rule]
        if _succeeds(delete):
            threading.Thread(target=_repeat_until_it_fails, args=(delete,), daemon=True).start()


def _succeeds(argv: list[str]) -> bool:
    return run_cmd(argv, check=False).returncode == 0


def _repeat_until_it_fails(argv: list[str]) -> None:
    while _succeeds(argv):
        pass


def start_unit(spec: UnitSpec, argv: list[str], cgroup: UnitCgroup) -> tuple[subprocess.Popen[bytes], int]:
    """Start argv as PID 1 of a new PID namespace inside the unit's netns.

    Returns (the `unshare` wrapper, the outer pid of the namespace's init),
    the init being what CRIU dumps. stdio is /dev/null opened on this host
    (CRIU must find it on restore), and the init is a session leader so the
    dumped tree is self-contained.
    """
    cgroup.create()

    def enter() -> None:
        with open(cgroup.procs_file, "w") as f:
            f.write("0")

    cmd = ["nsenter", f"--net={spec.netns_path}", "--",
           "unshare", "--pid", "--fork", "--", "setsid", *argv]
    try:
        wrapper = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, cwd="/", preexec_fn=enter,
                                   start_new_session=True)
    except OSError as e:
        raise HostError(f"cannot start unit: {e}") from e
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rc = wrapper.poll()
        if rc is not None:
            raise FatalError(f"unit command {argv[0]!r} exited at once with status {rc}")
        kids = psutil.Process(wrapper.pid).children()
        if kids:
            return wrapper, kids[0].pid
        time.sleep(0.005)
    raise FatalError("unit did not start within 5 s")
