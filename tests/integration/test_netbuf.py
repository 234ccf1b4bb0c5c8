"""Output buffer against the real kernel: client ns <-> host ns <-> unit ns.

The namespaces and the echo server are tests/support/netbuf.py's. The buffer
runs in this process with netns=<host ns>.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remus.errors import HostError
from remus.netbuf import NfqueueBuffer, PlugBuffer, make_buffer
from remus.netbuf.nfqueue_rules import QueueRules
from remus.netbuf.nfqueue_socket import QueueSocket, derived_queue
from remus.netbuf.plug import ifb_name, plug_available
from remus.netns import in_netns
from tests.support import netbuf
from tests.support.netbuf import (
    CLIENT_IP,
    CLIENT_IP6,
    VETH,
    Echo,
    Lab,
    connected,
    recv_within,
    send_while_held,
    sh,
    start_connect,
    unhold_and_receive,
)

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
lab = netbuf.lab  # the namespaces and the echo server (fixtures)
echo = netbuf.echo


@pytest.fixture
def bridged_lab() -> Iterator[Lab]:
    """Client and unit on one bridge in the host's namespace (10.77.3.0/24)."""
    lab = Lab.fresh()
    c, h, u = (f"rnb-{r}-{lab.tag}" for r in "chu")
    try:
        for n in (c, h, u):
            sh("ip", "netns", "add", n)
        sh("ip", "-n", h, "link", "add", "rnb-br0", "type", "bridge")
        sh("ip", "-n", h, "link", "add", "rnb-hc", "type", "veth", "peer", "name", "eth0",
           "netns", c)
        sh("ip", "-n", h, "link", "add", VETH, "type", "veth", "peer", "name", "eth0",
           "netns", u)
        for dev in ("rnb-hc", VETH):
            sh("ip", "-n", h, "link", "set", dev, "master", "rnb-br0", "up")
        sh("ip", "-n", h, "link", "set", "rnb-br0", "up")
        for ns, addr in ((c, "10.77.3.2"), (u, "10.77.3.3")):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("nsenter", f"--net={lab.host}", "sysctl", "-qw",
           "net.bridge.bridge-nf-call-iptables=1")
        yield lab
    finally:
        with contextlib.suppress(Exception):
            QueueRules(VETH, netns=lab.host).remove()
        for n in (c, h, u):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.fixture
def buf(lab: Lab) -> Iterator[NfqueueBuffer]:
    b = NfqueueBuffer(VETH, netns=lab.host)
    b.start()
    try:
        yield b
    finally:
        b.close(release_all=False)


def wait_held(buf: NfqueueBuffer, n: int = 1, timeout: float = 2.0) -> None:
    """Wait until the reader has tagged n packets (so they carry the current epoch)."""
    deadline = time.monotonic() + timeout
    while buf.counters()["held_packets"] < n:
        assert time.monotonic() < deadline, f"fewer than {n} packets held"
        time.sleep(0.01)


def establish(lab: Lab, buf: NfqueueBuffer, epoch: int = 1) -> socket.socket:
    """Connect to the echo server through the buffer (its SYN-ACK released)."""
    s = start_connect(lab)
    wait_held(buf)
    buf.begin_epoch(epoch)
    buf.release(epoch - 1)
    assert connected(s, 2.0)
    s.setblocking(True)
    return s


def datagrams_within(s: socket.socket, timeout: float) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([s], [], [], left)
        if r:
            out.append(s.recv(65536))
    return out


