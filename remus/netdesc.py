"""Describe an existing container's network; rebuild it identically elsewhere.

`remus protect PID` protects a process whose network namespace somebody else
made (`ip netns add` + a veth, a container runtime, a script). The backup
cannot restore into that namespace (it lives on the primary), so it builds an
identical one: CRIU runs inside the namespace (DESIGN.md, way B) and restores
sockets that expect the same interface names, MACs, addresses and routes.

- describe(pid): read the unit's namespace and this host's side of its veth
  ("this host" is the caller's network namespace) into a JSON-able dict.
- build(desc, netns_name, active): on the backup, make the named namespace and
  the veth exactly as described; standby (active=False) leaves the host side
  of the veth down and installs no host route or proxy entry.
- activate(desc, netns_name, dev): after the restore, bring the host side up,
  route and proxy the unit's addresses, and announce them.
- remove(desc, netns_name), deactivate(desc) (fence on the primary).

Reading and planning are pure (recorded `ip -j` output in, argv lists out,
see tests/unit/test_netdesc.py); only the run_* layer touches the kernel.
What is rebuilt and what is refused: docs/protect.md.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remus.errors import ConfigError, HostError
from remus.netbuf.base import run_cmd
from remus.unit import gratuitous_arp

log = logging.getLogger(__name__)

VERSION = 1
Desc = dict[str, Any]
Raw = list[dict[str, Any]]
Step = list[str]  # ["ip", ...] or ["sysctl", "net/ipv4/...", value]

# Made by the kernel in every namespace while their modules are loaded; the
# backup's kernel makes its own, so they are not part of the container.
FALLBACK_TUNNELS = frozenset({"tunl0", "sit0", "gre0", "gretap0", "erspan0", "ip6tnl0", "ip6gre0",
                              "ip_vti0", "ip6_vti0"})
DEFAULT_RULES = {"inet": {(0, "local"), (32766, "main"), (32767, "default")},
                 "inet6": {(0, "local"), (32766, "main")}}
ROUTE_METRICS = ("mtu", "advmss", "window", "initcwnd", "initrwnd", "hoplimit")
HOST_SYSCTLS = ("rp_filter", "proxy_arp")
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class NsDump:
    """Raw `ip -j` output of one namespace: what describe reads, tests replay."""

    links: Raw  # ip -j -d link show
    addrs: Raw  # ip -j addr show
    routes4: Raw  # ip -4 -j route show table all
    routes6: Raw  # ip -6 -j route show table all
    rules4: Raw = field(default_factory=list)  # ip -4 -j rule show
    rules6: Raw = field(default_factory=list)
    proxy: Raw = field(default_factory=list)  # ip -j neigh show proxy (host side)


# -- reading (pure) ----------------------------------------------------------------
def _kind(link: dict[str, Any]) -> str:
    if link.get("link_type") == "loopback":
        return "loopback"
    return str(link.get("linkinfo", {}).get("info_kind") or link.get("link_type") or "?")


def _link(link: dict[str, Any]) -> dict[str, Any]:
    return {"name": link["ifname"], "kind": _kind(link), "mac": link.get("address"),
            "mtu": link["mtu"], "up": "UP" in link.get("flags", []), "ifindex": link["ifindex"]}


def container_links(raw: Raw) -> tuple[list[dict[str, Any]], Raw]:
    """(links to rebuild, raw veth entries whose peers must be on this host)."""
    links, veths = [], []
    for lk in raw:
        kind, name = _kind(lk), lk["ifname"]
        if kind == "veth" and "master" not in lk:
            veths.append(lk)
        elif kind == "loopback":
            pass
        elif name in FALLBACK_TUNNELS and "UP" not in lk.get("flags", []):
            continue
        else:
            what = f"enslaved to {lk['master']}" if "master" in lk else f"a {kind} link"
            raise ConfigError(
                f"the unit's network namespace has {name}, {what}: remus can rebuild only lo and "
                "veth pairs to this host (not macvlan, ipvlan, vxlan, bridges, tunnels, ...)")
        links.append(_link(lk))
    return links, veths


def find_peers(veths: Raw, host_links: Raw, nsid: int) -> dict[str, dict[str, Any]]:
    """Map each container veth to its host-side peer (raw host link).

    nsid: the id this host gives the unit's namespace (RTM_GETNSID). Matching
    ifindexes alone is not enough: a peer in a third namespace can have the
    same pair of numbers as an unrelated veth of this host."""
    if not veths:
        raise ConfigError("the unit's network namespace has no veth to this host: remus needs "
                          "a veth pair whose other end is in this (the agent's) namespace")
    by_index = {lk["ifindex"]: lk for lk in host_links}
    peers = {}
    for c in veths:
        name = c["ifname"]
        if "link_netnsid" not in c:
            raise ConfigError(f"{name}: both ends of this veth are inside the unit's namespace")
        h = by_index.get(c.get("link_index"))
        if (nsid < 0 or h is None or _kind(h) != "veth" or h.get("link_netnsid") != nsid
                or h.get("link_index") != c["ifindex"]):
            raise ConfigError(f"{name}: the other end of this veth is not in this host's network "
                              "namespace (run remus where the container's host side lives)")
        peers[name] = h
    return peers


def parse_addr(a: dict[str, Any], dev: str) -> dict[str, Any] | None:
    """One `addr_info` entry as we rebuild it; None for what the kernel makes itself."""
    fam, local = a.get("family"), a.get("local")
    if fam not in ("inet", "inet6") or local is None:
        return None
    if fam == "inet6" and (a.get("scope") == "link" or a.get("dynamic")):
        return None  # link-local comes back from the MAC; SLAAC is relearned
    if (local, a.get("prefixlen")) in (("127.0.0.1", 8), ("::1", 128)):
        return None
    out: dict[str, Any] = {"dev": dev, "family": fam, "local": local, "prefixlen": a["prefixlen"]}
    for key in ("address", "broadcast"):
        if a.get(key) and a[key] != local:
            out[key] = a[key]
    if a.get("label") and a["label"] != dev:
        out["label"] = a["label"]
    if a.get("noprefixroute"):
        out["noprefixroute"] = True
    return out


def parse_addrs(raw: Raw, devs: Sequence[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for lk in raw:
        if devs is not None and lk["ifname"] not in devs:
            continue
        for a in lk.get("addr_info", []):
            p = parse_addr(a, lk["ifname"])
            if p is not None:
                out.append(p)
    return out


def _route_name(r: dict[str, Any]) -> str:
    return " ".join(str(x) for x in (r.get("type", ""), r.get("dst"), "via", r.get("gateway"),
                                     "dev", r.get("dev")) if x)


def parse_route(r: dict[str, Any], family: str) -> dict[str, Any]:
    if "nexthops" in r or "nhid" in r:
        raise ConfigError(f"route {_route_name(r)}: multipath/nexthop-object routes are not "
                          "supported")
    out: dict[str, Any] = {"family": family, "dst": r["dst"]}
    if r.get("type", "unicast") != "unicast":
        out["type"] = r["type"]
    for key in ("gateway", "dev", "prefsrc", "metric"):
        if key in r:
            out[key] = r[key]
    if r.get("scope", "global") != "global":
        out["scope"] = r["scope"]
    if r.get("protocol", "boot") != "boot":
        out["protocol"] = r["protocol"]
    if "onlink" in r.get("flags", []):
        out["onlink"] = True
    metrics = {k: v for m in r.get("metrics", []) for k, v in m.items() if k in ROUTE_METRICS}
    if metrics:
        out["metrics"] = metrics
    return out


def parse_routes(raw: Raw, family: str, strict: bool = True) -> list[dict[str, Any]]:
    """Main-table routes we must add (kernel-made ones come back with the addresses).

    strict: refuse routes in other tables (the container side); on the host
    side other tables are the host's own business and are skipped."""
    out = []
    for r in raw:
        table, kernel = r.get("table", "main"), r.get("protocol") == "kernel"
        if table == "main" and not kernel:
            out.append(parse_route(r, family))
        elif strict and (table not in ("main", "local") or not kernel):
            raise ConfigError(f"route {_route_name(r)} in table {table}: only the main table is "
                              "rebuilt (policy routing is not supported)")
    return out


