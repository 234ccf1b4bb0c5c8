"""remus.netdesc on the real kernel: describe a container made by hand, rebuild it
on a second "host", activate it there and reach it from a client.

Everything runs in namespaces made here (prefix rpd-), never in the lab:

    rpd-cl (client) ──┐
    rpd-a  (primary) ─┼── bridge sw0 in rpd-sw (the LAN, 10.66.0.0/24)
    rpd-b  (backup)  ─┘
    rpd-ua: the container on rpd-a (made by "someone else"); rpd-ub: its copy on rpd-b

netdesc treats the caller's namespace as the host, so describe/build/activate
run in a child entered into rpd-a or rpd-b, with a sysfs of that namespace
(gratuitous_arp reads the device's MAC from /sys/class/net).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
HOSTS = {"a": ("10.66.0.1", "02:66:00:00:00:01"), "b": ("10.66.0.2", "02:66:00:00:00:02"),
         "cl": ("10.66.0.100", "02:66:00:00:00:64")}
UNIT_MAC, HOST_MAC = "02:66:00:00:aa:02", "02:66:00:00:aa:01"
ROUTED_IP, BRIDGED_IP = "10.66.0.50", "10.66.0.60"
NAMESPACES = ["rpd-sw", "rpd-a", "rpd-b", "rpd-cl", "rpd-ua", "rpd-ub"]

CHILD = r"""
import json, sys
from remus import netdesc
from remus.errors import RemusError
req = json.loads(sys.argv[1])
try:
    res = getattr(netdesc, req["fn"])(*req["args"], **req["kw"])
    print(json.dumps({"ok": res}))
except RemusError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""
PRIVATE_SYSFS = 'mount --make-rprivate /sys && mount -t sysfs sysfs /sys && exec "$@"'


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {p.stderr.strip()}")
    return p


def ipn(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "-n", ns, *args, check=check)


def jn(ns: str, *args: str) -> list[dict[str, Any]]:
    out = ipn(ns, "-j", *args).stdout.strip()
    return json.loads(out) if out else []


def in_host(ns: str, fn: str, *args: Any, **kw: Any) -> dict[str, Any]:
    """Call remus.netdesc.fn in a child whose network namespace is host `ns`.

    Mount propagation stays unchanged, so namespaces that build() adds under
    /run/netns show up here too; only /sys is private to the child."""
    req = json.dumps({"fn": fn, "args": list(args), "kw": kw})
    p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "unshare", "--mount",
                        "--propagation", "unchanged", "sh", "-c", PRIVATE_SYSFS, "sh",
                        sys.executable, "-c", CHILD, req],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def call(ns: str, fn: str, *args: Any, **kw: Any) -> Any:
    res = in_host(ns, fn, *args, **kw)
    assert "ok" in res, res
    return res["ok"]


def cleanup() -> None:
    for ns in NAMESPACES:
        if Path(f"/run/netns/{ns}").exists():
            sh("ip", "netns", "del", ns, check=False)


def make_lan(bridged: bool) -> None:
    """The LAN; with bridged=True each host's uplink is a port of bridge br-rpd."""
    for ns in NAMESPACES[:4]:
        sh("ip", "netns", "add", ns)
        ipn(ns, "link", "set", "lo", "up")
    ipn("rpd-sw", "link", "add", "sw0", "type", "bridge")
    ipn("rpd-sw", "link", "set", "sw0", "up")
    for h, (addr, mac) in HOSTS.items():
        ns = f"rpd-{h}"
        ipn("rpd-sw", "link", "add", f"sw-{h}", "type", "veth", "peer", "name", "lan0",
            "address", mac, "netns", ns)
        ipn("rpd-sw", "link", "set", f"sw-{h}", "master", "sw0", "up")
        ipn(ns, "link", "set", "lan0", "up")
        dev = "lan0"
        if bridged and h != "cl":
            ipn(ns, "link", "add", "br-rpd", "type", "bridge")
            ipn(ns, "link", "set", "lan0", "master", "br-rpd")
            ipn(ns, "link", "set", "br-rpd", "up")
            dev = "br-rpd"
        ipn(ns, "addr", "add", f"{addr}/24", "dev", dev)


