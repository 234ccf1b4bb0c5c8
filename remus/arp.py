"""Gratuitous ARP: claim an IPv4 address for a MAC on the LAN after a takeover.

One frame format (an ARP request for the address itself: every Linux
neighbour table takes it), sent from a device of this host with the device's
MAC (gratuitous_arp) or from inside the unit's namespace with the unit's MAC
(announce_inside, for a unit whose veth is a bridge port).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

from remus.errors import HostError
from remus.netns import in_netns


def garp_frame(mac: str, addr: str) -> bytes:
    """A gratuitous ARP request, broadcast: `addr` is at `mac` ("02:52:...")."""
    hw, ip = bytes.fromhex(mac.replace(":", "")), socket.inet_aton(addr)
    return (b"\xff" * 6 + hw + struct.pack("!H", 0x0806)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\x00" * 6 + ip)


def gratuitous_arp(dev: str, addr: str, count: int = 3) -> None:
    """Announce that `addr` now lives at `dev`'s MAC (ARP request form)."""
    frame = garp_frame(Path(f"/sys/class/net/{dev}/address").read_text().strip(), addr)
    sk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sk.bind((dev, 0))
        sk.send(frame)
    except BaseException:
        sk.close()
        raise
    # The repeats (for a lost first frame) must not delay the takeover.
    threading.Thread(target=_repeat_frame, args=(sk, frame, count - 1, 0.005), daemon=True).start()


def _repeat_frame(sk: socket.socket, frame: bytes, count: int, spacing: float) -> None:
    with sk:
        for _ in range(count):
            time.sleep(spacing)
            try:
                sk.send(frame)
            except OSError:
                return


def announce_inside(netns_path: str, dev: str, mac: str, addr: str, count: int = 3) -> None:
    """Announce `addr` at `mac` from `dev` inside the namespace at netns_path.

    The packet socket belongs to the namespace it was made in, so it is made
    (and used) in a thread of our own that joined the unit's namespace."""

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sk:
            sk.bind((dev, 0))
            for i in range(count):
                sk.send(garp_frame(mac, addr))
                if i + 1 < count:
                    time.sleep(0.005)

    try:
        in_netns(netns_path, send)
    except (OSError, HostError) as e:
        raise HostError(f"announcing {addr} from {dev} in {netns_path}: {e}") from e