def check_rules(raw: Raw, family: str) -> None:
    for r in raw:
        if (set(r) - {"priority", "src", "table"} or r.get("src", "all") != "all"
                or (r.get("priority"), r.get("table")) not in DEFAULT_RULES[family]):
            rule = " ".join(f"{k} {v}" for k, v in r.items())
            raise ConfigError(f"the unit's namespace has the {family} rule '{rule}': policy "
                              "routing is not supported")


def _family(addr: str) -> str:
    return "inet6" if ":" in addr else "inet"


def host_link(h: dict[str, Any], cname: str, host_links: Raw,
              read_sysctl: Callable[[str], str | None]) -> dict[str, Any]:
    """The host side of the unit's veth `cname` (h: its raw host link)."""
    hl = _link(h)
    del hl["kind"], hl["ifindex"]  # the backup's ifindex is whatever is free there
    hl.update(peer=cname, master=h.get("master"))
    master = next((lk for lk in host_links if lk["ifname"] == hl["master"]), None)
    if master is not None and _kind(master) != "bridge":
        raise ConfigError(f"the host side {hl['name']} is enslaved to {hl['master']}, which is "
                          f"a {_kind(master)} link, not a bridge: not supported")
    hl["sysctl"] = {k: read_sysctl(f"net/ipv4/conf/{hl['name']}/{k}") for k in HOST_SYSCTLS}
    return hl


