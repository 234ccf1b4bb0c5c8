"""DeltaEncoder and the page image helpers, on synthetic CRIU image sets."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycriu
import pytest
import xxhash

from remus.checkpoint import images, pagemap
from remus.checkpoint.delta import (
    KIND_FILE,
    KIND_FILES,
    KIND_MANIFEST,
    KIND_PAGES,
    KIND_PAGES_LZ4,
    KIND_PAGES_XOR,
    PAGE_KINDS,
    Chunk,
    Manifest,
    decode_pages,
    decompress,
    encode_xor,
    files_of,
    unbundle,
)
from remus.checkpoint.delta_encoder import BUNDLE_BYTES, BUNDLE_FILE_MAX, MAX_CHUNK_PAGES, DeltaEncoder
from remus.errors import CheckpointError, ProtocolError

PAGE = images.PAGE_SIZE
BASE = 0x7F00_0000_0000


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE)


@dataclass
class Model:
    """What a dump holds: other files, and per pagemap (pages id, vaddr -> page)."""

    files: dict[str, bytes] = field(default_factory=dict)
    maps: dict[str, tuple[int, dict[int, bytes]]] = field(default_factory=dict)

    def copy(self) -> Model:
        return Model(dict(self.files), {n: (i, dict(p)) for n, (i, p) in self.maps.items()})


def write_dump(root: Path, m: Model, n: int) -> Path:
    d = root / f"dump{n}"
    d.mkdir()
    for name, data in m.files.items():
        (d / name).write_bytes(data)
    for name, (pages_id, pages) in m.maps.items():
        layout = np.array(sorted(pages), dtype=np.uint64)
        data = b"".join(pages[int(v)] for v in layout)
        pagemap.write_pagemap_image(d, name, pages_id, layout, data)
    return d


def decode(prev: Model | None, chunks: list[Chunk]) -> tuple[Model, dict[str, set[int]]]:
    """Reference decoder: the model a backup must end up with, and what was sent."""
    assert chunks[-1][0] == KIND_MANIFEST
    manifest = Manifest.from_json(chunks[-1][2])
    sent_files = dict(f for c in chunks for f in files_of(c))
    sent: dict[str, dict[int, bytes]] = {}
    for kind, name, meta, data in chunks:
        if kind in PAGE_KINDS:
            vaddrs, raw = decode_pages(kind, meta, data)
            for i, v in enumerate(vaddrs):
                assert int(v) not in sent.setdefault(name, {}), "page sent twice"
                pg = raw[i * PAGE : (i + 1) * PAGE]
                if kind == KIND_PAGES_XOR:  # against what the backup holds at v
                    assert prev is not None, "XOR page in a full checkpoint"
                    old = np.frombuffer(prev.maps[name][1][int(v)], dtype=np.uint64)
                    pg = (np.frombuffer(pg, dtype=np.uint64) ^ old).tobytes()
                sent[name][int(v)] = pg
    pages_names = {p.pages for p in manifest.pagemaps.values()}
    out = Model()
    for name in manifest.files:
        if name not in pages_names and name not in manifest.pagemaps:
            out.files[name] = sent_files[name] if name in sent_files else prev.files[name]  # type: ignore[union-attr]
    for name in manifest.pagemaps:
        raw = sent_files[name] if name in sent_files else prev_pagemap_bytes(prev, name)
        pm = pagemap.parse_pagemap(raw)
        old = prev.maps[name][1] if prev and name in prev.maps else {}
        new = sent.get(name, {})
        content = {int(v): new.get(int(v)) or old[int(v)] for v in pm.layout()}
        out.maps[name] = (pm.pages_id, content)
    return out, {n: set(p) for n, p in sent.items()}


def prev_pagemap_bytes(prev: Model | None, name: str) -> bytes:
    assert prev is not None, f"{name} not sent in a full checkpoint"
    pages_id, pages = prev.maps[name]
    layout = np.array(sorted(pages), dtype=np.uint64)
    return pagemap.encode_pagemap(pages_id, pagemap.entries_of(layout))


def base_model() -> Model:
    m = Model(files={"core-1.img": b"core" * 100, "files.img": b"files", "inventory.img": b"inv"})
    m.maps["pagemap-1.img"] = (1, {BASE + i * PAGE: page(i) for i in range(300)})
    m.maps["pagemap-shmem-77.img"] = (2, {i * PAGE: page(1000 + i) for i in range(10)})
    return m


class Run:
    """Encode successive models with one encoder; check every decode."""

    def __init__(self, root: Path, **kw: int | bool) -> None:
        self.root = root
        self.enc = DeltaEncoder(**kw)  # type: ignore[arg-type]
        self.n = 0
        self.prev: Model | None = None

    def step(self, m: Model, full: bool = False) -> dict[str, set[int]]:
        d = write_dump(self.root, m, self.n)
        self.n += 1
        chunks = list(self.enc.encode(d, full))
        got, sent = decode(None if full else self.prev, chunks)
        assert got == m
        self.prev = m.copy()
        self.chunks = chunks
        return sent


def changed_vaddrs(old: Model, new: Model) -> dict[str, set[int]]:
    out = {}
    for name, (_, pages) in new.maps.items():
        before = old.maps[name][1] if name in old.maps else {}
        s = {v for v, p in pages.items() if before.get(v) != p}
        if s:
            out[name] = s
    return out


def test_nothing_changed_sends_no_bytes(tmp_path: Path) -> None:
    r = Run(tmp_path)
    m = base_model()
    sent = r.step(m, full=True)
    assert sum(map(len, sent.values())) == 310
    assert r.enc.stats.files_sent == 5  # 3 files + 2 pagemaps
    assert r.step(m) == {}
    s = r.enc.stats
    assert (s.page_bytes, s.files_sent, s.file_bytes, s.pages_changed) == (0, 0, 0, 0)
    assert s.pages_total == 310 and s.image_bytes == 310 * PAGE
    assert [c[0] for c in r.chunks] == [KIND_MANIFEST]


@pytest.mark.parametrize("block_pages", [7, 64, 1024])
def test_only_changed_pages_are_sent(tmp_path: Path, block_pages: int) -> None:
    r = Run(tmp_path, block_pages=block_pages)
    m = base_model()
    r.step(m, full=True)
    m2 = m.copy()
    pages = m2.maps["pagemap-1.img"][1]
    for i in (0, 6, 7, 150, 299):
        pages[BASE + i * PAGE] = page(5000 + i)
    assert r.step(m2) == {"pagemap-1.img": {BASE + i * PAGE for i in (0, 6, 7, 150, 299)}}
    assert r.enc.stats.page_bytes == 5 * PAGE
    assert r.enc.stats.files_sent == 0  # same layout: pagemap file identical


def test_vmas_appear_disappear_grow_shrink_move(tmp_path: Path) -> None:
    r = Run(tmp_path, block_pages=16)
    m = base_model()
    r.step(m, full=True)
    m2 = m.copy()
    pages = m2.maps["pagemap-1.img"][1]
    for i in range(0, 40):  # VMA at the start disappears: every later page shifts
        del pages[BASE + i * PAGE]
    for i in range(300, 330):  # grows at the end
        pages[BASE + i * PAGE] = page(7000 + i)
    moved = {BASE + 0x1000_0000 + (v - BASE): p for v, p in pages.items() if v >= BASE + 250 * PAGE}
    for v in list(pages):  # a VMA moves (mremap): same content at new vaddrs
        if v >= BASE + 250 * PAGE:
            del pages[v]
    pages.update(moved)
    pages[BASE + 100 * PAGE] = page(9999)  # and a change inside the shifted part
    shm = m2.maps["pagemap-shmem-77.img"][1]
    del shm[9 * PAGE]  # shrinks
    m2.maps["pagemap-9.img"] = (3, {BASE * 2 + i * PAGE: page(8000 + i) for i in range(5)})  # new
    sent = r.step(m2)
    assert sent == changed_vaddrs(m, m2)
    assert sent["pagemap-1.img"] == set(moved) | {BASE + 100 * PAGE}
    assert "pagemap-shmem-77.img" not in sent
    files = {n for c in r.chunks for n, _ in files_of(c)}
    assert files == {"pagemap-1.img", "pagemap-shmem-77.img", "pagemap-9.img"}


def test_pages_ids_renumber(tmp_path: Path) -> None:
    r = Run(tmp_path)
    m = base_model()
    r.step(m, full=True)
    m2 = m.copy()
    a, b = m2.maps["pagemap-1.img"], m2.maps["pagemap-shmem-77.img"]
    m2.maps["pagemap-1.img"], m2.maps["pagemap-shmem-77.img"] = (2, a[1]), (1, b[1])
    assert r.step(m2) == {}
    manifest = Manifest.from_json(r.chunks[-1][2])
    assert manifest.pagemaps["pagemap-1.img"].pages == "pages-2.img"
    assert manifest.files["pages-2.img"].size == 300 * PAGE


def test_file_disappears_and_changes(tmp_path: Path) -> None:
    r = Run(tmp_path)
    m = base_model()
    r.step(m, full=True)
    m2 = m.copy()
    del m2.files["files.img"]
    m2.files["core-1.img"] = b"other core"
    m2.files["fdinfo-2.img"] = b"new"
    r.step(m2)
    assert {n for c in r.chunks for n, _ in files_of(c)} == {"core-1.img", "fdinfo-2.img"}
    assert "files.img" not in Manifest.from_json(r.chunks[-1][2]).files


def test_small_files_travel_in_bounded_bundles(tmp_path: Path) -> None:
    # A server with many connections: a thousand small socket images per epoch.
    r = Run(tmp_path)
    m = base_model()
    for i in range(1000):
        m.files[f"tcp-stream-{i:x}.img"] = random.Random(i).randbytes(1500)
    m.files["big.img"] = b"b" * (BUNDLE_FILE_MAX + 1)
    r.step(m, full=True)
    kinds = [c[0] for c in r.chunks]
    assert kinds.count(KIND_FILE) == 1 and r.chunks[kinds.index(KIND_FILE)][1] == "big.img"
    bundles = [c for c in r.chunks if c[0] == KIND_FILES]
    assert 1 < len(bundles) <= 3
    assert all(len(c[3]) < BUNDLE_BYTES + BUNDLE_FILE_MAX for c in bundles)
    m2 = m.copy()
    m2.files["tcp-stream-7.img"] = b"moved on"
    r.step(m2)
    assert [(n, d) for c in r.chunks for n, d in files_of(c)] == [("tcp-stream-7.img", b"moved on")]


@pytest.mark.parametrize("meta, data", [
    (b"\x03\0\x02\0\0\0abc", b"x"),  # data shorter than announced
    (b"\x03\0\x01\0\0\0abc", b"xy"),  # bytes that belong to no file
    (b"\x09\0\x01\0\0\0abc", b"x"),  # name runs past the meta
    (b"\x03\0\x01", b"x"),  # truncated entry header
    (b"\x05\0\x01\0\0\0../ab", b"x"),  # a path
    (b"\x0b\0\x01\0\0\0pages-1.img", b"x"),  # a pages file
    (b"\x02\0\x01\0\0\0\xff\xfe", b"x"),  # not UTF-8
])
def test_malformed_bundles_are_refused(meta: bytes, data: bytes) -> None:
    with pytest.raises(ProtocolError):
        unbundle(meta, data)


def test_full_after_reset(tmp_path: Path) -> None:
    r = Run(tmp_path)
    m = base_model()
    r.step(m, full=True)
    r.enc.reset()
    with pytest.raises(CheckpointError):
        list(r.enc.encode(write_dump(tmp_path, m, 99), full=False))
    sent = r.step(m, full=True)
    assert sum(map(len, sent.values())) == 310 and r.enc.stats.full


def test_chunks_are_bounded(tmp_path: Path) -> None:
    r = Run(tmp_path)
    m = Model(files={"inventory.img": b"x"})
    m.maps["pagemap-1.img"] = (1, {BASE + i * PAGE: page(i) for i in range(2500)})
    r.step(m, full=True)
    sizes = [len(c[3]) // PAGE for c in r.chunks if c[0] == KIND_PAGES]
    assert sizes == [MAX_CHUNK_PAGES, MAX_CHUNK_PAGES, 2500 - 2 * MAX_CHUNK_PAGES]


def test_lz4_round_trip(tmp_path: Path) -> None:
    r = Run(tmp_path, compress=True)
    m = base_model()
    m.maps["pagemap-1.img"][1][BASE] = b"\0" * PAGE
    m.maps["pagemap-1.img"][1][BASE + PAGE] = b"ab" * (PAGE // 2)
    r.step(m, full=True)
    assert {c[0] for c in r.chunks} == {KIND_FILES, KIND_PAGES_LZ4, KIND_MANIFEST}
    m2 = m.copy()
    new_vaddr = BASE + 1000 * PAGE  # the backup holds no version of it: plain lz4
    m2.maps["pagemap-1.img"][1][new_vaddr] = b"\0" * PAGE
    assert r.step(m2) == {"pagemap-1.img": {new_vaddr}}
    assert [c[0] for c in r.chunks if c[1] == "pagemap-1.img"][-1] == KIND_PAGES_LZ4
    assert r.enc.stats.wire_page_bytes < 100 < r.enc.stats.page_bytes
    with pytest.raises(ProtocolError):
        decode_pages(KIND_PAGES_LZ4, b"\0" * 8, b"not lz4")


@pytest.mark.parametrize("block_pages", [1024, 16])  # 16: blocks of the same, shifted, new
def test_changed_pages_go_as_xor_with_the_backups_version(tmp_path: Path, block_pages: int) -> None:
    r = Run(tmp_path, compress=True, block_pages=block_pages)
    m = base_model()
    r.step(m, full=True)
    for step in range(3):
        m2 = m.copy()
        pages = m2.maps["pagemap-1.img"][1]
        for i in range(0, 300, 7):  # a few bytes of many pages, as a busy server does
            pg = bytearray(pages[BASE + i * PAGE])
            pg[100 + step] ^= 0xFF
            pg[3000] = step
            pages[BASE + i * PAGE] = bytes(pg)
        pages[BASE + (step + 1) * PAGE] = b"\0" * PAGE  # wholly rewritten: still exact
        del pages[BASE + (299 - step) * PAGE]  # the layout moves too
        pages[BASE + (500 + step) * PAGE] = page(77 + step)  # and grows
        r.step(m2)  # decode() applies each XOR page to the previous model's page
        assert KIND_PAGES_XOR in {c[0] for c in r.chunks}
        assert r.enc.stats.pages_xor >= 40
        # ~45 changed pages of 4 KiB, the new one random: the rest is a few bytes each
        assert r.enc.stats.wire_page_bytes < 2 * PAGE + 2000 < r.enc.stats.page_bytes
        m = m2
    m2 = m.copy()  # the same layout: the encoder compares in place
    pages = m2.maps["pagemap-1.img"][1]
    for v in list(pages)[::5]:
        pages[v] = pages[v][:10] + b"xyz" + pages[v][13:]
    r.step(m2)
    assert r.enc.stats.pages_xor >= 40
    m = m2
    r.step(m, full=True)
    assert KIND_PAGES_XOR not in {c[0] for c in r.chunks}  # a full checkpoint has no base
    plain = Run(tmp_path / "plain", compress=False)
    (tmp_path / "plain").mkdir()
    plain.step(base_model(), full=True)
    plain.step(m)
    assert KIND_PAGES_XOR not in {c[0] for c in plain.chunks}  # --no-compress: pages as they are


def test_damaged_or_oversized_lz4_is_refused() -> None:
    import lz4.frame
    big = lz4.frame.compress(b"\0" * (3 * PAGE))
    with pytest.raises(ProtocolError):  # says 3 pages of data for 1 vaddr
        decode_pages(KIND_PAGES_LZ4, b"\0" * 8, big)
    with pytest.raises(ProtocolError):
        decode_pages(KIND_PAGES_LZ4, b"\0" * 24, big[:-5])
    assert decompress(big, 3 * PAGE, "x") == b"\0" * (3 * PAGE)
    with pytest.raises(ProtocolError):
        decompress(big, 3 * PAGE - 1, "x")


def test_sparse_xor_round_trip_and_refusals() -> None:
    x = np.zeros((3, 512), dtype=np.uint64)
    x[0, 5], x[2, 511], x[1, 0] = 7, 2**64 - 1, 1
    data = encode_xor(x)
    meta = np.array([BASE, BASE + PAGE, BASE + 9 * PAGE], dtype="<u8").tobytes()
    vaddrs, raw = decode_pages(KIND_PAGES_XOR, meta, data)
    assert raw == x.tobytes() and len(data) == 4 + 12 * 3
    bad_pos = bytearray(data)
    bad_pos[4:8] = (3 * 512).to_bytes(4, "little")  # outside the 3 pages (and unsorted)
    unsorted = bytearray(data)
    unsorted[4:12] = unsorted[8:12] + unsorted[4:8]
    for bad in (data[:-1], data + b"\0", b"", bytes(bad_pos), bytes(unsorted)):
        with pytest.raises(ProtocolError):
            decode_pages(KIND_PAGES_XOR, meta, bad)
    with pytest.raises(ProtocolError):
        decode_pages(KIND_PAGES_XOR, meta[:-8], data)  # a word of a page not listed


def test_abandoned_encode_keeps_the_base(tmp_path: Path) -> None:
    r = Run(tmp_path)
    m = base_model()
    r.step(m, full=True)
    base = r.enc.base_dir
    m2 = m.copy()
    m2.maps["pagemap-1.img"][1][BASE] = page(1)
    it = r.enc.encode(write_dump(tmp_path, m2, 50), False)
    next(it)
    it.close()
    assert r.enc.base_dir == base
    r.step(m2)  # still diffed against the first dump


def test_manifest_lists_every_file_with_digest(tmp_path: Path) -> None:
    r = Run(tmp_path)
    d = write_dump(tmp_path, base_model(), 7)
    (d / "dump.log").write_text("CRIU log, not an image")
    chunks = list(r.enc.encode(d, True))
    manifest = Manifest.from_json(chunks[-1][2])
    assert set(manifest.files) == set(images.list_images(d)) and "dump.log" not in manifest.files
    for name, info in manifest.files.items():
        data = (d / name).read_bytes()
        assert (info.size, info.xxh3) == (len(data), xxhash.xxh3_64_hexdigest(data))
    assert manifest.pagemaps["pagemap-shmem-77.img"].nr_pages == 10


def test_pages_file_size_mismatch_is_an_error(tmp_path: Path) -> None:
    d = write_dump(tmp_path, base_model(), 0)
    with open(d / "pages-1.img", "ab") as f:
        f.write(b"\0" * PAGE)
    with pytest.raises(CheckpointError):
        list(DeltaEncoder().encode(d, True))


@pytest.mark.parametrize("seed", range(6))
def test_random_evolution(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    r = Run(tmp_path, block_pages=rnd.choice([5, 32, 1024]))
    m = base_model()
    r.step(m, full=True)
    for _ in range(6):
        m2 = m.copy()
        for name in list(m2.maps):
            pid, pages = m2.maps[name]
            vs = sorted(pages)
            for v in rnd.sample(vs, min(len(vs), rnd.randint(0, 20))):
                op = rnd.random()
                if op < 0.5:
                    pages[v] = page(rnd.randrange(10**9))
                elif op < 0.8:
                    del pages[v]
                else:
                    pages[v + rnd.randint(1, 50) * 0x10_0000] = pages[v]
            if not pages:
                pages[BASE] = page(1)
        if rnd.random() < 0.3:  # renumber the pages ids
            ids = [pid for pid, _ in m2.maps.values()]
            rnd.shuffle(ids)
            m2.maps = {n: (i, p[1]) for (n, p), i in zip(m2.maps.items(), ids, strict=True)}
        assert r.step(m2) == changed_vaddrs(m, m2)
        m = m2


# ---- images.py ----------------------------------------------------------


def test_pagemap_parser_matches_pycriu(tmp_path: Path) -> None:
    entries = [
        {"pages_id": 3},
        {"vaddr": BASE, "compat_nr_pages": 0, "flags": 4, "nr_pages": 2},
        {"vaddr": BASE + 8 * PAGE, "compat_nr_pages": 0, "flags": 6, "nr_pages": 300},
        {"vaddr": BASE + 0x10000000, "compat_nr_pages": 0, "flags": 2, "nr_pages": 5},
        {"vaddr": 2**47 - PAGE, "compat_nr_pages": 1},  # old image: no flags, no nr_pages
        {"vaddr": BASE * 2, "compat_nr_pages": 4, "in_parent": True},
    ]
    buf = io.BytesIO()
    pycriu.images.dump({"magic": "PAGEMAP", "entries": entries}, buf)
    pm = pagemap.parse_pagemap(buf.getvalue())
    assert pm.pages_id == 3 and pm.pages_name == "pages-3.img"
    assert [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries] == [
        (BASE, 2, 4),
        (BASE + 8 * PAGE, 300, 6),
        (BASE + 0x10000000, 5, 2),
        (2**47 - PAGE, 1, pagemap.PE_PRESENT),
        (BASE * 2, 4, pagemap.PE_PARENT),
    ]
    layout = pm.layout()
    assert layout.size == pm.nr_present == 303
    assert list(layout[:3]) == [BASE, BASE + PAGE, BASE + 8 * PAGE]
    assert int(layout[-1]) == 2**47 - PAGE
    # our writer produces what pycriu parses back
    ours = pagemap.encode_pagemap(3, list(pm.entries[:3]))
    back = pycriu.images.load(io.BytesIO(ours))["entries"]
    assert back[0] == {"pages_id": 3}
    assert [(e["vaddr"], e["nr_pages"], e["flags"]) for e in back[1:]] == [
        (e.vaddr, e.nr_pages, e.flags) for e in pm.entries[:3]
    ]


def test_pagemap_codec_matches_pycriu_on_random_maps() -> None:
    # The numpy codec against the protobuf runtime, on field values at the varint
    # width boundaries and on maps of thousands of entries.
    rng = random.Random(7)
    widths = [0, 1, 127, 128, 16383, 16384, 2**32 - 1, 2**47 - PAGE, 2**63, 2**64 - 1]
    for n in (0, 1, 3, 50, 3000):
        entries = [pagemap.PagemapEntry(rng.choice(widths + [rng.randrange(2**64)]),
                                       rng.choice(widths[:7]), rng.choice([0, 1, 2, 4, 6, 2**31]))
                   for _ in range(n)]
        raw = pagemap.encode_pagemap(n, entries)
        back = pycriu.images.load(io.BytesIO(raw))["entries"]
        assert back[0] == {"pages_id": n}
        assert [(e["vaddr"], e["nr_pages"], e["flags"]) for e in back[1:]] == [
            (e.vaddr, e.nr_pages, e.flags) for e in entries]
        assert pagemap.parse_pagemap(raw).entries == tuple(entries)


def test_flattened_merges_adjacent_ranges() -> None:
    P, F = pagemap.PE_PRESENT, pagemap.PE_PARENT
    entries = [pagemap.PagemapEntry(BASE, 2, P), pagemap.PagemapEntry(BASE + 2 * PAGE, 3, F),
               pagemap.PagemapEntry(BASE + 5 * PAGE, 0, P), pagemap.PagemapEntry(BASE + 9 * PAGE, 1, F),
               pagemap.PagemapEntry(BASE + 10 * PAGE, 1, P), pagemap.PagemapEntry(BASE + 20 * PAGE, 4, 0)]
    pm = pagemap.parse_pagemap(pagemap.encode_pagemap(5, entries))
    assert pm.has_parent and pm.nr_present == 3 and pm.nr_full == 7
    flat = pagemap.parse_pagemap(pm.flattened())
    assert flat.entries == (pagemap.PagemapEntry(BASE, 5, P), pagemap.PagemapEntry(BASE + 9 * PAGE, 2, P))
    assert np.array_equal(flat.layout(), pm.full_layout())


def test_malformed_pagemaps_are_rejected() -> None:
    good = pagemap.encode_pagemap(1, [pagemap.PagemapEntry(BASE, 1, 4)])
    head = good[:8]
    for bad in (b"", good[:6], b"\0" * 8 + good[8:], good[:-1], good + b"\x01\0\0\0",
                good + b"\x01\0\0",  # a length prefix cut short
                head + b"\x02\0\0\0\x08\x80",  # a varint cut at the end of its message
                head + b"\x01\0\0\0\x08",  # a key without its value
                head + b"\x02\0\0\0\x0a\x00",  # a length-delimited field
                head + b"\x0c\0\0\0\x08" + b"\xff" * 10 + b"\x01"):  # an 11-byte varint
        with pytest.raises(CheckpointError):
            pagemap.parse_pagemap(bad)


def test_layout_helpers() -> None:
    layout = np.array([BASE, BASE + PAGE, BASE + 5 * PAGE, 7 * PAGE], dtype=np.uint64)
    entries = pagemap.entries_of(layout)
    assert [(e.vaddr, e.nr_pages) for e in entries] == [
        (BASE, 2), (BASE + 5 * PAGE, 1), (7 * PAGE, 1)
    ]
    assert np.array_equal(pagemap.layout_of(entries), layout)
    index = images.sorted_index(layout)
    got = images.lookup(index, np.array([7 * PAGE, BASE + 5 * PAGE, 3], dtype=np.uint64))
    assert list(got) == [3, 2, -1]
    with pytest.raises(CheckpointError):
        images.sorted_index(np.array([PAGE, PAGE], dtype=np.uint64))
    idx = np.array([4, 5, 6, -1, 9, 10, 3, -1], dtype=np.intp)
    assert images.page_runs(idx) == [(0, 4, 3), (4, 9, 2), (6, 3, 1)]


def test_big_files_go_compressed_and_arrive_plain(tmp_path: Path) -> None:
    from remus.checkpoint.delta import KIND_FILE_LZ4
    r = Run(tmp_path, compress=True)
    m = base_model()
    m.files["remus-tcp-streams.img"] = b"*3\r\n$3\r\nSET\r\n" * 20_000  # > BUNDLE_FILE_MAX
    r.step(m, full=True)  # decode() reads it through files_of
    (big,) = [c for c in r.chunks if c[1] == "remus-tcp-streams.img"]
    assert big[0] == KIND_FILE_LZ4 and len(big[3]) < len(m.files["remus-tcp-streams.img"]) // 10
    plain = Run(tmp_path / "p", compress=False)
    (tmp_path / "p").mkdir()
    plain.step(m, full=True)
    assert [c[0] for c in plain.chunks if c[1] == "remus-tcp-streams.img"] == [KIND_FILE]


# ---- pre_encode: pagemaps encoded while CRIU still dumps the rest ----------
def _encode_both(tmp_path: Path, models: list[Model], pre: list[str] | None
                 ) -> list[tuple[list[Chunk], dict[str, object]]]:
    """Encode the models in turn; before each delta, pre_encode the pagemaps `pre`
    (None: all of them). Returns each epoch's chunks and stats (but its time)."""
    enc = DeltaEncoder(compress=True, block_pages=16)
    out = []
    tmp_path.mkdir()
    for i, m in enumerate(models):
        d = write_dump(tmp_path, m, i)
        if i:
            for name in (m.maps if pre is None else pre):
                assert enc.pre_encode(d, name)
        chunks = list(enc.encode(d, i == 0))
        out.append((chunks, {k: v for k, v in vars(enc.stats).items() if k != "seconds"}))
    return out


