"""Real CRIU dumps -> DeltaEncoder -> CheckpointStore -> criu restore.

A small python process in its own PID namespace changes its memory in a
known, deterministic way at each step (dirties pages of a big bytearray,
maps and unmaps anonymous regions, writes a shared mapping, throws pages
away with MADV_DONTNEED, grows and moves a mapping with mremap, bumps a
counter). After every step it is dumped with --leave-running, the dump is
encoded against the previous one and applied to a store, and the store's
image set must hold exactly the dump. Finally the original is killed, the
store's images are restored, and the restored process must report the
memory digest the original had at the last dump, then keep working.

The same runs with CRIU memory tracking (`--track-mem` with the previous
dump as parent): with soft-dirty on kernels that have it (on this project's
CI kernel, which has none, tests/integration/test_vm_soft_dirty.py runs this
file inside a VM with Debian's stock kernel), and with uffd-wp tracking
(remus.checkpoint.uffd) where the kernel has PAGEMAP_SCAN.
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

from remus.checkpoint import images, pagemap
from remus.checkpoint.criu import Criu
from remus.checkpoint.delta_encoder import DeltaEncoder
from remus.checkpoint.store import CheckpointStore
from remus.checkpoint.tracking import kernel_soft_dirty, uffd_wp_problem
from remus.checkpoint.uffd import CRIU_ENV, UffdTracker
from tests.support.procs import ask_unit, criu_or_skip, inner_init

pytestmark = pytest.mark.root
SOFT_DIRTY = kernel_soft_dirty()
UFFD_WP = uffd_wp_problem()

# The unit. ``ctl`` holds a target step; on any change of ctl the unit runs
# the steps up to it and writes ``ack`` = "<ctl> <step> <digest> <pid>".
# With --simulate N it runs steps 1..N and prints the digest (a reference).
UNIT = r"""
import ctypes, hashlib, mmap, os, sys, time
# No transparent huge pages: soft-dirty marks a whole 2 MiB THP when one byte
# of it is written, and the tracked test counts 4 KiB pages.
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
PAGE = 4096
buf = bytearray(6 << 20)
for i in range(0, len(buf), PAGE):
    buf[i:i + 8] = i.to_bytes(8, "little")