def assemble(pid: int, unit: NsDump, host: NsDump, nsid: int,
             read_sysctl: Callable[[str], str | None]) -> Desc:
    """The description of pid's container; raises ConfigError for what we cannot rebuild."""
    check_rules(unit.rules4, "inet")
    check_rules(unit.rules6, "inet6")
    links, veths = container_links(unit.links)
    peers = find_peers(veths, host.links, nsid)
    if len(peers) > 1:
        raise ConfigError(f"the unit has {len(peers)} veths to this host ({', '.join(peers)}): "
                          "the output buffer holds one; give the unit one veth")
    addrs = parse_addrs(unit.addrs)
    ipv4 = [a["local"] for a in addrs if a["family"] == "inet"]
    if not ipv4:
        raise ConfigError("the unit has no IPv4 address: IPv6-only containers are not supported "
                          "(the takeover announces addresses with ARP)")
    hlinks = [host_link(h, c, host.links, read_sysctl) for c, h in peers.items()]
    for lk in links:
        lk.update({"host_peer": peers[lk["name"]]["ifname"]} if lk["name"] in peers else {})
    hnames = [h["name"] for h in hlinks]
    proxy = [{"family": _family(p["dst"]), "dst": p["dst"], "dev": p["dev"]} for p in host.proxy
             if p.get("dst") in {a["local"] for a in addrs} or p.get("dev") in hnames]
    hroutes = parse_routes(host.routes4, "inet", False) + parse_routes(host.routes6, "inet6", False)
    return {
        "version": VERSION, "pid": pid, "links": links, "addresses": addrs,
        "routes": parse_routes(unit.routes4, "inet") + parse_routes(unit.routes6, "inet6"),
        "host": {"links": hlinks, "addresses": parse_addrs(host.addrs, hnames),
                 "routes": [r for r in hroutes if r.get("dev") in hnames], "proxy": proxy,
                 "forwarding": {"ipv4": read_sysctl("net/ipv4/ip_forward"),
                                "ipv6": read_sysctl("net/ipv6/conf/all/forwarding")}},
        "host_if": hnames[0], "bridge": hlinks[0]["master"], "ipv4": ipv4,
        "ipv6": [a["local"] for a in addrs if a["family"] == "inet6"],
        "warnings": [f"host side {h['name']} is down" for h in hlinks if not h["up"]],
    }


# -- planning (pure) -----------------------------------------------------------------
def _check_version(desc: Desc) -> None:
    if desc.get("version") != VERSION:
        raise ConfigError(f"network description version {desc.get('version')!r}: this remus "
                          f"reads version {VERSION} (run the same remus on both hosts)")


