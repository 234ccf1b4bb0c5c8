"""Which pages did the unit write since the last checkpoint?

Three ways, chosen per primary with ``--dirty-tracking``:

- ``soft-dirty``: CRIU memory tracking (``track_mem`` plus the previous
  dump as ``parent_img``). The kernel's soft-dirty bits say which pages were
  written; CRIU copies only those while the unit is frozen and records the
  rest as PE_PARENT holes. The freeze and the agent's work are proportional
  to the pages dirtied, not to the unit's size. Needs CONFIG_MEM_SOFT_DIRTY
  (Debian's stock kernels have it).
- ``uffd-wp``: the same CRIU memory tracking, but "written" comes from
  userfaultfd write-protection in async mode and PAGEMAP_SCAN (Linux >= 6.7,
  no soft-dirty needed) through remus's CRIU patch and tracker
  (remus.checkpoint.uffd).
- ``diff``: every dump is full and the encoder compares it page by page with
  the previous one. Works on any kernel; the freeze grows with the unit.

``auto`` (the default) picks soft-dirty, then uffd-wp, then diff.

`DumpChain` decides the parent of each dump. A parent is only valid if it
is the dump the encoder will diff against (the delta base), so any dump
that fails, or is dumped but never sent, breaks the chain: the next dump
is taken without a parent (CRIU copies everything once and starts
tracking afresh).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from remus.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "soft-dirty", "uffd-wp", "diff")
#: the one default (the CLI, the agents and PrimaryConfig use it)
DEFAULT_MODE = "auto"
#: what a primary ends up using (MODES without auto)
TRACKERS = ("soft-dirty", "uffd-wp", "diff")

#: CRIU's error when the kernel cannot track memory (criu/config.c)
CRIU_NO_TRACKING = "Tracking memory is not available"


def kernel_soft_dirty() -> bool:
    """Write a fresh page after clearing soft-dirty bits; is bit 55 set again?"""
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, page, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf[0] = 1
        cell = ctypes.c_char.from_buffer(buf)
        addr = ctypes.addressof(cell)
        del cell  # release the buffer export so the mmap can close
        Path("/proc/self/clear_refs").write_text("4")
        buf[0] = 2
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(addr // page * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
        return bool(entry >> 55 & 1)
    finally:
        buf.close()


def uffd_wp_problem(criu: str | None = None) -> str | None:
    """None when uffd-wp tracking works here (kernel and CRIU); else why not."""
    from remus.checkpoint import uffd, uffd_kernel
    from remus.paths import criu_binary

    why = uffd_kernel.kernel_uffd_wp()
    if why is not None:
        return why
    binary = criu or criu_binary()
    if not uffd.criu_supports(binary):
        return f"CRIU at {binary} lacks remus's uffd-wp patch (run bin/setup)"
    return None


@dataclass(frozen=True)
class Probes:
    """The host facts `resolve` needs; tests pass their own."""

    soft_dirty: Callable[[], bool] = kernel_soft_dirty
    uffd_wp: Callable[[], str | None] = uffd_wp_problem


def resolve(mode: str, probes: Probes | None = None) -> str:
    """The tracker a primary uses for ``--dirty-tracking mode`` (one of TRACKERS).

    ConfigError for an unknown mode, or for a mode this host cannot do.
    """
    if mode not in MODES:
        raise ConfigError(f"--dirty-tracking must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "diff":
        return "diff"
    p = probes or Probes()
    if mode in ("auto", "soft-dirty"):
        try:
            have = p.soft_dirty()
        except OSError as e:
            log.warning("soft-dirty probe failed (%s)", e)
            have = False
        if have:
            return "soft-dirty"
        if mode == "soft-dirty":
            raise ConfigError("--dirty-tracking soft-dirty: this kernel has no soft-dirty bits "
                              "(CONFIG_MEM_SOFT_DIRTY); use --dirty-tracking uffd-wp, diff or auto")
    why = p.uffd_wp()
    if why is None:
        return "uffd-wp"
    if mode == "uffd-wp":
        raise ConfigError(f"--dirty-tracking uffd-wp is not available here: {why}; "
                          "use --dirty-tracking diff or auto")
    log.info("no soft-dirty, and uffd-wp tracking unavailable (%s): using page diff", why)
    return "diff"


class DumpChain:
    """The parent of the next tracked dump (thread-safe).

    Contract: the epoch loop calls `parent(need_full)` before a dump, then
    `dumped(dir)` after a successful one or `failed(error_text)` after a
    failed one. The sender calls `broken()` when a dump will not become the
    delta base (not sent, encoder reset). With tracking off (mode "diff"),
    `parent` is always None and `track` False.
    """

    def __init__(self, mode: str) -> None:
        if mode not in TRACKERS:
            raise ValueError(f"unknown tracker {mode!r}")
        self.mode = mode
        self._lock = threading.Lock()
        self._last: Path | None = None
        self._broken = False

    def parent(self, need_full: bool) -> Path | None:
        with self._lock:
            if not self.track or need_full or self._broken or self._last is None:
                self._broken = False  # this dump (no parent) restarts the chain
                return None
            return self._last

    def dumped(self, d: Path) -> None:
        with self._lock:
            self._last = d if self.track else None

    def failed(self, error: str) -> None:
        with self._lock:
            self._last = None
            if self.track and CRIU_NO_TRACKING in error:
                log.warning("CRIU cannot track memory on this kernel: falling back to page diff")
                self.mode = "diff"

    @property
    def track(self) -> bool:
        """Dumps use CRIU memory tracking (with a parent), i.e. not the page diff."""
        return self.mode != "diff"

    def broken(self) -> None:
        with self._lock:
            self._broken = True
