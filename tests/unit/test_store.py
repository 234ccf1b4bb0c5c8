"""CheckpointStore: staging, commit, idempotent apply, crash recovery."""

from __future__ import annotations

import random
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from remus.checkpoint import images, pagemap
from remus.checkpoint.delta import KIND_FILE, KIND_FILES, KIND_MANIFEST, KIND_PAGES_XOR, Manifest
from remus.checkpoint.delta_encoder import DeltaEncoder
from remus.checkpoint.redo import Record
from remus.checkpoint.store import CheckpointStore
from remus.errors import CheckpointError, ProtocolError

PAGE = images.PAGE_SIZE
BASE = 0x7F00_0000_0000

Maps = dict[str, tuple[int, dict[int, bytes]]]


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE)


def write_dump(d: Path, files: dict[str, bytes], maps: Maps) -> Path:
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    for name, (pages_id, pages) in maps.items():
        layout = np.array(sorted(pages), dtype=np.uint64)
        data = b"".join(pages[int(v)] for v in layout)
        pagemap.write_pagemap_image(d, name, pages_id, layout, data)
    return d


def evolution(root: Path) -> list[Path]:
    """Dumps 0..5 exercising every kind of change between epochs."""
    files = {"core-1.img": b"core" * 50, "files.img": b"files", "inventory.img": b"inv"}
    heap = {BASE + i * PAGE: page(i) for i in range(200)}
    shm = {i * PAGE: page(500 + i) for i in range(8)}
    maps: Maps = {"pagemap-1.img": (1, heap), "pagemap-shmem-9.img": (2, shm)}
    dumps = [write_dump(root / "d0", files, maps)]
    heap = dict(heap)  # 1: a few pages change in place
    for i in (0, 3, 199):
        heap[BASE + i * PAGE] = page(1000 + i)
    maps = {"pagemap-1.img": (1, heap), "pagemap-shmem-9.img": (2, shm)}
    dumps.append(write_dump(root / "d1", files, maps))
    heap = {v: p for v, p in heap.items() if v >= BASE + 20 * PAGE}  # 2: VMA gone, new VMA
    heap.update({BASE * 2 + i * PAGE: page(2000 + i) for i in range(30)})
    heap[BASE + 50 * PAGE] = page(2999)
    maps = {"pagemap-1.img": (1, heap), "pagemap-shmem-9.img": (2, shm)}
    dumps.append(write_dump(root / "d2", dict(files, **{"fdinfo-2.img": b"fd"}), maps))
    maps = {"pagemap-1.img": (2, heap), "pagemap-shmem-9.img": (1, shm)}  # 3: ids swap
    dumps.append(write_dump(root / "d3", dict(files, **{"core-1.img": b"new core"}), maps))
    dumps.append(write_dump(root / "d4", files, maps))  # 4: fdinfo gone, nothing else
    heap = {v + 0x100000: p for v, p in heap.items()}  # 5: everything moves, shm gone,
    heap[BASE + 0x100000 + 60 * PAGE] = page(4000)  # a new pagemap appears
    maps = {"pagemap-1.img": (3, heap), "pagemap-7.img": (1, {PAGE: page(5000)})}
    dumps.append(write_dump(root / "d5", files, maps))
    return dumps


def ship(store: CheckpointStore, enc: DeltaEncoder, d: Path, gen: int, epoch: int) -> None:
    full = enc.base_dir is None
    staged = store.begin(gen, epoch, epoch - 1, full)
    for chunk in enc.encode(d, full):
        staged.add(*chunk)
    staged.commit()


def assert_same(store: CheckpointStore, dump: Path) -> None:
    got = store.images_dir()
    assert images.list_images(got) == images.list_images(dump)
    for name in images.list_images(dump):
        assert (got / name).read_bytes() == (dump / name).read_bytes(), name
    assert pagemap.pages_by_vaddr(got) == pagemap.pages_by_vaddr(dump)