def udp_pair(lab: Lab, family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
    """(unit-side sender, client-side receiver bound to a port)."""
    rx = lab.sock("c", socket.SOCK_DGRAM, family)
    rx.bind((CLIENT_IP if family == socket.AF_INET else CLIENT_IP6, 0))
    tx = lab.sock("u", socket.SOCK_DGRAM, family)
    return tx, rx


# -- the guarantee ---------------------------------------------------------------

def test_syn_ack_held_until_its_epoch_is_released(lab: Lab, buf: NfqueueBuffer,
                                                  echo: Echo) -> None:
    s = start_connect(lab)
    assert not connected(s, 0.6), "SYN-ACK left before release"
    assert buf.counters()["held_packets"] >= 1
    buf.begin_epoch(1)
    buf.release(0)
    assert connected(s, 2.0)
    c = buf.counters()
    assert c["released_packets"] >= 1 and c["released_epoch"] == 0
    assert c["release_latency_ms"]["last"] is not None
    s.close()


def test_release_of_an_epoch_keeps_later_epochs(lab: Lab, buf: NfqueueBuffer,
                                                echo: Echo) -> None:
    s = establish(lab, buf)
    s.sendall(b"a")
    time.sleep(0.3)  # the echo of "a" is produced (and held) in epoch 1
    buf.begin_epoch(2)
    s.sendall(b"b")
    time.sleep(0.3)  # echo of "b": epoch 2
    buf.release(1)
    assert recv_within(s, 0.5) == b"a"
    buf.begin_epoch(3)
    assert recv_within(s, 0.4) == b"", "epoch 2 output left with release(1)"
    buf.release(2)
    assert recv_within(s, 1.0) == b"b"
    s.close()


def test_hold_inbound_holds_packets_towards_the_unit(lab: Lab, buf: NfqueueBuffer,
                                                     echo: Echo) -> None:
    s = establish(lab, buf)
    assert send_while_held(s, buf, b"c", range(2, 8)) == b""
    assert buf.counters()["inbound_waiting"] >= 1
    assert unhold_and_receive(s, buf, 8) == b"c"
    c = buf.counters()
    assert c["inbound_held"] >= 1 and c["inbound_waiting"] == 0
    s.close()


def test_inbound_passes_in_the_kernel_outside_holds(lab: Lab, buf: NfqueueBuffer,
                                                    echo: Echo) -> None:
    """Between holds the inbound queue fails open at length 0: packets towards
    the unit never reach the reader (no Python per packet); a hold queues
    them again, and its end lets them out, read or not."""
    s = establish(lab, buf)
    for i, data in enumerate((b"d", b"e", b"f")):
        s.sendall(data)
        time.sleep(0.2)
        buf.begin_epoch(2 + i)
        buf.release(1 + i)
        assert recv_within(s, 1.0) == data
    c = buf.counters()
    assert c["inbound_passed"] == 0 and c["inbound_held"] == 0, c
    # a hold still holds, and its end still lets the held data through
    assert send_while_held(s, buf, b"g", range(5, 9)) == b""
    assert buf.counters()["inbound_waiting"] >= 1
    assert unhold_and_receive(s, buf, 9) == b"g"
    # ... and then inbound passes in the kernel again
    before = buf.counters()["inbound_passed"] + buf.counters()["inbound_held"]
    s.sendall(b"h")
    time.sleep(0.2)
    buf.begin_epoch(10)
    buf.release(9)
    assert recv_within(s, 1.0) == b"h"
    assert buf.counters()["inbound_passed"] + buf.counters()["inbound_held"] == before
    # switching between passing and holding never left the queue at length 0
    # with fail-open off (which drops: the kernel counts it)
    assert buf.counters()["kernel_dropped"] in (0, None)
    s.close()


def test_full_buffer_drops_and_never_releases_early(lab: Lab) -> None:
    b = NfqueueBuffer(VETH, netns=lab.host, max_packets=5)
    b.start()
    try:
        tx, rx = udp_pair(lab)
        for i in range(40):
            tx.sendto(b"%d" % i, rx.getsockname())
        assert datagrams_within(rx, 0.5) == []
        c = b.counters()
        assert c["held_packets"] == 5
        assert c["dropped_packets"] == 35
        b.begin_epoch(1)
        b.release(0)
        assert datagrams_within(rx, 0.5) == [b"0", b"1", b"2", b"3", b"4"]
        tx.close()
        rx.close()
    finally:
        b.close()


def test_ipv6_output_is_held_too(lab: Lab) -> None:
    tx, rx = udp_pair(lab, socket.AF_INET6)
    # Warm the lab up first: the host's first neighbour solicitation towards
    # the fresh client link is sometimes lost and retried after 1 s.
    tx.sendto(b"warm", rx.getsockname()[:2])
    assert datagrams_within(rx, 2.0) == [b"warm"]
    b = NfqueueBuffer(VETH, netns=lab.host)
    b.start()
    try:
        tx.sendto(b"six", rx.getsockname()[:2])
        assert datagrams_within(rx, 0.5) == []
        assert b.counters()["held_packets"] == 1
        b.begin_epoch(1)
        b.release(0)
        assert datagrams_within(rx, 0.5) == [b"six"]
    finally:
        b.close()


def test_bridged_unit_output_is_held(bridged_lab: Lab) -> None:
    lab = bridged_lab
    rx = lab.sock("c", socket.SOCK_DGRAM)
    rx.bind(("10.77.3.2", 0))
    tx = lab.sock("u", socket.SOCK_DGRAM)
    tx.sendto(b"warm", rx.getsockname())  # ARP first: ARP is not netfilter's
    assert datagrams_within(rx, 2.0) == [b"warm"]
    b = NfqueueBuffer(VETH, netns=lab.host, bridged=True)
    b.start()
    try:
        tx.sendto(b"bridged", rx.getsockname())
        assert datagrams_within(rx, 0.5) == []
        wait_held(b)
        b.begin_epoch(1)
        b.release(0)
        assert datagrams_within(rx, 0.5) == [b"bridged"]
    finally:
        b.close()
    assert not lab.rules_present()


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from remus.netbuf import NfqueueBuffer
b = NfqueueBuffer({veth!r}, netns={ns!r})
b.start()
print("ready", flush=True)
time.sleep(600)
"""


def test_fail_closed_when_the_buffer_process_dies(lab: Lab, echo: Echo) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), veth=VETH,
                                                                 ns=lab.host)],
                             stdout=subprocess.PIPE, text=True)
    lab.children.append(child)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    s = start_connect(lab)
    assert not connected(s, 0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=5)
    # The SYN is retransmitted after 1 s and 3 s: nothing may answer it.
    assert not connected(s, 3.5), "traffic passed after the queue owner died"
    assert QueueRules(VETH, netns=lab.host).present()
    QueueRules(VETH, netns=lab.host).remove()
    assert not lab.rules_present()
    s.close()
    s2 = start_connect(lab)
    assert connected(s2, 3.0), "the lab itself is broken: no traffic without rules"
    s2.close()


def test_close_release_all_lets_held_output_out_and_removes_rules(lab: Lab,
                                                                  echo: Echo) -> None:
    b = NfqueueBuffer(VETH, netns=lab.host)
    b.start()
    tx, rx = udp_pair(lab)
    tx.sendto(b"held", rx.getsockname())
    s = start_connect(lab)
    assert not connected(s, 0.5)
    b.close(release_all=True)
    assert datagrams_within(rx, 0.5) == [b"held"]
    assert connected(s, 2.0)
    assert not lab.rules_present()
    s.setblocking(True)
    s.sendall(b"free")
    assert recv_within(s, 1.0) == b"free"  # no buffer any more: flows at once
    s.close()


def test_close_drops_held_output_and_leaves_no_rules(lab: Lab) -> None:
    b = NfqueueBuffer(VETH, netns=lab.host)
    b.start()
    assert lab.rules_present()
    tx, rx = udp_pair(lab)
    for i in range(3):
        tx.sendto(b"x%d" % i, rx.getsockname())
    wait_held(b, 3)
    assert b.counters()["held_packets"] == 3
    b.close(release_all=False)
    assert b.counters()["dropped_packets"] == 3
    assert not lab.rules_present()
    assert datagrams_within(rx, 0.5) == []  # dropped, never released
    tx.sendto(b"after", rx.getsockname())
    assert datagrams_within(rx, 0.5) == [b"after"]


def test_start_on_a_missing_interface_raises_and_leaves_nothing(lab: Lab) -> None:
    b = NfqueueBuffer("rnb-nosuch", netns=lab.host)
    with pytest.raises(HostError, match="rnb-nosuch"):
        b.start()
    assert not lab.rules_present()


def test_a_taken_queue_number_is_skipped(lab: Lab) -> None:
    ifindex = in_netns(lab.host, lambda: socket.if_nametoindex(VETH))
    squatter = in_netns(lab.host, lambda: QueueSocket(1 << 16))
    squatter.bind_queue(derived_queue(ifindex), 16)  # someone else owns our first choice
    b = NfqueueBuffer(VETH, netns=lab.host)
    try:
        b.start()
        assert b.q_out != derived_queue(ifindex) and b.q_in == b.q_out + 1
        with pytest.raises(HostError, match="queue"):
            NfqueueBuffer("rnb-hc", netns=lab.host, queue=derived_queue(ifindex)).start()
    finally:
        b.close()
        squatter.close()
    assert not lab.rules_present()


def test_plug_backend_says_sch_plug_is_missing(lab: Lab) -> None:
    if plug_available():
        pytest.skip("this kernel has sch_plug")
    b = make_buffer("plug", VETH, netns=lab.host)
    assert isinstance(b, PlugBuffer)
    with pytest.raises(HostError, match="sch_plug"):
        b.start()
    out = subprocess.run(["ip", "-n", f"rnb-h-{lab.tag}", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    assert ifb_name(VETH) not in out  # nothing left behind
    assert isinstance(make_buffer("auto", VETH, netns=lab.host), NfqueueBuffer)
