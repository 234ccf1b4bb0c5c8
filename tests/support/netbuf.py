"""The output buffer's namespaces and echo server (test_netbuf, test_netbuf_plug).

    rnb-c-XXXX  10.77.1.2 --- 10.77.1.1  rnb-h-XXXX  10.77.2.1 --- 10.77.2.2  rnb-u-XXXX
    (client)    rnb-c0        rnb-hc     (host, forwarding,  rnb-hu     eth0  (unit)
                                          the buffer's rules)

Sockets of the client and the unit are created inside their namespaces (a
socket stays in the namespace it was made in) and used from the test thread.
The fixtures `lab` and `echo` are bound in each test module that uses them
(`lab = netbuf.lab`): this `lab` is not the two-host lab of tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from remus.netbuf.base import OutputBuffer
from remus.netbuf.nfqueue_rules import QueueRules
from remus.netns import in_netns

CLIENT_IP, HOST_C_IP, HOST_U_IP, UNIT_IP = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"
CLIENT_IP6, UNIT_IP6 = "fd77:1::2", "fd77:2::2"
VETH = "rnb-hu"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@dataclass
class Lab:
    tag: str
    client: str = ""
    host: str = ""
    unit: str = ""
    children: list[subprocess.Popen[str]] = field(default_factory=list)

    @classmethod
    def fresh(cls) -> Lab:
        """A lab with a new tag, its namespaces not made yet; skips unless root."""
        if os.geteuid() != 0:
            pytest.skip("needs root")
        lab = cls(secrets.token_hex(2))
        lab.client, lab.host, lab.unit = lab.ns("c"), lab.ns("h"), lab.ns("u")
        return lab

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
    lab = Lab.fresh()
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
            with contextlib.suppress(TimeoutError):  # every 0.1 s: stop?
                conn, _ = self.lsock.accept()
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

    def __enter__(self) -> Echo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def echo(lab: Lab) -> Iterator[Echo]:
    with Echo(lab) as e:
        yield e


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
