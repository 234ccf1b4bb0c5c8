"""Where remus finds its tools and keeps its runtime files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_DIR = Path(os.environ.get("REMUS_RUN_DIR", "/run/remus"))


def criu_binary() -> str | None:
    """The CRIU binary remus uses (criu_source says which and why)."""
    return criu_source()[0]


def criu_source() -> tuple[str | None, str]:
    """(path, why): `--criu` or $REMUS_CRIU, `criu` in the configuration file,
    this checkout's build (bin/setup), or `criu` on PATH, in that order."""
    env = os.environ.get("REMUS_CRIU")
    if env:
        return env, os.environ.get("REMUS_CRIU_FROM", "$REMUS_CRIU")
    local = REPO / ".cache" / "criu" / "bin" / "criu"
    if local.exists():
        return str(local), "this checkout's build (bin/setup)"
    found = shutil.which("criu")
    if found:
        return found, "PATH"
    return None, ("not found: give --criu PATH, REMUS_CRIU, `criu = PATH` in [common] of "
                  "the configuration file, or put CRIU >= 4.2 on PATH")
