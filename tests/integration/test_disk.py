"""DiskTracker against real processes writing to a state directory.

1. A writer process appends with fsync, overwrites in place, writes through
   a shared mmap, saves atomically (write tmp, fsync, rename), creates and
   removes directories, all continuously. Every epoch it is stopped
   (SIGSTOP: like the freezer, it stops the writer between syscalls), the
   tracker captures, the writer continues, and the capture is shipped
   through a real CheckpointStore into a backup copy, which must equal the
   tree as it was while the writer was stopped.
2. (root, CRIU) A unit with a log open for append, a deleted-while-open
   file ("ghost": CRIU keeps its content in the image) and a shared mmap is
   checkpointed with the disk capture in CRIU's post-dump notification;
   then it is killed, the backup copy takes the state directory's place and
   the unit is restored from the store: it must have exactly the state of
   the last checkpoint, ghost file included, and go on.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remus import paths
from remus.checkpoint.delta import KIND_MANIFEST, Manifest
from remus.checkpoint.delta_encoder import DeltaEncoder
from remus.checkpoint.disk_apply import DiskApplier
from remus.checkpoint.disk_track import DiskTracker
from remus.checkpoint.store import CheckpointStore
from tests.support.disk import snapshot
from tests.support.procs import inner_init
from tests.support.timing import wait_for

WRITER = r"""
import mmap, os, random, sys, time
d = sys.argv[1]
rnd = random.Random(7)
aof = open(d + "/aof", "ab")
db = os.open(d + "/db", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(db, 1 << 20)
mf = os.open(d + "/mm", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(mf, 256 << 10)
mm = mmap.mmap(mf, 256 << 10)
i = 0
while True:
    i += 1
    aof.write(b"SET key:%d %d\n" % (i, rnd.random() * 1e9))
    aof.flush()
    os.fsync(aof.fileno())
    os.pwrite(db, os.urandom(512), rnd.randrange(0, (1 << 20) - 512))
    off = rnd.randrange(0, (256 << 10) - 64)
    mm[off:off + 64] = os.urandom(64)
    if i % 7 == 0:
        with open(d + "/snap.tmp", "wb") as f:
            f.write(os.urandom(rnd.randrange(1, 200000)))
            f.flush()
            os.fsync(f.fileno())
        os.rename(d + "/snap.tmp", d + "/snap")
    if i % 11 == 0:
        sub = d + "/dir%d" % (i % 3)
        if os.path.isdir(sub):
            for n in os.listdir(sub):
                os.unlink(os.path.join(sub, n))
            os.rmdir(sub)
        else:
            os.mkdir(sub)
            with open(sub + "/f", "w") as f:
                f.write(str(i))
    if i % 13 == 0:
        os.ftruncate(db, (1 << 20) - rnd.randrange(0, 4096))
        os.ftruncate(db, 1 << 20)
    time.sleep(0.0005)
"""


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] == "T"


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    state = tmp_path / "pri" / "state"
    state.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(state)])
    aof = state / "aof"

    def every_kind_written() -> bool:  # 13 rounds: each kind of write at least once
        return proc.poll() is not None or (aof.exists() and aof.read_bytes().count(b"\n") > 13)

    try:
        wait_for(every_kind_written, timeout=30)
        assert proc.poll() is None
        yield proc.pid, state
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_tracker_follows_a_real_writer(writer: tuple[int, Path], tmp_path: Path) -> None:
    pid, state = writer
    backup = tmp_path / "bak" / "state"
    (state / "cold").write_bytes(os.urandom(8 << 20))  # never touched again
    tracker = DiskTracker([state], pids=lambda: [pid])
    tracker.start()
    store = CheckpointStore(tmp_path / "store")
    DiskApplier({state: backup}).register(store)
    store.recover()
    sent, read = [], []
    try:
        for epoch in range(40):
            time.sleep(0.02)
            os.kill(pid, signal.SIGSTOP)
            while not stopped(pid):
                time.sleep(0.0005)
            delta = tracker.capture(full=epoch == 0)
            expected = snapshot(state)
            os.kill(pid, signal.SIGCONT)
            staged = store.begin(1, epoch, epoch - 1, epoch == 0)
            for chunk in delta.chunks():
                staged.add(*chunk)
            staged.add(KIND_MANIFEST, "manifest", Manifest(epoch == 0, {}, {}).to_json(), b"")
            staged.commit()
            store.apply_pending()
            got = snapshot(backup)
            assert got == expected, sorted(k for k in set(got) | set(expected)
                                           if got.get(k) != expected.get(k))
            sent.append(tracker.stats.bytes)
            read.append(tracker.stats.bytes_hashed)
    finally:
        os.kill(pid, signal.SIGCONT)
        tracker.close()
    # after the first copy only changed blocks travel, and the cold file is not even read
    assert sent[0] > 8 << 20 and max(sent[1:]) < 4 << 20, sent
    assert max(read[1:]) < 8 << 20, read


# ---- CRIU: the disk copy and the images restore together -----------------------------------

UNIT = r"""
import hashlib, mmap, os, sys, time
ctl, state = sys.argv[1], sys.argv[2]
log = open(state + "/log", "ab")
ghost = open(state + "/ghost", "w+b")
ghost.write(b"ghost content ")
ghost.flush()
os.unlink(state + "/ghost")  # deleted while open: CRIU keeps it in the image
mf = os.open(state + "/mm", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(mf, 64 << 10)
mm = mmap.mmap(mf, 64 << 10)
step = 0

def do_step(n):
    log.write(b"entry %d\n" % n)
    log.flush()
    os.fsync(log.fileno())
    ghost.write(b"g%d " % n)
    ghost.flush()
    mm[(n * 4099) % (60 << 10):(n * 4099) % (60 << 10) + 8] = n.to_bytes(8, "little")
    with open(state + "/snap.tmp", "wb") as f:
        f.write(b"snapshot %d" % n)
    os.rename(state + "/snap.tmp", state + "/snap")

def digest():
    h = hashlib.sha256()
    h.update(open(state + "/log", "rb").read())
    h.update(os.pread(ghost.fileno(), 1 << 20, 0))
    h.update(mm[:])
    h.update(open(state + "/snap", "rb").read() if step else b"")
    return h.hexdigest()

last = None
while True:
    try:
        cmd = open(ctl + "/ctl").read().strip()
    except OSError:
        cmd = None
    if cmd and cmd != last:
        while step < int(cmd.split()[0]):
            step += 1
            do_step(step)
        with open(ctl + "/ack.tmp", "w") as f:
            f.write("%s|%d|%s" % (cmd, step, digest()))
        os.rename(ctl + "/ack.tmp", ctl + "/ack")
        last = cmd
    time.sleep(0.005)
"""


def command(ctl: Path, cmd: str, timeout: float = 10.0) -> tuple[int, str]:
    (ctl / "ctl.tmp").write_text(cmd)
    os.rename(ctl / "ctl.tmp", ctl / "ctl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            echoed, step, digest = (ctl / "ack").read_text().split("|")
            if echoed == cmd:
                return int(step), digest
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"unit did not answer {cmd!r}")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] == "Z":
                break
        except OSError:
            break
        time.sleep(0.01)


@pytest.mark.root
def test_ghost_file_and_state_dir_restore_with_criu(tmp_path: Path) -> None:
    if paths.criu_binary() is None:
        pytest.skip("CRIU is not built")
    from remus.checkpoint.criu import Criu

    ctl, state, backup = tmp_path / "ctl", tmp_path / "state", tmp_path / "bak"
    ctl.mkdir()
    state.mkdir()
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", UNIT, str(ctl), str(state)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=tmp_path)
    restored = 0
    try:
        pid = inner_init(proc.pid)
        tracker = DiskTracker([state], pids=lambda: [pid])
        tracker.start()
        store = CheckpointStore(tmp_path / "store")
        DiskApplier({state: backup}).register(store)
        store.recover()
        enc, criu = DeltaEncoder(), Criu()
        digest = ""
        for epoch in range(4):
            _, digest = command(ctl, str(epoch))
            captured: dict[str, Any] = {}

            def notify(script: str, captured: dict[str, Any] = captured, full: bool = epoch == 0
                       ) -> None:
                if script == "post-dump":  # the unit is frozen
                    captured["delta"] = tracker.capture(full=full)
                    captured["view"] = snapshot(state)

            d = tmp_path / f"dump{epoch}"
            criu.dump(pid, d, notify=notify)
            staged = store.begin(1, epoch, epoch - 1, epoch == 0)
            for chunk in itertools.chain(captured["delta"].chunks(), enc.encode(d, epoch == 0)):
                staged.add(*chunk)
            staged.commit()
            store.apply_pending()
            assert snapshot(backup) == captured["view"]
        assert "ghost" not in captured["view"]
        command(ctl, "9")  # changes after the last checkpoint: must not survive
        _kill(pid)
        proc.wait(timeout=10)
        os.rename(state, tmp_path / "state.dead")
        os.rename(backup, state)  # the backup's copy, at the same path
        (ctl / "ack").unlink()
        (ctl / "ctl").write_text("3 again")  # the first thing the restored unit reads
        restored = criu.restore(store.images_dir())
        assert command(ctl, "3 again") == (3, digest)  # the last checkpoint, ghost included
        step, _ = command(ctl, "5")
        assert step == 5 and b"entry 5\n" in (state / "log").read_bytes()
        assert b"entry 9" not in (state / "log").read_bytes()
    finally:
        if restored:
            _kill(restored)
            try:
                os.waitpid(restored, 0)
            except ChildProcessError:
                pass
        proc.kill()
        proc.wait(timeout=10)
        for pid_file in tmp_path.glob("*.pid"):
            pid_file.unlink()
