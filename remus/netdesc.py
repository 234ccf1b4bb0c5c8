"""Describe an existing container's network; rebuild it identically elsewhere.

`remus protect PID` protects a process whose network namespace somebody else
made (`ip netns add` + a veth, a container runtime, a script). The backup
cannot restore into that namespace (it lives on the primary), so it builds an
identical one: CRIU runs inside the namespace (docs/protect.md) and restores
sockets that expect the same interface names, MACs, addresses and routes.

- describe(pid): read the unit's namespace and this host's side of its veth
  ("this host" is the caller's network namespace) into a JSON-able dict.
- build(desc, netns_name, active): on the backup, make the named namespace and
  the veth exactly as described; standby (active=False) leaves the host side
  of the veth down and installs no host route or proxy entry.
- activate(desc, netns_name, dev): after the restore, bring the host side up,
  route and proxy the unit's addresses, and announce them.
- remove(desc, netns_name), deactivate(desc) (fence on the primary).

This module is the kernel side: it reads `ip -j` output and runs `ip`
commands. Reading (remus.netdesc_read) and planning (remus.netdesc_plan) are
pure (recorded `ip -j` output in, argv lists out, see
tests/unit/test_netdesc.py). remus.container.DescribedContainer wraps build,
activate, deactivate and remove in Container's interface. What is rebuilt and
what is refused: docs/protect.md.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from remus.arp import announce_inside, gratuitous_arp
from remus.errors import ConfigError, HostError
from remus.netdesc_plan import Step, activate_plan, announce_plan, build_plan, check_host, remove_plan
from remus.netdesc_read import Desc, NsDump, Raw, assemble, check_version
from remus.netns import netns_id, netns_of, netns_path
from remus.proc import run_cmd

log = logging.getLogger(__name__)


def ip_json(args: Sequence[str], netns: str | None = None) -> Raw:
    """`ip -j ARGS` parsed; netns: a namespace file (None: the caller's)."""
    out = run_cmd(["ip", "-j", *args], netns=netns).stdout.strip()
    return json.loads(out) if out else []


def dump_ns(netns: str | None, host: bool = False) -> NsDump:
    """netns: a namespace file (None: the caller's); host also reads proxy entries."""
    def j(*args: str) -> Raw:
        return ip_json(args, netns)

    return NsDump(links=j("-d", "link", "show"), addrs=j("addr", "show"),
                  routes4=j("-4", "route", "show", "table", "all"),
                  routes6=j("-6", "route", "show", "table", "all"),
                  rules4=[] if host else j("-4", "rule", "show"),
                  rules6=[] if host else j("-6", "rule", "show"),
                  proxy=j("neigh", "show", "proxy") if host else [])


def read_sysctl(key: str) -> str | None:
    """A sysctl of the caller's network namespace (/proc/sys/net follows the reader)."""
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def describe(pid: int) -> Desc:
    """Describe pid's network container as seen from this host (the caller's netns)."""
    path = f"/proc/{pid}/ns/net"
    if netns_of(pid) == netns_of(os.getpid()):
        raise ConfigError(f"pid {pid} shares this host's network namespace: remus cannot hold its "
                          "output or move its connections; start it with `remus run -- CMD` or "
                          "in a container with its own network namespace")
    host = dump_ns(None, host=True)  # first: dumping a veth assigns its peer's nsid
    unit = dump_ns(path)
    desc = assemble(pid, unit, host, netns_id(path), read_sysctl)
    desc["warnings"] += _iptables_warnings(path)
    for w in desc["warnings"]:
        log.warning("pid %d: %s", pid, w)
    return desc


def _iptables_warnings(netns: str) -> list[str]:
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        try:
            res = run_cmd([tool], netns=netns, check=False)
        except HostError:  # no such tool here: then nobody made such rules either
            continue
        if any(line.startswith("-A ") for line in res.stdout.splitlines()):
            out.append(f"the unit's namespace has {tool.split('-')[0]} rules: the backup does "
                       "not rebuild them")
    return out


def run_steps(steps: list[Step], check: bool = True) -> None:
    """Run a plan's steps in order: `ip` argvs, and sysctl steps as /proc/sys writes."""
    for step in steps:
        if step[0] == "sysctl":
            try:
                Path("/proc/sys", step[1]).write_text(step[2])
            except OSError as e:
                if check:
                    raise HostError(f"sysctl {step[1]}={step[2]}: {e.strerror}") from e
        else:
            run_cmd(step, check=check)


def _owned(desc: Desc, ns: str, host_links: Raw) -> list[str]:
    """Host links of the description whose peer lives in our namespace `ns`."""
    path = netns_path(ns)
    if not os.path.exists(path):
        return []
    nsid = netns_id(path)
    names = {h["name"] for h in desc["host"]["links"]}
    return [lk["ifname"] for lk in host_links if lk["ifname"] in names and nsid >= 0
            and lk.get("link_netnsid") == nsid]


def build(desc: Desc, netns_name: str, active: bool) -> None:
    """Make namespace netns_name and its host side as described (replacing our leftovers).

    active=False: standby, the host side of the veth down, no host routes or
    proxy entries; activate() later. Raises ConfigError if this host lacks
    the bridge or devices the description names."""
    check_version(desc)
    host_links = ip_json(["-d", "link", "show"])
    owned = _owned(desc, netns_name, host_links)
    check_host(desc, host_links, owned)
    if os.path.exists(netns_path(netns_name)):
        run_steps(remove_plan(desc, netns_name, owned), check=False)
    try:
        run_steps(build_plan(desc, netns_name))
        if active:
            activate(desc, netns_name, announce=False)
    except Exception:
        remove(desc, netns_name)
        raise
    log.info("container %s built from the description of pid %s (%s, host side %s%s)",
             netns_name, desc.get("pid"), ", ".join(desc["ipv4"]), desc["host_if"],
             "" if active else " down")


def activate(desc: Desc, netns_name: str, dev: str | None = None, announce: bool = True) -> None:
    """Bring the built container onto the network and claim its IPv4 addresses.

    dev: the host device clients use, announced on in addition to the devices
    of the proxy entries (ignored if it is the unit's bridge: then the unit
    announces itself from inside, with its own MAC)."""
    run_steps(activate_plan(desc))
    if announce:
        for where, d, mac, addr in announce_plan(desc, dev):
            if where == "host":
                gratuitous_arp(d, addr)
            else:
                announce_inside(netns_path(netns_name), d, mac, addr)


def deactivate(desc: Desc) -> None:
    """Cut the unit off the network (fence): host side of its veth down."""
    run_steps([["ip", "link", "set", h["name"], "down"] for h in desc["host"]["links"]], check=False)


def remove(desc: Desc, netns_name: str) -> None:
    """Remove what build/activate made; leaves links that are not ours alone."""
    if not os.path.exists(netns_path(netns_name)):
        return
    owned = _owned(desc, netns_name, ip_json(["-d", "link", "show"]))
    run_steps(remove_plan(desc, netns_name, owned), check=False)
