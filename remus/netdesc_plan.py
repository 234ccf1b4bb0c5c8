"""Planning: the steps that rebuild, activate and remove a described container (pure).

A step is an argv (`ip ...`) or ["sysctl", "net/ipv4/...", value] (a write
under /proc/sys); remus.netdesc runs them. Plans only turn a description
(remus.netdesc_read) into steps, so tests compare them as lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from remus.errors import ConfigError
from remus.netdesc_read import Desc, Raw, check_version, link_kind

Step = list[str]  # ["ip", ...] or ["sysctl", "net/ipv4/...", value]


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
    check_version(desc)
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
    check_version(desc)
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
        if br and link_kind(by_name[br]) != "bridge":
            raise ConfigError(f"{br} on this host is a {link_kind(by_name[br])} link, not a bridge")
    for p in desc["host"]["proxy"]:
        if p["dev"] not in by_name and p["dev"] not in {h["name"] for h in desc["host"]["links"]}:
            raise ConfigError(f"device {p['dev']} does not exist on this host: the primary "
                              f"answers for {p['dst']} there (proxy neighbour entry)")
