"""Disk deltas: DiskTracker (inotify, primary) -> CheckpointStore + DiskApplier (backup).

Every test mutates a "primary" tree, captures, ships the chunks through a
real CheckpointStore (staged, committed, applied) into a "backup" tree at
another path, and compares the two trees entry by entry: kind, mode, owner,
mtime, content, symlink target, and data/hole layout.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remus.checkpoint.delta import KIND_MANIFEST, Manifest
from remus.checkpoint.disk_apply import PROGRESS, DiskApplier
from remus.checkpoint.disk_delta import DiskDelta
from remus.checkpoint.disk_track import BLOCK_SIZE, DiskTracker
from remus.checkpoint.disk_wire import DATA, KIND_DISK, STASH, TREE
from remus.checkpoint.redo import Record
from remus.checkpoint.store import CheckpointStore
from remus.errors import ProtocolError
from tests.support.disk import snapshot

MiB = 1 << 20


class Pair:
    """A tracked primary tree and its backup copy behind a real store."""

    def __init__(self, tmp: Path, **kw: Any) -> None:
        self.src = tmp / "pri" / "state"
        self.dst = tmp / "bak" / "state"
        self.work = tmp / "store"
        self.origin = self.src  # the root's name in the records
        self.src.mkdir(parents=True)
        self.tracker = DiskTracker([self.src], **kw)
        self.tracker.start()
        self.epoch = 0
        self.expected: dict[str, tuple[Any, ...]] = {}
        self.open_store()

    def open_store(self) -> None:
        """A fresh store + applier on the same workdir, as after a backup restart."""
        self.store = CheckpointStore(self.work)
        self.applier = DiskApplier({self.origin: self.dst})
        self.applier.register(self.store)
        self.store.recover()

    def capture(self, full: bool = False) -> list[tuple[int, str, bytes, bytes]]:
        delta = self.tracker.capture(full)
        self.expected = snapshot(self.src)  # the unit is "frozen" until we return
        return list(delta.chunks())

    def commit(self, chunks: list[tuple[int, str, bytes, bytes]]) -> None:
        e = self.epoch
        staged = self.store.begin(1, e, e - 1, e == 0)
        for c in chunks:
            staged.add(*c)
        staged.add(KIND_MANIFEST, "manifest", Manifest(e == 0, {}, {}).to_json(), b"")
        staged.commit()
        self.epoch += 1

    def sync(self, full: bool = False) -> list[tuple[int, str, bytes, bytes]]:
        chunks = self.capture(full)
        self.commit(chunks)
        self.store.apply_pending()
        self.check()
        return chunks

    def check(self) -> None:
        got = snapshot(self.dst)
        diff = {k: (self.expected.get(k), got.get(k)) for k in set(got) | set(self.expected)
                if got.get(k) != self.expected.get(k)}
        assert not diff, {k: (str(a)[:120], str(b)[:120]) for k, (a, b) in diff.items()}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.tracker.close()


def trees(chunks: list[tuple[int, str, bytes, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(meta) for kind, name, meta, _ in chunks if name == TREE]


def data_bytes(chunks: list[tuple[int, str, bytes, bytes]]) -> int:
    return sum(len(d) for _, name, _, d in chunks if name == DATA)


def fill(p: Path, size: int, seed: int = 1) -> None:
    p.write_bytes(bytes((seed * 7 + i) % 251 for i in range(251)) * (size // 251) +
                  b"x" * (size % 251))


# ---- format -------------------------------------------------------------------------------


def test_first_capture_is_full_and_tree_comes_first(pair: Pair) -> None:
    fill(pair.src / "a", 3 * BLOCK_SIZE + 5)
    chunks = pair.sync()
    assert all(k == KIND_DISK for k, *_ in chunks)
    assert chunks[0][1] == TREE and trees(chunks)[0]["full"] is True
    assert data_bytes(chunks) == 3 * BLOCK_SIZE + 5


def test_stage_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    ap = DiskApplier([tmp_path / "s"])
    tree = {"v": 1, "root": str(tmp_path / "s"), "full": False, "moves": [], "deletes": [],
            "creates": [], "sizes": [], "attrs": []}
    ap.stage(Record(KIND_DISK, TREE, json.dumps(tree).encode(), b""))
    for bad in ("../etc/passwd", "/etc/passwd", "a/../../x", f"{STASH}/0", "", "a//b"):
        with pytest.raises(ProtocolError):
            ap.stage(Record(KIND_DISK, TREE, json.dumps(dict(tree, deletes=[bad])).encode(), b""))
    with pytest.raises(ProtocolError):
        ap.stage(Record(KIND_DISK, TREE, json.dumps(dict(tree, root="/etc")).encode(), b""))
    data = {"root": str(tmp_path / "s"), "path": "f", "off": 0, "span": 10, "ext": [[0, 20]]}
    with pytest.raises(ProtocolError):
        ap.stage(Record(KIND_DISK, DATA, json.dumps(data).encode(), b"x" * 20))


# ---- what changes -------------------------------------------------------------------------------


def test_write_sends_only_the_changed_block(pair: Pair) -> None:
    fill(pair.src / "big", 8 * MiB)
    fill(pair.src / "other", 8 * MiB, seed=2)
    pair.sync()
    with open(pair.src / "big", "r+b") as f:
        f.seek(5 * MiB + 100)
        f.write(b"CHANGED")
        f.flush()
        os.fsync(f.fileno())
    chunks = pair.sync()
    assert data_bytes(chunks) == BLOCK_SIZE
    assert pair.tracker.stats.files_changed == 1
    assert pair.tracker.stats.bytes_hashed == 8 * MiB  # "other" was not even read
    chunks = pair.sync()  # nothing happened
    assert data_bytes(chunks) == 0 and pair.tracker.stats.bytes_hashed == 0


def test_append_create_and_delete(pair: Pair) -> None:
    (pair.src / "log").write_bytes(b"a" * 1000)
    (pair.src / "gone").write_text("bye")
    pair.sync()
    with open(pair.src / "log", "ab") as f:
        f.write(b"b" * 100)
    (pair.src / "gone").unlink()
    (pair.src / "new").write_text("hello")
    chunks = pair.sync()
    t = trees(chunks)[0]
    assert t["deletes"] == ["gone"] and ["new", "f", None] in t["creates"]


def test_truncate_and_truncate_then_extend(pair: Pair) -> None:
    fill(pair.src / "t", 4 * BLOCK_SIZE)
    fill(pair.src / "u", 4 * BLOCK_SIZE)
    pair.sync()
    os.truncate(pair.src / "t", 1000)
    with open(pair.src / "u", "r+b") as f:
        f.truncate(0)
        f.write(b"new head")
        f.truncate(3 * BLOCK_SIZE + 17)  # the tail is now a hole
    pair.sync()
    assert os.stat(pair.dst / "u").st_size == 3 * BLOCK_SIZE + 17


def test_rename_chain_swap_and_directory_moves(pair: Pair) -> None:
    for n in ("a", "x", "y"):
        fill(pair.src / n, 2 * BLOCK_SIZE, seed=ord(n))
    (pair.src / "d" / "sub").mkdir(parents=True)
    (pair.src / "d" / "sub" / "f").write_text("deep")
    (pair.src / "d" / "g").write_text("g")
    pair.sync()
    os.rename(pair.src / "a", pair.src / "b")
    os.rename(pair.src / "b", pair.src / "c")  # a -> b -> c
    os.rename(pair.src / "x", pair.src / "tmp")
    os.rename(pair.src / "y", pair.src / "x")
    os.rename(pair.src / "tmp", pair.src / "y")  # swap x and y
    os.rename(pair.src / "d", pair.src / "e")  # a directory, and
    os.rename(pair.src / "e" / "sub" / "f", pair.src / "f2")  # a child leaving it
    (pair.src / "e" / "sub" / "late").write_text("written after the move")
    chunks = pair.sync()
    t = trees(chunks)[0]
    assert data_bytes(chunks) == len("written after the move")  # renames move, not copy
    assert sorted(t["moves"]) == [["a", "c"], ["d", "e"], ["d/sub/f", "f2"], ["x", "y"], ["y", "x"]]


def test_delete_then_recreate_and_type_changes(pair: Pair) -> None:
    (pair.src / "p").write_text("old file")
    (pair.src / "q").mkdir()
    (pair.src / "q" / "inside").write_text("1")
    pair.sync()
    (pair.src / "p").unlink()
    (pair.src / "p").mkdir()  # file -> directory
    (pair.src / "p" / "kid").write_text("k")
    shutil.rmtree(pair.src / "q")
    (pair.src / "q").write_text("directory -> file")
    pair.sync()
    os.rename(pair.src / "p" / "kid", pair.src / "moved")
    shutil.rmtree(pair.src / "p")  # a directory removed after its child left
    (pair.src / "p").write_text("and back")
    pair.sync()


def test_directories_created_and_removed(pair: Pair) -> None:
    pair.sync()
    (pair.src / "a" / "b" / "c").mkdir(parents=True)
    (pair.src / "a" / "b" / "c" / "f").write_text("deep new")
    pair.sync()
    (pair.src / "a" / "b" / "c" / "g").write_text("watched now")
    pair.sync()
    shutil.rmtree(pair.src / "a")
    chunks = pair.sync()
    assert trees(chunks)[0]["deletes"] == ["a"]


def test_symlinks_and_fifos(pair: Pair) -> None:
    (pair.src / "target").write_text("t")
    os.symlink("target", pair.src / "link")
    os.symlink("/nonexistent/dangling", pair.src / "dangling")
    os.mkfifo(pair.src / "fifo")
    pair.sync()
    os.unlink(pair.src / "link")
    os.symlink("elsewhere", pair.src / "link")
    os.rename(pair.src / "dangling", pair.src / "dangling2")
    pair.sync()


def test_metadata(pair: Pair) -> None:
    (pair.src / "m").write_text("meta")
    (pair.src / "dir").mkdir()
    pair.sync()
    os.chmod(pair.src / "m", 0o640)
    os.utime(pair.src / "m", ns=(1, 1_234_567_890_123_456_789))
    os.chmod(pair.src / "dir", 0o711)
    if os.geteuid() == 0:
        os.chown(pair.src / "m", 1234, 5678)
    chunks = pair.sync()
    assert data_bytes(chunks) == 0
    assert os.stat(pair.dst / "m").st_mtime_ns == 1_234_567_890_123_456_789


def test_sparse_files_stay_sparse(pair: Pair) -> None:
    with open(pair.src / "sparse", "wb") as f:
        f.truncate(256 * MiB)
        f.seek(10 * MiB)
        f.write(b"island" * 1000)
        f.seek(200 * MiB)
        f.write(b"another")
    chunks = pair.sync()
    assert data_bytes(chunks) < 64 * 1024
    assert os.stat(pair.dst / "sparse").st_blocks * 512 < 1 * MiB
    with open(pair.src / "sparse", "r+b") as f:  # data -> hole -> data
        os.posix_fallocate(f.fileno(), 100 * MiB, 4096)
        f.seek(100 * MiB)
        f.write(b"filled")
    pair.sync()
    fd = os.open(pair.src / "sparse", os.O_RDWR)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        assert libc.fallocate(fd, 3, 10 * MiB - 4096, 64 * 1024) == 0  # punch the island
    finally:
        os.close(fd)
    pair.sync()
    assert os.stat(pair.dst / "sparse").st_blocks * 512 < 1 * MiB


def test_hard_links_are_kept_equal(pair: Pair) -> None:
    (pair.src / "h1").write_text("one")
    os.link(pair.src / "h1", pair.src / "h2")
    pair.sync()
    with open(pair.src / "h1", "a") as f:
        f.write(" two")
    pair.sync()


def test_shared_mmap_writes_are_found_through_pids(tmp_path: Path) -> None:
    p = Pair(tmp_path, pids=lambda: [os.getpid()])
    try:
        fill(p.src / "mm", 4 * BLOCK_SIZE)
        p.sync()
        with open(p.src / "mm", "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
        m[2 * BLOCK_SIZE + 5:2 * BLOCK_SIZE + 10] = b"MMAP!"  # no inotify event for this
        chunks = p.sync()
        assert data_bytes(chunks) == BLOCK_SIZE
        m.close()
    finally:
        p.tracker.close()


def test_queue_overflow_rescans_without_resending(pair: Pair) -> None:
    fill(pair.src / "big", 4 * MiB)
    (pair.src / "one").write_bytes(b"1")
    (pair.src / "two").write_bytes(b"2")
    pair.sync()
    rescans = pair.tracker.stats.rescans
    max_events = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    fds = [os.open(pair.src / n, os.O_WRONLY) for n in ("one", "two")]
    try:
        for i in range(max_events // 2 + 100):  # alternating: events are not merged
            for fd in fds:
                os.pwrite(fd, bytes([i % 256]), 0)
    finally:
        for fd in fds:
            os.close(fd)
    os.rename(pair.src / "one", pair.src / "uno")
    chunks = pair.sync()
    assert pair.tracker.stats.rescans == rescans + 1
    assert trees(chunks)[0]["full"] is False
    assert data_bytes(chunks) <= 2  # the two 1-byte files, not the 4 MiB one
    (pair.src / "after").write_text("back to events")
    pair.sync()
    assert pair.tracker.stats.rescans == rescans + 1


def test_reset_makes_a_full_copy_that_removes_extras(pair: Pair) -> None:
    (pair.src / "f").write_text("f")
    pair.sync()
    (pair.dst / "stray").write_text("only on the backup")
    pair.tracker.reset()
    chunks = pair.sync()
    assert trees(chunks)[0]["full"] is True
    assert not (pair.dst / "stray").exists()


# ---- crash safety ---------------------------------------------------------------------------------


def test_partial_epoch_is_discarded(pair: Pair) -> None:
    (pair.src / "f").write_text("committed")
    pair.sync()
    committed = snapshot(pair.dst)
    (pair.src / "f").write_text("never committed")
    (pair.src / "g").write_text("x")
    chunks = pair.capture()
    staged = pair.store.begin(1, pair.epoch, pair.epoch - 1, False)
    for c in chunks:
        staged.add(*c)
    assert snapshot(pair.dst) == committed  # staging never touches the state directory
    pair.open_store()  # the agent dies before the commit point
    pair.store.apply_pending()
    assert snapshot(pair.dst) == committed


def _epoch_with_everything(pair: Pair) -> None:
    fill(pair.src / "a", 3 * BLOCK_SIZE)
    fill(pair.src / "b", 2 * BLOCK_SIZE, seed=3)
    (pair.src / "d" / "s").mkdir(parents=True)
    (pair.src / "d" / "s" / "x").write_text("x")
    (pair.src / "old").write_text("old")
    os.symlink("a", pair.src / "l")
    pair.sync()
    os.rename(pair.src / "a", pair.src / "tmp")
    os.rename(pair.src / "b", pair.src / "a")
    os.rename(pair.src / "tmp", pair.src / "b")
    with open(pair.src / "b", "r+b") as f:
        f.seek(BLOCK_SIZE)
        f.write(b"W" * 100)
        f.truncate(2 * BLOCK_SIZE + 10)
    os.rename(pair.src / "d", pair.src / "e")
    os.rename(pair.src / "e" / "s" / "x", pair.src / "x")
    (pair.src / "old").unlink()
    (pair.src / "old").mkdir()
    (pair.src / "old" / "n").write_text("n")
    os.chmod(pair.src / "x", 0o600)
    os.unlink(pair.src / "l")


def test_crash_at_every_point_of_apply_then_redo(tmp_path: Path) -> None:
    base = tmp_path / "base"
    pair = Pair(base)
    _epoch_with_everything(pair)
    chunks = pair.capture()
    expected = pair.expected
    pair.tracker.close()
    points: list[str] = []
    k = 0
    while True:
        run = tmp_path / f"run{k}"
        shutil.copytree(base, run, symlinks=True)
        p = Pair.__new__(Pair)
        p.src, p.dst, p.work = run / "pri" / "state", run / "bak" / "state", run / "store"
        p.origin = pair.src
        p.epoch, p.expected = pair.epoch, expected
        p.open_store()
        seen = 0

        def crash(what: str, k: int = k) -> None:
            nonlocal seen
            seen += 1
            if seen > k:
                points.append(what)
                raise RuntimeError(f"crash before {what}")

        p.applier.on_write = crash
        p.commit(chunks)
        try:
            p.store.apply_pending()
            finished = True
        except RuntimeError:
            finished = False
        p.open_store()  # restart: recover() redoes the committed epoch
        p.store.apply_pending()
        p.check()
        if not (p.dst / STASH).exists():
            assert json.loads((p.work / PROGRESS).read_text())["epoch"] == pair.epoch
        shutil.rmtree(run)
        if finished:
            break
        k += 1
    assert k > 15, points  # every kind of step was interrupted somewhere
    assert any(s.startswith("stash") for s in points) and any(s.startswith("place") for s in points)
    assert any(s.startswith("write") for s in points) and any(s.startswith("attrs") for s in points)


def test_delta_can_be_dropped(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    t = DiskTracker([tmp_path / "s"], spool_limit=10)
    t.start()
    (tmp_path / "s" / "f").write_bytes(b"y" * 100)  # spills to a file
    d = t.capture()
    assert isinstance(d, DiskDelta) and d.data_bytes == 100
    d.close()
    t.close()


def test_writes_before_and_after_a_rename_in_one_epoch(pair: Pair) -> None:
    fill(pair.src / "w1", 4 * BLOCK_SIZE)
    fill(pair.src / "w2", 4 * BLOCK_SIZE)
    (pair.src / "dir").mkdir()
    pair.sync()
    with open(pair.src / "w1", "r+b") as f:  # write, then rename
        f.write(b"before")
    os.rename(pair.src / "w1", pair.src / "dir" / "w1")
    os.rename(pair.src / "w2", pair.src / "dir" / "w2")  # rename, then write
    with open(pair.src / "dir" / "w2", "r+b") as f:
        f.seek(3 * BLOCK_SIZE)
        f.write(b"after")
    os.rename(pair.src / "dir", pair.src / "dir2")  # and the directory moves too
    with open(pair.src / "dir2" / "w1", "r+b") as f:
        f.seek(BLOCK_SIZE)
        f.write(b"late")
    chunks = pair.sync()
    assert data_bytes(chunks) == 3 * BLOCK_SIZE


def test_sync_to_disk_syncs_each_filesystem_once(tmp_path: Path) -> None:
    from remus.checkpoint.disk_apply import sync_to_disk
    from remus.errors import CheckpointError

    a, b = tmp_path / "a", tmp_path / "a" / "b"
    b.mkdir(parents=True)
    (b / "f").write_bytes(b"x" * 10000)
    assert sync_to_disk([a, b]) == 1  # one filesystem
    assert sync_to_disk([a, Path("/dev")]) == (1 if os.stat(a).st_dev == os.stat("/dev").st_dev
                                               else 2)
    with pytest.raises(CheckpointError, match="cannot open state directory"):
        sync_to_disk([tmp_path / "missing"])
