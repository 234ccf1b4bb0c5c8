"""Pages encoded while the unit is still frozen.

CRIU writes a process's pages and pagemap part-way through a dump, then its
cores, threads, the parasite's cure, the namespaces and the rest (about 2 ms
more for a small unit, with the unit frozen and a core idle). The sender
encodes each pagemap as soon as CRIU closes it (DeltaEncoder.pre_encode), so
after post-dump only the small files are left: the checkpoint reaches the
backup, and the epoch's output the client, about 2 ms sooner.

A closed pagemap is complete: CRIU closes a task's pages file, then its
pagemap (close_page_xfer), and writes neither again in that dump. inotify's
IN_CLOSE_WRITE on the dump directory says when. Nothing is sent before
post-dump: a dump that fails later leaves only chunks in memory to drop.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path

from remus.checkpoint import images
from remus.checkpoint.inotify import IN_CLOSE_WRITE, IN_DONT_FOLLOW, IN_ONLYDIR, Inotify

log = logging.getLogger(__name__)


class Prelude:
    """One dump's early encoding: what the epoch loop hands the sender before the
    dump starts. ``finish`` says how the dump ended."""

    def __init__(self, dump_dir: Path, wd: int) -> None:
        self.dir = dump_dir
        self.wd = wd
        self.done = False  # post-dump handed the dump over, or the dump failed
        self.handed = False


class EarlyPages:
    """The inotify instance and wake-up of the early encoding (one per primary).

    Threads: watch() and finish() from the epoch loop, run() from the sender.
    """

    def __init__(self) -> None:
        self._ino = Inotify()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()

    def watch(self, dump_dir: Path) -> Prelude | None:
        """Watch ``dump_dir`` (created, empty) for the pagemaps CRIU closes."""
        try:
            wd = self._ino.add(dump_dir, IN_CLOSE_WRITE | IN_ONLYDIR | IN_DONT_FOLLOW)
        except Exception as e:  # no early encoding; the dump goes on
            log.debug("cannot watch %s: %s", dump_dir, e)
            return None
        return Prelude(dump_dir, wd)

    def finish(self, prelude: Prelude, handed: bool) -> None:
        """The dump was handed to the sender (True) or failed (False)."""
        with self._lock:
            if prelude.done:
                return
            prelude.handed, prelude.done = handed, True
        os.eventfd_write(self._wake, 1)

    def run(self, prelude: Prelude, encode: Callable[[Path, str], object],
            stop: threading.Event) -> None:
        """Call ``encode(dump_dir, pagemap_name)`` for each pagemap CRIU closes,
        until finish() (or ``stop``)."""
        poller = select.poll()
        poller.register(self._ino.fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        try:
            while not prelude.done and not stop.is_set():
                poller.poll(1000)
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                for wd, mask, _cookie, name in self._ino.events():
                    # Events of earlier dumps' watches are left over; skip them.
                    if (wd == prelude.wd and mask & IN_CLOSE_WRITE and not prelude.done
                            and images.is_pagemap(name)):
                        encode(prelude.dir, name)
        finally:
            self._ino.remove(prelude.wd)

    def close(self) -> None:
        self._ino.close()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
