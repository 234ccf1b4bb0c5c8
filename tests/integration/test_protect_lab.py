"""`remus protect PID` of a server in a container someone else built, then a power cut."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import psutil
import pytest

from remus.paths import REPO
from tests.support.timing import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

REMUS = [sys.executable, "-m", "remus.cli"]
CTR_ADDR = "10.77.0.120"
SETUP = f"""
set -e
ip netns add ctr
ip link add vc0 address 02:aa:00:00:00:01 type veth peer name eth0 address 02:aa:00:00:00:02 netns ctr
ip -n ctr link set lo up
ip -n ctr addr add {CTR_ADDR}/32 dev eth0
ip -n ctr link set eth0 up
ip -n ctr route add 169.254.9.1 dev eth0 scope link
ip -n ctr route add default via 169.254.9.1 dev eth0
ip addr add 169.254.9.1/32 dev vc0
ip link set vc0 up
ip route add {CTR_ADDR}/32 dev vc0
ip neigh add proxy {CTR_ADDR} dev eth0
sysctl -qw net.ipv4.ip_forward=1
"""


def _start_container_server(lab: Any) -> int:
    r = lab.run("pri", ["sh", "-c", SETUP], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # The lab's exec chain ends in `unshare` (same pid); its child is the server.
    # stdio opened inside the host (CRIU must find /dev/null's mount there).
    wrapper = lab.popen("pri", ["sh", "-c", 'exec "$@" </dev/null >/dev/null 2>&1', "sh",
                                "nsenter", "--net=/run/netns/ctr", "unshare", "--pid", "--fork",
                                "setsid", "redis-server", "--port", "6379", "--save", "",
                                "--protected-mode", "no"], cwd="/", start_new_session=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = [k for k in psutil.Process(wrapper.pid).children() if k.name() == "redis-server"]
        if kids:
            return int(kids[0].pid)
        time.sleep(0.05)
    raise AssertionError("redis-server did not start in the container")


def test_protect_existing_container_survives_power_cut(scenario: Any) -> None:
    sc = scenario(server="redis")
    lab = sc.lab
    pid = _start_container_server(lab)
    sc.start_backup()
    wait_for(lambda: sc.status("bak"), timeout=30)  # the backup is up (a hang bound)
    sc._spawn("pri", [*REMUS, "-v", "protect", str(pid), "--backup", lab.addr("bak"),
                      "--key-file", str(sc.key), "--name", "ctr"], "primary.log")
    sc.wait_protected()
    bak = sc.status("bak")
    assert bak is not None and bak["unit"] == "ctr"
    # The backup rebuilt the container from the primary's description, link down.
    links = json.loads(lab.run("bak", ["ip", "-j", "link", "show", "vc0"], capture_output=True,
                               text=True).stdout)
    assert links[0]["address"] == "02:aa:00:00:00:01" and "UP" not in links[0]["flags"]
    out = sc.workdir / "c.json"
    client = lab.popen("client", [sys.executable, "-m", "remus.loadgen", "redis", "--host",
                                  CTR_ADDR, "--port", "6379", "--duration", "5", "--pace", "0.001",
                                  "--out", str(out)], cwd=str(REPO))
    sc.procs.append(client)
    time.sleep(2.5)
    lab.crash("pri")
    client.wait(60)
    res = json.loads(out.read_text())
    assert res["connection_survived"], res["error"]
    assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0
    st = sc.status("bak")
    assert st is not None and st["state"] == "active"
    print(f"protect: {res['acked']} writes, gap {res['max_gap_s'] * 1000:.0f} ms")
