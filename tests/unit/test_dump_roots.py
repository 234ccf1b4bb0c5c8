"""Dump directories of agents that died are reclaimed by the next agent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from remus.agents import clean_stale_dump_roots
from remus.checkpoint.criu import VMFLAGS_DIR, PagesSpare, remove_dump_dir


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_dumps_of_gone_agents_are_removed(tmp_path: Path) -> None:
    gone = tmp_path / f"remus-kv-{dead_pid()}"
    (gone / "e12" / "parent-images").mkdir(parents=True)
    (gone / "e12" / "pages-1.img").write_bytes(b"x" * 4096)
    other = tmp_path / f"remus-bare-{dead_pid()}-0"  # a benchmark's, not an agent's
    other.mkdir()
    (other / "dump.log").write_text("")
    unrelated = tmp_path / "something-else"
    unrelated.mkdir()
    assert clean_stale_dump_roots(tmp_path) == [gone]
    assert not gone.exists() and other.exists() and unrelated.exists()


def test_a_dead_agents_vmflags_cache_does_not_keep_its_dumps(tmp_path: Path) -> None:
    gone = tmp_path / f"remus-kv-{dead_pid()}"
    (gone / "e3").mkdir(parents=True)
    (gone / VMFLAGS_DIR).mkdir()
    (gone / VMFLAGS_DIR / "4242").write_text("remus-vmflags 1 0 0\n")
    assert clean_stale_dump_roots(tmp_path) == [gone]


def test_remove_dump_dir(tmp_path: Path) -> None:
    d = tmp_path / "e7"
    d.mkdir()
    for i in range(50):
        (d / f"tcp-stream-{i}.img").write_bytes(b"x")
    (d / "parent").symlink_to(tmp_path / "e6")  # dangling, as after the parent went
    (d / "odd").mkdir()
    (d / "odd" / "f").write_text("")
    keep = tmp_path / "e6-target"
    keep.mkdir()
    (d / "link-to-dir").symlink_to(keep)
    remove_dump_dir(d)
    assert not d.exists() and keep.exists()  # a link is removed, not followed
    remove_dump_dir(d)  # already gone: nothing to do


def _dump_dir(d: Path, pages: dict[str, int]) -> None:
    d.mkdir()
    for name, size in pages.items():
        (d / name).write_bytes(b"p" * size)
    (d / "pagemap-1.img").write_bytes(b"m")
    (d / "core-1.img").write_bytes(b"c")


def test_pages_files_are_kept_for_later_dumps(tmp_path: Path) -> None:
    # CRIU patch 0011: a reaped dump's pages files wait in the spare directory
    # for CRIU to write a new dump's pages into; nothing else of the dump stays.
    spare = tmp_path / "spare"
    spare.mkdir()
    _dump_dir(tmp_path / "e5", {"pages-1.img": 8192, "pages-2.img": 4096})
    remove_dump_dir(tmp_path / "e5", spare=spare)
    assert not (tmp_path / "e5").exists()
    assert sorted(p.name for p in spare.iterdir()) == ["e5-pages-1.img", "e5-pages-2.img"]
    assert (spare / "e5-pages-1.img").stat().st_size == 8192


def test_spare_pages_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PagesSpare, "MAX_FILES", 3)
    monkeypatch.setattr(PagesSpare, "MAX_BYTES", 3 * 4096)
    spare = tmp_path / "spare"
    spare.mkdir()
    # too big: deleted, not kept
    _dump_dir(tmp_path / "e1", {"pages-1.img": 4 * 4096, "pages-2.img": 4096})
    remove_dump_dir(tmp_path / "e1", spare=spare)
    assert sorted(p.name for p in spare.iterdir()) == ["e1-pages-2.img"]
    # at most MAX_FILES wait; the rest are deleted with their dump
    _dump_dir(tmp_path / "e2", {f"pages-{i}.img": 4096 for i in range(1, 5)})
    remove_dump_dir(tmp_path / "e2", spare=spare)
    assert len(list(spare.iterdir())) == 3 and not (tmp_path / "e2").exists()
    # a spare directory that is gone (the agent stopping) loses nothing but the files
    _dump_dir(tmp_path / "e3", {"pages-1.img": 4096})
    remove_dump_dir(tmp_path / "e3", spare=tmp_path / "gone")
    assert not (tmp_path / "e3").exists()
