"""uffd-wp dirty tracking against real processes, the real kernel and our CRIU.

Asserted: a tracked dump copies exactly the pages written since the previous
one in a big mapping, whether user code or the kernel (read(2) into the
buffer) wrote them; a forked child is tracked from its first dump on; a
process that exec'd is tracked afresh; the unit keeps running normally
through the syscall injection. Restores of tracked chains are checked in
test_delta_criu.py (uffd-wp variant).
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

from remus.checkpoint.criu import Criu, remove_dump_dir
from remus.checkpoint.pagemap import PE_PARENT, read_pagemap
from remus.checkpoint.tracking import uffd_wp_problem
from remus.checkpoint.uffd import CRIU_ENV, UffdTracker, tree_pids

WHY = uffd_wp_problem()
pytestmark = [pytest.mark.root, pytest.mark.skipif(WHY is not None, reason=f"no uffd-wp: {WHY}")]

PAGE = 4096
MAP_PAGES = 4096  # 16 MiB

# Writes on command: "w N S" writes N pages from page S (one byte each), "r S"
# read(2)s one page of /dev/urandom into page S, "fork" starts a child that
# writes its own pages on "cw N", "exec" makes the child exec sleep.
UNIT = r"""
import ctypes, mmap, os, sys, time
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # no THP: pages are counted in 4 KiB
PAGE = 4096
m = mmap.mmap(-1, MAP_PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(m), PAGE):
    m[i] = 1
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
child = None
ticks = 0
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "w":
        n, s = int(cmd[1]), int(cmd[2])
        for k in range(n):
            m[(s + k) * PAGE + 9] = (m[(s + k) * PAGE + 9] + 1) % 256
    elif cmd[0] == "r":
        with open("/dev/urandom", "rb", buffering=0) as f:
            f.readinto(memoryview(m)[int(cmd[1]) * PAGE:(int(cmd[1]) + 1) * PAGE])
    elif cmd[0] == "fork":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            for c in os.fdopen(r):
                if c.startswith("cw"):
                    for k in range(int(c.split()[1])):
                        m[k * PAGE + 17] = 5
                elif c.startswith("exec"):
                    os.execvp("sleep", ["sleep", "1000"])
            os._exit(0)
        os.close(r)
        child = os.fdopen(w, "w")
        print(pid, flush=True)
        continue
    elif cmd[0] == "madv":  # madv S N ADVICE: madvise(2) N pages from page S
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.madvise(base + int(cmd[1]) * PAGE, int(cmd[2]) * PAGE, int(cmd[3])) == 0
    elif cmd[0] in ("cw", "exec"):
        child.write(line)
        child.flush()
        time.sleep(0.3)
    print("ok", flush=True)