def new_store(workdir: Path) -> CheckpointStore:
    store = CheckpointStore(workdir, verify_pages=True)
    store.recover()
    return store


def test_round_trip_through_every_change(tmp_path: Path) -> None:
    dumps = evolution(tmp_path)
    store = new_store(tmp_path / "store")
    assert store.committed() == (-1, -1)
    enc = DeltaEncoder()
    for epoch, d in enumerate(dumps):
        ship(store, enc, d, 1, epoch)
        assert store.committed() == (1, epoch)
        assert store.apply_pending() == epoch
        assert_same(store, d)
    pages = sorted(p.name for p in (tmp_path / "store" / "pages").iterdir())
    assert pages == [
        "pagemap-1.img.5.img", "pagemap-1.img.5.vaddrs",
        "pagemap-7.img.5.img", "pagemap-7.img.5.vaddrs",
    ]  # old layouts and vanished pagemaps are gone
    assert new_store(tmp_path / "store").committed() == (1, 5)


def test_in_place_epoch_writes_only_changed_pages(tmp_path: Path) -> None:
    dumps = evolution(tmp_path)
    store = new_store(tmp_path / "store")
    enc = DeltaEncoder()
    ship(store, enc, dumps[0], 1, 0)
    store.apply_pending()
    ship(store, enc, dumps[1], 1, 1)
    store.stats.pages_written = store.stats.pages_copied = 0
    store.apply_pending()
    assert (store.stats.pages_written, store.stats.pages_copied) == (3, 0)
    assert_same(store, dumps[1])


def commit_pending(tmp_path: Path, upto: int, compress: bool = False) -> tuple[Path, list[Path]]:
    """A store with dumps[:upto] applied and dumps[upto] committed, unapplied
    (compress: changed pages travel as XOR with the store's version)."""
    dumps = evolution(tmp_path)
    work = tmp_path / "store"
    store = new_store(work)
    enc = DeltaEncoder(compress=compress)
    for epoch, d in enumerate(dumps[: upto + 1]):
        ship(store, enc, d, 1, epoch)
        if epoch < upto:
            store.apply_pending()
    return work, dumps


class Crash(Exception):
    pass


def crash_after(k: int) -> Callable[[str], None]:
    calls = [0]

    def hook(what: str) -> None:
        calls[0] += 1
        if calls[0] > k:
            raise Crash(what)

    return hook


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("epoch", [1, 2, 3, 4, 5])
def test_crash_anywhere_in_apply_then_recover(tmp_path: Path, epoch: int, compress: bool) -> None:
    work, dumps = commit_pending(tmp_path, epoch, compress)
    crash_at_every_write(tmp_path, work, dumps[epoch], (1, epoch))


