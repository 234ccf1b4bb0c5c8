"""A state directory as the backup must reproduce it, to compare two trees
(tests/unit/test_disk.py, tests/integration/test_disk.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from remus.checkpoint.disk_blocks import data_extents


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything the backup must reproduce, per relative path."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in [None, *dirs, *files]:
            if name is None and dirpath != str(root):
                continue
            p = dirpath if name is None else os.path.join(dirpath, name)
            st = os.lstat(p)
            content: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = (f.read(), tuple(data_extents(f.fileno(), st.st_size)))
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             st.st_uid, st.st_gid, st.st_mtime_ns, content)
    return out
