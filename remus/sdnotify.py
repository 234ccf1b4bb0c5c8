"""systemd's readiness protocol (sd_notify), without libsystemd.

Under a unit with Type=notify, systemd passes NOTIFY_SOCKET; the agents send
READY=1 when they are what the unit promises (the primary: its first
checkpoint acknowledged, the unit protected; the backup: listening), STATUS=
lines as their state changes, and STOPPING=1. Outside systemd it does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=protected") to systemd; False if not
    under systemd or the send failed (never raises: readiness is advisory)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError as e:
        log.debug("sd_notify %s failed: %s", lines, e)
        return False