def make_routed_unit() -> None:
    """A container as a hand-made script would: /32 address, host route, proxy ARP."""
    sh("ip", "netns", "add", "rpd-ua")
    ipn("rpd-a", "link", "add", "vr-unit", "address", HOST_MAC, "type", "veth", "peer", "name",
        "eth0", "address", UNIT_MAC, "mtu", "1400", "netns", "rpd-ua")
    u = ("rpd-ua",)
    ipn(*u, "link", "set", "lo", "up")
    ipn(*u, "link", "set", "eth0", "up")
    ipn(*u, "addr", "add", f"{ROUTED_IP}/32", "dev", "eth0")
    ipn(*u, "addr", "add", "fd66::50/128", "dev", "eth0", "nodad")
    ipn(*u, "route", "add", "169.254.9.1", "dev", "eth0", "scope", "link")
    ipn(*u, "route", "add", "default", "via", "169.254.9.1", "dev", "eth0")
    ipn(*u, "route", "add", "10.67.0.0/16", "via", "169.254.9.1", "metric", "5")
    ipn(*u, "-6", "route", "add", "fd67::/64", "dev", "eth0", "metric", "7")
    ipn("rpd-a", "addr", "add", "169.254.9.1/32", "dev", "vr-unit")
    ipn("rpd-a", "link", "set", "vr-unit", "up")
    ipn("rpd-a", "route", "add", f"{ROUTED_IP}/32", "dev", "vr-unit")
    ipn("rpd-a", "neigh", "add", "proxy", ROUTED_IP, "dev", "lan0")
    for ns in ("rpd-a", "rpd-b"):  # the backup host is configured like the primary
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def make_bridged_unit() -> None:
    sh("ip", "netns", "add", "rpd-ua")
    ipn("rpd-a", "link", "add", "vb-unit", "address", HOST_MAC, "type", "veth", "peer", "name",
        "eth0", "address", UNIT_MAC, "netns", "rpd-ua")
    ipn("rpd-a", "link", "set", "vb-unit", "master", "br-rpd", "up")
    ipn("rpd-ua", "link", "set", "lo", "up")
    ipn("rpd-ua", "link", "set", "eth0", "up")
    ipn("rpd-ua", "addr", "add", f"{BRIDGED_IP}/24", "dev", "eth0")
    ipn("rpd-ua", "route", "add", "default", "via", "10.66.0.1")


