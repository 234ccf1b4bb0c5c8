"""The protected unit: its container (netns + veth + cgroup) and process tree.

Network layout (routed, see docs/architecture.md):

    client ── LAN ── [host dev] host ─ host_if ══ veth ══ eth0 [unit netns]
                                       169.254.77.1          VIP/32

The unit owns the service address (VIP) inside its own network namespace.
The host answers ARP for the VIP on its uplink (a proxy neighbour entry) and
routes it to the veth; the unit's default route points at the host side of
the veth. All of the unit's traffic therefore crosses the host's FORWARD
chain, where the output buffer holds it. The backup builds the identical
container (same names, MACs, addresses) with the host side of the veth down
and no proxy entry: "standby". Activating it (after a restore) brings the
link up, adds the route and proxy entry, and announces the VIP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from remus.cgroup import UnitCgroup
from remus.errors import ConfigError, FatalError, HostError

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
        return f"/run/netns/{self.netns}"

    @property
    def host_if(self) -> str:
        return f"rmh-{self.name}"[:15]

    @property
    def vip_addr(self) -> str:
        return str(ipaddress.ip_interface(self.vip).ip)


def validate_name(name: str) -> None:
    if not name or len(name) > 10 or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"unit name {name!r}: use 1-10 letters, digits, '-' or '_'")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise HostError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def _sysctl(key: str, value: str) -> None:
    Path("/proc/sys", key.replace(".", "/")).write_text(value)


class Container:
    """Build, activate and remove the unit's network container on this host."""

    def __init__(self, spec: UnitSpec) -> None:
        self.spec = spec
        self.netns_path = spec.netns_path
        self.host_if = spec.host_if

    def exists(self) -> bool:
        return Path(self.spec.netns_path).exists()

    def create(self, active: bool) -> None:
        """Build the container; `active` also routes the VIP to it (primary)."""
        s = self.spec
        if _ip("link", "show", s.dev, check=False).returncode != 0:
            raise ConfigError(f"--dev {s.dev}: no such interface on this host")
        self.remove()
        _ip("netns", "add", s.netns)
        n = ["-n", s.netns]
        _ip("link", "add", s.host_if, "address", s.host_mac, "type", "veth",
            "peer", "name", s.unit_if, "address", s.unit_mac, "netns", s.netns)
        _ip(*n, "link", "set", "lo", "up")
        _ip(*n, "addr", "add", str(ipaddress.ip_interface(s.vip).ip) + "/32", "dev", s.unit_if)
        _ip(*n, "link", "set", s.unit_if, "up")
        _ip(*n, "route", "add", s.gateway, "dev", s.unit_if, "scope", "link")
        _ip(*n, "route", "add", "default", "via", s.gateway, "dev", s.unit_if)
        _ip("addr", "add", s.gateway + "/32", "dev", s.host_if)
        _sysctl("net.ipv4.ip_forward", "1")
        _sysctl(f"net.ipv4.conf.{s.host_if}.rp_filter", "0")
        if active:
            self.activate(announce=False)

    def activate(self, announce: bool = True) -> None:
        """Route the VIP to the unit and claim it on the LAN (idempotent)."""
        s = self.spec
        _ip("link", "set", s.host_if, "up")
        _ip("route", "replace", s.vip_addr + "/32", "dev", s.host_if)
        _ip("neigh", "replace", "proxy", s.vip_addr, "dev", s.dev)
        if announce:
            gratuitous_arp(s.dev, s.vip_addr)

    def deactivate(self) -> None:
        s = self.spec
        _ip("neigh", "del", "proxy", s.vip_addr, "dev", s.dev, check=False)
        _ip("route", "del", s.vip_addr + "/32", "dev", s.host_if, check=False)
        _ip("link", "set", s.host_if, "down", check=False)

    def remove(self) -> None:
        s = self.spec
        _ip("neigh", "del", "proxy", s.vip_addr, "dev", s.dev, check=False)
        _ip("link", "del", s.host_if, check=False)
        if Path(s.netns_path).exists():
            _ip("netns", "del", s.netns, check=False)


def hold_inbound(host_if: str, on: bool) -> None:
    """Drop packets towards a unit behind host_if (during a restore its kernel would RST them)."""
    rule = ["FORWARD", "-o", host_if, "-j", "DROP", "-m", "comment", "--comment",
            f"remus-restore-{host_if}"]
    if on:
        p = subprocess.run(["iptables", "-w", "-I", *rule], capture_output=True, text=True)
        if p.returncode != 0:
            raise HostError(f"iptables: {p.stderr.strip()}")
    else:
        # One delete releases the hold (it is on the failover path); leftovers of an
        # earlier takeover that died holding are removed in the background.
        delete = ["iptables", "-w", "-D", *rule]
        if _succeeds(delete):
            threading.Thread(target=_repeat_until_it_fails, args=(delete,), daemon=True).start()


def _succeeds(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True).returncode == 0


def _repeat_until_it_fails(argv: list[str]) -> None:
    while _succeeds(argv):
        pass


def gratuitous_arp(dev: str, addr: str, count: int = 3) -> None:
    """Announce that `addr` now lives at `dev`'s MAC (ARP request form)."""
    mac = bytes.fromhex(Path(f"/sys/class/net/{dev}/address").read_text().strip().replace(":", ""))
    ip = socket.inet_aton(addr)
    frame = (b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
             + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip)
    sk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sk.bind((dev, 0))
        sk.send(frame)
    except BaseException:
        sk.close()
        raise
    # The repeats (for a lost first frame) must not delay the takeover.
    threading.Thread(target=_repeat_frame, args=(sk, frame, count - 1, 0.005), daemon=True).start()


def _repeat_frame(sk: socket.socket, frame: bytes, count: int, spacing: float) -> None:
    with sk:
        for _ in range(count):
            time.sleep(spacing)
            try:
                sk.send(frame)
            except OSError:
                return


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


def netns_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except FileNotFoundError as e:
        raise ConfigError(f"no process with pid {pid}") from e
    except PermissionError as e:
        raise ConfigError(f"cannot inspect pid {pid}: {e} (run as root)") from e
