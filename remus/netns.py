"""Network namespaces: where named ones live, which one a process is in, and the
id this namespace gives another.

The id (RTM_GETNSID over raw rtnetlink) is what `ip -j link` reports as a
veth's link_netnsid: it tells which namespace the other end of a veth is in.
"""

from __future__ import annotations

import os
import socket
import struct

from remus.errors import ConfigError, HostError

NETNS_DIR = "/run/netns"  # where `ip netns add NAME` mounts the namespace


def netns_path(netns_name: str) -> str:
    """The file of the namespace `ip netns add netns_name` makes (CRIU's --net target)."""
    return f"{NETNS_DIR}/{netns_name}"


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