shared = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_SHARED)
regions = []
step = 0
# Raw memory for what Python's objects cannot do: MADV_DONTNEED (pages must
# read as zero after a restore) and mremap (a registered mapping moves).
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
raw_len = 32 * PAGE
raw = libc.mmap(None, raw_len, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
ctypes.memset(raw, 7, raw_len)

def do_step(n):
    npages = len(buf) // PAGE
    for k in range(40):
        p = (n * 37 + k * 101) % npages
        buf[p * PAGE + 16:p * PAGE + 24] = n.to_bytes(8, "little")
    shared[(n % 64) * PAGE] = n % 251
    if n % 2 == 0:
        m = mmap.mmap(-1, (n % 5 + 1) * 64 * PAGE)
        for off in range(0, len(m), PAGE):
            m[off:off + 4] = n.to_bytes(4, "little")
        regions.append(m)
    if n % 3 == 0 and regions:
        regions.pop(0).close()
    global raw, raw_len
    # throw away 8 pages (they read as zero from now on), then write 2 of them again
    off = (n % 3) * 8 * PAGE
    libc.madvise(raw + off, 8 * PAGE, 4)  # MADV_DONTNEED
    ctypes.memset(raw + off + 3 * PAGE, n, 2 * PAGE)
    if n % 2 == 0:  # grow, and (most likely) move
        raw = libc.mremap(raw, raw_len, raw_len + 8 * PAGE, 1)  # MREMAP_MAYMOVE
        ctypes.memset(raw + raw_len, n, 8 * PAGE)
        raw_len += 8 * PAGE

def digest():
    h = hashlib.sha256()
    h.update(step.to_bytes(8, "little"))
    h.update(buf)
    h.update(shared[:])
    for m in regions:
        h.update(m[:])
    h.update(ctypes.string_at(raw, raw_len))
    return h.hexdigest()

if sys.argv[1] == "--simulate":
    for n in range(1, int(sys.argv[2]) + 1):
        step = n
        do_step(n)
    print(digest())
    sys.exit(0)

d = sys.argv[1]
last = None
while True:
    try:
        with open(d + "/ctl") as f:
            cmd = f.read().strip()
    except OSError:
        cmd = None
    if cmd and cmd != last:
        while step < int(cmd.split()[0]):
            step += 1
            do_step(step)
        with open(d + "/ack.tmp", "w") as f:
            f.write("%s|%d|%s|%d" % (cmd, step, digest(), os.getpid()))
        os.rename(d + "/ack.tmp", d + "/ack")
        last = cmd
    time.sleep(0.005)
"""

STEPS = 6


def command(ctl_dir: Path, cmd: str, timeout: float = 10.0) -> tuple[int, str, int]:
    """Send a command to the unit; (step, memory digest, pid inside its namespace)."""
    step, digest, pid = ask_unit(ctl_dir, cmd, 3, timeout)
    return int(step), digest, int(pid)


def simulate(steps: int) -> str:
    out = subprocess.run(
        [sys.executable, "-c", UNIT, "--simulate", str(steps)],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def kill_and_reap(pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The unit running as init of its own PID namespace: (outer pid, ctl dir)."""
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    # setsid inside the namespace: CRIU refuses a session leader outside it
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "setsid", "python3", "-c", UNIT, str(ctl)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    init = 0
    try:
        init = inner_init(proc.pid)
        yield init, ctl
    finally:
        if init:
            kill_and_reap(init, None)
        proc.kill()
        proc.wait(timeout=10)


def dump(pid: int, d: Path, *extra: str) -> None:
    d.mkdir()
    r = subprocess.run(
        [criu_or_skip(), "dump", "-t", str(pid), "-D", str(d), "--leave-running", "--shell-job",
         "-v1", "-o", "dump.log", *extra],
        capture_output=True, text=True, timeout=60,
    )
    log = (d / "dump.log").read_text() if (d / "dump.log").exists() else r.stderr
    assert r.returncode == 0, log[-3000:]


def assert_same_images(store_images: Path, dump_dir: Path) -> None:
    names = images.list_images(dump_dir)
    assert images.list_images(store_images) == names
    for name in names:
        assert (store_images / name).read_bytes() == (dump_dir / name).read_bytes(), name
    assert pagemap.pages_by_vaddr(store_images) == pagemap.pages_by_vaddr(dump_dir)


def assert_tracked_applied(store_images: Path, dump_dir: Path,
                           before: dict[str, dict[int, bytes]]) -> None:
    """The store holds the dump's flattened pagemap, its present pages, and for
    every PE_PARENT hole the page it had before."""
    after = pagemap.pages_by_vaddr(store_images)
    present = pagemap.pages_by_vaddr(dump_dir)
    for name in images.list_images(dump_dir):
        if not images.is_pagemap(name):
            continue
        pm = pagemap.read_pagemap(dump_dir / name)
        # the encoder flattens pagemaps with parent holes and sends the others as
        # they are (flattening also merges adjacent entries: CRIU splits shmem)
        want = pm.flattened() if pm.has_parent else (dump_dir / name).read_bytes()
        assert (store_images / name).read_bytes() == want, name
        assert set(after[name]) == {int(v) for v in pm.full_layout()}, name
        for vaddr, page in after[name].items():
            want = present[name].get(vaddr, before.get(name, {}).get(vaddr))
            assert page == want, (name, hex(vaddr))


def dump_uffd_wp(tracker: UffdTracker, pid: int, d: Path, parent: Path | None) -> None:
    """A dump as the primary takes it with uffd-wp tracking: the tracker attaches
    before, and re-arms in CRIU's post-dump notification (the unit still frozen)."""
    tracker.attach()

    def notify(script: str) -> None:
        if script == "post-dump":
            tracker.rearm()

    Criu().dump(pid, d, notify=notify, track_mem=True, parent=parent, env=CRIU_ENV)


@pytest.mark.parametrize("mode", [
    "diff",
    pytest.param("soft-dirty", marks=pytest.mark.skipif(
        not SOFT_DIRTY, reason="no soft-dirty on this kernel (test_vm_soft_dirty runs it in a VM)")),
    pytest.param("uffd-wp", marks=pytest.mark.skipif(
        UFFD_WP is not None, reason=f"no uffd-wp tracking here: {UFFD_WP}")),
])
def test_deltas_of_real_dumps_restore(unit: tuple[int, Path], tmp_path: Path, mode: str) -> None:
    pid, ctl = unit
    tracked = mode != "diff"
    tracker = UffdTracker(pid)
    store = CheckpointStore(tmp_path / "store", verify_pages=True)
    store.recover()
    enc = DeltaEncoder(compress=True)
    sent: list[int] = []
    digest = ""
    for epoch in range(STEPS + 1):
        step, digest, inner = command(ctl, str(epoch))
        assert (step, inner) == (epoch, 1)
        d = tmp_path / f"dump{epoch}"
        full = epoch == 0
        parent = tmp_path / f"dump{epoch - 1}" if tracked and not full else None
        if mode == "uffd-wp":
            dump_uffd_wp(tracker, pid, d, parent)
        else:
            track = ("--track-mem",) + (() if full else ("--prev-images-dir", f"../dump{epoch - 1}"))
            dump(pid, d, *(track if tracked else ()))
        before = pagemap.pages_by_vaddr(store.images_dir())
        staged = store.begin(1, epoch, epoch - 1, full)
        for chunk in enc.encode(d, full, parent=parent):
            staged.add(*chunk)
        staged.commit()
        store.apply_pending()
        if tracked and not full:
            # CRIU copied only the pages written since the parent dump
            maps = [pagemap.read_pagemap(d / n) for n in images.list_images(d) if images.is_pagemap(n)]
            written = sum(pm.nr_present for pm in maps)
            total = sum(pm.full_layout().size for pm in maps)
            # the step's pages (up to 448 in a new region), the shared mapping
            # (shmem is not tracked) and what the interpreter touched: not all
            assert written < total // 2, (written, total)
            assert any(pm.has_parent for pm in maps)
            assert_tracked_applied(store.images_dir(), d, before)
        else:
            assert_same_images(store.images_dir(), d)
        sent.append(enc.stats.page_bytes)
    # deltas carry a small part of the memory: 40 dirty pages + a new region
    assert sent[0] > 6 << 20
    assert all(b < sent[0] // 3 for b in sent[1:]), sent
    assert digest == simulate(STEPS)

    tracker.close()
    kill_and_reap(pid, None)
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        time.sleep(0.01)
    # a fresh store object, as after a backup restart, serves the restore
    store = CheckpointStore(tmp_path / "store")
    assert store.recover() == (1, STEPS)
    (ctl / "ack").unlink()
    pidfile = tmp_path / "restored.pid"
    restore = subprocess.Popen(
        [criu_or_skip(), "restore", "-D", str(store.images_dir()), "--shell-job", "-v1",
         "-o", str(tmp_path / "restore.log"), "--pidfile", str(pidfile)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    restored = 0
    try:
        deadline = time.monotonic() + 20
        while not restored and time.monotonic() < deadline:
            if restore.poll() is not None:
                log = (tmp_path / "restore.log").read_text()
                pytest.fail("criu restore exited: " + log[-3000:])
            if pidfile.exists() and pidfile.read_text().strip():
                restored = int(pidfile.read_text())
            time.sleep(0.01)
        assert restored
        # the restored process has the memory of the last checkpoint ...
        assert command(ctl, f"{STEPS} again") == (STEPS, digest, 1)
        # ... and goes on from there exactly as the original would have
        assert command(ctl, str(STEPS + 1)) == (STEPS + 1, simulate(STEPS + 1), 1)
    finally:
        if restored:
            kill_and_reap(restored, restore)
        else:
            restore.kill()
            restore.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    except (OSError, IndexError):
        return "Z"