@pytest.mark.parametrize("pre", [None, ["pagemap-1.img"]])
def test_pre_encoded_pagemaps_send_what_encode_sends(tmp_path: Path, pre: list[str] | None) -> None:
    rnd = random.Random(5)
    models = [base_model()]
    for _ in range(4):
        m = models[-1].copy()
        for name in m.maps:
            pages = m.maps[name][1]
            for v in rnd.sample(sorted(pages), 6):
                pages[v] = bytearray(pages[v])
                pages[v][rnd.randrange(PAGE)] ^= 0xFF  # a word: sent as XOR
                pages[v] = bytes(pages[v])
            pages[max(pages) + PAGE] = page(rnd.randrange(10**9))  # a new page
        models.append(m)
    plain = _encode_both(tmp_path / "plain", models, pre=[])
    early = _encode_both(tmp_path / "early", models, pre=pre)
    assert early == plain  # chunks and stats
    assert any(c[0] == KIND_PAGES_XOR for c in early[1][0]) and early[1][1]["pages_xor"]
    prev = None
    for m, (chunks, _) in zip(models, early, strict=True):
        got, _ = decode(prev, chunks)
        assert got == m
        prev = m


def test_pre_encoded_pages_are_dropped_unless_the_same_dump_follows(tmp_path: Path) -> None:
    m0 = base_model()
    m1 = m0.copy()
    m1.maps["pagemap-1.img"][1][BASE] = page(424242)
    enc = DeltaEncoder(compress=True)
    d0, d1, d2 = (write_dump(tmp_path, m, i) for i, m in enumerate((m0, m1, m1)))
    assert not enc.pre_encode(d1, "pagemap-1.img")  # no base yet
    list(enc.encode(d0, True))
    # too big to keep in memory
    assert not enc.pre_encode(d1, "pagemap-1.img", max_bytes=PAGE)
    # a damaged pagemap: not kept; encode() is the one to report it
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pagemap-1.img").write_bytes(b"nonsense")
    assert not enc.pre_encode(tmp_path / "bad", "pagemap-1.img")
    # kept for d1, but the next encode is of another dump: not used
    assert enc.pre_encode(d1, "pagemap-1.img")
    enc._early["pagemap-1.img"].chunks.clear()  # would lose the change if it were used
    got, sent = decode(m0, list(enc.encode(d2, False)))
    assert got == m1 and sent == {"pagemap-1.img": {BASE}}
    # kept, then dropped (its dump failed): encode does the work itself
    m3 = m1.copy()
    m3.maps["pagemap-1.img"][1][BASE] = page(7)
    d3 = write_dump(tmp_path, m3, 3)
    assert enc.pre_encode(d3, "pagemap-1.img")
    enc._early["pagemap-1.img"].chunks.clear()
    enc.drop_early()
    got, _ = decode(m1, list(enc.encode(d3, False)))
    assert got == m3
    # a full encode never uses what was kept
    d4 = write_dump(tmp_path, m0, 4)
    assert enc.pre_encode(d4, "pagemap-1.img")
    enc._early["pagemap-1.img"].chunks.clear()
    got, _ = decode(None, list(enc.encode(d4, True)))
    assert got == m0


def test_map_rows_prefaults_the_whole_file(tmp_path: Path) -> None:
    """map_rows maps the pages file with every page already in the page tables
    (MADV_POPULATE_READ through libc, outside the GIL), and reads it right."""
    import os
    import struct

    from remus.checkpoint.delta_encoder import map_rows

    pages = 4096  # 16 MiB: one populate step
    path = Path("/dev/shm") / f"remus-test-populate-{os.getpid()}"
    try:
        path.write_bytes(b"".join(struct.pack("<Q", i) * 512 for i in range(pages)))
        rows = map_rows(path)
        assert rows.shape == (pages, 512) and int(rows[1234, 7]) == 1234
        start = rows.ctypes.data
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // 4096 * 8)
            entries = struct.unpack(f"<{pages}Q", f.read(pages * 8))
        present = sum(e >> 63 for e in entries)
        assert present == pages, f"{present} of {pages} pages mapped"
    finally:
        path.unlink(missing_ok=True)
