"""Dump directories of agents that died are reclaimed by the next agent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from remus.agents import clean_stale_dump_roots


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