def crash_at_every_write(tmp_path: Path, work: Path, dump: Path,
                         position: tuple[int, int]) -> list[str]:
    """Apply the committed epoch in copies of the store at ``work``, crashing at
    each write in turn, then once more during recovery, then recovering cleanly:
    every copy must end at ``position`` holding ``dump``. The writes, in order."""
    writes = probe_writes(tmp_path, work, dump)
    for k in range(len(writes)):
        trial = crashed_copy(tmp_path, work, k)
        # a second crash during recovery, then a clean one
        s2 = new_store_no_apply(trial)
        s2.on_write = crash_after(k // 2)
        try:
            s2.apply_pending()
        except Crash:
            pass
        s3 = new_store(trial)
        assert s3.committed() == position
        assert_same(s3, dump)
    return writes


def probe_writes(tmp_path: Path, work: Path, dump: Path) -> list[str]:
    """The writes, in order, of applying what is committed in a copy of the store
    at ``work``, which must then hold ``dump``."""
    writes: list[str] = []
    probe = tmp_path / "probe"
    shutil.copytree(work, probe, symlinks=True)
    s = new_store_no_apply(probe)
    s.on_write = writes.append
    s.apply_pending()
    assert writes, "the hook must see the writes"
    assert_same(s, dump)
    return writes


def crashed_copy(tmp_path: Path, work: Path, k: int) -> Path:
    """A copy of the store at ``work`` whose apply crashed at its write ``k``."""
    trial = tmp_path / f"trial{k}"
    shutil.copytree(work, trial, symlinks=True)
    s = new_store_no_apply(trial)
    s.on_write = crash_after(k)
    with pytest.raises(Crash):
        s.apply_pending()
    return trial


def new_store_no_apply(workdir: Path) -> CheckpointStore:
    store = CheckpointStore(workdir, verify_pages=True)
    store.recover(apply=False)
    return store


def test_apply_twice_is_idempotent(tmp_path: Path) -> None:
    for epoch in (1, 2, 3, 5):
        work, dumps = commit_pending(tmp_path / str(epoch), epoch)
        (redo,) = (work / "redo").iterdir()
        saved = redo.read_bytes()
        state = (work / "STATE").read_bytes()
        new_store(work)
        # as if we crashed after the last write, before STATE moved
        redo.write_bytes(saved)
        (work / "STATE").write_bytes(state)
        store = new_store(work)
        assert store.committed() == (1, epoch)
        assert_same(store, dumps[epoch])


def test_crash_between_receive_and_commit(tmp_path: Path) -> None:
    dumps = evolution(tmp_path)
    work = tmp_path / "store"
    store = new_store(work)
    enc = DeltaEncoder()
    ship(store, enc, dumps[0], 1, 0)
    store.apply_pending()
    staged = store.begin(1, 1, 0, False)
    chunks = list(enc.encode(dumps[1], False))
    for c in chunks[:-1]:
        staged.add(*c)
    assert list((work / "incoming").iterdir())
    # kill -9 here: a new agent recovers
    store = new_store(work)
    assert store.committed() == (1, 0)
    assert not list((work / "incoming").iterdir())
    assert_same(store, dumps[0])


def test_committed_epoch_survives_before_apply(tmp_path: Path) -> None:
    work, dumps = commit_pending(tmp_path, 2)
    assert (work / "STATE").exists()
    store = new_store(work)
    assert store.committed() == (1, 2)
    assert not list((work / "redo").iterdir())
    assert_same(store, dumps[2])


def ship_all_unapplied(tmp_path: Path) -> tuple[CheckpointStore, list[Path]]:
    """A store with every dump of the evolution committed and none applied."""
    dumps = evolution(tmp_path)
    store = new_store(tmp_path / "store")
    enc = DeltaEncoder()
    for epoch, d in enumerate(dumps):
        ship(store, enc, d, 1, epoch)
    return store, dumps


def test_several_pending_epochs_apply_in_order(tmp_path: Path) -> None:
    store, dumps = ship_all_unapplied(tmp_path)
    assert len(list((tmp_path / "store" / "redo").iterdir())) == len(dumps)
    assert store.apply_pending() == len(dumps) - 1
    assert_same(store, dumps[-1])


def test_recover_without_apply_reports_the_backlog(tmp_path: Path) -> None:
    """The backup agent listens at once and applies a backlog in the background."""
    _, dumps = ship_all_unapplied(tmp_path)
    store = new_store_no_apply(tmp_path / "store")
    assert store.committed() == (1, len(dumps) - 1)
    assert store.pending() == len(dumps)
    assert store.apply_pending() == len(dumps) - 1
    assert store.pending() == 0
    assert_same(store, dumps[-1])


def test_a_later_full_epoch_supersedes_unapplied_ones(tmp_path: Path, monkeypatch: Any) -> None:
    store, dumps = ship_all_unapplied(tmp_path)  # epochs 0..5 of generation 1, unapplied
    ship(store, DeltaEncoder(), dumps[2], 2, 0)  # a new primary's full epoch
    applied: list[tuple[int, int]] = []
    real = CheckpointStore._apply

    def spy(self: CheckpointStore, redos: Any) -> None:
        applied.append((redos[-1].header.generation, redos[-1].header.epoch))
        real(self, redos)

    monkeypatch.setattr(CheckpointStore, "_apply", spy)
    assert store.apply_pending() == 0
    assert applied == [(2, 0)]
    assert not list((tmp_path / "store" / "redo").iterdir())
    assert_same(store, dumps[2])


def test_a_full_epoch_arriving_during_a_backlog_cuts_it_short(tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    """A backup that restarted with a backlog: the new primary's full epoch lands
    while the backlog is applied; the rest of the backlog is skipped, so a
    takeover soon after does not wait for it."""
    store, dumps = ship_all_unapplied(tmp_path)
    applied: list[tuple[int, int]] = []
    real = CheckpointStore._apply

    def spy(self: CheckpointStore, redos: Any) -> None:
        applied.append((redos[-1].header.generation, redos[-1].header.epoch))
        real(self, redos)
        if len(applied) == 1:
            ship(store, DeltaEncoder(), dumps[3], 2, 0)

    monkeypatch.setattr(CheckpointStore, "_apply", spy)
    store.apply_pending()
    assert applied == [(1, 0), (2, 0)]
    assert_same(store, dumps[3])


def test_with_disk_records_every_epoch_is_applied(tmp_path: Path, monkeypatch: Any) -> None:
    """Disk deltas of earlier epochs must land even when a full epoch follows."""
    store, dumps = ship_all_unapplied(tmp_path)
    store.register_kind(16, DiskHandler())
    ship(store, DeltaEncoder(), dumps[2], 2, 0)
    applied: list[int] = []
    real = CheckpointStore._apply
    monkeypatch.setattr(CheckpointStore, "_apply",
                        lambda self, redos: (applied.extend(r.header.epoch for r in redos),
                                             applied.append(-len(redos)), real(self, redos)))
    store.apply_pending()
    assert applied == [e for n in [*range(len(dumps)), 0] for e in (n, -1)]  # one at a time


def test_concurrent_apply_pending_is_serialized(tmp_path: Path) -> None:
    """The backup's apply loop and a takeover may both call apply_pending."""
    store, dumps = ship_all_unapplied(tmp_path)
    inside = threading.Event()
    release = threading.Event()

    def slow(what: str) -> None:  # hold the first apply open while the second starts
        if not inside.is_set():
            inside.set()
            release.wait(5)

    store.on_write = slow
    errors: list[BaseException] = []

    def apply() -> None:
        try:
            store.apply_pending()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    first = threading.Thread(target=apply)
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=apply)
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waits for the first instead of applying alongside it
    release.set()
    first.join(10)
    second.join(10)
    assert errors == []
    assert_same(store, dumps[-1])


def test_base_mismatch_is_rejected(tmp_path: Path) -> None:
    work, dumps = commit_pending(tmp_path, 2)
    store = new_store(work)
    with pytest.raises(ProtocolError, match="full"):
        store.begin(1, 4, 3, False)
    with pytest.raises(ProtocolError):
        store.begin(2, 3, 2, False)  # other generation
    with pytest.raises(ProtocolError):
        store.begin(1, 2, 1, True)  # a full one must be newer
    store.begin(1, 3, 2, False).abort()
    # a new generation starts with a full checkpoint and rebuilds from scratch
    enc = DeltaEncoder()
    ship(store, enc, dumps[5], 2, 0)
    store.apply_pending()
    assert store.committed() == (2, 0)
    assert_same(store, dumps[5])
    assert len(list((work / "pages").iterdir())) == 4


def test_bad_records_are_refused(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    staged = store.begin(1, 0, -1, True)
    for kind, name in ((KIND_FILE, "../etc/passwd"), (KIND_FILE, "pages-1.img"), (99, "x")):
        with pytest.raises(ProtocolError):
            staged.add(kind, name, b"", b"data")
    with pytest.raises(ProtocolError):
        staged.add(2, "core-1.img", b"", b"")  # pages for a non-pagemap
    with pytest.raises(ProtocolError):
        staged.commit()  # no manifest
    # a bundle with one bad name is refused whole: no file of it is staged
    meta = b"".join(struct.pack("<HI", len(n), 1) + n for n in (b"ok.img", b"../x", b"ok2.img"))
    with pytest.raises(ProtocolError):
        staged.add(KIND_FILES, "", meta, b"abc")
    staged.add(KIND_MANIFEST, "manifest", Manifest(True, {}, {}).to_json(), b"")
    staged.commit()  # commits: nothing of the refused bundle was staged
    staged = store.begin(1, 1, -1, True)
    staged.add(KIND_FILE, "core-1.img", b"", b"c")
    with pytest.raises(ProtocolError):
        staged.commit()  # core-1.img not in the manifest
    staged.add(KIND_MANIFEST, "manifest", Manifest(True, {}, {}).to_json(), b"")
    with pytest.raises(ProtocolError):
        staged.add(KIND_FILE, "x.img", b"", b"")  # after the manifest
    staged.abort()
    assert not list((tmp_path / "store" / "incoming").iterdir())


def test_torn_redo_log_is_detected(tmp_path: Path) -> None:
    work, _ = commit_pending(tmp_path, 1)
    (redo,) = (work / "redo").iterdir()
    redo.write_bytes(redo.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="torn"):
        CheckpointStore(work).recover()


def test_leftover_temporaries_are_removed(tmp_path: Path) -> None:
    work, dumps = commit_pending(tmp_path, 1)
    new_store(work)
    (work / "images" / ".core-1.img.tmp").write_bytes(b"junk")
    (work / "pages" / ".pagemap-1.img.9.img.tmp").write_bytes(b"junk")
    store = new_store(work)
    assert_same(store, dumps[1])
    assert not [p for p in (work / "pages").iterdir() if p.name.endswith(".tmp")]


class DiskHandler:
    """A toy disk-delta handler: record name -> file content under disk/."""

    def __init__(self) -> None:
        self.staged: list[str] = []

    def stage(self, record: Record) -> None:
        if "/" in record.name:
            raise ProtocolError("bad disk path")
        self.staged.append(record.name)

    def apply(self, store: CheckpointStore, records: list[Record]) -> None:
        assert store.applying is not None
        disk = store.workdir / "disk"
        disk.mkdir(exist_ok=True)
        for r in records:
            (disk / r.name).write_bytes(r.data)


def test_registered_kind_is_staged_and_applied(tmp_path: Path) -> None:
    dumps = evolution(tmp_path)
    work = tmp_path / "store"
    store = CheckpointStore(work)
    handler = DiskHandler()
    store.register_kind(16, handler)
    with pytest.raises(ValueError):
        store.register_kind(KIND_FILE, handler)
    store.recover()
    staged = store.begin(1, 0, -1, True)
    staged.add(16, "state.db", b"", b"disk bytes")
    with pytest.raises(ProtocolError):
        staged.add(16, "a/b", b"", b"")
    for chunk in DeltaEncoder().encode(dumps[0], True):
        staged.add(*chunk)
    staged.commit()
    assert handler.staged == ["state.db"]
    # without its handler a committed epoch cannot be applied
    with pytest.raises(CheckpointError, match="handler"):
        CheckpointStore(work).recover()
    store = CheckpointStore(work)
    store.register_kind(16, handler)
    assert store.recover() == (1, 0)
    assert (work / "disk" / "state.db").read_bytes() == b"disk bytes"
    assert_same(store, dumps[0])


def test_fsync_mode_round_trip(tmp_path: Path) -> None:
    dumps = evolution(tmp_path)
    store = CheckpointStore(tmp_path / "store", fsync=True)
    store.recover()
    enc = DeltaEncoder(compress=True)
    for epoch, d in enumerate(dumps):
        ship(store, enc, d, 1, epoch)
        store.apply_pending()
        assert_same(store, d)


def test_only_an_open_staged_epoch_is_abandoned(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    store = new_store(tmp_path / "store")
    staged = store.begin(1, 0, -1, True)
    staged.abort()  # refused (e.g. a full disk): closed by the backup already
    with caplog.at_level("WARNING", logger="remus.checkpoint.store"):
        left_open = store.begin(2, 0, -1, True)
        assert "abandoning" not in caplog.text
        store.begin(3, 0, -1, True)  # this one was still open: it is thrown away, said once
    assert caplog.text.count("abandoning unfinished epoch 0") == 1 and not left_open.open


def test_compressed_files_and_xor_pages_round_trip(tmp_path: Path) -> None:
    dumps = evolution(tmp_path)
    big = b"+OK\r\n" * 40_000  # an image file above the bundle size: sent as KIND_FILE_LZ4
    (dumps[1] / "remus-tcp-streams.img").write_bytes(big)
    store = new_store(tmp_path / "store")
    enc = DeltaEncoder(compress=True)
    for epoch, d in enumerate(dumps[:3]):
        ship(store, enc, d, 1, epoch)
        store.apply_pending()
        assert_same(store, d)
    assert not list((tmp_path / "store" / "pages").glob(".*.resolved"))  # forgotten once applied


def test_sparse_xor_in_place_survives_a_crash_anywhere(tmp_path: Path) -> None:
    """Pages changed in a few words, same layout: the store patches in place from
    resolved XOR pages; a crash at any write, then a redo, must not XOR twice."""
    heap = {BASE + i * PAGE: page(i) for i in range(64)}
    files = {"core-1.img": b"core", "inventory.img": b"inv"}
    d0 = write_dump(tmp_path / "d0", files, {"pagemap-1.img": (1, heap)})
    heap2 = dict(heap)
    for i in range(0, 64, 3):
        pg = bytearray(heap2[BASE + i * PAGE])
        pg[8 * i : 8 * i + 3] = b"new"
        heap2[BASE + i * PAGE] = bytes(pg)
    d1 = write_dump(tmp_path / "d1", files, {"pagemap-1.img": (1, heap2)})
    work = tmp_path / "store"
    store = new_store(work)
    enc = DeltaEncoder(compress=True)
    ship(store, enc, d0, 1, 0)
    store.apply_pending()
    staged = store.begin(1, 1, 0, False)
    kinds = []
    for chunk in enc.encode(d1, False):
        kinds.append(chunk[0])
        staged.add(*chunk)
    staged.commit()
    assert KIND_PAGES_XOR in kinds
    writes = crash_at_every_write(tmp_path, work, d1, (1, 1))
    assert any(w.startswith("resolve") for w in writes), writes


# ---- several committed epochs applied as one run ---------------------------------------


def tweak(p: bytes, at: int, what: bytes) -> bytes:
    pg = bytearray(p)
    pg[at : at + len(what)] = what
    return bytes(pg)


def xor_chain(root: Path) -> list[Path]:
    """Dumps 0..5 of one heap whose pages change in a few words, the same pages in
    consecutive epochs (XOR on XOR), with the layout the same in 1-2 and 4-5 and
    changed in 3 (pages gone, new ones)."""
    files = {"core-1.img": b"core", "inventory.img": b"inv"}
    heap = {BASE + i * PAGE: page(i) for i in range(64)}
    dumps = [write_dump(root / "d0", files, {"pagemap-1.img": (1, heap)})]
    for e in range(1, 6):
        heap = dict(heap)
        for i in range(0, 64, 2 + e % 3):
            v = BASE + i * PAGE
            if v in heap:
                heap[v] = tweak(heap[v], 16 * e + i, bytes([e, i, 7]))
        if e == 3:
            for i in range(10, 20):
                heap.pop(BASE + i * PAGE)
            heap.update({BASE + (100 + i) * PAGE: page(300 + i) for i in range(5)})
        f = dict(files, **{"core-1.img": b"core%d" % e}) if e % 2 else files
        dumps.append(write_dump(root / f"d{e}", f, {"pagemap-1.img": (1, heap)}))
    return dumps


def pending_run(tmp_path: Path, dumps: list[Path], upto: int,
                compress: bool = True) -> tuple[Path, list[int]]:
    """A store with dumps[0] applied and dumps[1..upto] committed, unapplied; the
    kinds of the records sent."""
    work = tmp_path / "store"
    store = new_store(work)
    enc = DeltaEncoder(compress=compress)
    kinds: list[int] = []
    for epoch, d in enumerate(dumps[: upto + 1]):
        staged = store.begin(1, epoch, epoch - 1, epoch == 0)
        for chunk in enc.encode(d, epoch == 0):
            kinds.append(chunk[0])
            staged.add(*chunk)
        staged.commit()
        if epoch == 0:
            store.apply_pending()
    return work, kinds


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("maker", [evolution, xor_chain])
def test_a_run_of_epochs_applies_as_one(tmp_path: Path, compress: bool,
                                        maker: Callable[[Path], list[Path]],
                                        monkeypatch: Any) -> None:
    dumps = maker(tmp_path)
    work, kinds = pending_run(tmp_path, dumps, len(dumps) - 1, compress)
    if compress and maker is xor_chain:
        assert KIND_PAGES_XOR in kinds
    runs: list[list[int]] = []
    real = CheckpointStore._apply

    def spy(self: CheckpointStore, redos: Any) -> None:
        runs.append([r.header.epoch for r in redos])
        real(self, redos)

    monkeypatch.setattr(CheckpointStore, "_apply", spy)
    store = new_store_no_apply(work)
    assert store.apply_pending() == len(dumps) - 1
    assert runs == [list(range(1, len(dumps)))]
    assert_same(store, dumps[-1])
    assert store.stats.epochs_applied == len(dumps) - 1 and store.stats.runs_applied == 1
    assert not list((work / "redo").iterdir())
    assert not list((work / "pages").glob(".*.resolved"))
    assert new_store(work).committed() == (1, len(dumps) - 1)


def test_a_run_writes_each_page_once(tmp_path: Path) -> None:
    """Epochs 1-2 of xor_chain share a layout and pages: applied as a run, each page
    is written once, not once per epoch."""
    dumps = xor_chain(tmp_path)
    one, _ = pending_run(tmp_path / "a", dumps, 2)
    for_each = new_store_no_apply(one)
    with pytest.MonkeyPatch.context() as mp:  # one epoch at a time, as before runs
        mp.setattr("remus.checkpoint.store.MERGE_MAX_PAGES", 1)
        for_each.apply_pending()
    run_dir, _ = pending_run(tmp_path / "b", dumps, 2)
    run = new_store_no_apply(run_dir)
    run.stats.pages_written = 0
    run.apply_pending()
    assert run.stats.runs_applied == 1 and for_each.stats.runs_applied == 2
    assert run.stats.pages_written < for_each.stats.pages_written
    assert_same(run, dumps[2])
    assert_same(for_each, dumps[2])


@pytest.mark.parametrize(("bound", "value", "runs"), [
    ("MERGE_MAX_PAGES", 40, (2, 4)),
    # Epochs without pages add nothing to MERGE_MAX_PAGES; each is an open file.
    ("MERGE_MAX_EPOCHS", 2, (3, 3)),
])
def test_a_bound_splits_a_run(tmp_path: Path, monkeypatch: Any, bound: str, value: int,
                              runs: tuple[int, int]) -> None:
    dumps = xor_chain(tmp_path)
    work, _ = pending_run(tmp_path, dumps, 5)
    monkeypatch.setattr(f"remus.checkpoint.store.{bound}", value)
    store = new_store_no_apply(work)
    store.apply_pending()
    assert runs[0] <= store.stats.runs_applied <= runs[1]
    assert_same(store, dumps[5])


@pytest.mark.parametrize("upto", [2, 5])
def test_crash_anywhere_in_a_run_then_recover(tmp_path: Path, upto: int) -> None:
    dumps = xor_chain(tmp_path)
    work, _ = pending_run(tmp_path, dumps, upto)
    writes = crash_at_every_write(tmp_path, work, dumps[upto], (1, upto))
    assert any(w.startswith("resolve") for w in writes) == (upto == 2), writes  # in place


@pytest.mark.parametrize("upto", [2, 3])
def test_a_crashed_run_is_redone_as_it_was_when_more_epochs_came(tmp_path: Path,
                                                                   upto: int) -> None:
    """A crash part-way through the run 1..upto, then epoch upto+1 commits before the
    recovery: the run is completed as it began (its resolved pages or its built file
    say how far it went), then the new epoch applies on top."""
    dumps = xor_chain(tmp_path)
    full_dir, _ = pending_run(tmp_path / "all", dumps, upto + 1)
    later = sorted((full_dir / "redo").iterdir())[-1]
    work = tmp_path / "store"
    shutil.copytree(full_dir, work, symlinks=True)
    (work / "redo" / later.name).unlink()
    for k in range(len(probe_writes(tmp_path, work, dumps[upto]))):
        trial = crashed_copy(tmp_path, work, k)
        shutil.copy(later, trial / "redo" / later.name)
        s3 = new_store(trial)
        assert s3.committed() == (1, upto + 1)
        assert_same(s3, dumps[upto + 1])


def add_then_remove(root: Path) -> list[Path]:
    """0: a heap of 8 pages; 1: a page more (a new VMA) and one changed; 2: the new
    page gone again (the layout of 0 back), the changed one kept."""
    files = {"core-1.img": b"core", "inventory.img": b"inv"}
    heap = {BASE + i * PAGE: page(i) for i in range(8)}
    d0 = write_dump(root / "d0", files, {"pagemap-1.img": (1, heap)})
    h1 = dict(heap)
    h1[BASE + 100 * PAGE] = page(999)
    h1[BASE + 2 * PAGE] = tweak(heap[BASE + 2 * PAGE], 8, b"one")
    d1 = write_dump(root / "d1", files, {"pagemap-1.img": (1, h1)})
    h2 = dict(heap)
    h2[BASE + 2 * PAGE] = tweak(h1[BASE + 2 * PAGE], 24, b"two")
    d2 = write_dump(root / "d2", files, {"pagemap-1.img": (1, h2)})
    return [d0, d1, d2]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("maker", [add_then_remove, evolution])
def test_a_run_with_pages_gone_by_its_end_or_a_pagemap_it_does_not_write(
        tmp_path: Path, compress: bool, maker: Callable[[Path], list[Path]]) -> None:
    """add_then_remove: a page added and dropped within the run, the layout the
    store's again (patched in place); evolution 1..2: pagemap-shmem-9 has no page
    records in the run. Found in review: both failed (TypeError, CheckpointError)."""
    dumps = maker(tmp_path)
    work, _ = pending_run(tmp_path, dumps, 2, compress)
    crash_at_every_write(tmp_path / "c", work, dumps[2], (1, 2))
    store = new_store_no_apply(work)
    store.apply_pending()
    assert store.stats.runs_applied == 1
    assert_same(store, dumps[2])


@pytest.mark.parametrize("generation", [1, 2])
def test_a_full_epoch_after_an_interrupted_run_applies(tmp_path: Path, generation: int) -> None:
    """A crash in the run 1..3 leaves its built pages file; the primary then sends a
    full epoch (after a reconnect: the same generation, or a new one). It supersedes
    the run and wipes its traces. Found in review: IndexError, for good."""
    dumps = xor_chain(tmp_path)
    work, _ = pending_run(tmp_path, dumps, 3)
    s = new_store_no_apply(work)

    def hook(what: str) -> None:
        if what.startswith("link"):
            raise Crash(what)

    s.on_write = hook
    with pytest.raises(Crash):
        s.apply_pending()
    assert (work / "pages" / "pagemap-1.img.3.img").exists()
    s2 = new_store_no_apply(work)
    ship(s2, DeltaEncoder(), dumps[5], generation, 4)
    assert s2.apply_pending() == 4
    assert_same(s2, dumps[5])
