"""The unit's network container on this host: its netns, veth, routes and proxy entry.

Two kinds, one interface (exists, create(active), activate(announce),
deactivate, remove; netns_path and host_if): Container builds the container
of `remus run` from a UnitSpec; DescribedContainer rebuilds the container of
`remus protect` from the primary's description (remus.netdesc).

Network layout of Container (routed, see docs/architecture.md):

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

import ipaddress
import os
import subprocess
from pathlib import Path
from typing import Any, Protocol

from remus import netdesc
from remus.arp import gratuitous_arp
from remus.errors import ConfigError
from remus.netdesc_read import Desc
from remus.netns import netns_path
from remus.proc import run_cmd
from remus.unit import UnitSpec


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cmd(["ip", *args], check=check)


# from linux/neighbour.h and linux/rtnetlink.h
NTF_PROXY = 0x08
NUD_PERMANENT = 0x80
RTPROT_BOOT = 3  # what `ip route` sets by default


def rtnl() -> Any:
    """An rtnetlink socket of this network namespace (pyroute2's IPRoute).

    Imported here, not at the top: pyroute2 takes ~0.2 s to import, which every
    `remus` command would pay; agents import it at start (warm_up) instead."""
    from pyroute2 import IPRoute

    return IPRoute()


def warm_up() -> None:
    """Import pyroute2 before it is needed on the takeover path."""
    rtnl().close()


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise ConfigError(f"no interface {ifname} on this host")
    return int(found[0])


def _sysctl(key: str, value: str) -> None:
    Path("/proc/sys", key.replace(".", "/")).write_text(value)


class UnitContainer(Protocol):
    """What agents need of a unit's container, built by remus run (Container) or
    described by remus protect (DescribedContainer)."""

    netns_path: str
    host_if: str

    def exists(self) -> bool: ...
    def create(self, active: bool) -> None: ...
    def activate(self, announce: bool = True) -> None: ...
    def deactivate(self) -> None: ...
    def remove(self) -> None: ...


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
        """Route the VIP to the unit and claim it on the LAN (idempotent).

        On the takeover path, so over rtnetlink in this process (pyroute2) rather
        than three `ip` processes: `ip link set up`, `ip route replace VIP/32`,
        `ip neigh replace proxy VIP`, the same three changes."""
        s = self.spec
        with rtnl() as ipr:
            host, dev = _index(ipr, s.host_if), _index(ipr, s.dev)
            ipr.link("set", index=host, state="up")
            ipr.route("replace", dst=s.vip_addr, dst_len=32, oif=host, proto=RTPROT_BOOT)
            ipr.neigh("replace", dst=s.vip_addr, ifindex=dev, flags=NTF_PROXY,
                      state=NUD_PERMANENT)
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


class DescribedContainer:
    """A described container with Container's interface, for agents that handle
    both `remus run` and `remus protect` units the same way."""

    def __init__(self, desc: Desc, netns_name: str, dev: str | None = None) -> None:
        self.desc, self.netns, self.dev = desc, netns_name, dev
        self.netns_path = netns_path(netns_name)
        self.host_if: str = desc["host_if"]

    def exists(self) -> bool:
        return os.path.exists(self.netns_path)

    def create(self, active: bool) -> None:
        netdesc.build(self.desc, self.netns, active)

    def activate(self, announce: bool = True) -> None:
        netdesc.activate(self.desc, self.netns, self.dev, announce)

    def deactivate(self) -> None:
        netdesc.deactivate(self.desc)

    def remove(self) -> None:
        netdesc.remove(self.desc, self.netns)
