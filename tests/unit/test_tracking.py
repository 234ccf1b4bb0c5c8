"""Soft-dirty tracking, the pure parts: the dump chain, mode choice, and the
encoder on synthetic tracked dumps (PE_PARENT holes) applied to a store.

The real CRIU side runs in tests/integration/test_delta_criu.py and
test_soft_dirty.py (in a VM on kernels without soft-dirty).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from remus.checkpoint import pagemap
from remus.checkpoint.delta import Manifest
from remus.checkpoint.delta_encoder import DeltaEncoder
from remus.checkpoint.images import PAGE_SIZE
from remus.checkpoint.pagemap import PE_PARENT, PE_PRESENT, PagemapEntry
from remus.checkpoint.store import CheckpointStore
from remus.checkpoint.tracking import CRIU_NO_TRACKING, DumpChain, Probes, resolve
from remus.errors import CheckpointError, ConfigError

BASE = 0x7F0000000000
PM = "pagemap-1.img"


def page(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PAGE_SIZE // 8)


def vaddr(i: int) -> int:
    return BASE + i * PAGE_SIZE


def write_tracked(d: Path, entries: list[tuple[int, int, int]], content: dict[int, int]) -> None:
    """A dump dir whose pagemap has (first page index, count, flags) entries; the
    pages file holds `content[i]` for the pages of the present entries."""
    d.mkdir()
    pm = [PagemapEntry(vaddr(i), n, flags) for i, n, flags in entries]
    (d / PM).write_bytes(pagemap.encode_pagemap(1, pm))
    data = b"".join(page(content[i + k]) for i, n, flags in entries if flags & PE_PRESENT
                    for k in range(n))
    (d / "pages-1.img").write_bytes(data)
    (d / "core-1.img").write_bytes(b"core")


def ship(store: CheckpointStore, enc: DeltaEncoder, d: Path, epoch: int, full: bool,
         parent: Path | None = None) -> Manifest:
    staged = store.begin(1, epoch, epoch - 1, full)
    manifest = None
    for chunk in enc.encode(d, full, parent=parent):
        staged.add(*chunk)
        if chunk[1] == "manifest":
            manifest = Manifest.from_json(chunk[2])
    staged.commit()
    store.apply_pending()
    assert manifest is not None
    return manifest


def memory(store: CheckpointStore) -> dict[int, bytes]:
    return pagemap.pages_by_vaddr(store.images_dir())[PM]


def new_store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "store", verify_pages=True)
    store.recover()
    return store


# -- the chain -----------------------------------------------------------------
def test_chain_without_tracking_never_has_a_parent(tmp_path: Path) -> None:
    c = DumpChain("diff")
    c.dumped(tmp_path / "e0")
    assert c.parent(need_full=False) is None and not c.track


def test_chain_follows_successful_dumps(tmp_path: Path) -> None:
    c = DumpChain("soft-dirty")
    assert c.parent(need_full=False) is None  # nothing dumped yet
    c.dumped(tmp_path / "e0")
    assert c.parent(need_full=False) == tmp_path / "e0"
    c.dumped(tmp_path / "e1")
    assert c.parent(need_full=False) == tmp_path / "e1"
    assert c.parent(need_full=True) is None  # a full checkpoint needs a parentless dump


def test_chain_breaks_on_failure_and_on_unsent_dump(tmp_path: Path) -> None:
    c = DumpChain("soft-dirty")
    c.dumped(tmp_path / "e0")
    c.failed("libsoccr_save() failed with -6")
    assert c.parent(need_full=False) is None and c.track
    c.dumped(tmp_path / "e1")
    c.broken()  # the sender could not send a dump: later parents are no delta base
    assert c.parent(need_full=False) is None
    c.dumped(tmp_path / "e2")  # the parentless dump restarted the chain
    assert c.parent(need_full=False) == tmp_path / "e2"


def test_chain_falls_back_when_criu_cannot_track(tmp_path: Path) -> None:
    c = DumpChain("soft-dirty")
    c.failed(f"CRIU dump failed: Error (criu/config.c:1131): {CRIU_NO_TRACKING}. Consider ...")
    assert not c.track
    c.dumped(tmp_path / "e0")
    assert c.parent(need_full=False) is None


def probes(soft_dirty: bool, uffd_wp: str | None) -> Probes:
    return Probes(soft_dirty=lambda: soft_dirty, uffd_wp=lambda: uffd_wp)


def test_resolve_modes() -> None:
    assert resolve("diff", probes(True, None)) == "diff"
    assert resolve("auto", probes(True, None)) == "soft-dirty"
    assert resolve("auto", probes(False, None)) == "uffd-wp"
    assert resolve("auto", probes(False, "no PAGEMAP_SCAN")) == "diff"
    assert resolve("soft-dirty", probes(True, "x")) == "soft-dirty"
    assert resolve("uffd-wp", probes(True, None)) == "uffd-wp"
    with pytest.raises(ConfigError, match="soft-dirty"):
        resolve("soft-dirty", probes(False, None))
    with pytest.raises(ConfigError, match="uffd-wp is not available here: no PAGEMAP_SCAN"):
        resolve("uffd-wp", probes(True, "no PAGEMAP_SCAN"))
    with pytest.raises(ConfigError, match="must be one of"):
        resolve("dirty", probes(True, None))


def test_chain_records_its_tracker(tmp_path: Path) -> None:
    c = DumpChain("uffd-wp")
    assert c.track and c.mode == "uffd-wp"
    c.failed(f"CRIU dump failed: {CRIU_NO_TRACKING}")
    assert (c.track, c.mode) == (False, "diff")
    with pytest.raises(ValueError):
        DumpChain("auto")


# -- pagemaps with holes ---------------------------------------------------------
def test_flattened_pagemap_has_every_page_present(tmp_path: Path) -> None:
    write_tracked(tmp_path / "d", [(0, 2, PE_PARENT), (2, 1, PE_PRESENT), (3, 3, PE_PARENT),
                                   (10, 1, PE_PRESENT | 2)], {2: 7, 10: 8})
    pm = pagemap.read_pagemap(tmp_path / "d" / PM)
    assert pm.has_parent and pm.nr_present == 2
    assert [int(v) for v in pm.full_layout()] == [vaddr(i) for i in (0, 1, 2, 3, 4, 5, 10)]
    flat = pagemap.parse_pagemap(pm.flattened())
    assert not flat.has_parent and flat.pages_id == 1
    assert [(e.vaddr, e.nr_pages, e.flags) for e in flat.entries] == [
        (vaddr(0), 6, PE_PRESENT), (vaddr(10), 1, PE_PRESENT)]


def test_tracked_delta_rebuilds_full_memory_on_the_backup(tmp_path: Path) -> None:
    store, enc = new_store(tmp_path), DeltaEncoder(compress=True)
    write_tracked(tmp_path / "e0", [(0, 8, PE_PRESENT)], {i: i for i in range(8)})
    ship(store, enc, tmp_path / "e0", 0, full=True)
    # pages 2 and 3 written (3 with the same bytes: soft-dirty, but no change),
    # page 9 is new, page 7 is gone, the rest are holes
    write_tracked(tmp_path / "e1", [(0, 2, PE_PARENT), (2, 2, PE_PRESENT), (4, 3, PE_PARENT),
                                    (9, 1, PE_PRESENT)], {2: 102, 3: 3, 9: 109})
    man = ship(store, enc, tmp_path / "e1", 1, full=False, parent=tmp_path / "e0")
    assert enc.stats.pages_changed == 2  # 2 and 9; 3 was diffed away
    assert enc.stats.pages_total == 8
    assert man.pagemaps[PM].nr_pages == 8
    want = {vaddr(i): page(i) for i in (0, 1, 4, 5, 6)} | {vaddr(2): page(102), vaddr(3): page(3),
                                                           vaddr(9): page(109)}
    assert memory(store) == want
    assert (store.images_dir() / PM).read_bytes() == pagemap.read_pagemap(tmp_path / "e1" / PM).flattened()
    # and a further tracked epoch on top of the tracked one
    write_tracked(tmp_path / "e2", [(0, 7, PE_PARENT), (9, 1, PE_PRESENT)], {9: 209})
    ship(store, enc, tmp_path / "e2", 2, full=False, parent=tmp_path / "e1")
    assert memory(store) == want | {vaddr(9): page(209)}


def test_tracked_dump_must_be_based_on_the_delta_base(tmp_path: Path) -> None:
    enc = DeltaEncoder()
    write_tracked(tmp_path / "e0", [(0, 4, PE_PRESENT)], {i: i for i in range(4)})
    list(enc.encode(tmp_path / "e0", True))
    write_tracked(tmp_path / "e1", [(0, 3, PE_PARENT), (3, 1, PE_PRESENT)], {3: 33})
    with pytest.raises(CheckpointError, match="full checkpoint"):
        enc.check_base(tmp_path / "e1", True, tmp_path / "e0")
    with pytest.raises(CheckpointError, match="delta base"):
        enc.check_base(tmp_path / "e1", False, tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="no parent was given"):
        list(enc.encode(tmp_path / "e1", False))
    enc.check_base(tmp_path / "e1", False, tmp_path / "e0")  # the right parent is fine
    assert np.array_equal(pagemap.read_pagemap(tmp_path / "e1" / PM).layout(),
                          np.array([vaddr(3)], dtype=np.uint64))


def test_tracked_pagemap_encoded_early_sends_the_same(tmp_path: Path) -> None:
    write_tracked(tmp_path / "e0", [(0, 8, PE_PRESENT)], {i: i for i in range(8)})
    write_tracked(tmp_path / "e1", [(0, 2, PE_PARENT), (2, 2, PE_PRESENT), (4, 3, PE_PARENT),
                                    (9, 1, PE_PRESENT)], {2: 102, 3: 3, 9: 109})
    got = []
    for early in (False, True):
        enc = DeltaEncoder(compress=True)
        list(enc.encode(tmp_path / "e0", True))
        if early:
            assert enc.pre_encode(tmp_path / "e1", PM)
        chunks = list(enc.encode(tmp_path / "e1", False, parent=tmp_path / "e0"))
        got.append((chunks, enc.stats.pages_changed, enc.stats.pages_total))
    assert got[0] == got[1]
    assert got[1][1:] == (2, 8)
