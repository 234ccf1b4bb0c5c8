"""Output buffer against the real kernel: client ns <-> host ns <-> unit ns.

    rnb-c-XXXX  10.77.1.2 --- 10.77.1.1  rnb-h-XXXX  10.77.2.1 --- 10.77.2.2  rnb-u-XXXX
    (client)    rnb-c0        rnb-hc     (host, forwarding,  rnb-hu     eth0  (unit)
                                          the buffer's rules)

The buffer runs in this process with netns=<host ns>; sockets of the client
and the unit are created inside their namespaces (a socket stays in the
namespace it was made in) and used from the test thread.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remus.errors import HostError
from remus.netbuf import NfqueueBuffer, PlugBuffer, make_buffer
from remus.netbuf.base import OutputBuffer
from remus.netbuf.nfqueue_rules import QueueRules
from remus.netbuf.nfqueue_socket import QueueSocket, derived_queue
from remus.netbuf.plug import ifb_name, plug_available
from remus.netns import in_netns

pytestmark = pytest.mark.root

CLIENT_IP, HOST_C_IP, HOST_U_IP, UNIT_IP = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"
CLIENT_IP6, UNIT_IP6 = "fd77:1::2", "fd77:2::2"
VETH = "rnb-hu"
REPO = Path(__file__).resolve().parents[2]


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@dataclass
class Lab:
    tag: str
    client: str = ""
    host: str = ""
    unit: str = ""
    children: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"/run/netns/rnb-{role}-{self.tag}"

    def sock(self, role: str, kind: int, family: int = socket.AF_INET) -> socket.socket:
        return in_netns(self.ns(role), lambda: socket.socket(family, kind))

    def rules_present(self) -> bool:
        out = subprocess.run(["nsenter", f"--net={self.host}", "iptables-save"],
                             capture_output=True, text=True, check=True).stdout
        out6 = subprocess.run(["nsenter", f"--net={self.host}", "ip6tables-save"],
                              capture_output=True, text=True, check=True).stdout
        return "REMUS-" in out or "REMUS-" in out6 or "NFQUEUE" in out + out6


def _build(lab: Lab) -> None:
    c, h, u = (f"rnb-{r}-{lab.tag}" for r in "chu")
    for n in (c, h, u):
        sh("ip", "netns", "add", n)
        # No duplicate address detection: link-local addresses usable at once.
        for knob in ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"):
            sh("nsenter", f"--net=/run/netns/{n}", "sysctl", "-qw", knob)
    sh("ip", "-n", h, "link", "add", "rnb-hc", "type", "veth", "peer", "name", "rnb-c0",
       "netns", c)
    sh("ip", "-n", h, "link", "add", VETH, "type", "veth", "peer", "name", "eth0", "netns", u)
    for ns, dev, addr, addr6 in ((c, "rnb-c0", CLIENT_IP, CLIENT_IP6),
                                 (h, "rnb-hc", HOST_C_IP, "fd77:1::1"),
                                 (h, VETH, HOST_U_IP, "fd77:2::1"),
                                 (u, "eth0", UNIT_IP, UNIT_IP6)):
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", c, "route", "add", "default", "via", HOST_C_IP)
    sh("ip", "-n", u, "route", "add", "default", "via", HOST_U_IP)
    sh("ip", "-n", c, "-6", "route", "add", "default", "via", "fd77:1::1")
    sh("ip", "-n", u, "-6", "route", "add", "default", "via", "fd77:2::1")
    for knob in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
        sh("nsenter", f"--net=/run/netns/{h}", "sysctl", "-qw", knob)


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab = Lab(secrets.token_hex(2))
    lab.client, lab.host, lab.unit = lab.ns("c"), lab.ns("h"), lab.ns("u")
    try:
        _build(lab)
        yield lab
    finally:
        for p in lab.children:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        with contextlib.suppress(Exception):
            QueueRules(VETH, netns=lab.host).remove()
        for role in "chu":
            subprocess.run(["ip", "netns", "del", f"rnb-{role}-{lab.tag}"], capture_output=True)


@pytest.fixture
def bridged_lab() -> Iterator[Lab]:
    """Client and unit on one bridge in the host's namespace (10.77.3.0/24)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lab = Lab(secrets.token_hex(2))
    lab.client, lab.host, lab.unit = lab.ns("c"), lab.ns("h"), lab.ns("u")
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


class Echo:
    """A TCP echo server in the unit's namespace (a thread of this process)."""

    def __init__(self, lab: Lab, port: int = 7000) -> None:
        self.port = port
        self.lsock = lab.sock("u", socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((UNIT_IP, port))
        self.lsock.listen(8)
        self.lsock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.lsock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(0.1)
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.lsock.close()


@pytest.fixture
def echo(lab: Lab) -> Iterator[Echo]:
    e = Echo(lab)
    try:
        yield e
    finally:
        e.close()


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


def start_connect(lab: Lab, port: int = 7000) -> socket.socket:
    s = lab.sock("c", socket.SOCK_STREAM)
    s.setblocking(False)
    assert s.connect_ex((UNIT_IP, port)) == 115  # EINPROGRESS
    return s


def connected(s: socket.socket, timeout: float) -> bool:
    _, w, _ = select.select([], [s], [], timeout)
    if not w:
        return False
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return True


def recv_within(s: socket.socket, timeout: float) -> bytes:
    """Everything that arrives on a stream socket within `timeout` seconds."""
    out = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([s], [], [], left)
        if r:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


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


def send_while_held(s: socket.socket, buf: OutputBuffer, data: bytes, epochs: range) -> bytes:
    """Hold inbound, send `data` to the echo server, then run and release `epochs`:
    what the client got back meanwhile (b"" if the unit never saw `data`)."""
    buf.hold_inbound(True)
    s.sendall(data)
    got = b""
    for e in epochs:  # release everything the unit sends
        time.sleep(0.1)
        buf.begin_epoch(e)
        buf.release(e - 1)
        got += recv_within(s, 0.01)
    return got


def unhold_and_receive(s: socket.socket, buf: OutputBuffer, epoch: int) -> bytes:
    """End the inbound hold, let epoch-1's output out: what the client gets."""
    buf.hold_inbound(False)
    time.sleep(0.3)
    buf.begin_epoch(epoch)
    buf.release(epoch - 1)
    return recv_within(s, 1.0)


def test_hold_inbound_holds_packets_towards_the_unit(lab: Lab, buf: NfqueueBuffer,
                                                     echo: Echo) -> None:
    s = establish(lab, buf)
    assert send_while_held(s, buf, b"c", range(2, 8)) == b""
    assert buf.counters()["inbound_waiting"] >= 1
    assert unhold_and_receive(s, buf, 8) == b"c"
    c = buf.counters()
    assert c["inbound_held"] >= 1 and c["inbound_waiting"] == 0
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
    time.sleep(0.2)
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