@pytest.fixture
def unit_pid() -> Iterator[Any]:
    """Start a process in rpd-ua (the container's workload) after the test made it."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        p = subprocess.Popen(["nsenter", "--net=/run/netns/rpd-ua", "--", "sleep", "300"])
        procs.append(p)
        return p.pid

    try:
        cleanup()
        yield start
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        cleanup()


# -- comparing two namespaces ----------------------------------------------------------
def unit_view(ns: str, link_local: bool = True) -> dict[str, Any]:
    """Links, addresses and routes of a namespace. link_local=False leaves out
    fe80::/64 and ff00::/8, which IPv6 configures only once the link has a carrier."""
    links = [(lk["ifname"], lk["address"], lk["mtu"], "UP" in lk["flags"], lk["ifindex"],
              lk.get("linkinfo", {}).get("info_kind")) for lk in jn(ns, "-d", "link", "show")]
    addrs = sorted((lk["ifname"], a["family"], a["local"], a["prefixlen"])
                   for lk in jn(ns, "addr", "show") for a in lk["addr_info"]
                   if link_local or not a["local"].startswith("fe80:"))
    routes = []
    for fam in ("-4", "-6"):
        for r in jn(ns, fam, "route", "show", "table", "all"):
            r.pop("flags", None)  # linkdown differs while the standby's peer is down
            auto6 = r["dst"].startswith(("fe80:", "ff00:"))  # made when the link gets a carrier
            if auto6 and (not link_local or r.get("table") == "local" and r["dst"] != "ff00::/8"):
                continue  # the local fe80 route waits for DAD, which is timing, not config
            routes.append(json.dumps(r, sort_keys=True))
    return {"links": links, "addrs": addrs, "routes": sorted(routes)}


def host_link(ns: str, name: str) -> dict[str, Any]:
    [lk] = jn(ns, "-d", "link", "show", "dev", name)
    [ad] = jn(ns, "addr", "show", "dev", name)
    return {"name": lk["ifname"], "mac": lk["address"], "mtu": lk["mtu"],
            "up": "UP" in lk["flags"], "master": lk.get("master"),
            "addrs": sorted((a["local"], a["prefixlen"]) for a in ad["addr_info"]
                            if a.get("scope") != "link")}


def host_routes(ns: str, dev: str) -> list[Any]:
    return [r for r in jn(ns, "-4", "route", "show") if r.get("dev") == dev]


def proxies(ns: str) -> list[tuple[str, str]]:
    return [(p["dst"], p["dev"]) for p in jn(ns, "neigh", "show", "proxy")]


def ping(src: str, dst: str, wait: float = 5.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if sh("ip", "netns", "exec", src, "ping", "-c1", "-W1", dst, check=False).returncode == 0:
            return True
    return False


def neigh_mac(ns: str, addr: str) -> str | None:
    for n in jn(ns, "neigh", "show", "to", addr):
        return n.get("lladdr")
    return None


# -- tests -----------------------------------------------------------------------------
def test_routed_container_rebuilt_and_activated(unit_pid: Any) -> None:
    make_lan(bridged=False)
    make_routed_unit()
    pid = unit_pid()
    assert ping("rpd-cl", ROUTED_IP)
    assert neigh_mac("rpd-cl", ROUTED_IP) == HOSTS["a"][1]

    desc = call("rpd-a", "describe", pid)
    assert desc["host_if"] == "vr-unit" and desc["bridge"] is None
    assert desc["ipv4"] == [ROUTED_IP] and desc["ipv6"] == ["fd66::50"]
    assert desc["host"]["proxy"] == [{"family": "inet", "dst": ROUTED_IP, "dev": "lan0"}]
    assert [r["dst"] for r in desc["host"]["routes"]] == [ROUTED_IP]

    assert call("rpd-b", "build", desc, "rpd-ub", False) is None
    assert unit_view("rpd-ub", link_local=False) == unit_view("rpd-ua", link_local=False)
    a, b = host_link("rpd-a", "vr-unit"), host_link("rpd-b", "vr-unit")
    assert b == {**a, "up": False}  # standby: same name, MAC, MTU, address; link down
    assert host_routes("rpd-b", "vr-unit") == [] and proxies("rpd-b") == []
    assert ping("rpd-cl", ROUTED_IP)  # the primary still serves, undisturbed

    ipn("rpd-a", "link", "set", "lan0", "down")  # the primary dies
    time.sleep(1.1)  # past the client's neighbour locktime: a GARP may then replace the entry
    call("rpd-b", "activate", desc, "rpd-ub")
    assert host_link("rpd-b", "vr-unit") == a
    assert unit_view("rpd-ub") == unit_view("rpd-ua")
    assert host_routes("rpd-b", "vr-unit") == host_routes("rpd-a", "vr-unit")
    assert proxies("rpd-b") == [(ROUTED_IP, "lan0")]
    assert neigh_mac("rpd-cl", ROUTED_IP) == HOSTS["b"][1]  # the announcement arrived
    assert ping("rpd-cl", ROUTED_IP, wait=3)

    call("rpd-b", "remove", desc, "rpd-ub")
    assert not Path("/run/netns/rpd-ub").exists()
    assert ipn("rpd-b", "link", "show", "vr-unit", check=False).returncode != 0
    assert proxies("rpd-b") == []


def test_bridged_container_rebuilt_and_announced_from_inside(unit_pid: Any) -> None:
    make_lan(bridged=True)
    make_bridged_unit()
    pid = unit_pid()
    assert ping("rpd-cl", BRIDGED_IP)

    desc = call("rpd-a", "describe", pid)
    assert desc["host_if"] == "vb-unit" and desc["bridge"] == "br-rpd"
    assert desc["host"]["proxy"] == [] and desc["host"]["routes"] == []

    refused = in_host("rpd-cl", "build", desc, "rpd-ub", False)  # a host without br-rpd
    assert refused["error"] == "ConfigError" and "bridge br-rpd does not exist" in refused["message"]
    assert not Path("/run/netns/rpd-ub").exists()

    call("rpd-b", "build", desc, "rpd-ub", False)
    assert unit_view("rpd-ub", link_local=False) == unit_view("rpd-ua", link_local=False)
    a, b = host_link("rpd-a", "vb-unit"), host_link("rpd-b", "vb-unit")
    assert b == {**a, "up": False} and b["master"] == "br-rpd"

    ipn("rpd-a", "link", "set", "lan0", "down")
    # Poison the client's entry: only an announcement with the unit's MAC can mend it
    # (the link coming up sends IPv6 DAD/MLD, which teach switches but not ARP caches).
    ipn("rpd-cl", "neigh", "replace", BRIDGED_IP, "lladdr", "02:66:00:00:00:99", "nud", "stale",
        "dev", "lan0")
    call("rpd-b", "activate", desc, "rpd-ub", "br-rpd")
    assert host_link("rpd-b", "vb-unit") == a
    assert unit_view("rpd-ub") == unit_view("rpd-ua")
    assert neigh_mac("rpd-cl", BRIDGED_IP) == UNIT_MAC
    fdb = json.loads(sh("bridge", "-n", "rpd-sw", "-j", "fdb", "show", "br", "sw0").stdout)
    assert {f["ifname"] for f in fdb if f["mac"] == UNIT_MAC} == {"sw-b"}
    assert ping("rpd-cl", BRIDGED_IP, wait=3)


def test_build_replaces_its_own_leftovers_but_not_a_stranger(unit_pid: Any) -> None:
    make_lan(bridged=False)
    make_routed_unit()
    desc = call("rpd-a", "describe", unit_pid())
    call("rpd-b", "build", desc, "rpd-ub", False)
    call("rpd-b", "build", desc, "rpd-ub", True)  # again, over its own standby: replaced
    assert host_link("rpd-b", "vr-unit")["up"]
    assert proxies("rpd-b") == [(ROUTED_IP, "lan0")]
    call("rpd-b", "remove", desc, "rpd-ub")
    ipn("rpd-b", "link", "add", "vr-unit", "type", "bridge")  # somebody else's link
    res = in_host("rpd-b", "build", desc, "rpd-ub", False)
    assert res["error"] == "ConfigError" and "already has a link named vr-unit" in res["message"]
    call("rpd-b", "remove", desc, "rpd-ub")
    assert ipn("rpd-b", "link", "show", "vr-unit", check=False).returncode == 0  # left alone


def test_describe_refuses_a_veth_into_another_namespace(unit_pid: Any) -> None:
    make_lan(bridged=False)
    make_routed_unit()
    res = in_host("rpd-b", "describe", unit_pid())  # rpd-b holds no end of rpd-ua's veth
    assert res["error"] == "ConfigError" and "not in this host's network namespace" in res["message"]
