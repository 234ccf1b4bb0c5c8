"""Dump directories of agents that died are reclaimed by the next agent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from remus.agents import clean_stale_dump_roots
from remus.checkpoint.criu import VMFLAGS_DIR, remove_dump_dir


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