def addr_args(a: dict[str, Any], verb: str = "add") -> Step:
    fam = "-6" if a["family"] == "inet6" else "-4"
    args = [fam, "addr", verb]
    if "address" in a:  # point-to-point: the prefix belongs to the peer
        args += [a["local"], "peer", f"{a['address']}/{a['prefixlen']}"]
    else:
        args.append(f"{a['local']}/{a['prefixlen']}")
    if "broadcast" in a:
        args += ["broadcast", a["broadcast"]]
    if "label" in a:
        args += ["label", a["label"]]
    if a.get("noprefixroute"):
        args.append("noprefixroute")
    if a["family"] == "inet6" and verb == "add":
        args.append("nodad")  # the address is ours; DAD would only delay the takeover
    return args + ["dev", a["dev"]]


def route_args(r: dict[str, Any], verb: str = "add") -> Step:
    args = ["-6" if r["family"] == "inet6" else "-4", "route", verb]
    if "type" in r:
        args.append(r["type"])
    args.append(r["dst"])
    for key, word in (("gateway", "via"), ("dev", "dev"), ("scope", "scope"), ("prefsrc", "src"),
                      ("metric", "metric"), ("protocol", "proto")):
        if key in r:
            args += [word, str(r[key])]
    if r.get("onlink"):
        args.append("onlink")
    for k, v in r.get("metrics", {}).items():
        args += [k, str(v)]
    return args


def _route_order(r: dict[str, Any]) -> int:
    return 1 if "gateway" in r else 0  # a gateway needs its link route first


def build_plan(desc: Desc, ns: str) -> list[Step]:
    """Steps that make namespace `ns` and the host side as described, host side down."""
    _check_version(desc)
    n = ["ip", "-n", ns]
    steps: list[Step] = [["ip", "netns", "add", ns]]
    links = {lk["name"]: lk for lk in desc["links"]}
    for h in desc["host"]["links"]:
        c = links[h["peer"]]
        steps.append(["ip", "link", "add", h["name"], "address", h["mac"], "mtu", str(h["mtu"]),
                      "type", "veth", "peer", "name", c["name"], "address", c["mac"],
                      "mtu", str(c["mtu"]), "index", str(c["ifindex"]), "netns", ns])
        steps += [["sysctl", f"net/ipv4/conf/{h['name']}/{k}", v]
                  for k, v in h.get("sysctl", {}).items() if v is not None]
        if h.get("master"):
            steps.append(["ip", "link", "set", h["name"], "master", h["master"]])
    steps += [["ip", *addr_args(a)] for a in desc["host"]["addresses"]]
    steps += [[*n, "link", "set", lk["name"], "up"] for lk in desc["links"] if lk["up"]]
    steps += [[*n, *addr_args(a)] for a in desc["addresses"]]
    steps += [[*n, *route_args(r)] for r in sorted(desc["routes"], key=_route_order)]
    return steps


def activate_plan(desc: Desc) -> list[Step]:
    """Steps that put the standby container on the network (idempotent)."""
    _check_version(desc)
    host = desc["host"]
    fwd = host.get("forwarding", {})
    steps: list[Step] = []
    if fwd.get("ipv4") == "1":
        steps.append(["sysctl", "net/ipv4/ip_forward", "1"])
    if fwd.get("ipv6") == "1":
        steps.append(["sysctl", "net/ipv6/conf/all/forwarding", "1"])
    steps += [["ip", "link", "set", h["name"], "up"] for h in host["links"]]
    steps += [["ip", *route_args(r, "replace")] for r in sorted(host["routes"], key=_route_order)]
    steps += [["ip", "-6" if p["family"] == "inet6" else "-4", "neigh", "replace", "proxy",
               p["dst"], "dev", p["dev"]] for p in host["proxy"]]
    return steps


def remove_plan(desc: Desc, ns: str, owned: Sequence[str]) -> list[Step]:
    """Undo build/activate; host links are deleted only if `owned` (peer in ns)."""
    steps: list[Step] = [["ip", "-6" if p["family"] == "inet6" else "-4", "neigh", "del", "proxy",
                          p["dst"], "dev", p["dev"]] for p in desc["host"]["proxy"]]
    steps += [["ip", "link", "del", h] for h in owned]
    return steps + [["ip", "netns", "del", ns]]


