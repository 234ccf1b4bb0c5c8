"""The C page loops (remus.checkpoint._pagexor) give the numpy loops' output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from remus.checkpoint import delta_encoder as de
from remus.checkpoint.delta import XOR_DENSE_WORDS, decode_xor
from remus.checkpoint.images import PAGE_WORDS

pagexor = pytest.importorskip(
    "remus.checkpoint._pagexor",
    reason="remus.checkpoint._pagexor is not built (bin/setup builds it; needs the Debian "
           "packages build-essential and python3-dev)")


def _pages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=(n, PAGE_WORDS), dtype=np.uint64)


def _changed_copy(rng: np.random.Generator, old: np.ndarray, words_per_page: list[int]) -> np.ndarray:
    """old with, in page i, words_per_page[i] words changed."""
    new = old.copy()
    for i, k in enumerate(words_per_page):
        where = rng.choice(PAGE_WORDS, size=k, replace=False)
        new[i, where] ^= rng.integers(1, 2**64, size=k, dtype=np.uint64)
    return new


def _both(monkeypatch: pytest.MonkeyPatch, fn: Any, *args: Any) -> tuple[Any, Any]:
    c = fn(*args)
    with monkeypatch.context() as m:
        m.setattr(de, "_pagexor", None)
        py = fn(*args)
    return c, py


def test_xor_pages_matches_numpy_at_every_density(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    # 0 words changed (a page written back as it was), 1, the dense limit, one past it, all
    counts = [0, 1, 7, XOR_DENSE_WORDS - 1, XOR_DENSE_WORDS, XOR_DENSE_WORDS + 1, PAGE_WORDS] * 3
    old = _pages(rng, len(counts) + 5)
    new = _changed_copy(rng, old[: len(counts)], counts)
    sel = rng.permutation(len(counts)).astype(np.intp)
    base = sel.copy()
    (c_dense, c_data), (py_dense, py_data) = _both(monkeypatch, de._xor_pages, new, old, sel, base)
    assert c_dense.tolist() == py_dense.tolist()
    assert c_dense.tolist() == [counts[i] > XOR_DENSE_WORDS for i in sel]
    assert c_data == py_data
    # and it decodes to the XOR of the sparse pages
    sparse = sel[~c_dense]
    _, pos, words = decode_xor(b"\0" * 8 * sparse.size, c_data)
    dense_x = np.zeros(sparse.size * PAGE_WORDS, dtype=np.uint64)
    dense_x[pos] = words
    assert np.array_equal(dense_x.reshape(-1, PAGE_WORDS), new[sparse] ^ old[base[~c_dense]])


def test_xor_pages_with_a_base_row_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    old = _pages(rng, 50)
    new = _changed_copy(rng, old[[40, 3, 17]], [2, 300, 9])
    sel, base = np.array([0, 1, 2], dtype=np.intp), np.array([40, 3, 17], dtype=np.intp)
    (c_dense, c_data), (py_dense, py_data) = _both(monkeypatch, de._xor_pages, new, old, sel, base)
    assert c_dense.tolist() == py_dense.tolist() == [False, True, False]
    assert c_data == py_data


def test_xor_pages_of_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = np.empty((0, PAGE_WORDS), dtype=np.uint64)
    none = np.empty(0, dtype=np.intp)
    (c_dense, c_data), (py_dense, py_data) = _both(monkeypatch, de._xor_pages, rows, rows, none, none)
    assert c_dense.size == py_dense.size == 0 and c_data == py_data


def test_differing_matches_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    old = _pages(rng, 64)
    new = _changed_copy(rng, old, [int(k) for k in rng.choice([0, 0, 0, 1, 512], size=64)])
    c, py = _both(monkeypatch, de._differing, new, old)
    assert c.tolist() == py.tolist()
    assert 0 < c.size < 64


def test_read_only_mapped_pages_files_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what the encoder passes: read-only arrays over mmap'd pages files (map_rows)
    rng = np.random.default_rng(12)
    old = _pages(rng, 8)
    new = _changed_copy(rng, old, [3, 0, 200, 1, 0, 9, 512, 2])
    (tmp_path / "old").write_bytes(old.tobytes())
    (tmp_path / "new").write_bytes(new.tobytes())
    o, n = de.map_rows(tmp_path / "old"), de.map_rows(tmp_path / "new")
    assert not n.flags.writeable
    sel = np.arange(8, dtype=np.intp)
    (c_dense, c_data), (py_dense, py_data) = _both(monkeypatch, de._xor_pages, n, o, sel, sel)
    assert c_dense.tolist() == py_dense.tolist() and c_data == py_data
    c, py = _both(monkeypatch, de._differing, n, o)
    assert c.tolist() == py.tolist() == [0, 2, 3, 5, 6, 7]


def test_changed_rows_of_a_moved_layout_matches_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    # the gather branch of _changed_rows: pages at new vaddrs, some new, some moved
    rng = np.random.default_rng(13)
    old = _pages(rng, 6)
    old_vaddrs = np.array([0x1000, 0x2000, 0x3000, 0x7000, 0x8000, 0x9000], dtype=np.uint64)
    vaddrs = np.array([0x2000, 0x4000, 0x8000, 0x9000], dtype=np.uint64)  # 0x4000 is new
    block = np.stack([old[1], _pages(rng, 1)[0], old[4] ^ np.uint64(5), old[5]])
    prev = de._Prev(old_vaddrs, de.images.sorted_index(old_vaddrs), Path("unused"))
    c, py = _both(monkeypatch, de._changed_rows, block, vaddrs, prev, old, False, 0)
    assert [a.tolist() for a in c] == [a.tolist() for a in py] == [[1, 2], [-1, 4]]


def test_changed_rows_gathers_and_counts_new_pages_as_changed() -> None:
    rng = np.random.default_rng(10)
    old = _pages(rng, 10)
    new = np.stack([old[4], old[2] ^ np.uint64(1), old[9], _pages(rng, 1)[0]])
    idx = np.array([4, 2, 9, -1], dtype=np.int64)
    got = np.frombuffer(pagexor.changed_rows(new, old, idx), dtype=np.intp)
    assert got.tolist() == [1, 3]


def test_bad_arguments_raise_instead_of_reading_past_the_pages() -> None:
    rng = np.random.default_rng(11)
    old = _pages(rng, 4)
    with pytest.raises(IndexError):
        pagexor.xor_sparse(old, old, np.array([0, 4]), np.array([0, 1]), XOR_DENSE_WORDS)
    with pytest.raises(IndexError):
        pagexor.xor_sparse(old, old, np.array([0]), np.array([-1]), XOR_DENSE_WORDS)
    with pytest.raises(IndexError):
        pagexor.changed_rows(old, old, np.array([0, 1, 2, 4]))
    with pytest.raises(ValueError):
        pagexor.changed_rows(old, old[:2])  # fewer old rows than new ones
    with pytest.raises(ValueError):
        pagexor.xor_sparse(b"\0" * 100, old, np.array([0]), np.array([0]), XOR_DENSE_WORDS)
    with pytest.raises(ValueError):  # 2 pages' bytes, but rows of half a page
        pagexor.changed_rows(old.reshape(-1, PAGE_WORDS // 2), old)
    with pytest.raises(TypeError):  # int32 indices are not read as int64
        pagexor.xor_sparse(old, old, np.array([0, 1], dtype=np.int32), np.array([0, 1]),
                           XOR_DENSE_WORDS)