""".replace("MAP_PAGES", str(MAP_PAGES))


class Unit:
    def __init__(self, tmp: Path) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", UNIT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, cwd=tmp)
        assert self.proc.stdout is not None
        self.base = int(self.proc.stdout.readline())
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        self.pid = int(kids[0])

    def do(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        for pid in reversed(tree_pids(self.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Unit]:
    u = Unit(tmp_path)
    try:
        yield u
    finally:
        u.close()


class Dumper:
    """Dumps the way the primary does with uffd-wp (attach, dump, re-arm in post-dump)."""

    def __init__(self, unit: Unit, root: Path, env: dict[str, str] | None = None) -> None:
        self.unit, self.root = unit, root
        self.env = {**CRIU_ENV, **(env or {})}
        self.tracker = UffdTracker(unit.pid)
        self.prev: Path | None = None
        self.n = 0

    def dump(self) -> Path:
        self.tracker.attach()
        d = self.root / f"d{self.n}"
        self.n += 1

        def notify(script: str) -> None:
            if script == "post-dump":
                self.tracker.rearm()

        Criu().dump(self.unit.pid, d, notify=notify, track_mem=True, parent=self.prev,
                    env=self.env, log_level=4)
        self.prev = d
        return d


def copied_in_map(d: Path, pagemap: str, base: int) -> set[int]:
    """Pages (indices into the unit's big mapping) whose data this dump holds."""
    pm = read_pagemap(d / pagemap)
    lo, hi = base, base + MAP_PAGES * PAGE
    return {(int(v) - lo) // PAGE for v in pm.layout() if lo <= int(v) < hi}


def test_dump_copies_exactly_the_written_pages(unit: Unit, tmp_path: Path) -> None:
    dumper = Dumper(unit, tmp_path)
    first = dumper.dump()
    pm = f"pagemap-{1}.img"  # the unit is pid 1 of its namespace
    assert len(copied_in_map(first, pm, unit.base)) == MAP_PAGES  # no parent: everything
    assert copied_in_map(dumper.dump(), pm, unit.base) == set()  # nothing written since
    assert unit.do("w 100 1000") == "ok"
    assert unit.do("r 3000") == "ok"  # the kernel writes this page (copy_to_user)
    assert copied_in_map(dumper.dump(), pm, unit.base) == set(range(1000, 1100)) | {3000}
    assert unit.do("w 3 0") == "ok"
    assert copied_in_map(dumper.dump(), pm, unit.base) == {0, 1, 2}
    assert dumper.tracker.stats.processes == 1 and dumper.tracker.stats.untracked == 0
    dumper.tracker.close()


def test_clean_runs_are_one_parent_entry(unit: Unit, tmp_path: Path) -> None:
    # CRIU patch 0006: a run of clean pages goes to the parent as one hole, not a
    # page at a time; the entries must still cover the mapping exactly once.
    dumper = Dumper(unit, tmp_path)
    dumper.dump()
    assert unit.do("w 100 1000") == "ok"
    pm = read_pagemap(dumper.dump() / "pagemap-1.img")
    lo, hi = unit.base, unit.base + MAP_PAGES * PAGE
    runs = [(e.vaddr, e.nr_pages, bool(e.flags & PE_PARENT)) for e in pm.entries
            if lo <= e.vaddr < hi]
    assert runs == [(lo, 1000, True), (lo + 1000 * PAGE, 100, False),
                    (lo + 1100 * PAGE, MAP_PAGES - 1100, True)]
    dumper.tracker.close()


def _vmas(d: Path) -> dict[int, tuple[int, int]]:
    """start -> (end, madvise bits) of each mapping in the dump's mm image."""
    import pycriu

    with open(d / "mm-1.img", "rb") as f:
        mm = pycriu.images.load(f)["entries"][0]
    def num(x: int | str) -> int:  # pycriu writes some fields as hex strings
        return x if isinstance(x, int) else int(x, 16)

    return {num(v["start"]): (num(v["end"]), num(v.get("madv", 0))) for v in mm["vmas"]}


def _vmflags_from_cache(d: Path) -> bool:
    return "VmFlags of" in (d / "dump.log").read_text()


def test_vmflags_cache(unit: Unit, tmp_path: Path) -> None:
    # CRIU patch 0007: VmFlags come from the cache while /proc/PID/maps is
    # unchanged and the cache is younger than its maximum age; any change of
    # the mappings reads smaps again.
    cache = tmp_path / "vmflags"
    cache.mkdir()
    dumper = Dumper(unit, tmp_path, env={"CRIU_REMUS_VMFLAGS_DIR": str(cache),
                                         "CRIU_REMUS_VMFLAGS_MAX_AGE_MS": "60000"})
    d0 = dumper.dump()
    assert not _vmflags_from_cache(d0) and (cache / str(unit.pid)).exists()
    d1 = dumper.dump()
    assert _vmflags_from_cache(d1) and _vmas(d1) == _vmas(d0)
    dontdump = 1 << 16  # MADV_DONTDUMP, as CRIU records it
    base = unit.base
    assert unit.do("madv 0 16 16") == "ok"  # splits the mapping: maps changed
    d2 = dumper.dump()
    assert not _vmflags_from_cache(d2)
    assert _vmas(d2)[base] == (base + 16 * PAGE, dontdump)
    assert _vmas(d2)[base + 16 * PAGE][1] & dontdump == 0
    # A flag change that leaves every mapping's bounds alone is seen at the next
    # full read: not while the cache is young, at once when it has expired.
    assert unit.do(f"madv 16 {MAP_PAGES - 16} 16") == "ok"  # merges with the first part
    d3 = dumper.dump()
    assert not _vmflags_from_cache(d3)  # the merge changed maps
    assert _vmas(d3)[base] == (base + MAP_PAGES * PAGE, dontdump)
    assert unit.do(f"madv 0 {MAP_PAGES} 17") == "ok"  # MADV_DODUMP, bounds unchanged
    d4 = dumper.dump()
    assert _vmflags_from_cache(d4) and _vmas(d4)[base][1] & dontdump  # not yet
    dumper.env["CRIU_REMUS_VMFLAGS_MAX_AGE_MS"] = "0"
    d5 = dumper.dump()
    assert not _vmflags_from_cache(d5) and _vmas(d5)[base][1] & dontdump == 0
    # the unit's memory is the same through all of it (no page dumped twice)
    assert copied_in_map(d5, "pagemap-1.img", base) == set()
    dumper.tracker.close()


def test_pages_go_into_a_recycled_file(unit: Unit, tmp_path: Path) -> None:
    # CRIU patch 0011: with a spare pages file (one the reaper kept), a dump
    # writes its pages into that file, over what it held, and cuts it to what
    # it wrote; the image is what a dump into a new file holds.
    spare = tmp_path / "spare"
    spare.mkdir()
    dumper = Dumper(unit, tmp_path, env={"CRIU_REMUS_PAGES_SPARE": str(spare)})
    d0 = dumper.dump()  # full: the whole mapping, no spare to take yet
    assert unit.do("w 100 1000") == "ok"
    dumper.dump()  # d1: now the parent of the next dump, not d0
    old = os.stat(d0 / "pages-1.img")
    assert old.st_size > MAP_PAGES * PAGE
    remove_dump_dir(d0, spare=spare)  # reaped, as the primary does two epochs on
    assert [p.name for p in spare.iterdir()] == ["d0-pages-1.img"]
    assert unit.do("w 50 2000") == "ok"
    d2 = dumper.dump()
    assert list(spare.iterdir()) == []
    new = os.stat(d2 / "pages-1.img")
    assert new.st_ino == old.st_ino  # the very file, not a copy
    pm = read_pagemap(d2 / "pagemap-1.img")
    assert new.st_size == pm.layout().size * PAGE  # cut to what was written
    assert copied_in_map(d2, "pagemap-1.img", unit.base) == set(range(2000, 2050))
    # each page holds what the unit wrote (byte 0 set at start, byte 9 once),
    # not the full dump's bytes that the file held before
    data = (d2 / "pages-1.img").read_bytes()
    lo = unit.base
    for k, v in enumerate(int(x) for x in pm.layout()):
        if lo <= v < lo + MAP_PAGES * PAGE:
            page = data[k * PAGE:(k + 1) * PAGE]
            assert page[0] == 1 and page[9] == 1 and page.count(0) == PAGE - 2
    # a dump with no spare left writes a new file, as stock CRIU does
    assert unit.do("w 5 10") == "ok"
    d3 = dumper.dump()
    assert os.stat(d3 / "pages-1.img").st_ino != new.st_ino
    assert copied_in_map(d3, "pagemap-1.img", unit.base) == set(range(10, 15))
    dumper.tracker.close()


def test_children_and_exec_are_tracked(unit: Unit, tmp_path: Path) -> None:
    dumper = Dumper(unit, tmp_path)
    dumper.dump()
    assert int(unit.do("fork")) == 2  # its pid inside the namespace
    time.sleep(0.2)
    (child,) = set(tree_pids(unit.pid)) - {unit.pid}
    d = dumper.dump()  # the child is attached before this dump; CRIU copies it in full
    assert set(dumper.tracker.procs) == {unit.pid, child}
    pm_child = f"pagemap-{2}.img"  # inner pids: the unit is 1, its child 2
    assert len(copied_in_map(d, pm_child, unit.base)) == MAP_PAGES
    assert unit.do("cw 7") == "ok"
    d = dumper.dump()
    assert copied_in_map(d, pm_child, unit.base) == set(range(7))
    assert copied_in_map(d, "pagemap-1.img", unit.base) == set()
    # exec: the old tracker's mm is gone; the process is tracked afresh
    assert unit.do("exec") == "ok"
    old = dumper.tracker.procs[child]
    dumper.dump()  # re-arm finds the mm gone and drops it
    assert child not in dumper.tracker.procs or dumper.tracker.procs[child] is not old
    dumper.dump()
    assert child in dumper.tracker.procs and dumper.tracker.procs[child] is not old
    assert dumper.tracker.stats.untracked == 0
    dumper.tracker.close()


def test_injection_leaves_the_unit_running_normally(unit: Unit, tmp_path: Path) -> None:
    # a unit blocked in read(2) on its stdin is interrupted and restarted by the
    # injection: the command sent afterwards must still be read and answered
    tracker = UffdTracker(unit.pid)
    tracker.attach()
    assert unit.pid in tracker.procs
    fds = os.listdir(f"/proc/{unit.pid}/fd")
    links = [os.readlink(f"/proc/{unit.pid}/fd/{fd}") for fd in fds]
    assert not any("userfaultfd" in link for link in links)  # its own copy is closed
    assert unit.do("w 1 5") == "ok"
    tracker.close()
