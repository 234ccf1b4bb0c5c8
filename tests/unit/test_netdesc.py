"""remus.netdesc_read and netdesc_plan: recorded `ip -j` output in, description and plans out.

UNIT and HOST were recorded (trimmed to the keys we read) from a container made
by hand: eth0 10.66.0.50/32 + fd66::50/128 in the unit's namespace, its peer
vr-unit on the host with 169.254.9.1/32, a host route and a proxy ARP entry on
lan0 (tests/integration/test_protect.py builds the same). lan0 is itself a
veth to a switch namespace (nsid 0): the unit's namespace is nsid 1.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from typing import Any

import pytest

from remus import arp
from remus import netdesc as nd
from remus import netdesc_plan as ndp
from remus import netdesc_read as ndr
from remus.container import DescribedContainer
from remus.errors import ConfigError

UNIT: dict[str, Any] = dict(
    links=[{"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "mtu": 65536, "link_type": "loopback", "address": "00:00:00:00:00:00"}, {"ifindex": 2, "link_index": 3, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1400, "link_type": "ether", "address": "02:66:00:00:aa:02", "link_netnsid": 0, "linkinfo": {"info_kind": "veth"}}],  # noqa: E501
    addrs=[{"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host", "label": "lo"}, {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"}]}, {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "10.66.0.50", "prefixlen": 32, "scope": "global", "label": "eth0"}, {"family": "inet6", "local": "fd66::50", "prefixlen": 128, "scope": "global", "nodad": True}, {"family": "inet6", "local": "fe80::66:ff:fe00:aa02", "prefixlen": 64, "scope": "link"}]}],  # noqa: E501
    routes4=[{"dst": "default", "gateway": "169.254.9.1", "dev": "eth0", "flags": []}, {"dst": "10.67.0.0/16", "gateway": "169.254.9.1", "dev": "eth0", "metric": 5, "flags": []}, {"dst": "169.254.9.1", "dev": "eth0", "scope": "link", "flags": []}, {"type": "local", "dst": "10.66.0.50", "dev": "eth0", "table": "local", "protocol": "kernel", "scope": "host", "prefsrc": "10.66.0.50", "flags": []}, {"type": "local", "dst": "127.0.0.0/8", "dev": "lo", "table": "local", "protocol": "kernel", "scope": "host", "prefsrc": "127.0.0.1", "flags": []}, {"type": "local", "dst": "127.0.0.1", "dev": "lo", "table": "local", "protocol": "kernel", "scope": "host", "prefsrc": "127.0.0.1", "flags": []}, {"type": "broadcast", "dst": "127.255.255.255", "dev": "lo", "table": "local", "protocol": "kernel", "scope": "link", "prefsrc": "127.0.0.1", "flags": []}],  # noqa: E501
    routes6=[{"dst": "fd66::50", "dev": "eth0", "protocol": "kernel", "metric": 256, "flags": [], "pref": "medium"}, {"dst": "fd67::/64", "dev": "eth0", "metric": 7, "flags": [], "pref": "medium"}, {"dst": "fe80::/64", "dev": "eth0", "protocol": "kernel", "metric": 256, "flags": [], "pref": "medium"}, {"type": "local", "dst": "::1", "dev": "lo", "table": "local", "protocol": "kernel", "metric": 0, "flags": [], "pref": "medium"}, {"type": "local", "dst": "fd66::50", "dev": "eth0", "table": "local", "protocol": "kernel", "metric": 0, "flags": [], "pref": "medium"}, {"type": "multicast", "dst": "ff00::/8", "dev": "eth0", "table": "local", "protocol": "kernel", "metric": 256, "flags": [], "pref": "medium"}],  # noqa: E501
    rules4=[{"priority": 0, "src": "all", "table": "local"}, {"priority": 32766, "src": "all", "table": "main"}, {"priority": 32767, "src": "all", "table": "default"}],  # noqa: E501
    rules6=[{"priority": 0, "src": "all", "table": "local"}, {"priority": 32766, "src": "all", "table": "main"}],  # noqa: E501
    proxy=[],
)
HOST: dict[str, Any] = dict(
    links=[{"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "mtu": 65536, "link_type": "loopback", "address": "00:00:00:00:00:00"}, {"ifindex": 2, "link_index": 3, "ifname": "lan0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1500, "link_type": "ether", "address": "02:66:00:00:00:01", "link_netnsid": 0, "linkinfo": {"info_kind": "veth"}}, {"ifindex": 3, "link_index": 2, "ifname": "vr-unit", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1500, "link_type": "ether", "address": "02:66:00:00:aa:01", "link_netnsid": 1, "linkinfo": {"info_kind": "veth"}}],  # noqa: E501
    addrs=[{"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host", "label": "lo"}, {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"}]}, {"ifname": "lan0", "addr_info": [{"family": "inet", "local": "10.66.0.1", "prefixlen": 24, "scope": "global", "label": "lan0"}, {"family": "inet6", "local": "fe80::66:ff:fe00:1", "prefixlen": 64, "scope": "link"}]}, {"ifname": "vr-unit", "addr_info": [{"family": "inet", "local": "169.254.9.1", "prefixlen": 32, "scope": "global", "label": "vr-unit"}, {"family": "inet6", "local": "fe80::66:ff:fe00:aa01", "prefixlen": 64, "scope": "link"}]}],  # noqa: E501
    routes4=[{"dst": "10.66.0.0/24", "dev": "lan0", "protocol": "kernel", "scope": "link", "prefsrc": "10.66.0.1", "flags": []}, {"dst": "10.66.0.50", "dev": "vr-unit", "scope": "link", "flags": []}, {"type": "local", "dst": "10.66.0.1", "dev": "lan0", "table": "local", "protocol": "kernel", "scope": "host", "prefsrc": "10.66.0.1", "flags": []}, {"type": "broadcast", "dst": "10.66.0.255", "dev": "lan0", "table": "local", "protocol": "kernel", "scope": "link", "prefsrc": "10.66.0.1", "flags": []}, {"type": "local", "dst": "127.0.0.0/8", "dev": "lo", "table": "local", "protocol": "kernel", "scope": "host", "prefsrc": "127.0.0.1", "flags": []}, {"type": "local", "dst": "169.254.9.1", "dev": "vr-unit", "table": "local", "protocol": "kernel", "scope": "host", "prefsrc": "169.254.9.1", "flags": []}],  # noqa: E501
    routes6=[{"dst": "fe80::/64", "dev": "lan0", "protocol": "kernel", "metric": 256, "flags": [], "pref": "medium"}, {"dst": "fe80::/64", "dev": "vr-unit", "protocol": "kernel", "metric": 256, "flags": [], "pref": "medium"}, {"type": "multicast", "dst": "ff00::/8", "dev": "vr-unit", "table": "local", "protocol": "kernel", "metric": 256, "flags": [], "pref": "medium"}],  # noqa: E501
    proxy=[{"dst": "10.66.0.50", "dev": "lan0", "proxy": None}, {"dst": "10.66.0.77", "dev": "lan0", "proxy": None}],  # noqa: E501
)
UNIT_NSID = 1
SYSCTL = {"net/ipv4/conf/vr-unit/rp_filter": "0", "net/ipv4/conf/vr-unit/proxy_arp": "0",
          "net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "0"}


def dumps(unit: dict[str, Any] | None = None, host: dict[str, Any] | None = None
          ) -> tuple[ndr.NsDump, ndr.NsDump]:
    return ndr.NsDump(**copy.deepcopy(unit or UNIT)), ndr.NsDump(**copy.deepcopy(host or HOST))


def describe(unit: dict[str, Any] | None = None, host: dict[str, Any] | None = None,
             nsid: int = UNIT_NSID) -> ndr.Desc:
    u, h = dumps(unit, host)
    return ndr.assemble(4242, u, h, nsid, SYSCTL.get)


def bridged_host() -> dict[str, Any]:
    host = copy.deepcopy(HOST)
    host["links"].append({"ifindex": 4, "ifname": "br-rpd", "flags": ["UP"], "mtu": 1500,
                          "link_type": "ether", "address": "02:66:00:00:bb:01",
                          "linkinfo": {"info_kind": "bridge"}})
    host["links"][2]["master"] = "br-rpd"
    host["routes4"] = [r for r in host["routes4"] if r["dst"] != "10.66.0.50"]
    host["proxy"] = []
    return host


def with_link(link: dict[str, Any]) -> dict[str, Any]:
    unit = copy.deepcopy(UNIT)
    unit["links"].append(link)
    return unit


# -- describe --------------------------------------------------------------------------
def test_routed_container_described() -> None:
    d = describe()
    assert d["links"] == [
        {"name": "lo", "kind": "loopback", "mac": "00:00:00:00:00:00", "mtu": 65536, "up": True,
         "ifindex": 1},
        {"name": "eth0", "kind": "veth", "mac": "02:66:00:00:aa:02", "mtu": 1400, "up": True,
         "ifindex": 2, "host_peer": "vr-unit"}]
    assert d["addresses"] == [
        {"dev": "eth0", "family": "inet", "local": "10.66.0.50", "prefixlen": 32},
        {"dev": "eth0", "family": "inet6", "local": "fd66::50", "prefixlen": 128}]
    assert d["routes"] == [
        {"family": "inet", "dst": "default", "gateway": "169.254.9.1", "dev": "eth0"},
        {"family": "inet", "dst": "10.67.0.0/16", "gateway": "169.254.9.1", "dev": "eth0",
         "metric": 5},
        {"family": "inet", "dst": "169.254.9.1", "dev": "eth0", "scope": "link"},
        {"family": "inet6", "dst": "fd67::/64", "dev": "eth0", "metric": 7}]
    host = d["host"]
    assert host["links"] == [{"name": "vr-unit", "mac": "02:66:00:00:aa:01", "mtu": 1500,
                              "up": True, "peer": "eth0", "master": None,
                              "sysctl": {"rp_filter": "0", "proxy_arp": "0"}}]
    assert host["addresses"] == [{"dev": "vr-unit", "family": "inet", "local": "169.254.9.1",
                                  "prefixlen": 32}]
    assert host["routes"] == [{"family": "inet", "dst": "10.66.0.50", "dev": "vr-unit",
                               "scope": "link"}]
    # 10.66.0.77 is proxied too, but it is not the unit's: not part of the container
    assert host["proxy"] == [{"family": "inet", "dst": "10.66.0.50", "dev": "lan0"}]
    assert host["forwarding"] == {"ipv4": "1", "ipv6": "0"}
    assert (d["host_if"], d["bridge"], d["ipv4"], d["ipv6"]) == ("vr-unit", None, ["10.66.0.50"],
                                                                   ["fd66::50"])
    assert d["warnings"] == [] and d["version"] == ndr.VERSION
    assert json.loads(json.dumps(d)) == d


def test_bridged_container_records_the_bridge() -> None:
    d = describe(host=bridged_host())
    assert d["bridge"] == "br-rpd" and d["host"]["links"][0]["master"] == "br-rpd"
    assert d["host"]["routes"] == [] and d["host"]["proxy"] == []


def test_peer_in_another_namespace_is_refused() -> None:
    # lan0's numbers (ifindex 2 <-> 3) would match eth0 too, if only ifindexes were compared
    host = copy.deepcopy(HOST)
    host["links"] = [lk for lk in host["links"] if lk["ifname"] != "vr-unit"]
    host["links"][1].update(ifindex=3, link_index=2)
    with pytest.raises(ConfigError, match="not in this host's network namespace"):
        describe(host=host)  # lan0 leads to nsid 0 (the switch), the unit is nsid 1
    with pytest.raises(ConfigError, match="not in this host's network namespace"):
        describe(nsid=-1)  # this host has no id for the unit's namespace: no veth to it


def test_refusals() -> None:
    unit = copy.deepcopy(UNIT)
    unit["links"] = unit["links"][:1]
    with pytest.raises(ConfigError, match="no veth to this host"):
        describe(unit)
    mac = {"ifindex": 5, "link_index": 2, "ifname": "mv0", "flags": ["UP"], "mtu": 1500,
           "link_type": "ether", "address": "02:00:00:00:00:05", "linkinfo": {"info_kind": "macvlan"}}
    with pytest.raises(ConfigError, match="mv0, a macvlan link"):
        describe(with_link(mac))
    tun = {"ifindex": 6, "ifname": "tunl0", "flags": ["NOARP"], "mtu": 1480, "link_type": "ipip",
           "linkinfo": {"info_kind": "ipip"}}
    assert [lk["name"] for lk in describe(with_link(tun))["links"]] == ["lo", "eth0"]
    with pytest.raises(ConfigError, match="tunl0, a ipip link"):
        describe(with_link({**tun, "flags": ["NOARP", "UP"]}))
    unit = copy.deepcopy(UNIT)
    unit["rules4"].insert(1, {"priority": 100, "from": "10.66.0.50", "table": "7"})
    with pytest.raises(ConfigError, match="policy routing"):
        describe(unit)
    unit = copy.deepcopy(UNIT)
    unit["routes4"].append({"dst": "default", "gateway": "169.254.9.1", "dev": "eth0",
                            "table": "7", "flags": []})
    with pytest.raises(ConfigError, match="in table 7"):
        describe(unit)
    unit = copy.deepcopy(UNIT)
    unit["routes4"][0] = {"dst": "default", "nexthops": [{"gateway": "169.254.9.1"}]}
    with pytest.raises(ConfigError, match="multipath"):
        describe(unit)
    unit = copy.deepcopy(UNIT)
    unit["addrs"][1]["addr_info"] = unit["addrs"][1]["addr_info"][1:]
    with pytest.raises(ConfigError, match="IPv6-only"):
        describe(unit)
    host = bridged_host()
    host["links"][3]["linkinfo"]["info_kind"] = "bond"
    with pytest.raises(ConfigError, match="not a bridge"):
        describe(host=host)


def test_addresses_the_kernel_makes_are_left_out() -> None:
    info = [{"family": "inet6", "local": "2001:db8::5", "prefixlen": 64, "scope": "global",
             "dynamic": True}, {"family": "inet", "local": "10.1.0.1", "address": "10.1.0.2",
                                "prefixlen": 32, "label": "eth0:ptp"},
            {"family": "inet", "local": "10.2.0.1", "prefixlen": 24, "broadcast": "10.2.0.255",
             "noprefixroute": True}]
    assert ndr.parse_addrs([{"ifname": "eth0", "addr_info": info}]) == [
        {"dev": "eth0", "family": "inet", "local": "10.1.0.1", "prefixlen": 32,
         "address": "10.1.0.2", "label": "eth0:ptp"},
        {"dev": "eth0", "family": "inet", "local": "10.2.0.1", "prefixlen": 24,
         "broadcast": "10.2.0.255", "noprefixroute": True}]


def test_describe_refuses_the_callers_own_namespace_and_missing_pids() -> None:
    with pytest.raises(ConfigError, match="shares this host's network namespace"):
        nd.describe(os.getpid())
    with pytest.raises(ConfigError, match="no process with pid"):
        nd.describe(2**22 + 1)  # above pid_max's ceiling: never a process


# -- plans -----------------------------------------------------------------------------
def test_build_plan_rebuilds_both_sides_with_the_host_side_down() -> None:
    plan = ndp.build_plan(describe(), "remus-x")
    assert plan == [
        ["ip", "netns", "add", "remus-x"],
        ["ip", "link", "add", "vr-unit", "address", "02:66:00:00:aa:01", "mtu", "1500", "type",
         "veth", "peer", "name", "eth0", "address", "02:66:00:00:aa:02", "mtu", "1400",
         "index", "2", "netns", "remus-x"],
        ["sysctl", "net/ipv4/conf/vr-unit/rp_filter", "0"],
        ["sysctl", "net/ipv4/conf/vr-unit/proxy_arp", "0"],
        ["ip", "-4", "addr", "add", "169.254.9.1/32", "dev", "vr-unit"],
        ["ip", "-n", "remus-x", "link", "set", "lo", "up"],
        ["ip", "-n", "remus-x", "link", "set", "eth0", "up"],
        ["ip", "-n", "remus-x", "-4", "addr", "add", "10.66.0.50/32", "dev", "eth0"],
        ["ip", "-n", "remus-x", "-6", "addr", "add", "fd66::50/128", "nodad", "dev", "eth0"],
        # link routes before the routes whose gateway they reach
        ["ip", "-n", "remus-x", "-4", "route", "add", "169.254.9.1", "dev", "eth0", "scope", "link"],
        ["ip", "-n", "remus-x", "-6", "route", "add", "fd67::/64", "dev", "eth0", "metric", "7"],
        ["ip", "-n", "remus-x", "-4", "route", "add", "default", "via", "169.254.9.1", "dev",
         "eth0"],
        ["ip", "-n", "remus-x", "-4", "route", "add", "10.67.0.0/16", "via", "169.254.9.1",
         "dev", "eth0", "metric", "5"],
    ]
    assert not any(s[:4] == ["ip", "link", "set", "vr-unit"] for s in plan)  # stays down


def test_build_plan_enslaves_to_the_bridge() -> None:
    plan = ndp.build_plan(describe(host=bridged_host()), "remus-x")
    assert ["ip", "link", "set", "vr-unit", "master", "br-rpd"] in plan


def test_activate_plan() -> None:
    assert ndp.activate_plan(describe()) == [
        ["sysctl", "net/ipv4/ip_forward", "1"],
        ["ip", "link", "set", "vr-unit", "up"],
        ["ip", "-4", "route", "replace", "10.66.0.50", "dev", "vr-unit", "scope", "link"],
        ["ip", "-4", "neigh", "replace", "proxy", "10.66.0.50", "dev", "lan0"],
    ]


def test_remove_plan_deletes_host_links_only_when_ours() -> None:
    d = describe()
    proxy_del = ["ip", "-4", "neigh", "del", "proxy", "10.66.0.50", "dev", "lan0"]
    assert ndp.remove_plan(d, "remus-x", ["vr-unit"]) == [
        proxy_del, ["ip", "link", "del", "vr-unit"], ["ip", "netns", "del", "remus-x"]]
    assert ndp.remove_plan(d, "remus-x", []) == [proxy_del, ["ip", "netns", "del", "remus-x"]]


def test_announcements() -> None:
    routed = describe()
    assert ndp.announce_plan(routed) == [("host", "lan0", "", "10.66.0.50")]
    assert ndp.announce_plan(routed, "lan0") == [("host", "lan0", "", "10.66.0.50")]
    assert ndp.announce_plan(routed, "up1") == [("host", "lan0", "", "10.66.0.50"),
                                                ("host", "up1", "", "10.66.0.50")]
    bridged = describe(host=bridged_host())
    inside = [("unit", "eth0", "02:66:00:00:aa:02", "10.66.0.50")]
    assert ndp.announce_plan(bridged) == inside
    assert ndp.announce_plan(bridged, "br-rpd") == inside  # never with the bridge's MAC


def test_check_host() -> None:
    d = describe(host=bridged_host())
    backup = copy.deepcopy(bridged_host()["links"])
    backup = [lk for lk in backup if lk["ifname"] != "vr-unit"]
    ndp.check_host(d, backup)
    ndp.check_host(d, bridged_host()["links"], owned=["vr-unit"])  # our own leftover
    with pytest.raises(ConfigError, match="already has a link named vr-unit"):
        ndp.check_host(d, bridged_host()["links"])
    with pytest.raises(ConfigError, match="bridge br-rpd does not exist"):
        ndp.check_host(d, backup[:2])
    backup[2]["linkinfo"]["info_kind"] = "veth"
    with pytest.raises(ConfigError, match="not a bridge"):
        ndp.check_host(d, backup)
    routed = describe()
    with pytest.raises(ConfigError, match="device lan0 does not exist"):
        ndp.check_host(routed, HOST["links"][:1])


def test_argument_builders() -> None:
    assert ndp.addr_args({"dev": "eth0", "family": "inet", "local": "10.1.0.1", "prefixlen": 32,
                          "address": "10.1.0.2", "label": "eth0:ptp"}) == [
        "-4", "addr", "add", "10.1.0.1", "peer", "10.1.0.2/32", "label", "eth0:ptp", "dev", "eth0"]
    r = ndr.parse_route({"type": "blackhole", "dst": "10.9.0.0/16", "protocol": "static",
                         "flags": ["onlink"], "metrics": [{"mtu": 1400}, {"rtt": 3}]}, "inet")
    assert ndp.route_args(r, "replace") == ["-4", "route", "replace", "blackhole", "10.9.0.0/16",
                                            "proto", "static", "onlink", "mtu", "1400"]


def test_version_is_checked() -> None:
    d = describe()
    d["version"] = 99
    with pytest.raises(ConfigError, match="version 99"):
        ndp.build_plan(d, "remus-x")


def test_garp_frame() -> None:
    f = arp.garp_frame("02:66:00:00:aa:02", "10.66.0.50")
    mac, ip = bytes.fromhex("026600 00aa02".replace(" ", "")), socket.inet_aton("10.66.0.50")
    assert len(f) == 42 and f[:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x08\x06"
    assert f[20:22] == b"\x00\x01"  # a request: every Linux neighbour table takes it
    assert f[22:28] == mac and f[28:32] == ip and f[38:42] == ip


def test_described_container_has_containers_interface() -> None:
    from remus.container import Container

    c = DescribedContainer(describe(), "remus-x", dev="lan0")
    assert (c.netns_path, c.host_if) == ("/run/netns/remus-x", "vr-unit")
    for name in ("exists", "create", "activate", "deactivate", "remove"):
        assert callable(getattr(c, name)) and callable(getattr(Container, name))
