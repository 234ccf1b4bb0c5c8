"""Socket options read ahead on a second thread dump exactly what CRIU reads itself.

With CRIU_REMUS_SOCKOPT_AHEAD=1 (patch 0013, in every remus dump) a helper
thread reads most options of the sockets in a batch of descriptors while CRIU
dumps the batch, and CRIU takes the helper's values. Asserted: a unit with
hundreds of TCP connections, their options set in many combinations, dumps
to the same socket entries with the helper as without it; the helper did
read ahead (its log line counts the descriptors); and the unit's connections
still work after both dumps (left running).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remus.checkpoint.criu import DUMP_ENV
from tests.support.procs import ask_unit, criu_or_skip, inner_init

pytestmark = [pytest.mark.root]

CONNS = 400  # 801 socket descriptors: CRIU's batch of 756, then a short one

# A TCP server and its clients in one process, in its own network namespace
# (loopback brought up with pyroute2). Connection i gets options that depend
# on i, so every option the helper reads has sockets with non-default values.
# On "k N" (in ctl) it sends a byte over connection N and answers with what
# the other end received.
UNIT = r"""
import os, socket, struct, sys, time
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
d, n = sys.argv[1], int(sys.argv[2])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 7000))
ls.listen(1024)
pairs = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", 7000))
    s, _ = ls.accept()
    for k in (c, s) if i % 2 else (s,):
        if i % 3 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384 + 64 * i)
        if i % 4 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768 + 32 * i)
        if i % 5 == 0:
            k.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if i % 7 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            k.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 100 + i)
            k.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5 + i % 50)
            k.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2 + i % 9)
        if i % 11 == 0:
            k.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
        if i % 13 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 1 + i % 6)
        if i % 17 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, i % 60))
        if i % 19 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 1 + i % 5, 250000))
            k.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 2, 500000 + i))
        if i % 23 == 0:
            k.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        if i % 29 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1000 + i)
        if i % 31 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        if i % 37 == 0:
            k.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 10 + i % 100)
        if i % 41 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            k.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if i % 43 == 0:
            k.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1 + i % 7)
            k.setsockopt(socket.SOL_SOCKET, socket.SO_DONTROUTE, 1)
        if i % 47 == 0:
            k.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
            k.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO
    pairs.append((c, s))
open(d + "/up", "w").close()
last = None
while True:
    try:
        cmd = open(d + "/ctl").read().strip()
    except OSError:
        cmd = None
    if cmd and cmd != last:
        k = int(cmd.split()[1])
        pairs[k][0].send(b"x")
        pairs[k][1].settimeout(5)
        got = pairs[k][1].recv(16).decode()
        with open(d + "/ack.tmp", "w") as f:
            f.write("%s|%s" % (cmd, got))
        os.rename(d + "/ack.tmp", d + "/ack")
        last = cmd
    time.sleep(0.005)
"""


def ask(ctl: Path, cmd: str) -> str:
    (got,) = ask_unit(ctl, cmd, 1)
    return got


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    proc = subprocess.Popen(["unshare", "--net", "--pid", "--fork", "setsid", sys.executable,
                             "-c", UNIT, str(ctl), str(CONNS)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    pid = 0
    try:
        pid = inner_init(proc.pid)
        deadline = time.monotonic() + 30
        while not (ctl / "up").exists():
            assert proc.poll() is None, "the unit exited while connecting"
            assert time.monotonic() < deadline, "the unit did not connect in 30 s"
            time.sleep(0.05)
        yield pid, ctl
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait(timeout=10)


def dump(pid: int, d: Path, ahead: str) -> tuple[list[dict[str, Any]], str]:
    """Dump the unit, left running; its socket entries (ids and inodes out) and the log."""
    d.mkdir()
    r = subprocess.run([criu_or_skip(), "dump", "-t", str(pid), "-D", str(d), "--shell-job",
                        "--tcp-established", "--leave-running", "-v4", "-o", "dump.log"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, **DUMP_ENV, "CRIU_REMUS_SOCKOPT_AHEAD": ahead})
    log = (d / "dump.log").read_text() if (d / "dump.log").exists() else r.stderr
    assert r.returncode == 0, log[-3000:]
    import pycriu
    with open(d / "files.img", "rb") as f:
        files = pycriu.images.load(f)["entries"]
    socks = [e["isk"] for e in files if "isk" in e]
    for s in socks:
        s.pop("id", None)
    return sorted(socks, key=lambda s: json.dumps(s, sort_keys=True)), log


def test_options_read_ahead_dump_the_same_entries(unit: tuple[int, Path],
                                                   tmp_path: Path) -> None:
    pid, ctl = unit
    assert ask(ctl, "k 0") == "x"
    stock, stock_log = dump(pid, tmp_path / "stock", "0")
    ahead, ahead_log = dump(pid, tmp_path / "ahead", "1")
    assert "read ahead" not in stock_log
    used = [(int(a), int(b)) for a, b in
            re.findall(r"socket options read ahead for (\d+) of (\d+) descriptors", ahead_log)]
    assert used and sum(a for a, _ in used) > 0, ahead_log[-3000:]
    assert len(stock) == 2 * CONNS + 1
    # the options vary, so a value taken for the wrong option or socket shows
    assert len({json.dumps(s.get("opts"), sort_keys=True) for s in stock}) > 20
    assert ahead == stock
    for k in (1, CONNS // 2, CONNS - 1):  # the connections work after both dumps
        assert ask(ctl, f"k {k}") == "x"
