"""The host tools the lab drives and what it reads back: `ip` batches and link
tables, mount points, namespace bind mounts, deleting a named netns, and
finding a tool (which)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remus.errors import HostError
from remus.netns import netns_exists, netns_path
from remus.proc import run_cmd


def which(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise HostError(f"the lab needs `{tool}` (util-linux/iproute2/procps)")
    return path


def ip_batch(netns: str, lines: Sequence[str], check: bool = True) -> None:
    """Several `ip` commands in one netns; check=False is best effort."""
    argv, script = ["ip", "-n", netns, "-batch", "-"], "\n".join(lines) + "\n"
    if check or netns_exists(netns):
        run_cmd(argv, stdin=script, check=check)


def links(netns: str) -> dict[str, dict[str, Any]]:
    """Links of a namespace by name ({} if the namespace is missing)."""
    if not netns_exists(netns):
        return {}
    res = run_cmd(["ip", "-n", netns, "-j", "link", "show"], check=False)
    if res.returncode != 0:
        return {}
    return {link["ifname"]: link for link in json.loads(res.stdout or "[]")}


def link_up(link: dict[str, Any] | None) -> bool:
    return link is not None and "UP" in link.get("flags", [])


def mountpoints() -> list[str]:
    """Mount points of the caller's mount namespace (octal escapes decoded)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    unescape = functools.partial(re.sub, r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)))
    return [unescape(line.split()[4]) for line in lines]


def umount(path: str) -> None:
    res = run_cmd(["umount", "-l", path], check=False)
    if res.returncode != 0 and os.path.ismount(path):
        raise HostError(f"umount {path}: {res.stderr.strip()}")


def is_ns_mounted(path: Path) -> bool:
    """A namespace file bind mount shows nsfs's device, not its directory's."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False


def delete_netns(name: str) -> None:
    res = run_cmd(["ip", "netns", "del", name], check=False)
    path = Path(netns_path(name))
    if path.exists():  # e.g. the file exists but is not a mount any more
        if os.path.ismount(path):
            umount(str(path))
        with contextlib.suppress(OSError):
            path.unlink()
    if path.exists():
        raise HostError(f"cannot delete netns {name}: {res.stderr.strip()}")
