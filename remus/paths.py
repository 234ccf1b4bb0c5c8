"""Where remus finds its tools and keeps its runtime files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_DIR = Path(os.environ.get("REMUS_RUN_DIR", "/run/remus"))


def criu_binary() -> str | None:
    """The CRIU binary remus uses: $REMUS_CRIU, the project-local build, or PATH."""
    env = os.environ.get("REMUS_CRIU")
    if env:
        return env
    local = REPO / ".cache" / "criu" / "bin" / "criu"
    if local.exists():
        return str(local)
    return shutil.which("criu")
