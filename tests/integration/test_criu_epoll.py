"""An epoll with hundreds of socket targets survives dump and restore with our CRIU.

CRIU checks every target of an epoll against the task's descriptor table.
With CRIU_REMUS_FAST_FDS=1 (in every remus dump) a socket target is checked
by its inode instead of kcmp: through CRIU's own copy of the descriptor when
it holds one (patch 0012: the batch of descriptors being dumped, 756 at a
time), else through /proc/PID/fd/N (patch 0004). Asserted: both ways are
taken (a unit with more descriptors than one batch), no target needs kcmp,
and the restored epoll reports each socket under its own descriptor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remus.checkpoint.criu import DUMP_ENV
from tests.support.procs import ask_unit, criu_or_skip, inner_init

pytestmark = [pytest.mark.root]

PAIRS = 500  # 1,000 socket descriptors: more than CRIU's batch of 756

# An epoll over one end of each socket pair, the epoll's data = the fd. On
# "k N" (in ctl) it writes a byte into the other end of pair N and answers
# with the fds epoll reports ready, reading what it reports.
UNIT = r"""
import os, select, socket, sys, time
d = sys.argv[1]
pairs = [socket.socketpair() for _ in range(PAIRS)]
ep = select.epoll()
for a, b in pairs:
    ep.register(a.fileno(), select.EPOLLIN)
last = None
while True:
    try:
        cmd = open(d + "/ctl").read().strip()
    except OSError:
        cmd = None
    if cmd and cmd != last:
        k = int(cmd.split()[1])
        pairs[k][1].send(b"x")
        ready = [fd for fd, _ in ep.poll(2.0)]
        for fd in ready:
            os.read(fd, 16)
        want = pairs[k][0].fileno()
        with open(d + "/ack.tmp", "w") as f:
            f.write("%s|%s|%d" % (cmd, ",".join(map(str, ready)), want))
        os.rename(d + "/ack.tmp", d + "/ack")
        last = cmd
    time.sleep(0.005)
""".replace("PAIRS", str(PAIRS))


def ask(ctl: Path, cmd: str) -> tuple[list[int], int]:
    ready, want = ask_unit(ctl, cmd, 2)
    return [int(x) for x in ready.split(",") if x], int(want)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", UNIT,
                             str(ctl)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    pid = 0
    try:
        pid = inner_init(proc.pid)
        yield pid, ctl
    finally:
        if pid:
            kill(pid)
        proc.kill()
        proc.wait(timeout=10)


def test_epoll_targets_checked_without_kcmp_and_restored(unit: tuple[int, Path],
                                                         tmp_path: Path) -> None:
    pid, ctl = unit
    ready, want = ask(ctl, "k 0")  # the unit is up and its epoll works
    assert ready == [want]
    d = tmp_path / "dump"
    d.mkdir()
    r = subprocess.run([criu_or_skip(), "dump", "-t", str(pid), "-D", str(d), "--shell-job", "-v4",
                        "-o", "dump.log"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **DUMP_ENV})
    log = (d / "dump.log").read_text() if (d / "dump.log").exists() else r.stderr
    assert r.returncode == 0, log[-3000:]
    held = log.count("by the copy CRIU holds")
    via_proc = log.count("through /proc")
    assert held + via_proc == PAIRS, (held, via_proc)
    assert held > 0 and via_proc > 0  # both ways, across the batches
    assert "kcmp-yes" not in log  # no target needed the slow path
    # the dump stopped the unit (no --leave-running); restore it
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.01)
    (ctl / "ack").unlink()
    pidfile = tmp_path / "restored.pid"
    restore = subprocess.Popen([criu_or_skip(), "restore", "-D", str(d), "--shell-job", "-v1",
                                "-o", str(tmp_path / "restore.log"), "--pidfile", str(pidfile)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    restored = 0
    try:
        deadline = time.monotonic() + 20
        while not restored and time.monotonic() < deadline:
            if restore.poll() is not None:
                pytest.fail("criu restore exited: "
                            + (tmp_path / "restore.log").read_text()[-3000:])
            if pidfile.exists() and pidfile.read_text().strip():
                restored = int(pidfile.read_text())
            time.sleep(0.01)
        assert restored
        # every target, in both batches, is reported under its own descriptor
        for k in (1, PAIRS // 2, PAIRS - 1):
            ready, want = ask(ctl, f"k {k}")
            assert ready == [want], (k, ready, want)
    finally:
        if restored:
            kill(restored)
        restore.kill()
        restore.wait(timeout=10)
