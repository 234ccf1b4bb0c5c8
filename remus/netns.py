"""Network namespaces: where named ones live (and whether one is there), which
one a process is in, the id this namespace gives another, and running a
function inside one (in_netns).

The id (RTM_GETNSID over raw rtnetlink) is what `ip -j link` reports as a
veth's link_netnsid: it tells which namespace the other end of a veth is in.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from remus.errors import ConfigError, HostError

T = TypeVar("T")

NETNS_DIR = "/run/netns"  # where `ip netns add NAME` mounts the namespace
CLONE_NEWNET = 0x40000000


def netns_path(netns_name: str) -> str:
    """The file of the namespace `ip netns add netns_name` makes (CRIU's --net target)."""
    return f"{NETNS_DIR}/{netns_name}"


def netns_exists(netns_name: str) -> bool:
    """Whether the named namespace `netns_name` is there (its file in NETNS_DIR)."""
    return os.path.exists(netns_path(netns_name))


def netns_of(pid: int) -> str:
    """Which network namespace pid is in ("net:[inode]"); ConfigError if we cannot tell."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except FileNotFoundError as e:
        raise ConfigError(f"no process with pid {pid}") from e
    except PermissionError as e:
        raise ConfigError(f"cannot inspect pid {pid}: {e.strerror} (run as root)") from e


def netns_id(path: str) -> int:
    """The id this namespace gives the namespace at `path` (-1: none assigned).

    RTM_GETNSID by fd; pyroute2 0.9 has no synchronous call for it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        body = struct.pack("=B3xHHI", 0, 8, 3, fd)  # rtgenmsg + NETNSA_FD
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sk:
            sk.send(struct.pack("=IHHII", 16 + len(body), 90, 1, 1, 0) + body)
            data = sk.recv(4096)
    finally:
        os.close(fd)
    length, typ = struct.unpack_from("=IH", data)
    if typ == 2:  # NLMSG_ERROR
        raise HostError(f"RTM_GETNSID: {os.strerror(-struct.unpack_from('=i', data, 16)[0])}")
    off = 20
    while off + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, off)
        if atype == 1:  # NETNSA_NSID
            return int(struct.unpack_from("=i", data, off + 4)[0])
        off += max(4, (alen + 3) & ~3)
    return -1


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run fn with the calling thread's network namespace set to `netns`.

    setns() changes only one thread, so fn runs in a throw-away thread; what
    it creates there (a netlink socket, an open /proc/net file) stays bound to
    that namespace after the thread ends. netns None: run fn here."""
    if netns is None:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise HostError(f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    t = threading.Thread(target=run, name="netns-call")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
