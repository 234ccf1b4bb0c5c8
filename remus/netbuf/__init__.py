"""Output buffer: the unit's network output leaves only after its epoch is acked.

make_buffer() picks a backend; see base.OutputBuffer for the contract.
"""

from __future__ import annotations

import logging
from typing import Any

from remus.errors import ConfigError
from remus.netbuf.base import NullBuffer, OutputBuffer
from remus.netbuf.nfqueue import NfqueueBuffer
from remus.netbuf.plug import PlugBuffer, plug_available

log = logging.getLogger(__name__)

KINDS = ("auto", "nfqueue", "plug", "none")


def make_buffer(kind: str, host_veth: str, **limits: Any) -> OutputBuffer:
    """An output buffer of `kind` for the unit behind `host_veth` (not started).

    kind: nfqueue | plug | none | auto. auto = nfqueue: it is the backend the
    integration tests exercise on a real kernel; plug (sch_plug) has only been
    tested for its command sequence, so it is used only when asked for by name
    (see docs/netbuf.md). limits: max_packets,
    max_bytes, netns (host namespace path if not the caller's), and backend
    options (nfqueue: queue, rcvbuf, local)."""
    if kind == "auto":
        kind = "nfqueue"
        log.info("output buffer backend: %s (sch_plug %s; use --netbuf plug to choose it)",
                 kind, "available" if plug_available() else "absent")
    if kind == "nfqueue":
        return NfqueueBuffer(host_veth, **limits)
    if kind == "plug":
        return PlugBuffer(host_veth, **limits)
    if kind == "none":
        return NullBuffer()
    raise ConfigError(f"unknown output buffer kind {kind!r} (one of {', '.join(KINDS)})")


__all__ = ["KINDS", "NfqueueBuffer", "NullBuffer", "OutputBuffer", "PlugBuffer", "make_buffer"]