def announce_plan(desc: Desc, dev: str | None = None) -> list[tuple[str, str, str, str]]:
    """Gratuitous ARPs after activation: (where, device, MAC or "", IPv4 address).

    where == "host": from this host's device (its MAC; proxied addresses).
    where == "unit": from inside the unit's namespace with the unit's MAC (its
    veth is a bridge port: the LAN must learn the unit's own MAC there)."""
    out: list[tuple[str, str, str, str]] = []
    bridges = {h["master"] for h in desc["host"]["links"] if h.get("master")}
    bridged = {h["peer"] for h in desc["host"]["links"] if h.get("master")}
    macs = {lk["name"]: lk["mac"] for lk in desc["links"]}
    for a in desc["addresses"]:
        if a["family"] == "inet" and a["dev"] in bridged:
            out.append(("unit", a["dev"], macs[a["dev"]], a["local"]))
    for p in desc["host"]["proxy"]:
        if p["family"] == "inet":
            out.append(("host", p["dev"], "", p["dst"]))
    if dev is not None and dev not in bridges:
        out += [("host", dev, "", a) for a in desc["ipv4"]]
    return list(dict.fromkeys(out))


def check_host(desc: Desc, host_links: Raw, owned: Sequence[str] = ()) -> None:
    """Refuse to build on a host that lacks what the description needs."""
    by_name = {lk["ifname"]: lk for lk in host_links}
    for h in desc["host"]["links"]:
        if h["name"] in by_name and h["name"] not in owned:
            raise ConfigError(f"this host already has a link named {h['name']} (not ours): the "
                              "unit's host-side veth needs that name; rename or remove it")
        br = h.get("master")
        if br and br not in by_name:
            raise ConfigError(f"bridge {br} does not exist on this host: on the primary the "
                              f"unit's veth {h['name']} is a port of {br}; create {br} here, "
                              "connected to the same LAN, before starting the backup")
        if br and _kind(by_name[br]) != "bridge":
            raise ConfigError(f"{br} on this host is a {_kind(by_name[br])} link, not a bridge")
    for p in desc["host"]["proxy"]:
        if p["dev"] not in by_name and p["dev"] not in {h["name"] for h in desc["host"]["links"]}:
            raise ConfigError(f"device {p['dev']} does not exist on this host: the primary "
                              f"answers for {p['dst']} there (proxy neighbour entry)")


# -- kernel (I/O) --------------------------------------------------------------------
def _ip_json(args: Sequence[str], netns: str | None = None) -> Raw:
    out = run_cmd(["ip", "-j", *args], netns=netns).stdout.strip()
    return json.loads(out) if out else []


def dump_ns(netns: str | None, host: bool = False) -> NsDump:
    """netns: a namespace file (None: the caller's); host also reads proxy entries."""
    def j(*args: str) -> Raw:
        return _ip_json(args, netns)

    return NsDump(links=j("-d", "link", "show"), addrs=j("addr", "show"),
                  routes4=j("-4", "route", "show", "table", "all"),
                  routes6=j("-6", "route", "show", "table", "all"),
                  rules4=[] if host else j("-4", "rule", "show"),
                  rules6=[] if host else j("-6", "rule", "show"),
                  proxy=j("neigh", "show", "proxy") if host else [])


