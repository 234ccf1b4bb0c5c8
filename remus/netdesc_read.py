"""Reading a container's network into a description (pure: recorded `ip -j` output in).

The description (a JSON-able dict, `Desc`) says what the backup must rebuild:
the unit's links, addresses and routes, and this host's side of its veth
(its name, MAC, bridge, addresses, routes, proxy entries, sysctls). What
cannot be rebuilt is refused here with a ConfigError naming it (see
docs/protect.md). remus.netdesc.describe() reads the kernel and calls
assemble(); tests/unit/test_netdesc.py replays recorded dumps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from remus.errors import ConfigError

VERSION = 1
Desc = dict[str, Any]
Raw = list[dict[str, Any]]

# Made by the kernel in every namespace while their modules are loaded; the
# backup's kernel makes its own, so they are not part of the container.
FALLBACK_TUNNELS = frozenset({"tunl0", "sit0", "gre0", "gretap0", "erspan0", "ip6tnl0", "ip6gre0",
                              "ip_vti0", "ip6_vti0"})
DEFAULT_RULES = {"inet": {(0, "local"), (32766, "main"), (32767, "default")},
                 "inet6": {(0, "local"), (32766, "main")}}
ROUTE_METRICS = ("mtu", "advmss", "window", "initcwnd", "initrwnd", "hoplimit")
HOST_SYSCTLS = ("rp_filter", "proxy_arp")


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


def link_kind(link: dict[str, Any]) -> str:
    """lo, veth, bridge, ...: what `ip -d link` says a link is."""
    if link.get("link_type") == "loopback":
        return "loopback"
    return str(link.get("linkinfo", {}).get("info_kind") or link.get("link_type") or "?")


def _link(link: dict[str, Any]) -> dict[str, Any]:
    return {"name": link["ifname"], "kind": link_kind(link), "mac": link.get("address"),
            "mtu": link["mtu"], "up": "UP" in link.get("flags", []), "ifindex": link["ifindex"]}


def container_links(raw: Raw) -> tuple[list[dict[str, Any]], Raw]:
    """(links to rebuild, raw veth entries whose peers must be on this host)."""
    links, veths = [], []
    for lk in raw:
        kind, name = link_kind(lk), lk["ifname"]
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
        if (nsid < 0 or h is None or link_kind(h) != "veth" or h.get("link_netnsid") != nsid
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
    if master is not None and link_kind(master) != "bridge":
        raise ConfigError(f"the host side {hl['name']} is enslaved to {hl['master']}, which is "
                          f"a {link_kind(master)} link, not a bridge: not supported")
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


def check_version(desc: Desc) -> None:
    """Refuse a description written by another version of remus."""
    if desc.get("version") != VERSION:
        raise ConfigError(f"network description version {desc.get('version')!r}: this remus "
                          f"reads version {VERSION} (run the same remus on both hosts)")