def netns_id(path: str) -> int:
    """The id this namespace gives the namespace at `path` (-1: none assigned).

    RTM_GETNSID by fd; pyroute2 0.9 has no synchronous call for it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        body = struct.pack("=B3xHHI", 0, 8, 3, fd)  # rtgenmsg + NETNSA_FD
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sk:
            sk.send(struct.pack("=IHHII", 16 + len(body), 90, 1, 1, 0) + body)
            data = sk.recv(4096)
    finally:
        os.close(fd)
    length, typ = struct.unpack_from("=IH", data)
    if typ == 2:  # NLMSG_ERROR
        raise HostError(f"RTM_GETNSID: {os.strerror(-struct.unpack_from('=i', data, 16)[0])}")
    off = 20
    while off + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, off)
        if atype == 1:  # NETNSA_NSID
            return int(struct.unpack_from("=i", data, off + 4)[0])
        off += max(4, (alen + 3) & ~3)
    return -1


def read_sysctl(key: str) -> str | None:
    """A sysctl of the caller's network namespace (/proc/sys/net follows the reader)."""
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def describe(pid: int) -> Desc:
    """Describe pid's network container as seen from this host (the caller's netns)."""
    path = f"/proc/{pid}/ns/net"
    try:
        theirs, ours = os.stat(path), os.stat("/proc/self/ns/net")
    except FileNotFoundError as e:
        raise ConfigError(f"no process with pid {pid}") from e
    except PermissionError as e:
        raise ConfigError(f"cannot inspect pid {pid}: {e.strerror} (run as root)") from e
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
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


def _run(steps: list[Step], check: bool = True) -> None:
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
    path = f"/run/netns/{ns}"
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
    _check_version(desc)
    host_links = _ip_json(["-d", "link", "show"])
    owned = _owned(desc, netns_name, host_links)
    check_host(desc, host_links, owned)
    if os.path.exists(f"/run/netns/{netns_name}"):
        _run(remove_plan(desc, netns_name, owned), check=False)
    try:
        _run(build_plan(desc, netns_name))
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
    _run(activate_plan(desc))
    if announce:
        for where, d, mac, addr in announce_plan(desc, dev):
            if where == "host":
                gratuitous_arp(d, addr)
            else:
                _announce_inside(f"/run/netns/{netns_name}", d, mac, addr)


def deactivate(desc: Desc) -> None:
    """Cut the unit off the network (fence): host side of its veth down."""
    _run([["ip", "link", "set", h["name"], "down"] for h in desc["host"]["links"]], check=False)


def remove(desc: Desc, netns_name: str) -> None:
    """Remove what build/activate made; leaves links that are not ours alone."""
    if not os.path.exists(f"/run/netns/{netns_name}"):
        return
    owned = _owned(desc, netns_name, _ip_json(["-d", "link", "show"]))
    _run(remove_plan(desc, netns_name, owned), check=False)


def garp_frame(mac: str, addr: str) -> bytes:
    """A gratuitous ARP request: `addr` is at `mac` (same form as unit.gratuitous_arp)."""
    hw, ip = bytes.fromhex(mac.replace(":", "")), socket.inet_aton(addr)
    return (b"\xff" * 6 + hw + struct.pack("!H", 0x0806)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\x00" * 6 + ip)


def _announce_inside(netns_path: str, dev: str, mac: str, addr: str, count: int = 3) -> None:
    # A thread of our own joins the unit's namespace: setns(CLONE_NEWNET) is
    # per thread, and the packet socket belongs to the namespace it was made in.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sk:
                sk.bind((dev, 0))
                for i in range(count):
                    sk.send(garp_frame(mac, addr))
                    if i + 1 < count:
                        time.sleep(0.005)
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=run, name="garp-in-unit")
    t.start()
    t.join()
    if errors:
        raise HostError(f"announcing {addr} from {dev} in {netns_path}: {errors[0]}")


def netns_path(netns_name: str) -> str:
    """Where build() puts the namespace (CRIU's --net target on the backup)."""
    return f"/run/netns/{netns_name}"


class DescribedContainer:
    """A described container with remus.unit.Container's interface, for agents
    that handle both `remus run` and `remus protect` units the same way."""

    def __init__(self, desc: Desc, netns_name: str, dev: str | None = None) -> None:
        self.desc, self.netns, self.dev = desc, netns_name, dev
        self.netns_path = netns_path(netns_name)
        self.host_if: str = desc["host_if"]

    def exists(self) -> bool:
        return os.path.exists(self.netns_path)

    def create(self, active: bool) -> None:
        build(self.desc, self.netns, active)

    def activate(self, announce: bool = True) -> None:
        activate(self.desc, self.netns, self.dev, announce)

    def deactivate(self) -> None:
        deactivate(self.desc)

    def remove(self) -> None:
        remove(self.desc, self.netns)
